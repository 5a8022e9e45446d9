"""AIMC tile primitives: tile splits and counts, converter quantization, programming weights onto tiles.

Shared by both analog backends, ADC-bound calibration and the figures: tile splits follow aihwkit's
``TileModuleArray``, quantization aihwkit's ``UniformQuantize``, programming and drift aihwkit's noise models.
Every draw is seeded per (seed, module) through :func:`_derive_seed`: same config and seed, same numbers.
"""
from __future__ import annotations

import functools
import hashlib
from contextlib import contextmanager

import torch

from .noise import NoiseConfig

_CHUNK_ELEMS = 1 << 24  # programming works on at most this many weights at once (bounded memory)


def _derive_seed(seed: int, name: str) -> int:
    """Seed of one module's draws: sha256 of (seed, module name), 63 bits."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


@contextmanager
def _seeded_global_rng(seed: int, device: torch.device):
    """aihwkit's noise models draw from torch's global RNG: fork it, seed it, restore it after.

    Seeds the generator of ``device`` only (CPU's, plus the CUDA device's when there): ``torch.manual_seed``
    would also queue a lazy seeding of CUDA, MTIA and XPU on a machine where they are not initialised, each
    with a captured stack trace (~4 ms per call, measured, and a list that only grows), once per programmed
    expert. The draws are the same: ``torch.manual_seed`` sets these very generators to ``seed``."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def split_sizes(size: int, tile: int) -> list[int]:
    """Tile split of a matrix dimension, as aihwkit's ``TileModuleArray.get_split_sizes``:
    ceil(size / tile) near-equal parts (700 with 512 -> [350, 350]). A new list each call; aihwkit's answer is
    kept per (size, tile) (``_kept_split``): the fast backend asks twice per MoE layer and placement, and the
    import plus aihwkit's call cost ~30 us each (measured, ``bench/bench_overhead.py``'s steady state)."""
    return list(_kept_split(int(size), int(tile)))


@functools.lru_cache(maxsize=1024)
def _kept_split(size: int, tile: int) -> tuple:
    from aihwkit.simulator.tiles.array import TileModuleArray
    return tuple(TileModuleArray.get_split_sizes(None, size, tile))


def _quantize(x: torch.Tensor, res: float, bound: float) -> torch.Tensor:
    """aihwkit's ``UniformQuantize`` (round to 2·bound·res steps) then clip to ±bound."""
    from aihwkit.simulator.tiles.utils import UniformQuantize
    return UniformQuantize.apply(x, res, bound, False).clamp(-bound, bound)


# aihwkit's BaseNoiseModel.apply_programming_noise also computes every conductance's drift coefficients nu (log,
# abs, clamp over each device: ~40% of programming a PCM preset), which only drifting presets use. Without drift we
# keep nu's random draw (one randn_like per conductance, same shape) and skip its arithmetic, so the global RNG
# advances exactly as in the official route and every programmed weight is the same bit for bit. Only for noise
# models whose nu is exactly that one draw; any other model (or a subclass that overrides either method) takes
# the official route unchanged.
_NU_IS_ONE_DRAW = {"PCMLikeNoiseModel.generate_drift_coefficients",
                   "StateIndependentNoiseModel.generate_drift_coefficients"}


def _programming_noise(noise_model, wn: torch.Tensor, drifts: bool):
    """``noise_model.apply_programming_noise(wn)``; when ``drifts`` is False, nu (unused then) is drawn, not built."""
    from aihwkit.inference.noise.base import BaseNoiseModel
    cls = type(noise_model)
    if drifts or cls.apply_programming_noise is not BaseNoiseModel.apply_programming_noise or \
            cls.generate_drift_coefficients.__qualname__ not in _NU_IS_ONE_DRAW:
        return noise_model.apply_programming_noise(wn)
    targets, params = noise_model.g_converter.convert_to_conductances(wn)
    noisy = []
    for g in targets:
        noisy.append(noise_model.apply_programming_noise_to_conductance(g))
        torch.randn_like(g)   # nu's draw (generate_drift_coefficients: randn_like of a same-shaped tensor)
    return noise_model.g_converter.convert_back_to_weights(noisy, params), None


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
            wp, nu = _programming_noise(noise_model, wn, noise.drifts)
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


def _w_in(m) -> torch.Tensor:
    return m.experts.gate_up_proj if m.gated else m.experts.up_proj

def _cumstarts(sizes):
    out, s = [], 0
    for n in sizes:
        out.append(s)
        s += n
    return out


