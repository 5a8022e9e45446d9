"""Converter (ADC) bounds: tuning the routed experts' ADC range per MoE layer and projection on data.

Not to be confused with the *calibration text* of the routing statistics (routing.py): this module sets where the
ADC of each expert tile clips, as a chip's ADC range is tuned per tile (arXiv 2603.02633 tunes the ADC bound).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .noise import NoiseConfig


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
    from .analog import analog
    from .placement import Placement
    cal = Calibration(quantile=quantile, recording=True)
    rec_noise = noise.replace(name="calibration", noise_model="none", adc_bits=None, out_noise=0.0)
    with analog(model, anatomy, Placement.all_analog(anatomy), rec_noise, seed=0, calibration=cal):
        for b in range(0, input_ids.shape[0], batch_size):
            model(input_ids[b:b + batch_size])
    cal.recording = False
    return cal
