"""The Learn page's toy: programming noise on every expert of one MoE layer, the output error it causes, what a
layer shows (``toy_lesson`` / ``shows_outlier``) and its figures."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from .figures import _LAYOUT, LOG_AXIS

OUTLIER_RATIO = 1.5
"""A layer shows an outlier when its top-MaxNNScore expert has the largest error and at least this many times the
layer's median error (the Learn page's reading of the paper's claim, arXiv 2603.02633)."""


def toy_expert_errors(moe_layer, noise, seed: int = 0, tokens: int = 64, show: int = 0) -> dict:
    """Programming noise on every expert of one MoE layer and the output error it causes (Learn page toy).

    Each expert's gate/up ``[I, H]`` and down ``[H, I]`` are programmed onto tiles with ``analog.program_weights``
    (aihwkit noise model of ``noise``: weights normalised per output channel, so the noise is relative to each
    channel's abs-max, as on a chip). ``tokens`` random inputs ``x ~ N(0, 1)`` of size H (seeded) go through the
    SwiGLU expert ``down(silu(gate x) * up x)`` with clean and noisy weights.
    Returns {"maxnn": [E], "error": [E] mean L2 output error, "rel_error": [E] error / mean clean output norm,
    "up": [I, H] clean up projection of expert ``show``, "up_noisy": [I, H] the same after programming}.
    The paper's claim (arXiv 2603.02633): the absolute error grows with the maximum neuron norm.
    """
    import torch
    from .analog import program_weights, split_sizes
    from .scores import layer_scores
    m = moe_layer
    H, I, E = m.hidden_size, m.intermediate_size, m.num_experts
    nm = noise.build_noise_model()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=g)
    with torch.no_grad():
        up = torch.stack([m.up(e).float() for e in range(E)])                 # [E, I, H]
        gate = torch.stack([m.gate(e).float() for e in range(E)]) if m.gated else None
        down = torch.stack([m.down(e).float() for e in range(E)])             # [E, H, I]

        def prog(w, s):
            if nm is None:
                return w
            return program_weights(w, noise, nm, split_sizes(w.shape[2], noise.tile_size),
                                   split_sizes(w.shape[1], noise.tile_size), seed + s, w.device)[0]

        def run(gw, uw, dw):
            h = torch.einsum("eih,th->eti", uw, x)
            if gw is not None:
                h = torch.nn.functional.silu(torch.einsum("eih,th->eti", gw, x)) * h
            return torch.einsum("ehi,eti->eth", dw, h)                        # [E, T, H]
        y = run(gate, up, down)
        up_n = prog(up, 2)
        yn = run(prog(gate, 1) if gate is not None else None, up_n, prog(down, 3))
        err = (yn - y).norm(dim=-1).mean(-1)
        ref = y.norm(dim=-1).mean(-1).clamp(min=1e-12)
    return {"maxnn": layer_scores(m).maxnn, "error": err.numpy(), "rel_error": (err / ref).numpy(),
            "up": up[show].numpy(), "up_noisy": up_n[show].numpy()}


def toy_figure(maxnn, error, layer: int, noise_label: str, highlight: int | None = None) -> go.Figure:
    """Output error of each expert against its MaxNNScore, with a least-squares line in log-log space."""
    maxnn, error = np.asarray(maxnn, float), np.asarray(error, float)
    colors = ["#e45756" if e == highlight else "#4c78a8" for e in range(len(maxnn))]
    fig = go.Figure(go.Scatter(x=maxnn, y=error, mode="markers+text", text=[str(e) for e in range(len(maxnn))],
                               textposition="top center", marker=dict(size=10, color=colors),
                               hovertemplate="expert %{text}<br>MaxNNScore %{x:.4g}<br>output error %{y:.4g}"
                                             "<extra></extra>", name="expert"))
    ok = (maxnn > 0) & (error > 0)
    if ok.sum() >= 2 and np.ptp(np.log(maxnn[ok])) > 0:
        k, c = np.polyfit(np.log(maxnn[ok]), np.log(error[ok]), 1)
        xs = np.linspace(maxnn[ok].min(), maxnn[ok].max(), 50)
        fig.add_trace(go.Scatter(x=xs, y=np.exp(c) * xs ** k, mode="lines", name=f"fit: error ∝ score^{k:.2f}",
                                 line=dict(dash="dash", color="#e45756"), hoverinfo="skip"))
    fig.update_layout(title=f"Layer {layer}: output error under {noise_label} vs MaxNNScore",
                      xaxis_title="MaxNNScore (product of max neuron norms)", yaxis_title="mean L2 output error",
                      height=400, **_LAYOUT)
    fig.update_xaxes(**LOG_AXIS)
    if (error > 0).all():
        fig.update_yaxes(**LOG_AXIS)
    else:        # exact programming: every error is 0, which a log axis cannot show
        fig.update_yaxes(range=[-1, 1], zeroline=True)
        fig.add_annotation(text="no programming noise: every expert's output error is 0", showarrow=False,
                           xref="paper", yref="paper", x=0.5, y=0.9)
    return fig


