"""Replayed forward passes that flip single routed experts between digital and analog (the engine of
``sensitivity``).

A ``_Bank`` holds one MoE layer's experts clean and programmed under one noise seed (each expert with the seed
``analog()`` gives it when it is the only analog expert of its layer). ``_Engine.base_pass`` runs the model once
(digital, or every expert analog) and keeps what each layer saw; ``_Engine.replay_pass`` replays everything below
MoE layer d and d's attention from it and runs R row blocks from d up, block r holding expert e_r of d in its
other state — appended to the fused expert tensors (``_LayerForward``), with only its own rows recomputed
(``_CachedFlip``). Experts compute through the fast backend's ``_FastExperts`` forward, so every position has the
arithmetic ``analog()`` gives it.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

from . import moe_dispatch
from .fast_backend import _FastExperts
from .noise import NoiseConfig
from .tiles import _channel_absmax, _derive_seed, _w_in, program_weights, split_sizes


# ------------------------------------------------------------------------------------------ expert banks

class _Bank:
    """The routed experts of one MoE layer under one noise seed: clean and programmed (noisy) fused tensors.

    ``clean[key]`` / ``noisy[key]``: ``[E, ...]`` in the parameter's storage layout and dtype (key "in" =
    gate_up/up, "down"); noisy weights are stored as the fast backend stores them (pre-divided by the tile scale x
    ADC step when converters act), ``g_out[key]`` ``[T, E, O]`` maps ADC codes back. Expert e is programmed
    with the seed ``analog()`` uses when e is the only analog expert of the layer.
    """

    def __init__(self, m, noise: NoiseConfig, seed: int, nm, check=None):
        """``check()``, when given, runs before each expert is programmed (it raises to stop, e.g. on cancel)."""
        self.m, self.noise, self.seed = m, noise, seed
        dev = m.experts.down_proj.device
        probe = _FastExperts(m, noise, [], torch.Generator(device=dev), None)  # converter grids, fold factors
        self.io_out = probe.io_out
        self.in_sizes, self.g_out, self.clean, self.noisy = {}, {}, {}, {}
        ts = noise.tile_size
        for key, p in (("in", _w_in(m)), ("down", m.experts.down_proj)):
            logical = p.data.transpose(1, 2) if m.transposed else p.data   # [E, O, I]
            O, I = logical.shape[1:]
            sizes = self.in_sizes[key] = split_sizes(I, ts)
            self.clean[key] = p.data
            if nm is None and not probe.io_out:
                self.noisy[key] = p.data
                continue
            g_out = torch.ones(len(sizes), m.num_experts, O, dtype=torch.float32, device=dev)
            noisy = torch.empty_like(p.data)
            fold = probe.fold(key)
            for e in range(m.num_experts):   # one noise stream per expert (see module docstring)
                if check is not None:
                    check()
                if nm is not None:
                    w, sc = program_weights(logical[[e]], noise, nm, sizes, split_sizes(O, ts),
                                            _derive_seed(seed, f"{m.experts_name}.{key}:{e}-{e}"), dev)
                else:
                    w, sc = logical[[e]].float(), _channel_absmax(logical[[e]], sizes)
                if probe.io_out:
                    w = w * torch.repeat_interleave(fold / sc, torch.tensor(sizes, device=dev), dim=-1)
                    g_out[:, [e]] = (sc * probe.s_out(key)).permute(2, 0, 1)
                noisy[e] = (w.transpose(1, 2) if m.transposed else w)[0].to(p.dtype)
            self.noisy[key] = noisy
            if probe.io_out:
                self.g_out[key] = g_out

    def bias(self, name: str, ids) -> torch.Tensor | None:
        b = getattr(self.m.experts, name, None)
        return None if b is None else b.data[ids]


class _ExpertsView:
    """The real experts module with other fused weight tensors (its activation, gate and flags are kept)."""

    def __init__(self, mod, m, w_in, w_down, biases: dict):
        self.__dict__["_mod"] = mod
        self.__dict__.update({("gate_up_proj" if m.gated else "up_proj"): w_in, "down_proj": w_down, **biases})

    def __getattr__(self, name):
        return getattr(self.__dict__["_mod"], name)


class _LayerForward:
    """Experts forward of one MoE layer over ``experts`` = base experts [E] plus ``flip`` extra copies.

    ``base`` "clean" or "noisy" gives the state of experts 0..E-1; with ``flip = [e_1..e_R]`` the hidden states
    are R row blocks and block r sends its tokens of expert e_r to appended expert E + r, which holds e_r in the
    other state. Computes exactly as ``analog()``'s fast backend (``_FastExperts``) for the same analog set.
    """

    def __init__(self, bank: _Bank, base: str, flip=(), gen_seed: int = 0):
        m, E = bank.m, bank.m.num_experts
        other = "noisy" if base == "clean" else "clean"
        self.flip, self.E = list(flip), E
        ids = list(range(E)) + self.flip
        src = [base] * E + [other] * len(self.flip)
        w = {}
        for key in ("in", "down"):
            if self.flip:
                w[key] = torch.cat([getattr(bank, base)[key], getattr(bank, other)[key][self.flip]])
            else:
                w[key] = getattr(bank, base)[key]
        self.w = w
        self.biases = {}
        if m.has_bias:
            for name in (("gate_up_proj_bias" if m.gated else "up_proj_bias"), "down_proj_bias"):
                self.biases[name] = bank.bias(name, ids)
        analog_ids = [i for i, s in enumerate(src) if s == "noisy"]
        dev = bank.clean["down"].device
        proxy = SimpleNamespace(num_experts=len(ids), experts=SimpleNamespace(down_proj=w["down"]), index=m.index,
                                transposed=m.transposed)
        gen = torch.Generator(device=dev).manual_seed(_derive_seed(gen_seed, m.experts_name + ":out"))
        self.st = _FastExperts(proxy, bank.noise, analog_ids, gen, None)
        self.st.in_sizes = dict(bank.in_sizes)
        if bank.io_out:
            self.st.g_out = {k: g[:, ids] for k, g in bank.g_out.items()}
        self.m = m

    def forward(self, mod, hidden_states, top_k_index, top_k_weights):
        idx = top_k_index
        if self.flip:
            R = len(self.flip)
            idx = top_k_index.clone()
            n = idx.shape[0] // R
            for r, e in enumerate(self.flip):
                blk = idx[r * n:(r + 1) * n]
                blk[blk == e] = self.E + r
        view = _ExpertsView(mod, self.m, self.w["in"], self.w["down"], self.biases)
        return self.st.forward(view, hidden_states, idx, top_k_weights)


class _CachedFlip:
    """Experts forward of MoE layer d for R row blocks that recomputes only the flipped expert's rows.

    ``rows`` ``[N*K, H]`` float32: every (token, choice) row of the base state, weighted by its routing weight, as
    the fast backend computes it for a placement that differs from the base in one expert (the mixed-placement
    arithmetic). Block r copies them, recomputes the rows of expert e_r in its other state through the same
    forward (one row per choice), and sums each token's K rows in the same order as ``_FastExperts.forward``.
    Row-wise identical to ``_LayerForward`` with the same flips (float32 models; test_sensitivity)."""

    def __init__(self, bank: _Bank, base: str, flip, rows: torch.Tensor, gen_seed: int = 0):
        self.lf = _LayerForward(bank, base, flip, gen_seed)
        self.rows, self.flip, self.E = rows, list(flip), bank.m.num_experts

    @staticmethod
    def base_rows(bank: _Bank, base: str, inputs, gen_seed: int = 0) -> torch.Tensor:
        """The base state's weighted rows ``[N*K, H]`` for the captured experts inputs (hidden, top-k ids,
        top-k weights); a base of all-noisy experts runs the mixed arithmetic (one clean copy appended)."""
        x, idx, w = inputs
        K = idx.shape[-1]
        lf = _LayerForward(bank, base, [0] if base == "noisy" else [], gen_seed)
        view = _ExpertsView(bank.m.experts, bank.m, lf.w["in"], lf.w["down"], lf.biases)
        return lf.st.forward(view, x.repeat_interleave(K, 0), idx.reshape(-1, 1), w.reshape(-1, 1))

    def forward(self, mod, hidden_states, top_k_index, top_k_weights):
        R, K = len(self.flip), top_k_index.shape[-1]
        N, H = hidden_states.shape[0] // R, hidden_states.shape[1]
        view = _ExpertsView(mod, self.lf.m, self.lf.w["in"], self.lf.w["down"], self.lf.biases)
        out = []
        for r, e in enumerate(self.flip):
            sel = (top_k_index[r * N:(r + 1) * N].reshape(-1) == e).nonzero().squeeze(1)
            y = self.rows.clone()
            if sel.numel():
                x = hidden_states[r * N + sel // K]
                ids = torch.full((sel.numel(), 1), self.E + r, dtype=top_k_index.dtype, device=x.device)
                wr = top_k_weights[r * N:(r + 1) * N].reshape(-1)[sel].unsqueeze(1)
                y[sel] = self.lf.st.forward(view, x, ids, wr).to(y.dtype)
            out.append(y.view(N, K, H).sum(1))
        return torch.cat(out).to(hidden_states.dtype)


@contextmanager
def _dispatch(anatomy):
    """Route every experts forward through hetmoe's dispatcher (``moe_dispatch.install``, as ``analog()`` does);
    a layer runs the state ``_Engine`` gives it, else the implementation it had before."""
    with ExitStack() as stack:
        moe_dispatch.install(stack, anatomy)
        yield


class _Replay(nn.Module):
    """Stands in for a decoder layer (or its attention) and returns a stored output."""

    def __init__(self, out, attention: bool = False):
        super().__init__()
        self.out, self.attention = out, attention

    def forward(self, *args, **kwargs):
        return (self.out, None) if self.attention else self.out


# ------------------------------------------------------------------------------------------ the engine

def _decoder(model):
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    if not hasattr(base, "layers"):
        raise ValueError(f"{type(model).__name__} keeps no decoder `layers` list; sensitivity cannot replay it")
    return base


def _logits(model, h: torch.Tensor) -> torch.Tensor:
    """LM-head logits of final hidden states ``[M, H]`` -> float32 ``[M, V]`` (Granite's logits scaling and
    Gemma-style final soft-capping applied as the model's own forward does)."""
    z = model.get_output_embeddings()(h).float()
    cfg = model.config
    if getattr(cfg, "logits_scaling", None):
        z = z / cfg.logits_scaling
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        z = torch.tanh(z / cap) * cap
    return z


def token_nll(model, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token NLL (nats) of every position: final hidden states ``[B, T, H]``, token ids ``[B, T]`` ->
    float32 ``[B, T-1]`` (position t predicts token t+1)."""
    B, T, H = h.shape
    z = _logits(model, h[:, :-1].reshape(-1, H))
    return nn.functional.cross_entropy(z, ids[:, 1:].reshape(-1), reduction="none").view(B, T - 1)


class _Engine:
    """Measurement state of one model: base passes, batched flips, NLL bookkeeping (see module docstring)."""

    def __init__(self, lm, ids: torch.Tensor, batch: int, check: Callable[[], None]):
        self.lm, self.model, self.anatomy = lm, lm.model, lm.anatomy
        self.dec = _decoder(lm.model)
        self.dev = next(lm.model.parameters()).device
        self.chunks = [ids[i:i + batch].to(self.dev) for i in range(0, ids.shape[0], batch)]
        self.positions = ids.shape[0] * (ids.shape[1] - 1)
        self.check = check
        # cached base rows need float32 experts (a per-row cast would round before the K-sum)
        self.cached_rows = all(m.experts.down_proj.dtype == torch.float32 for m in lm.anatomy.moe_layers)

    def flip_state(self, bank: _Bank, base: str, flip, keep: dict, seed: int):
        """The layer state measuring ``flip`` against ``base`` ("clean"/"noisy"): cached rows when possible."""
        if not self.cached_rows:
            return _LayerForward(bank, base, flip, gen_seed=seed)
        rows = keep.setdefault("rows", {})
        if bank.m.index not in rows:
            rows[bank.m.index] = _CachedFlip.base_rows(bank, base, keep["experts"][bank.m.index], seed)
        return _CachedFlip(bank, base, flip, rows[bank.m.index], gen_seed=seed)

    def base_pass(self, chunk, states: dict | None, routes: bool = False) -> dict:
        """One forward of ``chunk`` with the given experts states (None: clean); keeps every decoder layer's
        input, every attention output, the final hidden states, the NLL and (optionally) the routers' top-k."""
        self.check()
        keep = {"inp": {}, "attn": {}, "topk": {}, "experts": {}}
        hooks = [m.experts.register_forward_pre_hook(
            lambda mod, a, kw, i=m.index: keep["experts"].__setitem__(i, tuple(
                (a[j] if len(a) > j else kw[n]) for j, n in enumerate(("hidden_states", "top_k_index",
                                                                         "top_k_weights")))), with_kwargs=True)
            for m in self.anatomy.moe_layers] if self.cached_rows else []
        for j, layer in enumerate(self.dec.layers):
            hooks.append(layer.register_forward_pre_hook(
                lambda mod, a, kw, j=j: keep["inp"].__setitem__(j, a[0] if a else kw["hidden_states"]),
                with_kwargs=True))
            if hasattr(layer, "self_attn"):
                hooks.append(layer.self_attn.register_forward_hook(
                    lambda mod, a, out, j=j: keep["attn"].__setitem__(j, out[0])))
        if routes:
            for m in self.anatomy.moe_layers:
                hooks.append(m.router.register_forward_hook(
                    lambda mod, a, out, i=m.index: keep["topk"].__setitem__(i, out[2].detach())))
        self._set_states(states)
        try:
            h = self.dec(input_ids=chunk, use_cache=False).last_hidden_state
        finally:
            for hk in hooks:
                hk.remove()
            self._set_states(None)
        keep["final"] = h
        keep["nll"] = token_nll(self.model, h, chunk)
        return keep

    def _set_states(self, states):
        for m in self.anatomy.moe_layers:
            if states and m.index in states:
                moe_dispatch.set_state(m.experts, states[m.index])
            else:
                m.experts.__dict__.pop("_hetmoe_state", None)   # back to the layer's own implementation

    def replay_pass(self, chunk, base: dict, m, layer_state, states: dict | None, R: int) -> torch.Tensor:
        """Forward of R row blocks of ``chunk`` from MoE layer ``m`` up: lower decoder layers and m's attention
        replayed from ``base``, m's experts through ``layer_state``, higher layers with ``states``.
        Returns the NLL of every position ``[R, B, T-1]`` (positions whose final hidden state equals the base
        pass's keep its NLL; the LM head runs only on the others)."""
        self.check()
        d = m.layer
        layers = self.dec.layers
        saved = [layers[j] for j in range(d)]
        layer = layers[d]
        attn = getattr(layer, "self_attn", None)
        rep = lambda t: t.repeat(R, *([1] * (t.dim() - 1)))  # noqa: E731
        with ExitStack() as stack:
            for j in range(d):
                layers[j] = _Replay(rep(base["inp"][d]) if j == d - 1 else None)
            stack.callback(lambda: [layers.__setitem__(j, saved[j]) for j in range(d)])
            if attn is not None and d in base["attn"]:
                layer.self_attn = _Replay(rep(base["attn"][d]), attention=True)
                stack.callback(lambda: setattr(layer, "self_attn", attn))
            st = dict(states or {})
            st[m.index] = layer_state
            self._set_states(st)
            stack.callback(self._set_states, None)
            ids = rep(chunk)
            if d == 0:   # no replayed layer below: feed the stored input as embeddings
                h = self.dec(inputs_embeds=rep(base["inp"][0]), use_cache=False).last_hidden_state
            else:
                h = self.dec(input_ids=ids, use_cache=False).last_hidden_state
        B, T = chunk.shape
        h = h.view(R, B, T, -1)
        nll = base["nll"].unsqueeze(0).repeat(R, 1, 1)
        changed = (h[:, :, :-1] != base["final"][:, :-1].unsqueeze(0)).any(-1)
        if changed.any():
            z = _logits(self.model, h[:, :, :-1][changed])
            nll[changed] = nn.functional.cross_entropy(z, ids.view(R, B, T)[:, :, 1:][changed], reduction="none")
        return nll


def _sum(nll: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-block sum of NLL differences, float64: ``[R, B, T-1]`` vs ``[B, T-1]`` -> ``[R]``."""
    return (nll.double() - ref.double().unsqueeze(0)).flatten(1).sum(1)
