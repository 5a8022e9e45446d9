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
forward per expert and seed): noise is programmed once per seed for all experts; one base pass (digital, or all
experts analog for all-but-this) keeps the hidden states entering each decoder layer, each attention output and
each MoE layer's weighted expert rows, so measuring an expert of decoder layer d replays everything below d and
d's attention, recomputes only that expert's rows in d (``_CachedFlip``) and runs the layers above; the flipped
expert is a copy appended to the fused expert tensors, so R experts of a layer can share one forward of R row
blocks (``group``); the LM head runs only on positions whose final hidden state changed (for the last MoE
layer: only the tokens routed to the expert). Each position sees the arithmetic of ``analog()``'s fast backend
(its ``_FastExperts`` forward is reused), so with the default of one expert per forward (up to
``ROWS_PER_FORWARD`` tokens) the result equals the one-expert-at-a-time loop bit for bit (``naive_only_this``;
test_sensitivity); with R > 1 the layers above multiply taller matrices, for which BLAS may choose other kernels,
and results agree to float32 rounding. Tile output noise (``out_noise`` > 0) is drawn per forward and cannot
be equal between the two orders; the paper presets have none.

API contract (the Validate page and the example-results script build on it)::

    validate(source_or_lm, preset, *, seeds=5, texts=None, tokens=16384, store=None, progress=None,
             cancel=None, executor=None) -> Validation

