"""Running a placement on simulated analog (AIMC) hardware, and restoring the digital model exactly.

``analog(model, anatomy, placement, noise, seed)`` is a context manager: inside it the modules the
placement puts on analog tiles compute with the nonidealities of ``noise`` (a ``NoiseConfig``);
on exit every weight is restored bit-exactly. It yields a ``CoverageReport`` that lists every
module as analog or digital and checks the analog parameter count against the placement.

The pieces live in their own modules: ``tiles`` (tile splits, quantization, programming), ``adc`` (ADC bounds),
``coverage`` (what runs where), ``moe_dispatch`` (every transformers-internal touch), ``backend`` (the base
class), and one module per backend. Two backends:

* ``"fast"`` (default): per seed, the analog expert slices of the fused expert tensors
  (``experts.gate_up_proj`` / ``down_proj``) and the analog dense weights are programmed once
  (experts kept across placements, ``tiles.ProgrammedCache``) through aihwkit's noise-model functions (``apply_programming_noise``, ``apply_drift_noise``
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
``noise.out_bound`` or, with ``calibration=adc.calibrate_adc(model, anatomy, ids, noise)``, a bound per
MoE layer and projection at a quantile of the normalised tile outputs on calibration tokens.

Randomness: every programming draw runs under ``torch.random.fork_rng`` seeded per
(seed, module) (aihwkit draws from the global generator, whose state is restored afterwards);
forward-pass output noise of the fast backend draws from a ``torch.Generator`` per
(seed, module); the aihwkit backend's forward noise draws from a global generator seeded per
seed for the duration of the with-block (and restored on exit).

Memory: the fast backend keeps clean copies of the analog tensors' slices it changes, or, for a model whose fused
expert tensors take at most half the ProgrammedCache, a copy of those tensors in the cache that the parameters point
at while the placement runs (either reported as ``CoverageReport.clean_copy_bytes``), never a second model;
``estimate_bytes`` (clean copies) is checked against psutil's available memory before anything is applied.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from . import moe_dispatch
from .adc import AdcBounds, calibrate_adc
from .adc import AdcBounds as Calibration, calibrate_adc as calibrate  # the names callers used before adc.py
from .backend import BACKENDS, backend_class  # re-export
from .coverage import CoverageReport, ModuleCoverage, _coverage, _dense_analog_units  # re-export
from .moe_dispatch import IMPL_NAME  # re-export
from .noise import NoiseConfig
from .tiles import _CHUNK_ELEMS, _w_in, program_weights, split_sizes  # re-export


def estimate_bytes(model: nn.Module, anatomy, placement, noise: NoiseConfig, backend: str = "fast") -> dict:
    """Memory the analog simulation adds, in bytes: ``{"clean_copies", "working", "total"}``.

    fast: clean copies of the analog tensors (their dtype) + tile scales + float32 programming
    work space (~8 float32 copies of one chunk); aihwkit: ~10 float32 copies of every analog
    weight (Linear copy, tile weights, reference, programmed, drift coefficients, conductances)."""
    n_an, biggest, elem = 0, 0, 4
    for m in anatomy.moe_layers:
        ids = placement.analog_experts(m.index)
        elem = m.experts.down_proj.element_size()
        per = sum(p.numel() // p.shape[0] for p in (m.experts.down_proj, _w_in(m)))   # one expert's slices
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


_AVAILABLE_KEPT_S = 1.0   # how long a CPU memory reading stands for the next placements (see _fits)
_available_kept: dict = {}


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil
    return psutil.virtual_memory().available


def _fits(need: int, device: torch.device, memory_limit: int | None) -> tuple[bool, int]:
    """(``need`` bytes fit, the bytes that may be used): at most ``memory_limit``, default 90% of the available
    memory (``_available_bytes``).

    On CPU a reading (psutil's ``virtual_memory``: a read and parse of /proc/meminfo, ~0.2 ms, measured in
    ``bench/bench_overhead.py``'s steady state, where a sweep enters one placement per result) stands for
    ``_AVAILABLE_KEPT_S`` seconds for estimates of at most half of what it allows; a larger estimate, an older
    reading or a GPU reads afresh. A sweep's placements of the default model estimate tens of MB against GBs
    available, so each needs no reading of its own, while one that comes near the limit is checked against the
    memory available then."""
    import time
    if memory_limit is not None:
        return need <= int(memory_limit), int(memory_limit)
    if device.type == "cpu":
        got = _available_kept.get(str(device))
        if got is not None and time.monotonic() - got[0] < _AVAILABLE_KEPT_S and need <= got[1] // 2:
            return True, got[1]
    avail = int(0.9 * _available_bytes(device))
    if device.type == "cpu":
        _available_kept[str(device)] = (time.monotonic(), avail)
    return need <= avail, avail


def _check_inputs(model, anatomy, placement, noise, seed, backend):
    backend_class(backend)   # ValueError naming the choices for an unknown backend
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
           calibration=None, memory_limit: int | None = None, check=None):
    """Run ``model`` with the placement's analog part on simulated AIMC tiles; restore on exit.

    Args:
        model: the transformers MoE model ``anatomy`` describes (float32/bfloat16/float16).
        placement: ``hetmoe_core.placement.Placement`` (digital experts per MoE layer + DensePolicy).
        noise: ``NoiseConfig`` (``get_preset(name)``).
        seed: noise seed (>= 0); same seed -> identical outputs.
        backend: "fast" (default) or "aihwkit" (reference, slow).
        calibration: ADC bounds, an ``adc.AdcBounds`` (``adc.calibrate_adc(...)``): per-layer ADC bounds of
            the routed experts instead of ``noise.out_bound``; None: ``noise.out_bound`` everywhere. (Not the
            calibration *text* of the routing statistics.)
        memory_limit: bytes the simulation may add (default: 90% of the available memory,
            psutil on CPU, ``torch.cuda.mem_get_info`` on GPU).
        check: None, or a callable run between programmed pieces (each MoE layer, chunk of experts, dense unit);
            whatever it raises (e.g. ``evaluate.Cancelled``) stops the programming, and the model is restored.
    Yields:
        ``CoverageReport`` (every module analog/digital; raises RuntimeError on a mismatch).
    Raises:
        ValueError: bad backend/seed/noise, placement for another anatomy, unsupported dtype,
            or a module the aihwkit backend cannot convert.
        MemoryError: the estimated memory does not fit into what is available.
    After the with-block every parameter is bit-identical to before (also after an exception).
    """
    _check_inputs(model, anatomy, placement, noise, seed, backend)
    if calibration is not None and not isinstance(calibration, AdcBounds):
        raise ValueError("calibration must be ADC bounds from hetmoe_core.adc.calibrate_adc(...) or None")
    if calibration is not None and not calibration.recording:
        missing = [(m.index, k) for m in anatomy.moe_layers for k in ("in", "down")
                   if (m.index, k) not in calibration.bounds]
        if missing:
            raise ValueError(f"calibration lacks ADC bounds for MoE layers/projections {missing}: calibrate this model")
    device = next(model.parameters()).device
    est = estimate_bytes(model, anatomy, placement, noise, backend)
    fits, avail = _fits(est["total"], device, memory_limit)
    if not fits:
        raise MemoryError(f"analog simulation ({backend}) needs about {est['total'] / 2**30:.4f} GiB more but only "
                          f"{avail / 2**30:.4f} GiB may be used on {device}; use backend='fast', fewer analog "
                          f"experts, a smaller model, or free memory")
    dense_units = _dense_analog_units(model, anatomy, placement)
    rep = _coverage(model, anatomy, placement, noise, seed, backend, dense_units)
    rep.estimated_bytes = est["total"]
    rep.calibration_key = calibration.key if calibration is not None and not calibration.recording else ""
    with ExitStack() as stack:
        moe_dispatch.install(stack, anatomy)
        be = backend_class(backend)(model, anatomy, noise, seed, device, calibration)
        be.check = check or be.check
        rep.clean_copy_bytes = be.program(stack, placement, dense_units)
        yield rep
