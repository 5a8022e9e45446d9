"""Running a placement on simulated analog (AIMC) hardware, and restoring the digital model exactly.

``analog(model, anatomy, placement, noise, seed)`` is a context manager: inside it the modules the
placement puts on analog tiles compute with the nonidealities of ``noise`` (a ``NoiseConfig``);
on exit every weight is restored bit-exactly. It yields a ``CoverageReport`` that lists every
module as analog or digital and checks the analog parameter count against the placement.

Two backends:

* ``"fast"`` (default): per seed, the analog expert slices of the fused expert tensors
  (``experts.gate_up_proj`` / ``down_proj``) and the analog dense weights are programmed once, in
  place, through aihwkit's noise-model functions (``apply_programming_noise``, ``apply_drift_noise``
  via its ``g_converter``), tile by tile with aihwkit's mapping (weights normalised per output
  channel and tile, ``TileModuleArray`` tile splits), with global drift compensation. DAC/ADC
  quantization (aihwkit ``UniformQuantize``) and output noise act inside a vectorised experts
  forward registered in transformers' ``ExpertsInterface`` (only analog experts' rows), and
  through forward hooks on analog dense modules.
* ``"aihwkit"`` (reference): each analog expert unfused into ``nn.Linear``s, converted with
  ``aihwkit.nn.conversion.convert_to_analog`` (``TorchInferenceRPUConfig``), programmed and drifted
  the aihwkit way (``program_analog_weights``, ``drift_analog_weights(t_inference)``); analog dense
  ``nn.Linear`` modules are swapped for their converted copies. Slow: a loop over experts.

Converters, calibrated as a chip would be (arXiv 2603.02633 tunes the DAC range and ADC bound):
the DAC input range is each token's absolute maximum per tile (aihwkit
``NoiseManagementType.ABS_MAX``); the ADC bound is in units of each output channel's weight
abs-max × input range (aihwkit's ``weight_scaling_omega=1``, columnwise convention): either
``noise.out_bound`` or, with ``calibration=calibrate(model, anatomy, ids, noise)``, a bound per
MoE layer and projection at a quantile of the normalised tile outputs on calibration tokens.

Randomness: every programming draw runs under ``torch.random.fork_rng`` seeded per
(seed, module) (aihwkit draws from the global generator, whose state is restored afterwards);
forward-pass output noise of the fast backend draws from a ``torch.Generator`` per
(seed, module); the aihwkit backend's forward noise draws from a global generator seeded per
seed for the duration of the with-block (and restored on exit).

Memory: the fast backend keeps clean copies of the analog tensors' slices it changes (reported
as ``CoverageReport.clean_copy_bytes``), never a second model; ``estimate_bytes`` is checked
against psutil's available memory before anything is applied.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager, ExitStack
from dataclasses import dataclass, field

import torch
from torch import nn

from .noise import NoiseConfig

BACKENDS = ("fast", "aihwkit")
IMPL_NAME = "hetmoe_analog"
_POLICY_KINDS = {"attention": "attention", "lm_head": "lm_head", "shared_experts": "shared_experts",
                 "router": "router", "dense_mlp": "dense_mlp"}  # DensePolicy field -> anatomy kind
_CHUNK_ELEMS = 1 << 24  # programming works on at most this many weights at once (bounded memory)


# ------------------------------------------------------------------------------ coverage report

@dataclass
class ModuleCoverage:
    """One module of the model: where it runs and how many parameters it holds."""
    name: str
    kind: str
    state: str          # "analog" | "digital"
    params: int
    tiles: int = 0      # AIMC tiles its matrices occupy (0 when digital)
    note: str = ""


@dataclass
class CoverageReport:
    """Every module listed as analog or digital, checked against the placement.

    ``analog_params`` counts parameters of modules run on tiles (tile matrices plus their digital
    periphery: biases); ``expected_analog_params`` is the placement's analog share computed from
    the anatomy's parameter counts; ``clean_copy_bytes`` is the memory kept for exact restore.
    """
    backend: str
    seed: int
    noise: dict
    placement_key: str
    modules: list[ModuleCoverage] = field(default_factory=list)
    analog_params: int = 0
    digital_params: int = 0
    expected_analog_params: int = 0
    total_params: int = 0
    tiles: int = 0
    clean_copy_bytes: int = 0
    estimated_bytes: int = 0
    calibration_key: str = ""

    @property
    def analog_share(self) -> float:
        """Analog parameters / all parameters."""
        return self.analog_params / max(self.total_params, 1)

    def summary(self) -> dict:
        """JSON-able summary (no per-module rows)."""
        return {"backend": self.backend, "seed": self.seed, "noise": self.noise, "placement_key": self.placement_key,
                "analog_params": self.analog_params, "digital_params": self.digital_params,
                "expected_analog_params": self.expected_analog_params, "total_params": self.total_params,
                "analog_share": self.analog_share, "tiles": self.tiles, "clean_copy_bytes": self.clean_copy_bytes,
                "calibration_key": self.calibration_key,
                "analog_modules": sum(m.state == "analog" for m in self.modules),
                "digital_modules": sum(m.state == "digital" for m in self.modules)}


# ------------------------------------------------------------------------------ helpers

def _derive_seed(seed: int, name: str) -> int:
    """Seed of one module's draws: sha256 of (seed, module name), 63 bits."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


@contextmanager
def _seeded_global_rng(seed: int, device: torch.device):
    """aihwkit's noise models draw from torch's global RNG: fork it, seed it, restore it after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def split_sizes(size: int, tile: int) -> list[int]:
    """Tile split of a matrix dimension, as aihwkit's ``TileModuleArray.get_split_sizes``:
    ceil(size / tile) near-equal parts (700 with 512 -> [350, 350])."""
    from aihwkit.simulator.tiles.array import TileModuleArray
    return TileModuleArray.get_split_sizes(None, size, tile)


def _quantize(x: torch.Tensor, res: float, bound: float) -> torch.Tensor:
    """aihwkit's ``UniformQuantize`` (round to 2·bound·res steps) then clip to ±bound."""
    from aihwkit.simulator.tiles.utils import UniformQuantize
    return UniformQuantize.apply(x, res, bound, False).clamp(-bound, bound)