class ProgrammedCache:
    """Programmed experts of one model, kept across placements: each expert is drawn once per (seed, noise).

    Every routed expert's programming noise is seeded by itself (``_derive_seed(seed, "<experts>.<proj>:e-e")``,
    the seed ``sensitivity`` measures each expert's damage with), so an expert's programmed weights do not depend
    on which other experts are analog: a sweep over strategies and digital budgets at one seed programs each
    expert once and every placement copies its analog experts' draws (speed), and the expert that the
    sensitivity measurement saw is the very draw each evaluation uses (pairing).

    Expert entries: ``(group, expert) -> (w, g)``, ``group`` a small int standing for ``(seed, NoiseConfig,
    experts module name, "in"|"down", form)`` (:meth:`group`: a NoiseConfig hashes all its fields), each draw
    kept in the form the fast backend writes it (``fast_backend.FastBackend``): ``w`` ``[1, ...]`` one expert's
    slice of the fused tensor, in its storage layout and dtype (pre-divided by tile scale x converter steps when
    converters act: half the bytes of a float32 draw for a bfloat16 model, and no arithmetic per placement),
    ``g`` ``[1, O, T]`` float32 ADC-code-to-output factors (None without converters); ``form`` names what the
    stored form depends on besides the draw (converter grids, dtype, layout). Fused entries:
    ``("fused", experts module name, "in"|"down") -> (tensor, tag, analog experts, g_out, experts in g_out)`` (and
    a spare's five after them), a whole fused expert tensor holding the analog experts of the placement last run
    (``tag``: their seed, noise and form) and every other expert clean, which the next placement updates where its
    analog set differs, with its ADC factors (:meth:`take` / :meth:`keep`, ``fast_backend.FastBackend._swap``).
    Least recently used out first beyond ``max_bytes`` (default ``HETMOE_PROGRAM_CACHE_MB`` MiB, 512): the
    default model holds ~30 MB per seed; an OLMoE-1B-7B-sized model (6.4 G expert weights, 13 GB per seed in
    bfloat16) keeps few and programs each placement afresh with the same numbers. Lives on the model object
    (``of``), so it goes with the model (a deep copy of the model starts empty); guarded by a lock (callers also
    hold the model's lock while its weights are noisy). Entries are dropped when an expert weight tensor is
    replaced or edited in place as a Parameter (its storage or autograd version changes: ``check_clean``); an
    edit through ``.data`` leaves no trace, so code that does one must call :meth:`clear`.
    """

    def __init__(self, max_bytes: int | None = None):
        import os
        import threading
        from collections import OrderedDict
        self.max_bytes = int(max_bytes if max_bytes is not None
                             else float(os.environ.get("HETMOE_PROGRAM_CACHE_MB", "512")) * 2 ** 20)
        self.entries: OrderedDict = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self.stamps: dict[int, tuple[int, int]] = {}
        self.groups: dict[tuple, int] = {}
        self.lock = threading.Lock()

    def __deepcopy__(self, memo) -> "ProgrammedCache":
        return type(self)(self.max_bytes)

    def check_clean(self, params) -> None:
        """Forget every entry unless each of ``params`` (torch Parameters) is the tensor, unedited, that the
        entries were programmed from: same storage (``data_ptr``) and autograd version (``_version``)."""
        with self.lock:
            for p in params:
                stamp = (p.data_ptr(), p._version)
                if self.stamps.get(id(p), stamp) != stamp:
                    self.entries.clear()
                    self.bytes = 0
                    self.stamps.clear()
                self.stamps[id(p)] = stamp

    @classmethod
    def of(cls, model) -> "ProgrammedCache":
        """The cache attached to ``model`` (created on first use)."""
        cache = getattr(model, "_hetmoe_programmed", None)
        if cache is None:
            cache = cls()
            model._hetmoe_programmed = cache
        return cache

    def group(self, key: tuple) -> int:
        """A small int standing for ``key`` in this cache (the same int for equal keys, for the cache's life)."""
        with self.lock:
            return self.groups.setdefault(key, len(self.groups))

    def expert(self, key: tuple, program) -> tuple:
        """The entry under ``key``, else ``program()`` -> (w, g), stored (if it fits) and returned."""
        with self.lock:
            got = self.entries.get(key)
            if got is not None:
                self.entries.move_to_end(key)
                self.hits += 1
                return got
        got = program()
        with self.lock:
            self.misses += 1
            self._put(key, got)
        return got

    def kept(self, group: int, ids) -> list | None:
        """The entries ``(group, e)`` of every expert ``e`` of ``ids``, in order, when all are kept (each a hit, as
        :meth:`expert` would count it, in one lock), else None and nothing counted: a placement whose experts are
        all programmed takes them at once instead of one look-up per expert."""
        with self.lock:
            got = [self.entries.get((group, e)) for e in ids]
            if any(g is None for g in got):
                return None
            for e in ids:
                self.entries.move_to_end((group, e))
            self.hits += len(got)
            return got

    def fits_fused(self, nbytes: int) -> bool:
        """Whether fused expert tensors of ``nbytes`` in all (every MoE layer's, both projections) are kept
        between placements: at most half the cache, the rest holding the programmed experts."""
        return nbytes <= self.max_bytes // 2

    def take(self, key: tuple):
        """Remove and return the entry under ``key`` (None when absent): its holder owns it until :meth:`keep`."""
        with self.lock:
            got = self.entries.pop(key, None)
            if got is not None:
                self.bytes -= _nbytes(got)
            return got

    def keep(self, key: tuple, value: tuple) -> None:
        """Store ``value`` under ``key`` (if it fits), the least recently used entries out first."""
        with self.lock:
            self._put(key, value)

    def _put(self, key, value) -> None:
        size = _nbytes(value)
        if size <= self.max_bytes and key not in self.entries:
            self.entries[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self.entries.popitem(last=False)
                self.bytes -= _nbytes(old)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.bytes = 0
            self.stamps.clear()


def _nbytes(value: tuple) -> int:
    """Bytes of the tensors in a cache entry."""
    return sum(t.numel() * t.element_size() for t in value if isinstance(t, torch.Tensor))
