"""Measured sensitivity of every routed expert (and of the dense modules) to analog noise.

The scores in ``scores.py`` (MaxNNScore, Router Norm) and ``routing.py`` (Activation Frequency / Weight) are
*proxies*; this module *measures* what analog noise costs, as the increase of the mean next-token negative
log-likelihood (NLL, nats) on calibration text, and checks each proxy against the measurement.

Quantities (``measure``), each per noise seed, over the same tokens for every expert (common random numbers):

* ``only_this[l, e]``    NLL(only expert e of MoE layer l analog) − NLL(all digital);
* ``all_but_this[l, e]`` NLL(all routed experts analog) − NLL(all but expert e analog) — the NLL recovered by
  keeping only e digital;
* ``layers[l]``          NLL(every expert of MoE layer l analog, nothing else) − NLL(all digital);
* ``dense[kind]``        NLL(only that dense module kind analog: attention, lm_head, router, shared_experts,
  dense_mlp where the model has it) − NLL(all digital);
* ``all_experts``        NLL(every routed expert analog) − NLL(all digital).

Noise realisation: under seed s, expert e of MoE layer l is programmed exactly as ``analog.analog()`` programs it
when it is the only analog expert of its layer (aihwkit noise model through ``analog.program_weights``, seed
``_derive_seed(s, "<experts>.<proj>:e-e")``), and every quantity above sees that same draw of each expert — so
only-this, all-but-this, whole-layer and all-experts damages are paired over experts as well as over seeds and
tokens. Dense modules are programmed by ``analog()`` itself (one stream per module).

Speed, without approximation (``bench/bench_sensitivity.py`` times it against the naive loop of one full noisy
forward per expert and seed): noise is programmed once per seed for all experts; the clean (or all-analog)
hidden states entering each decoder layer and its attention output are kept from one pass, so a measurement of an
expert of decoder layer d replays them and recomputes only the MoE block of d and the layers above; R experts of
one layer are measured in one forward of R row blocks, block r routing its tokens of expert e_r to a noisy (or,
for all-but-this, clean) copy of that expert appended to the fused expert tensors; the LM head runs only on the
positions whose final hidden state changed (for the last MoE layer: only the tokens routed to the expert).
The arithmetic of each position is the one ``analog()``'s fast backend does (its ``_FastExperts`` forward is
reused), so the batched result equals the one-expert-at-a-time loop (``naive_only_this``; test_sensitivity).
Tile output noise (``out_noise`` > 0) is drawn per forward and cannot be equal between the two orders; the
paper presets have none.

API contract (the Validate page and the example-results script build on it)::

    validate(source_or_lm, preset, *, seeds=5, texts=None, tokens=16384, store=None, progress=None,
             cancel=None) -> Validation

``progress(done, total)`` is called after each unit of work; ``cancel()`` returning True stops the measurement
(``evaluate.Cancelled`` is raised). ``Validation.to_dict()`` is JSON with the keys: model_fingerprint, preset,
noise (full NoiseConfig), seeds, tokens, calibration {source, hash, tokens}, clean_nll,
experts [{layer, expert, only_this, only_this_se, all_but_this, all_but_this_se}], layers [{layer, damage, se}],
dense [{kind, damage, se}], all_experts {damage, se}, correlations [{criterion, scope ("pooled" or MoE layer int),
spearman, spearman_lo, spearman_hi, kendall, kendall_lo, kendall_hi}], best {criterion, margin, margin_lo,
margin_hi, significant}, routing_drift [{layer, changed_share, load_max_over_mean_ideal,
load_max_over_mean_noisy}], cached. Damages are in nats per token; ``*_se`` are standard errors over seeds
(sample std / sqrt(n); None for one seed). ``layer`` is the MoE-layer index (anatomy.moe_layers order).
"""
from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import moe_dispatch
from .analog import analog
from .fast_backend import _FastExperts
from .noise import NoiseConfig, get_preset
from .tiles import _channel_absmax, _derive_seed, _w_in, program_weights, split_sizes