@torch.no_grad()
def program_weights(w: torch.Tensor, noise: NoiseConfig, noise_model, in_sizes: list[int], out_sizes: list[int],
                    seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Program (and drift) a stack of weight matrices onto tiles with an aihwkit noise model.

    Args:
        w: ``[n, O, I]`` weights (nn.Linear orientation), any float dtype; not modified.
        noise_model: aihwkit ``BaseNoiseModel`` (its ``g_converter`` maps weights to µS).
        in_sizes / out_sizes: tile splits of I and O (``split_sizes``).
    Returns:
        (noisy ``[n, O, I]`` float32 weights in the original units, scales ``[n, O, T]`` float32),
        scales = per-output-channel, per-input-tile abs-max × drift compensation (so that the
        normalised tile output the ADC sees is ``y / (scale · input_range)``).
    Each input tile's weights are normalised per output channel to abs-max 1 (aihwkit
    ``weight_scaling_omega=1``, columnwise), converted to a device pair each (aihwkit
    ``SinglePairConductanceConverter``, abs-max -> g_max µS), given programming noise
    (``apply_programming_noise``), then drift and read noise at ``t_inference``
    (``apply_drift_noise``); global drift compensation (aihwkit ``GlobalDriftCompensation``:
    mean |output| to one-hot inputs before/after drift, per tile) rescales the outputs.
    """
    w = w.float()
    n, O, I = w.shape
    out = torch.empty_like(w)
    scales = torch.empty(n, O, len(in_sizes), dtype=torch.float32, device=w.device)
    with _seeded_global_rng(seed, device):
        i0 = 0
        for t, ni in enumerate(in_sizes):
            wt = w[:, :, i0:i0 + ni]
            s = wt.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
            wn = wt / s
            wp, nu = noise_model.apply_programming_noise(wn)
            wd = noise_model.apply_drift_noise(wp, nu, noise.t_inference) if noise.drifts else wp
            alpha = torch.ones(n, O, 1, dtype=torch.float32, device=w.device)
            if noise.drifts and noise.drift_compensation:
                # aihwkit's readout: one-hot inputs through the tile, i.e. the weights seen by the ADC
                io = noise.io_parameters()
                read = (lambda v: _quantize(v, io.out_res, noise.out_bound)) if noise.adc_bits else (lambda v: v)
                o0 = 0
                for no in out_sizes:  # one compensation factor per tile
                    ref = read(wp[:, o0:o0 + no]).abs().mean((1, 2)).clamp(min=1e-4)
                    cur = read(wd[:, o0:o0 + no]).abs().mean((1, 2)).clamp(min=1e-4)
                    alpha[:, o0:o0 + no] = (ref / cur).view(n, 1, 1)
                    o0 += no
            scale = s * alpha
            out[:, :, i0:i0 + ni] = wd * scale
            scales[:, :, t] = scale[..., 0]
            i0 += ni
    return out, scales


def _channel_absmax(w: torch.Tensor, in_sizes: list[int]) -> torch.Tensor:
    """Per-output-channel abs-max of each input tile: ``[n, O, I]`` -> ``[n, O, T]`` float32."""
    parts = torch.split(w.float().abs(), in_sizes, dim=-1)
    return torch.stack([p.amax(-1) for p in parts], -1).clamp(min=torch.finfo(torch.float32).tiny)


def _tiles(o: int, i: int, tile: int) -> int:
    return len(split_sizes(o, tile)) * len(split_sizes(i, tile))


def _is_norm(m: nn.Module) -> bool:
    return "norm" in type(m).__name__.lower()


def _mvm_units(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """Matrix-vector-multiply units of a dense module: its nn.Linear submodules, or the module
    itself when it holds a 2-D ``weight`` (routers computing ``F.linear(x, self.weight)``)."""
    lins = [(f"{prefix}.{n}" if n else prefix, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if lins:
        return lins
    w = getattr(module, "weight", None)
    if isinstance(w, nn.Parameter) and w.dim() == 2 and not isinstance(module, nn.Embedding):
        return [(prefix, module)]
    return []


# ------------------------------------------------------------------------------ experts forward

def _gmm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Grouped ``x @ w[e].T`` (``w [E, O, I]``; transposed storage ``[E, I, O]``) for tokens
    sorted by expert (``offs``: cumulative counts). transformers' grouped_mm when the strides
    allow, else its loop fallback op."""
    from transformers.integrations.moe import _grouped_linear
    try:
        return _grouped_linear(x, w, offs, is_transposed=transposed)
    except RuntimeError:  # strides the grouped kernel cannot take (tile slices)
        wt = w if transposed else w.transpose(-2, -1)  # [E, I, O]
        return torch.ops.transformers.grouped_mm_fallback(x.to(w.dtype), wt, offs)