def toy_lesson(maxnn, error) -> dict:
    """What the toy shows for one layer: {"r": Pearson r of log MaxNNScore with log error (nan if undefined),
    "top": expert with the largest MaxNNScore, "ratio": its error / the layer's median error, "rank": its place
    (1 = largest) among the experts' errors, "n": number of experts}."""
    maxnn, error = np.asarray(maxnn, float), np.asarray(error, float)
    top = int(np.argmax(maxnn))
    ok = (maxnn > 0) & (error > 0)
    r = float(np.corrcoef(np.log(maxnn[ok]), np.log(error[ok]))[0, 1]) if ok.sum() >= 2 \
        and np.ptp(np.log(error[ok])) > 0 else float("nan")
    med = float(np.median(error))
    return {"r": r, "top": top, "ratio": float(error[top] / med) if med > 0 else float("nan"),
            "rank": int((error > error[top]).sum()) + 1, "n": len(maxnn)}


def lesson_head(lesson: dict) -> str:
    """First sentence of the Learn page's take-away from a :func:`toy_lesson`: the top-MaxNNScore expert and where
    its output error ranks ("only the 11th largest" when it is not the largest: with close scores a strong trend
    and a top expert that is not the worst go together)."""
    k = lesson["rank"]
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    place = "the largest" if k == 1 else f"only the {k}{suffix} largest"
    return (f"Expert **{lesson['top']}** has the largest MaxNNScore in this layer; its output error is "
            f"{lesson['ratio']:.1f}× the layer's median, {place} of the {lesson['n']} experts' errors.")


def matrix_pair(clean, noisy, title: str) -> go.Figure:
    """Two heatmaps side by side: a weight matrix [rows = neurons, cols = inputs] and its programming error, each
    on its own symmetric colour scale (the error is far smaller than the weights; the subtitle gives the ratio)."""
    from plotly.subplots import make_subplots
    clean, noisy = np.asarray(clean, float), np.asarray(noisy, float)
    err = noisy - clean
    ratio = float(np.sqrt((err ** 2).mean() / max((clean ** 2).mean(), 1e-30)))
    gap = 0.2          # room for the left colour bar and its tick labels before the right panel's y ticks
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=gap, subplot_titles=(
        "weights", f"programmed − weights (RMS {ratio:.1%} of the weights' RMS)"))
    right_edge = (1 - gap) / 2
    for i, (z, name, bar) in enumerate(((clean, "weight", "weight"),
                                        (err, "error", "error"))):
        lim = float(np.abs(z).max()) or 1.0
        fig.add_trace(go.Heatmap(z=z, zmin=-lim, zmax=lim, colorscale="RdBu", name=name,
                                 colorbar=dict(x=right_edge + 0.01 if i == 0 else 1.01, xanchor="left", len=0.9,
                                               thickness=12, title=dict(text=bar, side="top")),
                                 hovertemplate="neuron %{y}, input %{x}<br>" + name + " %{z:.4g}<extra></extra>"),
                      1, i + 1)
    fig.update_xaxes(title_text="input (column of up_proj)")
    fig.update_yaxes(autorange="reversed", title_text="neuron (row of up_proj)", row=1, col=1)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title, height=370, **{**_LAYOUT, "margin": dict(l=10, r=10, t=70, b=10)})
    return fig


def shows_outlier(lesson: dict) -> bool:
    """Whether a layer's :func:`toy_lesson` shows an outlier: its top-MaxNNScore expert has the largest output error,
    at least ``OUTLIER_RATIO`` x the layer's median."""
    return lesson["rank"] == 1 and lesson["ratio"] >= OUTLIER_RATIO
