"""Sensitivity criteria checked against measured damage, and the data-aware Local Output Error criterion.

A *criterion* gives every routed expert a score (higher = keep digital). ``criterion_scores`` collects the
paper's (MaxNNScore and its per-projection maxima, Activation Frequency, Activation Weight, Router Norm;
arXiv 2603.02633) and hetmoe's ``local_error``; ``correlate`` ranks them against measured only-this damage
(``sensitivity.measure``) with Spearman's rho and Kendall's tau-b (scipy.stats), per MoE layer and pooled over
layers, with 95% percentile intervals from a paired bootstrap (below).

Paired bootstrap (experts and seeds): each replicate draws the noise seeds with replacement (the damage of an
expert is its mean over the drawn seeds) and the experts with replacement (within the layer for a per-layer
scope, over all experts for "pooled"); every criterion is scored on the same replicate, so differences between
criteria are paired. scipy.stats.bootstrap resamples one axis of paired samples; this needs two (seeds inside
the statistic, experts outside), hence the explicit loop, vectorised over replicates. Ties (an expert drawn twice)
are handled by tau-b and by average ranks.

Local Output Error (hetmoe, beyond the paper): for expert e of a layer,
``score_e = (1/N) Σ_{tokens t routed to e} w_{t,e}² · ||f_e^analog(x_t) − f_e(x_t)||²`` over N calibration
tokens, averaged over a few noise seeds — the expected squared perturbation expert e adds to the residual
stream per token: activation frequency × routing weight² × the expert's local output error under the preset's
noise (programming noise, DAC/ADC) on the inputs it really sees. One calibration forward plus one noisy pass of
each expert over its own tokens.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .scores import PROJECTIONS

PAPER_CRITERIA = ("maxnn", "frequency", "weight", "router_norm") + tuple(f"{p}_max" for p in PROJECTIONS)
LOCAL_ERROR_SEEDS = (0, 1, 2)
LOCAL_ERROR_TOKENS = 4096
N_BOOT = 1000


# ------------------------------------------------------------------------------------------ criteria

@torch.no_grad()
def local_error_scores(lm, noise, ids: torch.Tensor, seeds=LOCAL_ERROR_SEEDS,
                       progress: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
    """Local Output Error per MoE layer: float64 ``[E]`` each (see module docstring), nats-free units of
    hidden-state squared norm per token.

    ids: int64 ``[S, T]`` calibration sequences (``sensitivity.calibration_tokens``); seeds: noise seeds averaged.
    progress(done, total) after each forward: the calibration forwards (8 sequences each), then the clean and the
    noisy experts forward of every MoE layer under every seed (total = ceil(S / 8) + 2 x layers x seeds).
    Raises ValueError for bad noise or seeds.
    """
    from .replay import _Bank, _LayerForward, _decoder, _dispatch
    from .sensitivity import _check_noise, _lock, _seeds
    noise, seeds = _check_noise(noise), _seeds(seeds)
    a = lm.anatomy
    dev = next(lm.model.parameters()).device
    inputs: dict[int, list] = {m.index: [] for m in a.moe_layers}
    hooks = [m.experts.register_forward_pre_hook(
        lambda mod, args, kw, i=m.index: inputs[i].append(tuple(
            (args[j] if len(args) > j else kw[n]).detach() for j, n in
            enumerate(("hidden_states", "top_k_index", "top_k_weights")))), with_kwargs=True)
        for m in a.moe_layers]
    dec = _decoder(lm.model)
    total, done = -(-ids.shape[0] // 8) + 2 * len(a.moe_layers) * len(seeds), [0]

    def tick():
        done[0] += 1
        if progress is not None:
            progress(done[0], total)
    with _lock(lm):
        try:
            for b in range(0, ids.shape[0], 8):
                dec(input_ids=ids[b:b + 8].to(dev), use_cache=False)
                tick()
        finally:
            for h in hooks:
                h.remove()
        nm = noise.build_noise_model() if noise.weight_noise else None
        out = [np.zeros(m.num_experts) for m in a.moe_layers]
        with _dispatch(a):
            for m in a.moe_layers:
                x = torch.cat([t[0] for t in inputs[m.index]])
                idx = torch.cat([t[1] for t in inputs[m.index]]).reshape(x.shape[0], -1)
                w = torch.cat([t[2] for t in inputs[m.index]]).reshape(x.shape[0], -1)
                xk = x.repeat_interleave(idx.shape[1], 0)          # one row per (token, choice)
                ek, wk = idx.reshape(-1, 1), w.reshape(-1).double()
                one = torch.ones_like(ek, dtype=x.dtype)
                for seed in seeds:
                    bank = _Bank(m, noise, seed, nm)
                    clean = _LayerForward(bank, "clean").forward(m.experts, xk.clone(), ek, one).double()
                    tick()
                    noisy = _LayerForward(bank, "noisy", gen_seed=seed).forward(m.experts, xk.clone(), ek, one).double()
                    tick()
                    err = (noisy - clean).pow(2).sum(-1) * wk ** 2
                    out[m.index] += torch.bincount(ek.flatten(), weights=err, minlength=m.num_experts).cpu().numpy()
                out[m.index] /= len(seeds) * x.shape[0]
    return out


def criterion_scores(lm, texts: dict, noise, ids: torch.Tensor, *, local_error: bool = True) -> dict[str, list]:
    """Every criterion's per-layer scores: name -> list of float64 ``[E]`` (higher = more sensitive).

    maxnn, router_norm and the per-projection maxima from the weights (scores.expert_scores); frequency and
    weight from routing statistics on ``texts`` (routing.activation_stats, max_length 256, cached by fingerprint);
    local_error on ``ids`` under ``noise``.
    """
    from .routing import activation_stats
    from .scores import expert_scores
    sc = expert_scores(lm.anatomy)
    out = {"maxnn": sc.get("maxnn"), "router_norm": sc.get("router_norm")}
    for p in PROJECTIONS:
        if all(v is not None for v in sc.get(p)):
            out[f"{p}_max"] = sc.get(p)
    stats = activation_stats(lm.model, lm.tokenizer, lm.anatomy, texts, max_length=256,
                             fingerprint=getattr(lm, "fingerprint", None))
    out["frequency"] = list(stats.frequency)
    out["weight"] = list(stats.weight)
    if local_error:
        out["local_error"] = local_error_scores(lm, noise, ids[:max(1, LOCAL_ERROR_TOKENS // ids.shape[1])])
    return {k: [np.asarray(x, dtype=np.float64) for x in v] for k, v in out.items()}


# ------------------------------------------------------------------------------------------ correlation

def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata
    return rankdata(x, axis=-1)


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row pair ``[B, n]`` (Pearson of average ranks); NaN for a constant row."""
    rx, ry = _ranks(x), _ranks(y)
    rx = rx - rx.mean(-1, keepdims=True)
    ry = ry - ry.mean(-1, keepdims=True)
    den = np.sqrt((rx ** 2).sum(-1) * (ry ** 2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(-1) / np.where(den > 0, den, 1), np.nan)


def _kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row pair ``[B, n]`` (as scipy.stats.kendalltau); NaN for a constant row."""
    i, j = np.triu_indices(x.shape[-1], 1)
    dx, dy = np.sign(x[:, i] - x[:, j]), np.sign(y[:, i] - y[:, j])
    n0 = len(i)
    den = np.sqrt((n0 - (dx == 0).sum(-1)) * (n0 - (dy == 0).sum(-1)).astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (dx * dy).sum(-1) / np.where(den > 0, den, 1), np.nan)


def _point(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from scipy.stats import kendalltau, spearmanr
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    return float(spearmanr(x, y).statistic), float(kendalltau(x, y).statistic)


def _ci(v: np.ndarray) -> tuple[float, float]:
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(v, [2.5, 97.5])
    return float(lo), float(hi)


def correlate(criteria: dict[str, list], damage: np.ndarray, n_boot: int = N_BOOT, seed: int = 0):
    """Rank correlation of each criterion with measured damage, per MoE layer and pooled, with bootstrap CIs.

    Args:
        criteria: name -> per-layer float64 ``[E]`` scores (``criterion_scores``).
        damage: float64 ``[S, L, E]`` per-seed only-this damage (nats; NaN-free).
        n_boot: bootstrap replicates (paired over criteria; module docstring); seed: their RNG seed.
    Returns:
        (rows, best): rows [{criterion, scope ("pooled" | MoE layer int), n, spearman, spearman_lo, spearman_hi,
        kendall, kendall_lo, kendall_hi}]; best {criterion, runner_up, margin, margin_lo, margin_hi, significant}
        by pooled Spearman: margin = best − runner-up (point), its 95% interval from the same replicates,
        significant when the interval excludes 0 (else the two are not told apart: "no difference").
    """
    damage = np.asarray(damage, dtype=np.float64)
    S, L, E = damage.shape
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, S, size=(n_boot, S))
    boot_damage = damage[seed_draws].mean(1)                 # [B, L, E]
    mean = damage.mean(0)
    names = list(criteria)
    scopes = [("pooled", np.arange(L * E))] + [(li, li * E + np.arange(E)) for li in range(L)]
    rows, pooled_boot = [], {}
    for scope, cols in scopes:
        n = len(cols)
        pick = cols[rng.integers(0, n, size=(n_boot, n))] if scope == "pooled" else \
            cols[0] + rng.integers(0, n, size=(n_boot, n))
        y_boot = np.take_along_axis(boot_damage.reshape(n_boot, -1), pick, 1)
        for name in names:
            x = np.concatenate(criteria[name])
            rho, tau = _point(x[cols], mean.reshape(-1)[cols])
            rb, tb = _spearman_rows(x[pick], y_boot), _kendall_rows(x[pick], y_boot)
            if scope == "pooled":
                pooled_boot[name] = rb
            (slo, shi), (klo, khi) = _ci(rb), _ci(tb)
            rows.append({"criterion": name, "scope": scope, "n": n, "spearman": rho, "spearman_lo": slo,
                         "spearman_hi": shi, "kendall": tau, "kendall_lo": klo, "kendall_hi": khi})
    pooled = sorted((r for r in rows if r["scope"] == "pooled" and np.isfinite(r["spearman"])),
                    key=lambda r: -r["spearman"])
    best = {"criterion": None, "runner_up": None, "margin": None, "margin_lo": None, "margin_hi": None,
            "significant": False}
    if pooled:
        best["criterion"] = pooled[0]["criterion"]
        if len(pooled) > 1:
            a, b = pooled[0]["criterion"], pooled[1]["criterion"]
            lo, hi = _ci(pooled_boot[a] - pooled_boot[b])
            best.update(runner_up=b, margin=pooled[0]["spearman"] - pooled[1]["spearman"], margin_lo=lo,
                        margin_hi=hi, significant=bool(np.isfinite(lo) and lo > 0))
    return rows, best