``progress(done, total)`` is called after each unit of work; ``cancel()`` returning True stops the measurement
(``evaluate.Cancelled`` is raised). ``Validation.to_dict()`` is JSON with the keys: model_fingerprint, preset,
noise (full NoiseConfig), seeds, tokens, calibration {source, hash, tokens}, clean_nll,
experts [{layer, expert, only_this, only_this_se, all_but_this, all_but_this_se}], layers [{layer, damage, se}],
dense [{kind, damage, se}], all_experts {damage, se}, correlations [{criterion, scope ("pooled" or MoE layer int),
spearman, spearman_lo, spearman_hi, kendall, kendall_lo, kendall_hi}], best {criterion, margin, significant},
routing_drift [{layer, changed_share, load_max_over_mean_ideal, load_max_over_mean_noisy}], cached.
Additional keys: experts[] also carry decoder_layer, only_this_seeds (per seed, in ``seeds`` order) and
score_<criterion> (each criterion's score); correlations[] carry n (experts); best carries runner_up and the
margin's 95% interval margin_lo / margin_hi (``significant``: the interval excludes 0 — else "no difference");
layers[] carry decoder_layer; routing_drift[] carries changed_share_se. Criteria: ``criteria.criterion_scores``. Damages are in nats per token; ``*_se`` are standard errors over seeds
(sample std / sqrt(n); None for one seed). ``layer`` is the MoE-layer index (anatomy.moe_layers order).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .analog import analog
from .replay import _Bank, _Engine, _LayerForward, _decoder, _dispatch, _sum, token_nll
# the request key and the stored record need no torch (a cache-hit `validate` answers without it): validation.py
from .validation import (SEQ_LEN, Validation, _VERSION, _check_noise, _clean, _se, _seeds, _texts,  # noqa: F401
                         request_key)

ORACLE_SEEDS, ORACLE_TOKENS = 5, 16384   # the oracle's measurement = validate()'s defaults (shares its cache)
ROWS_PER_FORWARD = 8192  # tokens in one batched forward (R experts x sequences x positions), bounds memory


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


def _bincount(topk: torch.Tensor, n: int) -> np.ndarray:
    return torch.bincount(topk.flatten(), minlength=n).cpu().numpy()[:n]


def _lock(lm):
    from .evaluate import _state
    return _state(lm)["lock"]


@torch.no_grad()
def measure(lm, noise, ids: torch.Tensor, *, seeds=5, all_but_this: bool = True, dense: bool = True,
            layers: bool = True, group: int | None = None, reuse_rows: bool = True,
            progress: Callable[[int, int], None] | None = None,
            cancel: Callable[[], bool] | None = None) -> Measurement:
    """Measure per-expert, per-layer and dense-module damage (see module docstring).

    Args:
        lm: models.LoadedModel (or anything with .model, .anatomy).
        noise: preset name or NoiseConfig.
        ids: int64 ``[S, T]`` calibration sequences (``calibration_tokens``).
        seeds: count N (seeds 0..N-1) or a list of seeds.
        all_but_this / dense: also measure those. layers: also whole-layer and all-experts damage and routing
            drift (needs the all-analog pass; all_but_this implies it). Quantities not measured stay 0.
        group: experts per forward, as R row blocks (default 1: each forward holds one expert and up to
            ``ROWS_PER_FORWARD`` tokens, so its matrices have the naive loop's shapes and the result is bit-identical
            to it; with R > 1 BLAS may pick other kernels for the taller matrices of the layers above, and results
            agree to float32 rounding, ~1e-5 relative, measured on the default).
        reuse_rows: recompute only the flipped expert's rows of its layer (``_CachedFlip``); False runs the whole
            experts forward of that layer per block (same numbers, slower; kept for the equality test).
        progress: progress(done, total) after each unit; cancel: returns True to stop.
    Returns: Measurement. Raises ValueError for bad seeds/noise/ids; evaluate.Cancelled when cancelled.
    Cost: per seed about (L-l) decoder layers + LM head per expert of MoE layer l, in batched forwards.
    """
    from .evaluate import Cancelled, cancel_hooks
    from .placement import DensePolicy, Placement
    noise, seeds = _check_noise(noise), _seeds(seeds)
    if ids.dim() != 2 or ids.numel() == 0 or ids.shape[1] < 2:
        raise ValueError("ids must be [sequences, tokens] with at least 2 tokens per sequence")
    a = lm.anatomy
    L, E = len(a.moe_layers), max(m.num_experts for m in a.moe_layers)
    B = max(1, ROWS_PER_FORWARD // ids.shape[1])
    # a tied LM head owns no parameters of its own (the embedding table counts them) but is a matrix on tiles
    kinds = [k for k in ("attention", "lm_head", "router", "shared_experts", "dense_mlp")
             if a.modules.get(k) and (a.param_counts.get(k, 0) or k == "lm_head")] if dense else []
    counter = {"done": 0, "forwards": 0}

    def stop():
        if cancel is not None and cancel():
            raise Cancelled()

    def check():
        stop()
        counter["forwards"] += 1

    B = min(B, ids.shape[0])
    R = group or 1
    eng = _Engine(lm, ids, B, check)
    eng.cached_rows = eng.cached_rows and reuse_rows
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
    with _lock(lm), cancel_hooks(lm.model, a, cancel):   # a cancel stops within one layer's forward
        for si, seed in enumerate(seeds):
            clean_nll = []
            with _dispatch(a):
                banks = {m.index: _Bank(m, noise, seed, nm, stop) for m in a.moe_layers}
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
                        fl = eng.flip_state(banks[m.index], "clean", g, clean, seed)
                        nll = eng.replay_pass(chunk, clean, m, fl, None, len(g))
                        only[si, m.index, g] += _sum(nll, clean["nll"]).cpu().numpy()
                        tick()
                        if all_but_this:
                            fl = eng.flip_state(banks[m.index], "noisy", g, noisy, seed)
                            nll = eng.replay_pass(chunk, noisy, m, fl, noisy_states, len(g))
                            abt[si, m.index, g] += -_sum(nll, noisy["nll"]).cpu().numpy()
                            tick()
                del banks, noisy_states, clean, noisy
            for kind in kinds:   # dense modules: analog() programs them (one stream per module)
                full = Placement.all_digital(a)
                pl = Placement(f"dense:{kind}", 1.0, "layer", 0, full.num_experts, full.digital,
                               DensePolicy(**{kind: False}))
                with analog(lm.model, a, pl, noise, seed=seed, check=stop):
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

def join(parts: list[Measurement]) -> Measurement:
    """One Measurement from measurements of disjoint seeds on the same model and tokens (in the given order):
    per-seed arrays are stacked along the seed axis; clean NLL and the digital load come from the first part
    (every part computes the same digital pass). Used to combine the per-seed units of ``validate`` on Ray."""
    f = parts[0]
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    return Measurement(seeds=[s for p in parts for s in p.seeds], tokens=f.tokens, clean_nll=f.clean_nll,
                       only_this=cat("only_this"), all_but_this=None if f.all_but_this is None else cat("all_but_this"),
                       layers=cat("layers"), dense={k: np.concatenate([p.dense[k] for p in parts]) for k in f.dense},
                       all_experts=cat("all_experts"), topk_changed=cat("topk_changed"), load_ideal=f.load_ideal,
                       load_noisy=cat("load_noisy"), forwards=sum(p.forwards for p in parts))


@dataclass
class SeedUnit:
    """A Ray unit of ``validate``: the measurement under one noise seed (``measure`` with ``seeds=[seed]``), on a
    worker that loads the model once; with ``criteria`` also the criterion scores and the model's MoE layout.
    Returns {"fingerprint", "measurement", "criteria", "moe": [(index, decoder layer, experts)], "ids_shape"}."""
    source: str
    device: str
    dtype: str
    noise: object
    seed: int
    texts: dict
    tokens: int
    criteria: bool

    def __call__(self, cache: dict) -> dict:
        from .evaluate import _get_model
        lm = _get_model(self.source, self.device, self.dtype, None, False)
        ids = calibration_tokens(lm.tokenizer, self.texts, self.tokens)
        meas = measure(lm, self.noise, ids, seeds=[self.seed])
        crit = None
        if self.criteria:
            from .criteria import criterion_scores
            crit = criterion_scores(lm, self.texts, self.noise, ids)
        return {"fingerprint": lm.fingerprint, "measurement": meas, "criteria": crit, "ids_shape": tuple(ids.shape),
                "moe": [(m.index, m.layer, m.num_experts) for m in lm.anatomy.moe_layers]}


def _measure_ray(source: str, noise, seeds: list, texts: dict, tokens: int, fp: str, device: str, dtype: str,
                 options, progress, cancel):
    """(Measurement, criteria, moe layout, ids shape) measured on Ray, one SeedUnit per seed; the driver combines
    the parts in seed order (``join``), so the numbers are the local ``measure``'s."""
    import threading
    from .evaluate import Cancelled
    from .ray_executor import run_units
    units = [SeedUnit(source, device, dtype, noise, s, texts, tokens, i == 0) for i, s in enumerate(seeds)]
    got, errors = {}, []
    stop = threading.Event()

    def on_result(unit, value):
        if value["fingerprint"] != fp:
            raise ValueError(f"the model {source!r} on a Ray worker has fingerprint {value['fingerprint']}, the "
                             f"driver's is {fp}: put the same weights on every node")
        got[unit.seed] = value
        if progress:
            progress(len(got), len(units))
        if cancel is not None and cancel():
            stop.set()

    run_units(units, on_result, lambda unit, why: errors.append(f"seed {unit.seed}: {why}"), options=options,
              cancel=stop)
    if stop.is_set():
        raise Cancelled()
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(units)} seeds failed on Ray, first: {errors[0]} (nothing stored)")
    head = got[seeds[0]]
    return join([got[s]["measurement"] for s in seeds]), head["criteria"], head["moe"], head["ids_shape"]


def validate(source_or_lm, preset, *, seeds=5, texts=None, tokens: int = 16384, store=None,
             progress: Callable[[int, int], None] | None = None, cancel: Callable[[], bool] | None = None,
             n_boot: int = 1000, device: str = "cpu", dtype: str = "float32", executor=None) -> Validation:
    """Measure every expert's damage under ``preset`` and check each criterion against it (API contract in the
    module docstring). Cached in the store: the same request returns at once, without loading the model.

    Args:
        source_or_lm: model source ("default", folder, hub id, "tiny:<family>") or a models.LoadedModel.
        preset: preset name or NoiseConfig. seeds: count N (0..N-1) or list. texts: None (the default
        calibration text), a calibration file path, or {domain: [texts]} / [texts]. tokens: calibration tokens.
        store: a store.Store, a path, None (the default store) or False (no store).
        progress(done, total); cancel() -> True stops (evaluate.Cancelled). n_boot: bootstrap replicates.
        executor: None measures here; a ray_executor.RayOptions measures one seed per Ray unit (``SeedUnit``,
            the model loaded once per worker; source must be a string) and this process combines the seeds and
            is the only store writer — the same numbers as here (test_ray_executor).
    Raises: ValueError for bad input (checked before any model work); evaluate.Cancelled; RuntimeError when a
    seed failed on Ray (nothing stored).
    """
    from .criteria import correlate
    from .store import Store
    noise, seeds = _check_noise(preset), _seeds(seeds)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise ValueError(f"tokens must be a whole number >= 1, got {tokens!r}")
    if executor is not None and not isinstance(source_or_lm, str):
        raise ValueError("validate on Ray needs the model's source (a name, folder or hub id), not a loaded model")
    texts, where = _texts(texts, source_or_lm if isinstance(source_or_lm, str) else source_or_lm.source)
    if isinstance(source_or_lm, str):
        from .models import source_fingerprint
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
    if executor is not None:
        meas, crit, moe, shape = _measure_ray(source_or_lm, noise, seeds, texts, tokens, fp, device, dtype, executor,
                                              progress, cancel)
    else:
        from .criteria import criterion_scores
        if isinstance(source_or_lm, str):
            from .evaluate import _get_model
            lm = _get_model(source_or_lm, device, dtype, None, False)
        else:
            lm = source_or_lm
        ids = calibration_tokens(lm.tokenizer, texts, tokens)
        meas = measure(lm, noise, ids, seeds=seeds, progress=progress, cancel=cancel)
        from .evaluate import cancel_hooks
        with cancel_hooks(lm.model, lm.anatomy, cancel):
            crit = criterion_scores(lm, texts, noise, ids)
        moe, shape = [(m.index, m.layer, m.num_experts) for m in lm.anatomy.moe_layers], tuple(ids.shape)
    corr, best = correlate(crit, meas.only_this, n_boot=n_boot)
    experts = [{"layer": i, "decoder_layer": d, "expert": e,
                "only_this": float(meas.only_this[:, i, e].mean()), "only_this_se": _se(meas.only_this[:, i, e]),
                "all_but_this": float(meas.all_but_this[:, i, e].mean()),
                "all_but_this_se": _se(meas.all_but_this[:, i, e]),
                "only_this_seeds": meas.only_this[:, i, e].tolist(),
                **{f"score_{k}": float(v[i][e]) for k, v in crit.items()}}
               for i, d, n in moe for e in range(n)]
    v = Validation(
        model_fingerprint=fp, preset=noise.name, noise=noise.to_dict(), seeds=seeds, tokens=meas.tokens,
        calibration={"source": where, "hash": cfg["calibration"], "tokens": meas.tokens,
                     "sequences": int(shape[0]), "seq_len": int(shape[1])},
        clean_nll=meas.clean_nll, experts=experts,
        layers=[{"layer": i, "decoder_layer": d, "damage": float(meas.layers[:, i].mean()),
                 "se": _se(meas.layers[:, i])} for i, d, _ in moe],
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
    calibration text. ``progress(done, total)`` after each forward of the measurement (a stored oracle
    measurement: never called). Raises ValueError for another strategy or bad input.
    """
    if strategy == "oracle":
        return validate(lm, noise, seeds=seeds, texts=texts, tokens=tokens, store=store, progress=progress,
                        cancel=cancel).only_this()
    if strategy == "local_error":
        from .criteria import LOCAL_ERROR_TOKENS, local_error_scores
        ids = calibration_tokens(lm.tokenizer, _texts(texts, lm.source)[0], LOCAL_ERROR_TOKENS)
        return local_error_scores(lm, noise, ids, progress=progress)
    raise ValueError(f"strategy {strategy!r} is not measured; measured strategies are oracle, local_error")


def measurement_forwards(anatomy, *, seeds=ORACLE_SEEDS, tokens: int = ORACLE_TOKENS, seq_len: int = SEQ_LEN) -> int:
    """Batched forwards ``measure`` makes with ``validate``'s settings (only-this and all-but-this per expert, every
    layer, the dense modules, one expert per forward): the count its progress bar runs to. ``anatomy``:
    models.Anatomy. Assumes the calibration text holds ``tokens`` tokens. Raises ValueError for bad seeds/tokens."""
    seeds = _seeds(seeds)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise ValueError(f"tokens must be a whole number >= 1, got {tokens!r}")
    T = min(seq_len, tokens)
    S = max(1, tokens // T)
    chunks = -(-S // min(S, max(1, ROWS_PER_FORWARD // T)))
    L = len(anatomy.moe_layers)
    experts = sum(m.num_experts for m in anatomy.moe_layers)
    kinds = [k for k in ("attention", "lm_head", "router", "shared_experts", "dense_mlp")
             if anatomy.modules.get(k) and (anatomy.param_counts.get(k, 0) or k == "lm_head")]
    return chunks * (1 + (1 + L) + 2 * experts + len(kinds)) * len(seeds)


def forward_tokens(tokens: int, seq_len: int = SEQ_LEN) -> int:
    """Tokens in one batched forward of ``measure`` with ``validate``'s settings (one expert per forward): whole
    sequences of min(seq_len, tokens) tokens, as many as fit in ``ROWS_PER_FORWARD`` and the calibration holds
    (256 tokens: one sequence of 256; 16,384: 32 sequences of 256 = 8,192). Raises ValueError for bad tokens."""
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise ValueError(f"tokens must be a whole number >= 1, got {tokens!r}")
    T = min(seq_len, tokens)
    S = max(1, tokens // T)
    return min(S, max(1, ROWS_PER_FORWARD // T)) * T


def forward_seconds(lm, tokens: int = ROWS_PER_FORWARD, seq_len: int = SEQ_LEN) -> float:
    """Wall time (s) of one clean forward of ``tokens`` tokens (sequences of ``seq_len``) through the whole model,
    timed here. A measurement forward replays only the layers above the flipped expert and recomputes that
    expert's rows, so this bounds its cost from above (measured on the default model with 2 shared CPU cores:
    one measurement forward took 2.8 s, one clean forward of the same 8,192 tokens 4.6 s)."""
    import time
    T = max(2, min(seq_len, tokens))
    dev = next(lm.model.parameters()).device
    ids = torch.randint(0, max(2, int(getattr(lm.model.config, "vocab_size", 2))), (max(1, tokens // T), T),
                        generator=torch.Generator().manual_seed(0)).to(dev)
    with _lock(lm), torch.inference_mode():
        t = time.perf_counter()
        lm.model(input_ids=ids, use_cache=False)
        return time.perf_counter() - t


ESTIMATE_FIXED_S = 5.0
"""Seconds ``measurement_estimate`` adds for the part of ``validate`` that does not grow with the forwards: the
criteria's weight scores, the bootstrap of the correlations (1,000 replicates) and a first run's imports — 2.2 s on
the default model and 0.4-2.0 s on tiny:qwen3_moe on 2 shared CPU cores (``bench/bench_estimate.py``)."""


def measurement_estimate(lm, *, seeds=ORACLE_SEEDS, tokens: int = ORACLE_TOKENS, forward_s: float | None = None
                         ) -> dict:
    """About how long ``validate(lm, …, seeds, tokens)`` takes here, an upper estimate: {"forwards":
    measurement_forwards, "forward_tokens": tokens in each of them (``forward_tokens``), "forward_s": one clean
    forward of that many tokens (``forward_seconds``, timed here at that size, or the value given, which must be
    of a forward of that size), "extra_forwards": one seed's forwards more, and "fixed_s": ``ESTIMATE_FIXED_S``, for
    what is not a measurement forward (the criteria: activation statistics and the local output error on the
    calibration text, weight scores; the bootstrap), "seconds": (forwards + extra_forwards) x forward_s + fixed_s}.

    Basis (2 shared CPU cores, ``bench/bench_estimate.py`` and a profile of ``validate`` on the default model): the
    per-forward time is timed at the measurement's own forward size, not taken from another — a clean forward of 256
    tokens took 0.06-0.08 s, one of 8,192 1.9-2.0 s (the old estimate of 1 seed x 256 tokens, 137 forwards x 2.4 s
    ≈ 6 min, used the latter, for a run of 10-15 s); a measurement forward took 0.042 s at 256 tokens, below the
    clean one; the criteria took 1.2 s and the bootstrap 0.6-1.0 s. Raises ValueError for bad seeds/tokens."""
    n = measurement_forwards(lm.anatomy, seeds=seeds, tokens=tokens)
    extra = n // len(_seeds(seeds))
    ft = forward_tokens(tokens)
    t = forward_seconds(lm, ft) if forward_s is None else float(forward_s)
    return {"forwards": n, "forward_tokens": ft, "forward_s": t, "extra_forwards": extra, "fixed_s": ESTIMATE_FIXED_S,
            "seconds": (n + extra) * t + ESTIMATE_FIXED_S}
