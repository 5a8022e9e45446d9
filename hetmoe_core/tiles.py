"""AIMC tile primitives: tile splits and counts, converter quantization, programming weights onto tiles.

Shared by both analog backends, ADC-bound calibration and the figures: tile splits follow aihwkit's
``TileModuleArray``, quantization aihwkit's ``UniformQuantize``, programming and drift aihwkit's noise models.
Every draw is seeded per (seed, module) through :func:`_derive_seed`: same config and seed, same numbers.
"""
from __future__ import annotations

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


def _w_in(m) -> torch.Tensor:
    return m.experts.gate_up_proj if m.gated else m.experts.up_proj

def _cumstarts(sizes):
    out, s = [], 0
    for n in sizes:
        out.append(s)
        s += n
    return out