class _FastExperts:
    """Per-MoE-layer state of the fast backend.

    With ADC or output noise, each analog expert's tile weights are stored pre-divided by
    ``scale * step_out / step_in`` (scale: the tile's per-channel abs-max x drift compensation),
    so a grouped matmul of the DAC's integer codes gives the ADC input directly in ADC steps;
    ``g_out [T, E, O] = scale * step_out`` maps the ADC codes back. This saves every per-row
    gather of scales in the forward pass (speed); the restore copies the clean slices back.
    """

    def __init__(self, layer, noise: NoiseConfig, analog_ids: list[int], gen: torch.Generator, calibration=None):
        self.layer, self.noise, self.gen = layer, noise, gen
        self.recorder = calibration if calibration is not None and calibration.recording else None
        E = layer.num_experts
        dev = layer.experts.down_proj.device
        self.analog = torch.zeros(E, dtype=torch.bool, device=dev)
        self.analog[analog_ids] = True
        self.analog_list = [bool(v) for v in self.analog.tolist()]
        self.all_analog = all(self.analog_list)
        self.in_sizes: dict[str, list[int]] = {}
        self.g_out: dict[str, torch.Tensor] = {}
        io = noise.io_parameters()
        # converter grids (aihwkit UniformQuantize: step = 2 * bound * res; the DAC's bound is 1 range)
        self.step_in = 2.0 * io.inp_res if noise.dac_bits else None
        self.step_out = self.levels = None
        if noise.adc_bits:  # one grid per projection: the calibrated bound, else noise.out_bound
            self.step_out, self.levels = {}, 1.0 / (2.0 * io.out_res)
            for key in ("in", "down"):
                b = calibration.bounds[(layer.index, key)] if calibration is not None and not self.recorder \
                    else noise.out_bound
                self.step_out[key] = 2.0 * io.out_res * b
        self.io_out = noise.adc_bits is not None or noise.out_noise > 0 or self.recorder is not None

    def s_out(self, key) -> float:
        return self.step_out[key] if self.step_out else 1.0

    def fold(self, key) -> float:
        """Factor stored weights are multiplied by, per unit of 1 / scale (see class doc)."""
        return (self.step_in or 1.0) / self.s_out(key) if self.io_out else 1.0

    def _adc(self, z, a, key, t, e, noise_scale):
        """Output noise, ADC and digital rescale of one expert's rows ``z`` (in place)."""
        if noise_scale:
            z += noise_scale * torch.randn(z.shape, generator=self.gen, device=z.device)
        if self.levels is not None:
            z.round_().clamp_(-self.levels, self.levels)
        z *= self.g_out[key][t, e]
        if a is not None:
            z *= a

    def proj(self, x, w, segs, offs, key, defer_row_scale=False):
        """One grouped projection of expert-sorted rows ``x [S, I]`` -> ``[S, O]`` (float32).

        Analog rows: the DAC maps each tile's input to integer codes round(x / (a * step_in)),
        a = the row's abs-max over the tile (aihwkit NoiseManagementType.ABS_MAX); the tile's
        normalised output gets output noise and the ADC (round to step_out, clip at ±out_bound,
        aihwkit UniformQuantize grid); the digital periphery rescales by scale * a. Digital
        rows: a plain matmul. ``segs``: (expert, start, end) of the analog experts' rows.
        Returns (y, row_scale): with ``defer_row_scale`` (all rows analog, one input tile) the
        per-row factor is left to the caller (folded into the routing weights), else None.
        """
        nz = self.noise
        tr = self.layer.transposed
        sizes = self.in_sizes[key]
        noise_scale = nz.out_noise / self.s_out(key) if nz.out_noise > 0 else 0.0
        out, i0 = None, 0
        for t, ni in enumerate(sizes):
            xt = x[:, i0:i0 + ni] if len(sizes) > 1 else x
            wt = (w[:, i0:i0 + ni] if tr else w[..., i0:i0 + ni]) if len(sizes) > 1 else w
            a = None
            if self.step_in is not None:
                # abs-max as max(-min, max): two fast reductions, no |x| copy; in x's own dtype
                # (a max is exact in any float format), only the [S, 1] result in float32
                a = torch.maximum(xt.amax(-1, keepdim=True), xt.amin(-1, keepdim=True).neg_()).float().clamp_(
                    min=torch.finfo(torch.float32).tiny)
                # x is this forward's own gathered copy: float32 rows are coded in place (no
                # allocation: fresh large CPU tensors cost page faults); other dtypes get one
                # float32 temporary (the division promotes), rounded in place, then cast back
                inplace = xt.dtype == torch.float32
                if self.all_analog:
                    xin = xt.div_(a * self.step_in).round_() if inplace else \
                        torch.div(xt, a * self.step_in).round_().to(w.dtype)
                else:
                    xin = xt if inplace else xt.to(w.dtype, copy=True)
                    for _, s0, s1 in segs:
                        xin[s0:s1] = torch.div(xt[s0:s1], a[s0:s1] * self.step_in).round_()
            else:
                xin = xt
            y = _gmm(xin, wt, offs, tr).float()
            if self.recorder is not None:  # calibration: |normalised tile output| quantile
                v = y.abs().flatten()
                v = v[torch.randperm(v.numel(), generator=self.gen)[:1 << 22]] if v.numel() > 1 << 22 else v
                q = torch.quantile(v, self.recorder.quantile).item() if v.numel() else 0.0
                k = (self.layer.index, key)
                self.recorder.bounds[k] = max(self.recorder.bounds.get(k, 0.0), q)
            if self.io_out:
                if self.all_analog:
                    if noise_scale:
                        y += noise_scale * torch.randn(y.shape, generator=self.gen, device=y.device)
                    if self.levels is not None:
                        y.round_().clamp_(-self.levels, self.levels)
                    for e, s0, s1 in segs:
                        y[s0:s1] *= self.g_out[key][t, e]
                    if a is not None:
                        if defer_row_scale and len(sizes) == 1:
                            return y, a
                        y *= a
                else:
                    for e, s0, s1 in segs:
                        self._adc(y[s0:s1], None if a is None else a[s0:s1], key, t, e, noise_scale)
            elif a is not None:  # DAC only: codes back to input units
                if self.all_analog:
                    if defer_row_scale and len(sizes) == 1:
                        return y, a * self.step_in
                    y *= a * self.step_in
                else:
                    for _, s0, s1 in segs:
                        y[s0:s1] *= a[s0:s1] * self.step_in
            out = y if out is None else out + y
            i0 += ni
        return out, None

    def forward(self, mod, hidden_states, top_k_index, top_k_weights):
        """Experts forward (same contract as transformers' ``grouped_mm_experts_forward``)."""
        K = top_k_index.size(-1)
        N, H = hidden_states.shape
        eids = top_k_index.reshape(-1)
        eids_g, perm = torch.sort(eids)  # as transformers: deterministic on a given device
        x = hidden_states[perm // K]
        w_route = top_k_weights.reshape(-1)[perm]
        counts = torch.bincount(eids_g, minlength=self.layer.num_experts)
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        ends = offs.tolist()
        segs = [(e, s1 - c, s1) for e, (c, s1) in enumerate(zip(counts.tolist(), ends)) if c and self.analog_list[e]]
        gated = getattr(mod, "has_gate", True)
        h, _ = self.proj(x, mod.gate_up_proj if gated else mod.up_proj, segs, offs, "in")
        if getattr(mod, "has_bias", False):
            h = h + (mod.gate_up_proj_bias if gated else mod.up_proj_bias)[eids_g]
        h = mod._apply_gate(h) if gated else mod.act_fn(h)
        plain = not (getattr(mod, "has_bias", False) or getattr(mod, "has_post_expert_norm", False))
        y, row_scale = self.proj(h, mod.down_proj, segs, offs, "down", defer_row_scale=plain)
        if getattr(mod, "has_bias", False):
            y = y + mod.down_proj_bias[eids_g]
        if getattr(mod, "has_post_expert_norm", False):
            y = mod.post_expert_norm(y)
        w_route = w_route.unsqueeze(-1)
        y = y * (w_route if row_scale is None else w_route * row_scale)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        return y[inv].view(N, K, H).sum(1).to(hidden_states.dtype)


class _AihwkitExperts:
    """Per-MoE-layer state of the aihwkit backend: converted AnalogLinear per analog expert."""

    def __init__(self, layer, lins: dict[int, tuple[nn.Module, nn.Module]]):
        self.layer, self.lins = layer, lins

    def forward(self, mod, hidden_states, top_k_index, top_k_weights):
        """Eager loop over hit experts; analog experts through aihwkit tiles (float32)."""
        L = self.layer
        out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        gated = getattr(mod, "has_gate", True)
        for e in torch.unique(top_k_index).tolist():
            tok, pos = torch.where(top_k_index == e)
            x = hidden_states[tok]
            if e in self.lins:
                lin_in, lin_down = self.lins[e]
                h = lin_in(x.float()).to(x.dtype)
            else:
                w = (mod.gate_up_proj if gated else mod.up_proj)[e]
                h = x @ w if L.transposed else x @ w.T
                if getattr(mod, "has_bias", False):
                    h = h + (mod.gate_up_proj_bias if gated else mod.up_proj_bias)[e]
            h = mod._apply_gate(h) if gated else mod.act_fn(h)
            if e in self.lins:
                y = lin_down(h.float())
            else:
                w = mod.down_proj[e]
                y = h @ w if L.transposed else h @ w.T
                if getattr(mod, "has_bias", False):
                    y = y + mod.down_proj_bias[e]
            if getattr(mod, "has_post_expert_norm", False):
                y = mod.post_expert_norm(y)
            out.index_add_(0, tok, y.float() * top_k_weights[tok, pos, None].float())
        return out.to(hidden_states.dtype)


def _analog_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The ``hetmoe_analog`` experts implementation: analog layers use their backend state,
    other layers the implementation the model had before ``analog()``."""
    st = self.__dict__.get("_hetmoe_state")
    if st is not None:
        return st.forward(self, hidden_states, top_k_index, top_k_weights)
    prev = self.__dict__.get("_hetmoe_prev")
    if prev is None:  # not inside analog(): the class's own eager forward
        return type(self).forward.__wrapped__(self, hidden_states, top_k_index, top_k_weights)
    return prev(self, hidden_states, top_k_index, top_k_weights)


def _register_impl():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface
    if IMPL_NAME not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(IMPL_NAME, _analog_experts_forward)


# ------------------------------------------------------------------------------ dense units (fast)

class _DenseUnit:
    """One analog dense MVM (nn.Linear or router weight) in the fast backend."""

    def __init__(self, name, module, noise: NoiseConfig, tied: bool, gen: torch.Generator):
        self.name, self.module, self.noise, self.tied, self.gen = name, module, noise, tied, gen
        self.weight = module.weight
        self.bias = getattr(module, "bias", None) if isinstance(module, nn.Linear) else None
        O, I = self.weight.shape
        self.in_sizes = split_sizes(I, noise.tile_size)
        self.out_sizes = split_sizes(O, noise.tile_size)
        self.scales = None          # [O, T]
        self.noisy = None           # noisy weight copy when tied (shared with embeddings)
        self.clean = None
        io = noise.io_parameters()
        self.inp_res = io.inp_res if noise.dac_bits else None
        self.out_res = io.out_res if noise.adc_bits else None
        self._a = None

    def hooks_needed(self) -> bool:
        return self.tied or self.noise.io_active

    def pre_hook(self, module, args):
        """DAC: quantize the input to the per-token, per-tile range (fake-quantized, same units)."""
        if self.inp_res is None or not args:
            self._a = None
            return None
        x = args[0]
        parts, avals, i0 = [], [], 0
        for ni in self.in_sizes:
            xt = x[..., i0:i0 + ni].float()
            a = xt.abs().amax(-1, keepdim=True)
            a = torch.where(a > 0, a, torch.ones_like(a))
            parts.append(_quantize(xt / a, self.inp_res, 1.0) * a)
            avals.append(a)
            i0 += ni
        self._a = avals
        return (torch.cat(parts, -1).to(x.dtype),) + tuple(args[1:])

    def post_hook(self, module, args, output):
        """ADC and output noise per tile; tied weights compute with their noisy copy."""
        if not isinstance(output, torch.Tensor):
            return None  # routers: logits consumed inside (top-k); only DAC + weight noise simulated
        x = args[0]
        w = self.noisy if self.tied else self.weight
        nz = self.noise
        io = self.out_res is not None or nz.out_noise > 0
        if not io and not self.tied:
            return None
        if not io:
            return nn.functional.linear(x, w, self.bias)
        out, i0 = None, 0
        for t, ni in enumerate(self.in_sizes):
            if len(self.in_sizes) == 1 and not self.tied:
                yt = output - self.bias if self.bias is not None else output
            else:
                yt = nn.functional.linear(x[..., i0:i0 + ni], w[:, i0:i0 + ni])
            sc = self.scales[:, t]
            if self._a is not None:
                sc = sc * self._a[t]
            yn = yt.float() / sc
            if nz.out_noise > 0:
                yn = yn + nz.out_noise * torch.randn(yn.shape, generator=self.gen, device=yn.device)
            if self.out_res is not None:
                yn = _quantize(yn, self.out_res, nz.out_bound)
            yt = (yn * sc).to(output.dtype)
            out = yt if out is None else out + yt
            i0 += ni
        return out + self.bias if self.bias is not None else out


class _AnalogLinearWrap(nn.Module):
    """An aihwkit AnalogLinear standing in for an nn.Linear of any dtype (tiles are float32)."""

    def __init__(self, analog_linear):
        super().__init__()
        self.analog_linear = analog_linear

    def forward(self, x):
        return self.analog_linear(x.float()).to(x.dtype)


def _to_analog_linear(weight: torch.Tensor, bias: torch.Tensor | None, noise: NoiseConfig):
    """nn.Linear from a weight ``[O, I]`` (and bias), converted with aihwkit's convert_to_analog."""
    from aihwkit.nn.conversion import convert_to_analog
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
    with torch.no_grad():
        lin.weight.copy_(weight.float())
        if bias is not None:
            lin.bias.copy_(bias.float())
    alin = convert_to_analog(lin, noise.rpu_config())
    return alin.eval()


# ------------------------------------------------------------------------------ memory

def estimate_bytes(model: nn.Module, anatomy, placement, noise: NoiseConfig, backend: str = "fast") -> dict:
    """Memory the analog simulation adds, in bytes: ``{"clean_copies", "working", "total"}``.

    fast: clean copies of the analog tensors (their dtype) + tile scales + float32 programming
    work space (~8 float32 copies of one chunk); aihwkit: ~10 float32 copies of every analog
    weight (Linear copy, tile weights, reference, programmed, drift coefficients, conductances)."""
    n_an, biggest, elem = 0, 0, 4
    for m in anatomy.moe_layers:
        ids = placement.analog_experts(m.index)
        elem = m.experts.down_proj.element_size()
        per = sum(p[0].numel() for p in (m.experts.down_proj, _w_in(m)))
        n_an += len(ids) * per
        biggest = max(biggest, min(max(len(ids), 1) * per, _CHUNK_ELEMS))
    for name, kind, unit in _dense_analog_units(model, anatomy, placement):
        n_an += unit.weight.numel()
        biggest = max(biggest, unit.weight.numel())
    if backend == "fast":
        clean = n_an * elem
        working = 8 * 4 * biggest + n_an * 4 // 64
    else:
        clean, working = 0, 10 * 4 * n_an
    return {"clean_copies": clean, "working": working, "total": clean + working, "analog_weights": n_an}


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil
    return psutil.virtual_memory().available


def _w_in(m) -> torch.Tensor:
    return m.experts.gate_up_proj if m.gated else m.experts.up_proj


def _dense_analog_units(model, anatomy, placement):
    """(name, kind, module) of every MVM unit in a dense module the placement puts on analog."""
    dense = placement.dense
    out = []
    for field_name, kind in _POLICY_KINDS.items():
        if getattr(dense, field_name, True):
            continue  # True = digital
        for mname in anatomy.modules.get(kind, ()):
            for uname, unit in _mvm_units(model.get_submodule(mname), mname):
                out.append((uname, kind, unit))
    return out


# ------------------------------------------------------------------------------ coverage

def _param_owner(model, anatomy) -> dict[int, str]:
    """id(param) -> anatomy kind, with the anatomy's precedence (norms inside modules = norms)."""
    norm = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    owner: dict[int, str] = {}
    for kind in ("embeddings", "lm_head", "router", "routed_experts", "shared_experts", "dense_mlp", "attention"):
        for name in anatomy.modules.get(kind, ()):
            for p in model.get_submodule(name).parameters():
                owner.setdefault(id(p), "norms" if id(p) in norm else kind)
    return owner


def _coverage(model, anatomy, placement, noise, seed, backend, dense_units) -> CoverageReport:
    """Build the report and check it: analog params == the placement's analog share."""
    rep = CoverageReport(backend=backend, seed=seed, noise=noise.to_dict(),
                         placement_key=str(getattr(placement, "key", "")))
    owner = _param_owner(model, anatomy)
    counted: set[int] = set()
    ts = noise.tile_size
    # routed experts: one row per expert
    for m in anatomy.moe_layers:
        an = set(placement.analog_experts(m.index))
        per = sum(p.numel() for p in m.experts.parameters()) // m.num_experts
        O_in, I_in = (2 if m.gated else 1) * m.intermediate_size, m.hidden_size
        tiles = _tiles(O_in, I_in, ts) + _tiles(m.hidden_size, m.intermediate_size, ts)
        for e in range(m.num_experts):
            a = e in an
            rep.modules.append(ModuleCoverage(f"{m.experts_name}[{e}]", "routed_experts", "analog" if a else "digital",
                                              per, tiles if a else 0))
        counted |= {id(p) for p in m.experts.parameters()}
    # dense MVM units placed analog
    unit_ids = {id(u) for _, _, u in dense_units}
    for uname, kind, unit in dense_units:
        own = [p for p in unit.parameters(recurse=False) if id(p) not in counted]
        note = ""
        if any(owner.get(id(p)) != kind for p in own):
            note = "weight tied to the embeddings: the table is this matrix, counted here (as digital_share does)"
        if kind == "router" and noise.io_active:
            note = "router: weight noise and DAC simulated; its output is consumed inside, no ADC"
        O, I = unit.weight.shape
        rep.modules.append(ModuleCoverage(uname, kind, "analog", sum(p.numel() for p in own), _tiles(O, I, ts), note))
        counted |= {id(p) for p in own}
    for field_name, kind in _POLICY_KINDS.items():  # non-matrix parameters of analog modules
        if getattr(placement.dense, field_name, True):
            continue
        for mname in anatomy.modules.get(kind, ()):
            rest = [p for p in model.get_submodule(mname).parameters()
                    if id(p) not in counted and owner.get(id(p)) == kind]
            if rest:
                rep.modules.append(ModuleCoverage(mname, kind, "analog", sum(p.numel() for p in rest), 0,
                                                  "periphery of an analog module (not a matrix): computed digitally"))
                counted |= {id(p) for p in rest}
    # everything else: digital (by placement, or not an MVM: embeddings, norms, ...)
    for name, mod in model.named_modules():
        if id(mod) in unit_ids:
            continue
        params = [p for p in mod.parameters(recurse=False) if id(p) not in counted]
        if not params:
            continue
        counted |= {id(p) for p in params}
        kinds = sorted({owner.get(id(p), "norms" if _is_norm(mod) else "other") for p in params})
        note = {"embeddings": "table lookup: no matrix-vector product", "norms": "element-wise: no matrix-vector product",
                "other": "not mapped to tiles"}.get(kinds[0], "digital by placement") if len(kinds) == 1 else ""
        rep.modules.append(ModuleCoverage(name, "/".join(kinds), "digital", sum(p.numel() for p in params), 0, note))
    rep.analog_params = sum(r.params for r in rep.modules if r.state == "analog")
    rep.digital_params = sum(r.params for r in rep.modules if r.state == "digital")
    rep.total_params = rep.analog_params + rep.digital_params
    rep.tiles = sum(r.tiles for r in rep.modules)
    # the placement's analog share (placement.digital_share: analog experts + analog dense kinds)
    from .placement import digital_share
    exp = digital_share(placement, anatomy)["analog_params"]
    rep.expected_analog_params = exp
    problems = []
    if rep.total_params != anatomy.total_params:
        problems.append(f"{rep.total_params} parameters listed but the anatomy counts {anatomy.total_params}")
    if rep.analog_params != exp:
        problems.append(f"{rep.analog_params} analog parameters but the placement's analog share is {exp}")
    for field_name, kind in _POLICY_KINDS.items():
        if not getattr(placement.dense, field_name, True) and anatomy.param_counts.get(kind, 0):
            if not any(k == kind for _, k, _ in dense_units):
                problems.append(f"{kind} placed analog but none of its modules has a matrix to put on tiles")
    if problems:
        raise RuntimeError("analog coverage does not match the placement: " + "; ".join(problems))
    return rep


# ------------------------------------------------------------------------------ ADC calibration

@dataclass
class Calibration:
    """ADC bounds of the routed experts' tiles, per MoE layer and projection, from data.

    ``bounds[(moe_index, "in" | "down")]``: the ``quantile`` of |normalised tile output| (per
    channel abs-max x per-token input range = 1, i.e. aihwkit's ``out_bound`` units) over the
    calibration tokens, all experts programmed clean, DAC as in the noise config. Passed to
    ``analog(calibration=...)`` it replaces ``noise.out_bound`` for those tiles (both backends),
    as a chip's ADC range is tuned per tile. ``key`` enters cache keys.
    """
    quantile: float
    bounds: dict = field(default_factory=dict)
    recording: bool = False

    @property
    def key(self) -> str:
        items = sorted((f"{i}:{k}", round(v, 6)) for (i, k), v in self.bounds.items())
        return hashlib.sha256(repr((self.quantile, items)).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"quantile": self.quantile, "bounds": {f"{i}:{k}": v for (i, k), v in sorted(self.bounds.items())}}


@torch.no_grad()
def calibrate(model: nn.Module, anatomy, input_ids: torch.Tensor, noise: NoiseConfig, quantile: float = 0.999,
              batch_size: int = 8) -> Calibration:
    """Tune the experts' ADC bounds on calibration tokens (the paper tunes the ADC bound).

    Args:
        input_ids: ``[B, T]`` token ids (a few thousand tokens suffice).
        noise: its DAC setting is used (the ADC sees DAC-quantized inputs); weights are clean.
        quantile: share of normalised outputs the ADC range covers (largest batch value kept).
    Returns: ``Calibration`` with one bound per (MoE layer, projection).
    Raises: ValueError for a quantile outside (0, 1] or empty input.
    """
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    if input_ids.numel() == 0:
        raise ValueError("calibration needs at least one token")
    from .placement import Placement
    cal = Calibration(quantile=quantile, recording=True)
    rec_noise = noise.replace(name="calibration", noise_model="none", adc_bits=None, out_noise=0.0)
    with analog(model, anatomy, Placement.all_analog(anatomy), rec_noise, seed=0, calibration=cal):
        for b in range(0, input_ids.shape[0], batch_size):
            model(input_ids[b:b + batch_size])
    cal.recording = False
    return cal


# ------------------------------------------------------------------------------ the context manager

def _check_inputs(model, anatomy, placement, noise, seed, backend):
    if backend not in BACKENDS:
        raise ValueError(f"unknown analog backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not isinstance(noise, NoiseConfig):
        raise ValueError(f"noise must be a NoiseConfig (hetmoe_core.noise.get_preset(name)), got {type(noise).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    nums = tuple(placement.num_experts)
    want = tuple(m.num_experts for m in anatomy.moe_layers)
    if nums != want:
        raise ValueError(f"placement is for experts per layer {nums} but the model has {want}; "
                         f"place again for this model's anatomy")
    dt = next(model.parameters()).dtype
    if dt not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"analog simulation supports float32, bfloat16 and float16 models, not {dt}")


@contextmanager
def analog(model: nn.Module, anatomy, placement, noise: NoiseConfig, seed: int, backend: str = "fast",
           calibration=None, memory_limit: int | None = None):
    """Run ``model`` with the placement's analog part on simulated AIMC tiles; restore on exit.

    Args:
        model: the transformers MoE model ``anatomy`` describes (float32/bfloat16/float16).
        placement: ``hetmoe_core.placement.Placement`` (digital experts per MoE layer + DensePolicy).
        noise: ``NoiseConfig`` (``get_preset(name)``).
        seed: noise seed (>= 0); same seed -> identical outputs.
        backend: "fast" (default) or "aihwkit" (reference, slow).
        calibration: a ``Calibration`` (``calibrate(...)``): per-layer ADC bounds of the routed
            experts instead of ``noise.out_bound``; None: ``noise.out_bound`` everywhere.
        memory_limit: bytes the simulation may add (default: 90% of the available memory,
            psutil on CPU, ``torch.cuda.mem_get_info`` on GPU).
    Yields:
        ``CoverageReport`` (every module analog/digital; raises RuntimeError on a mismatch).
    Raises:
        ValueError: bad backend/seed/noise, placement for another anatomy, unsupported dtype,
            or a module the aihwkit backend cannot convert.
        MemoryError: the estimated memory does not fit into what is available.
    After the with-block every parameter is bit-identical to before (also after an exception).
    """
    _check_inputs(model, anatomy, placement, noise, seed, backend)
    if calibration is not None and not isinstance(calibration, Calibration):
        raise ValueError("calibration must be a Calibration from hetmoe_core.analog.calibrate(...) or None")
    if calibration is not None and not calibration.recording:
        missing = [(m.index, k) for m in anatomy.moe_layers for k in ("in", "down")
                   if (m.index, k) not in calibration.bounds]
        if missing:
            raise ValueError(f"calibration lacks ADC bounds for MoE layers/projections {missing}: calibrate this model")
    device = next(model.parameters()).device
    est = estimate_bytes(model, anatomy, placement, noise, backend)
    avail = int(0.9 * _available_bytes(device)) if memory_limit is None else int(memory_limit)
    if est["total"] > avail:
        raise MemoryError(f"analog simulation ({backend}) needs about {est['total'] / 2**30:.4f} GiB more but only "
                          f"{avail / 2**30:.4f} GiB may be used on {device}; use backend='fast', fewer analog "
                          f"experts, a smaller model, or free memory")
    dense_units = _dense_analog_units(model, anatomy, placement)
    rep = _coverage(model, anatomy, placement, noise, seed, backend, dense_units)
    rep.estimated_bytes = est["total"]
    rep.calibration_key = calibration.key if calibration is not None and not calibration.recording else ""
    _register_impl()
    with ExitStack() as stack:
        # experts dispatch: every experts module's config selects hetmoe_analog while inside
        configs = {id(m.experts.config): m.experts.config for m in anatomy.moe_layers}
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        for m in anatomy.moe_layers:
            prev_name = m.experts.config._experts_implementation
            if prev_name == IMPL_NAME:
                raise RuntimeError("analog() contexts cannot be nested on one model")
            m.experts.__dict__["_hetmoe_prev"] = ALL_EXPERTS_FUNCTIONS.get_interface(
                prev_name, type(m.experts).forward.__wrapped__)
        prev_impls = {k: c._experts_implementation for k, c in configs.items()}

        def _undo_dispatch():
            for k, c in configs.items():
                c._experts_implementation = prev_impls[k]
            for m in anatomy.moe_layers:
                m.experts.__dict__.pop("_hetmoe_prev", None)
                m.experts.__dict__.pop("_hetmoe_state", None)
        stack.callback(_undo_dispatch)
        for c in configs.values():
            c._experts_implementation = IMPL_NAME
        if backend == "fast":
            rep.clean_copy_bytes = _apply_fast(stack, model, anatomy, placement, noise, seed, dense_units, device,
                                               calibration)
        else:
            with _seeded_global_rng(_derive_seed(seed, "build"), device):  # nn.Linear init draws globally
                _apply_aihwkit(stack, model, anatomy, placement, noise, seed, dense_units, device, calibration)
            stack.enter_context(_seeded_global_rng(_derive_seed(seed, "forward"), device))
        yield rep


def _apply_fast(stack, model, anatomy, placement, noise, seed, dense_units, device, calibration=None) -> int:
    """Program analog weights in place (clean copies kept for restore); install forward state."""
    nm = noise.build_noise_model() if noise.weight_noise else None
    clean_bytes = 0
    ts = noise.tile_size
    for m in anatomy.moe_layers:
        ids = list(placement.analog_experts(m.index))
        if not ids:
            continue
        gen = torch.Generator(device=device).manual_seed(_derive_seed(seed, m.experts_name + ":out"))
        st = _FastExperts(m, noise, ids, gen, calibration)
        idx = torch.tensor(ids, dtype=torch.long, device=device)
        for key, p in (("in", _w_in(m)), ("down", m.experts.down_proj)):
            fold = st.fold(key)
            logical = p.data.transpose(1, 2) if m.transposed else p.data  # [E, O, I]
            O, I = logical.shape[1:]
            sizes = st.in_sizes[key] = split_sizes(I, ts)
            if nm is None and not st.io_out:
                continue  # DAC alone needs no weight change
            clean = p.data.index_select(0, idx)
            clean_bytes += clean.numel() * clean.element_size()
            stack.callback(lambda p=p, idx=idx, clean=clean: p.data.index_copy_(0, idx, clean))
            g_out = torch.ones(len(sizes), m.num_experts, O, dtype=torch.float32, device=device)
            chunk = max(1, _CHUNK_ELEMS // (O * I))
            for c0 in range(0, len(ids), chunk):
                sub = ids[c0:c0 + chunk]
                if nm is not None:
                    nz = noise if not (calibration and noise.adc_bits and not st.recorder) else \
                        noise.replace(out_bound=calibration.bounds[(m.index, key)])  # drift readout's ADC
                    w, sc = program_weights(logical[sub], nz, nm, sizes, split_sizes(O, ts),
                                            _derive_seed(seed, f"{m.experts_name}.{key}:{sub[0]}-{sub[-1]}"), device)
                else:
                    w, sc = logical[sub].float(), _channel_absmax(logical[sub], sizes)
                if st.io_out:  # store in ADC steps per unit DAC code (see _FastExperts)
                    w = w * torch.repeat_interleave(fold / sc, torch.tensor(sizes, device=device), dim=-1)
                    g_out[:, sub] = (sc * st.s_out(key)).permute(2, 0, 1)
                p.data[sub] = (w.transpose(1, 2) if m.transposed else w).to(p.dtype)
            if st.io_out:
                st.g_out[key] = g_out
                clean_bytes += g_out.numel() * 4
        if noise.io_active or st.recorder is not None:  # programmed weights alone need no special forward
            m.experts.__dict__["_hetmoe_state"] = st
    tied = _tied_ids(model)
    for uname, kind, unit in dense_units:
        gen = torch.Generator(device=device).manual_seed(_derive_seed(seed, uname + ":out"))
        du = _DenseUnit(uname, unit, noise, id(unit.weight) in tied, gen)
        w = unit.weight
        O, I = w.shape
        if nm is not None:
            noisy, sc = program_weights(w.data[None], noise, nm, du.in_sizes, du.out_sizes,
                                        _derive_seed(seed, uname), device)
            du.scales = sc[0]
            if du.tied:
                du.noisy = noisy[0].to(w.dtype)
                clean_bytes += du.noisy.numel() * du.noisy.element_size()
            else:
                clean = w.data.clone()
                clean_bytes += clean.numel() * clean.element_size()
                stack.callback(lambda w=w, clean=clean: w.data.copy_(clean))
                w.data.copy_(noisy[0].to(w.dtype))
        else:
            du.noisy = w.data if du.tied else None
            du.scales = torch.stack([w.data[:, i0:i0 + ni].abs().amax(-1).float() for i0, ni in
                                     zip(_cumstarts(du.in_sizes), du.in_sizes)], -1).clamp(min=torch.finfo(torch.float32).tiny)
        if du.hooks_needed():
            h1 = unit.register_forward_pre_hook(du.pre_hook)
            h2 = unit.register_forward_hook(du.post_hook)
            stack.callback(h1.remove)
            stack.callback(h2.remove)
    return clean_bytes


def _cumstarts(sizes):
    out, s = [], 0
    for n in sizes:
        out.append(s)
        s += n
    return out


def _tied_ids(model) -> set[int]:
    """ids of parameters held by more than one module (tied lm_head / embeddings)."""
    seen: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, v in seen.items() if v > 1}


def _apply_aihwkit(stack, model, anatomy, placement, noise, seed, dense_units, device, calibration=None):
    """Convert analog experts / dense Linears with aihwkit, program and drift them."""
    analog_lins: list[tuple[str, nn.Module]] = []
    for m in anatomy.moe_layers:
        ids = list(placement.analog_experts(m.index))
        if not ids:
            continue
        ex = m.experts
        lins = {}
        for e in ids:
            w_in = _w_in(m)[e]
            w_in = w_in.T if m.transposed else w_in                                    # [O, I]
            w_dn = m.experts.down_proj[e]
            w_dn = w_dn.T if m.transposed else w_dn
            b_in = (ex.gate_up_proj_bias if m.gated else ex.up_proj_bias)[e] if m.has_bias else None
            b_dn = ex.down_proj_bias[e] if m.has_bias else None
            nz_in, nz_dn = noise, noise
            if calibration is not None and noise.adc_bits:
                nz_in = noise.replace(out_bound=calibration.bounds[(m.index, "in")])
                nz_dn = noise.replace(out_bound=calibration.bounds[(m.index, "down")])
            lins[e] = (_to_analog_linear(w_in.detach(), b_in.detach() if b_in is not None else None, nz_in),
                       _to_analog_linear(w_dn.detach(), b_dn.detach() if b_dn is not None else None, nz_dn))
            analog_lins += [(f"{m.experts_name}[{e}].in", lins[e][0]), (f"{m.experts_name}[{e}].down", lins[e][1])]
        ex.__dict__["_hetmoe_state"] = _AihwkitExperts(m, lins)
    for uname, kind, unit in dense_units:
        if type(unit) is not nn.Linear:
            raise ValueError(f"{uname} ({kind}, {type(unit).__name__}) is not a plain nn.Linear, so aihwkit's "
                             f"convert_to_analog cannot convert it; keep {kind} digital or use backend='fast'")
        alin = _to_analog_linear(unit.weight.detach(), unit.bias.detach() if unit.bias is not None else None, noise)
        parent_name, _, attr = uname.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, _AnalogLinearWrap(alin))
        stack.callback(lambda parent=parent, attr=attr, unit=unit: setattr(parent, attr, unit))
        analog_lins.append((uname, alin))
    if noise.weight_noise:
        for name, alin in analog_lins:
            with _seeded_global_rng(_derive_seed(seed, name), device):
                alin.program_analog_weights()
                if noise.drifts:
                    alin.drift_analog_weights(noise.t_inference)