ORACLE_SEEDS, ORACLE_TOKENS = 5, 16384   # the oracle's measurement = validate()'s defaults (shares its cache)
SEQ_LEN = 256          # tokens per calibration sequence (capped by the model's context)
ROWS_PER_FORWARD = 8192  # tokens in one batched forward (R experts x sequences x positions), bounds memory
_VERSION = 1           # bump when a measurement changes meaning (enters the store key)


# ------------------------------------------------------------------------------------------ calibration tokens

def calibration_tokens(tokenizer, texts: dict[str, list[str]], tokens: int, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """The calibration token stream cut into whole sequences: int64 ``[S, T]``, S·T <= tokens.

    Texts are taken round-robin over domains (so a prefix of the stream covers every domain), encoded without
    special tokens and joined by the tokenizer's EOS token (if it has one), then cut into S = tokens // T
    sequences of T = seq_len tokens (no padding). Raises ValueError when tokens < 1 or the text holds fewer than
    T tokens.
    """
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise ValueError(f"tokens must be a whole number >= 1, got {tokens!r}")
    seq_len = min(seq_len, tokens)
    eos = getattr(tokenizer, "eos_token_id", None)
    queues = [list(v) for v in texts.values()]
    stream: list[int] = []
    i = 0
    while len(stream) < tokens and any(i < len(q) for q in queues):
        for q in queues:
            if i < len(q):
                stream += tokenizer(q[i], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        i += 1
    n = min(tokens, len(stream)) // seq_len
    if n < 1:
        raise ValueError(f"calibration text holds {len(stream)} tokens, fewer than one sequence of {seq_len}; "
                         "give more text or fewer --tokens")
    return torch.tensor(stream[:n * seq_len], dtype=torch.long).view(n, seq_len)


# ------------------------------------------------------------------------------------------ expert banks

class _Bank:
    """The routed experts of one MoE layer under one noise seed: clean and programmed (noisy) fused tensors.

    ``clean[key]`` / ``noisy[key]``: ``[E, ...]`` in the parameter's storage layout and dtype (key "in" =
    gate_up/up, "down"); noisy weights are stored as the fast backend stores them (pre-divided by the tile scale x
    ADC step when converters act), ``g_out[key]`` ``[T, E, O]`` maps ADC codes back. Expert e is programmed
    with the seed ``analog()`` uses when e is the only analog expert of the layer.
    """

    def __init__(self, m, noise: NoiseConfig, seed: int, nm):
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

    def base_pass(self, chunk, states: dict | None, routes: bool = False) -> dict:
        """One forward of ``chunk`` with the given experts states (None: clean); keeps every decoder layer's
        input, every attention output, the final hidden states, the NLL and (optionally) the routers' top-k."""
        self.check()
        keep = {"inp": {}, "attn": {}, "topk": {}}
        hooks = []
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


# ------------------------------------------------------------------------------------------ measurement

@dataclass
class Measurement:
    """Raw per-seed damages (nats per token) over ``tokens`` calibration tokens.

    only_this / all_but_this: float64 ``[S, L, E]``; layers: ``[S, L]``; dense: kind -> ``[S]``;
    all_experts: ``[S]``; clean_nll: mean NLL of the digital model; topk_changed: ``[S, L]`` share of tokens whose
    top-k set differs from the digital model's when all experts are analog; load_ideal: ``[L, E]`` tokens per
    expert (digital); load_noisy: ``[S, L, E]``.
    """
    seeds: list
    tokens: int
    clean_nll: float
    only_this: np.ndarray
    all_but_this: np.ndarray | None
    layers: np.ndarray
    dense: dict
    all_experts: np.ndarray
    topk_changed: np.ndarray
    load_ideal: np.ndarray
    load_noisy: np.ndarray
    forwards: int = 0


def _check_noise(noise) -> NoiseConfig:
    if isinstance(noise, str):
        return get_preset(noise)
    if not isinstance(noise, NoiseConfig):
        raise ValueError(f"noise must be a preset name or a NoiseConfig, got {type(noise).__name__}")
    return noise


def _seeds(seeds) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1 (number of noise seeds), got {seeds}")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out or any(s < 0 for s in out):
        raise ValueError(f"seeds must be a count >= 1 or a list of seeds >= 0, got {seeds!r}")
    return out


def _bincount(topk: torch.Tensor, n: int) -> np.ndarray:
    return torch.bincount(topk.flatten(), minlength=n).cpu().numpy()[:n]


def _lock(lm):
    from .evaluate import _state
    return _state(lm)["lock"]


@torch.no_grad()
def measure(lm, noise, ids: torch.Tensor, *, seeds=5, all_but_this: bool = True, dense: bool = True,
            layers: bool = True, group: int | None = None, progress: Callable[[int, int], None] | None = None,
            cancel: Callable[[], bool] | None = None) -> Measurement:
    """Measure per-expert, per-layer and dense-module damage (see module docstring).

    Args:
        lm: models.LoadedModel (or anything with .model, .anatomy).
        noise: preset name or NoiseConfig.
        ids: int64 ``[S, T]`` calibration sequences (``calibration_tokens``).
        seeds: count N (seeds 0..N-1) or a list of seeds.
        all_but_this / dense: also measure those. layers: also whole-layer and all-experts damage and routing
            drift (needs the all-analog pass; all_but_this implies it). Quantities not measured stay 0.
        group: experts per batched forward (default: as many as fit ``ROWS_PER_FORWARD`` tokens).
        progress: progress(done, total) after each unit; cancel: returns True to stop.
    Returns: Measurement. Raises ValueError for bad seeds/noise/ids; evaluate.Cancelled when cancelled.
    Cost: per seed about (L-l) decoder layers + LM head per expert of MoE layer l, in batched forwards.
    """
    from .evaluate import Cancelled
    from .placement import DensePolicy, Placement
    noise, seeds = _check_noise(noise), _seeds(seeds)
    if ids.dim() != 2 or ids.numel() == 0 or ids.shape[1] < 2:
        raise ValueError("ids must be [sequences, tokens] with at least 2 tokens per sequence")
    a = lm.anatomy
    L, E = len(a.moe_layers), max(m.num_experts for m in a.moe_layers)
    B = max(1, ROWS_PER_FORWARD // ids.shape[1])
    kinds = [k for k in ("attention", "lm_head", "router", "shared_experts", "dense_mlp")
             if a.modules.get(k) and a.param_counts.get(k, 0)] if dense else []
    counter = {"done": 0, "forwards": 0}

    def check():
        if cancel is not None and cancel():
            raise Cancelled()
        counter["forwards"] += 1

    B = min(B, ids.shape[0])
    R = group or max(1, ROWS_PER_FORWARD // (B * ids.shape[1]))
    eng = _Engine(lm, ids, B, check)
    n_chunks = len(eng.chunks)
    groups = [(m, list(range(m.num_experts))[g:g + R]) for m in a.moe_layers for g in range(0, m.num_experts, R)]
    layers = layers or all_but_this
    per_seed = n_chunks * (1 + (1 + L if layers else 0) + len(groups) * (2 if all_but_this else 1) + len(kinds))
    total = per_seed * len(seeds)

    def tick():
        counter["done"] += 1
        if progress:
            progress(counter["done"], total)

    S = len(seeds)
    only = np.zeros((S, L, E))
    abt = np.zeros((S, L, E)) if all_but_this else None
    lay, allx = np.zeros((S, L)), np.zeros(S)
    dens = {k: np.zeros(S) for k in kinds}
    changed, load_noisy, load_ideal = np.zeros((S, L)), np.zeros((S, L, E)), np.zeros((L, E))
    clean_sum = 0.0
    nm = noise.build_noise_model() if noise.weight_noise else None
    with _lock(lm):
        for si, seed in enumerate(seeds):
            clean_nll = []
            with _dispatch(a):
                banks = {m.index: _Bank(m, noise, seed, nm) for m in a.moe_layers}
                noisy_states = {i: _LayerForward(b, "noisy", gen_seed=seed) for i, b in banks.items()}
                for chunk in eng.chunks:
                    clean = eng.base_pass(chunk, None, routes=True)
                    clean_nll.append(clean["nll"])
                    tick()
                    if si == 0:
                        clean_sum += float(clean["nll"].double().sum())
                    noisy = eng.base_pass(chunk, noisy_states, routes=True) if layers else None
                    for m in a.moe_layers if layers else ():
                        if m.index == 0:
                            tick()
                            allx[si] += float(_sum(noisy["nll"].unsqueeze(0), clean["nll"])[0])
                        i, k = m.index, m.top_k
                        t0, t1 = clean["topk"][i].reshape(-1, k), noisy["topk"][i].reshape(-1, k)
                        changed[si, i] += float((t0.sort(-1).values != t1.sort(-1).values).any(-1).sum())
                        load_noisy[si, i, :m.num_experts] += _bincount(t1, m.num_experts)
                        if si == 0:
                            load_ideal[i, :m.num_experts] += _bincount(t0, m.num_experts)
                        nll = eng.replay_pass(chunk, clean, m, noisy_states[i], None, 1)
                        lay[si, i] += float(_sum(nll, clean["nll"])[0])
                        tick()
                    for m, g in groups:
                        fl = _LayerForward(banks[m.index], "clean", g, gen_seed=seed)
                        nll = eng.replay_pass(chunk, clean, m, fl, None, len(g))
                        only[si, m.index, g] += _sum(nll, clean["nll"]).cpu().numpy()
                        tick()
                        if all_but_this:
                            fl = _LayerForward(banks[m.index], "noisy", g, gen_seed=seed)
                            nll = eng.replay_pass(chunk, noisy, m, fl, noisy_states, len(g))
                            abt[si, m.index, g] += -_sum(nll, noisy["nll"]).cpu().numpy()
                            tick()
                del banks, noisy_states, clean, noisy
            for kind in kinds:   # dense modules: analog() programs them (one stream per module)
                full = Placement.all_digital(a)
                pl = Placement(f"dense:{kind}", 1.0, "layer", 0, full.num_experts, full.digital,
                               DensePolicy(**{kind: False}))
                with analog(lm.model, a, pl, noise, seed=seed):
                    for chunk, ref in zip(eng.chunks, clean_nll):
                        check()
                        h = eng.dec(input_ids=chunk, use_cache=False).last_hidden_state
                        dens[kind][si] += float(_sum(token_nll(lm.model, h, chunk).unsqueeze(0), ref)[0])
                        tick()
    P = eng.positions
    tok = ids.shape[0] * ids.shape[1]
    return Measurement(seeds=seeds, tokens=tok, clean_nll=clean_sum / P, only_this=only / P,
                       all_but_this=None if abt is None else abt / P, layers=lay / P,
                       dense={k: v / P for k, v in dens.items()}, all_experts=allx / P, topk_changed=changed / tok,
                       load_ideal=load_ideal, load_noisy=load_noisy, forwards=counter["forwards"])


@torch.no_grad()
def naive_only_this(lm, noise, ids: torch.Tensor, *, seeds=1, experts=None, batch: int | None = None) -> np.ndarray:
    """Reference: only-this damage by the naive loop, one full forward per expert and seed under ``analog()``
    with that expert alone analog. Returns float64 ``[S, L, E]`` (NaN where not measured).
    experts: list of (moe_index, expert) (default: all). Used by the tests and the bench."""
    from .placement import Placement
    noise, seeds = _check_noise(noise), _seeds(seeds)
    a = lm.anatomy
    L, E = len(a.moe_layers), max(m.num_experts for m in a.moe_layers)
    experts = experts or [(m.index, e) for m in a.moe_layers for e in range(m.num_experts)]
    eng = _Engine(lm, ids, batch or max(1, ROWS_PER_FORWARD // ids.shape[1]), lambda: None)
    dec = eng.dec
    out = np.full((len(seeds), L, E), np.nan)
    with _lock(lm):
        ref = [token_nll(lm.model, dec(input_ids=c, use_cache=False).last_hidden_state, c) for c in eng.chunks]
        full = Placement.all_digital(a)
        for si, seed in enumerate(seeds):
            for i, e in experts:
                dig = list(full.digital)
                dig[i] = tuple(x for x in dig[i] if x != e)
                pl = Placement("only_this", 1.0, "layer", 0, full.num_experts, tuple(dig))
                tot = 0.0
                with analog(lm.model, a, pl, noise, seed=seed):
                    for c, r in zip(eng.chunks, ref):
                        h = dec(input_ids=c, use_cache=False).last_hidden_state
                        tot += float(_sum(token_nll(lm.model, h, c).unsqueeze(0), r)[0])
                out[si, i, e] = tot / eng.positions
    return out


# ------------------------------------------------------------------------------------------ routing drift

def drift_rows(topk_changed: np.ndarray, load_ideal: np.ndarray, load_noisy: np.ndarray) -> list[dict]:
    """Routing drift per MoE layer (ROMER, arXiv 2605.11800: analog noise breaks expert load balance).

    topk_changed ``[S, L]`` share of tokens whose top-k set differs from the digital model's; load_ideal
    ``[L, E]`` and load_noisy ``[S, L, E]`` tokens per expert. Returns [{layer, changed_share, changed_share_se,
    load_max_over_mean_ideal, load_max_over_mean_noisy}] (noisy values: mean over seeds)."""
    out = []
    for i in range(load_ideal.shape[0]):
        mx = lambda c: float(c.max() / c.mean()) if c.mean() > 0 else float("nan")  # noqa: E731
        out.append({"layer": i, "changed_share": float(topk_changed[:, i].mean()),
                    "changed_share_se": _se(topk_changed[:, i]),
                    "load_max_over_mean_ideal": mx(load_ideal[i]),
                    "load_max_over_mean_noisy": float(np.mean([mx(c) for c in load_noisy[:, i]]))})
    return out


@torch.no_grad()
def routing_drift(lm, placement, noise, ids: torch.Tensor, seeds=1) -> list[dict]:
    """Routing drift of any placement under ``noise`` vs the digital model (``drift_rows`` format), through
    ``analog()`` (its noise realisation). ids: int64 ``[S, T]``; seeds: count or list."""
    noise, seeds = _check_noise(noise), _seeds(seeds)
    a = lm.anatomy
    L, E = len(a.moe_layers), max(m.num_experts for m in a.moe_layers)
    dec, dev = _decoder(lm.model), next(lm.model.parameters()).device
    chunks = [ids[i:i + 8].to(dev) for i in range(0, ids.shape[0], 8)]

    def topk():
        got = {m.index: [] for m in a.moe_layers}
        hs = [m.router.register_forward_hook(lambda mod, x, out, i=m.index: got[i].append(out[2].detach()))
              for m in a.moe_layers]
        try:
            for c in chunks:
                dec(input_ids=c, use_cache=False)
        finally:
            for h in hs:
                h.remove()
        return {i: torch.cat([t.reshape(-1, a.moe_layers[i].top_k) for t in v]).sort(-1).values
                for i, v in got.items()}
    with _lock(lm):
        ref = topk()
        changed, load_noisy = np.zeros((len(seeds), L)), np.zeros((len(seeds), L, E))
        for si, seed in enumerate(seeds):
            with analog(lm.model, a, placement, noise, seed=seed):
                cur = topk()
            for i in range(L):
                changed[si, i] = float((cur[i] != ref[i]).any(-1).float().mean())
                load_noisy[si, i] = _bincount(cur[i], E)
    load_ideal = np.stack([_bincount(ref[i], E) for i in range(L)])
    return drift_rows(changed, load_ideal, load_noisy)


# ------------------------------------------------------------------------------------------ validate

def _se(x: np.ndarray) -> float | None:
    x = np.asarray(x, dtype=np.float64)
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None


def _clean(obj):
    """JSON-safe copy: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


@dataclass
class Validation:
    """Measured sensitivity of a model under a noise preset and how well each criterion ranks it.

    Field meanings and units: module docstring (API contract). ``to_dict()`` is the JSON the CLI prints and
    the store keeps; ``cached`` says the result came from the store without any forward pass.
    """
    model_fingerprint: str
    preset: str
    noise: dict
    seeds: list
    tokens: int
    calibration: dict
    clean_nll: float
    experts: list = field(default_factory=list)
    layers: list = field(default_factory=list)
    dense: list = field(default_factory=list)
    all_experts: dict = field(default_factory=dict)
    correlations: list = field(default_factory=list)
    best: dict = field(default_factory=dict)
    routing_drift: list = field(default_factory=list)
    cached: bool = False

    def to_dict(self) -> dict:
        from dataclasses import asdict
        return _clean(asdict(self))

    def only_this(self) -> list[np.ndarray]:
        """Mean only-this damage per MoE layer: float64 ``[E]`` each (nats per token)."""
        L = 1 + max(r["layer"] for r in self.experts)
        out = [[] for _ in range(L)]
        for r in sorted(self.experts, key=lambda r: (r["layer"], r["expert"])):
            out[r["layer"]].append(r["only_this"])
        return [np.asarray(v, dtype=np.float64) for v in out]


def _texts(texts):
    """(texts by domain, where they came from) from None (routing.default_calibration), a file path or texts."""
    from pathlib import Path
    from .routing import _as_domains, default_calibration, read_calibration
    if texts is None:
        return default_calibration()
    if isinstance(texts, (str, Path)):
        return read_calibration(texts), str(texts)
    return _as_domains(texts), "given"


def request_key(fingerprint: str, noise: NoiseConfig, texts: dict, tokens: int, seeds: list, dtype: str,
                device: str, n_boot: int) -> tuple[str, dict]:
    """(store key, full config) of a validation request: model fingerprint and dtype, device type, full noise
    config, calibration hash, tokens, sequence length, seeds, bootstrap size and library versions."""
    from .evaluate import library_versions
    from .routing import calibration_hash
    from .store import config_key
    cfg = {"kind": "sensitivity", "v": _VERSION, "model": {"fingerprint": fingerprint, "dtype": dtype},
           "device": device.split(":")[0], "noise": noise.to_dict(),
           "calibration": calibration_hash(texts, SEQ_LEN), "tokens": tokens, "seq_len": SEQ_LEN,
           "seeds": list(seeds), "n_boot": n_boot, "versions": library_versions()}
    return config_key(cfg), cfg


def validate(source_or_lm, preset, *, seeds=5, texts=None, tokens: int = 16384, store=None,
             progress: Callable[[int, int], None] | None = None, cancel: Callable[[], bool] | None = None,
             n_boot: int = 1000, device: str = "cpu", dtype: str = "float32") -> Validation:
    """Measure every expert's damage under ``preset`` and check each criterion against it (API contract in the
    module docstring). Cached in the store: the same request returns at once, without loading the model.

    Args:
        source_or_lm: model source ("default", folder, hub id, "tiny:<family>") or a models.LoadedModel.
        preset: preset name or NoiseConfig. seeds: count N (0..N-1) or list. texts: None (the default
        calibration text), a calibration file path, or {domain: [texts]} / [texts]. tokens: calibration tokens.
        store: a store.Store, a path, None (the default store) or False (no store).
        progress(done, total); cancel() -> True stops (evaluate.Cancelled). n_boot: bootstrap replicates.
    Raises: ValueError for bad input (checked before any model work); evaluate.Cancelled.
    """
    from .criteria import correlate, criterion_scores
    from .store import Store
    noise, seeds = _check_noise(preset), _seeds(seeds)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise ValueError(f"tokens must be a whole number >= 1, got {tokens!r}")
    texts, where = _texts(texts)
    if isinstance(source_or_lm, str):
        from .evaluate import source_fingerprint
        fp = source_fingerprint(source_or_lm)
    else:
        fp = source_or_lm.fingerprint
        dtype = str(next(source_or_lm.model.parameters()).dtype).replace("torch.", "")
        device = str(next(source_or_lm.model.parameters()).device)
    key, cfg = request_key(fp, noise, texts, tokens, seeds, dtype, device, n_boot)
    st = None if store is False else store if isinstance(store, Store) else Store(store)
    if st is not None:
        hit = st.get_sensitivity(key)
        if hit is not None:
            return Validation(**{**hit, "cached": True})
    if isinstance(source_or_lm, str):
        from .evaluate import _get_model
        lm = _get_model(source_or_lm, device, dtype, None, False)
    else:
        lm = source_or_lm
    ids = calibration_tokens(lm.tokenizer, texts, tokens)
    meas = measure(lm, noise, ids, seeds=seeds, progress=progress, cancel=cancel)
    crit = criterion_scores(lm, texts, noise, ids)
    corr, best = correlate(crit, meas.only_this, n_boot=n_boot)
    a = lm.anatomy
    experts = [{"layer": m.index, "decoder_layer": m.layer, "expert": e,
                "only_this": float(meas.only_this[:, m.index, e].mean()), "only_this_se": _se(meas.only_this[:, m.index, e]),
                "all_but_this": float(meas.all_but_this[:, m.index, e].mean()),
                "all_but_this_se": _se(meas.all_but_this[:, m.index, e]),
                "only_this_seeds": meas.only_this[:, m.index, e].tolist(),
                **{f"score_{k}": float(v[m.index][e]) for k, v in crit.items()}}
               for m in a.moe_layers for e in range(m.num_experts)]
    v = Validation(
        model_fingerprint=fp, preset=noise.name, noise=noise.to_dict(), seeds=seeds, tokens=meas.tokens,
        calibration={"source": where, "hash": cfg["calibration"], "tokens": meas.tokens,
                     "sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1])},
        clean_nll=meas.clean_nll, experts=experts,
        layers=[{"layer": m.index, "decoder_layer": m.layer, "damage": float(meas.layers[:, m.index].mean()),
                 "se": _se(meas.layers[:, m.index])} for m in a.moe_layers],
        dense=[{"kind": k, "damage": float(x.mean()), "se": _se(x)} for k, x in meas.dense.items()],
        all_experts={"damage": float(meas.all_experts.mean()), "se": _se(meas.all_experts)},
        correlations=corr, best=best,
        routing_drift=drift_rows(meas.topk_changed, meas.load_ideal, meas.load_noisy))
    if st is not None:
        st.put_sensitivity(key, fp, noise.name, cfg, {k: x for k, x in v.to_dict().items() if k != "cached"})
    return v


def measured_scores(lm, strategy: str, noise, *, store=None, texts=None, seeds=ORACLE_SEEDS,
                    tokens: int = ORACLE_TOKENS, progress=None, cancel=None) -> list[np.ndarray]:
    """Per-layer float64 ``[E]`` scores of the measured strategies (higher -> digital) under ``noise``.

    "oracle": mean only-this damage from ``validate`` (same request as ``validate``'s defaults, so a stored
    validation is reused and a new one is stored); "local_error": ``criteria.local_error_scores`` on the
    calibration text. Raises ValueError for another strategy or bad input.
    """
    if strategy == "oracle":
        return validate(lm, noise, seeds=seeds, texts=texts, tokens=tokens, store=store, progress=progress,
                        cancel=cancel).only_this()
    if strategy == "local_error":
        from .criteria import LOCAL_ERROR_TOKENS, local_error_scores
        ids = calibration_tokens(lm.tokenizer, _texts(texts)[0], LOCAL_ERROR_TOKENS)
        return local_error_scores(lm, noise, ids)
    raise ValueError(f"strategy {strategy!r} is not measured; measured strategies are oracle, local_error")
