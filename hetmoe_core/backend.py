"""Analog backends: the registry of their names, and the base class that owns the order of programming a placement.

As aihwkit's ``BaseDriftCompensation`` owns the read-out and ``GlobalDriftCompensation`` fills ten lines, the base
walks the MoE layers with analog experts and the analog dense units, and a backend says how one of each is put on
tiles (``fast_backend.FastBackend``, ``aihwkit_backend.AihwkitBackend``). Every change a hook makes registers its
exact undo on the ExitStack it is given, so leaving ``analog()`` restores the model bit for bit.

``BACKENDS`` maps each name to the class that implements it, as "module:Class", imported on first use: sweep
planning, the CLI and the pages check a backend name without importing torch.
"""
from __future__ import annotations

import importlib

BACKENDS = {"fast": "fast_backend:FastBackend", "aihwkit": "aihwkit_backend:AihwkitBackend"}


def backend_class(name: str) -> type:
    """The AnalogBackend subclass registered as ``name``. Raises ValueError naming the choices."""
    if name not in BACKENDS:
        raise ValueError(f"unknown analog backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)


class AnalogBackend:
    """Puts the analog part of one model on simulated tiles for one (noise, seed).

    Args:
        model / anatomy: the transformers MoE model and its ``models.Anatomy``.
        noise: ``NoiseConfig``; seed: noise seed (>= 0); device: the model's ``torch.device``.
        adc_bounds: ``adc.AdcBounds`` (ADC bounds per MoE layer and projection) or None.
    """
    name = ""

    @staticmethod
    def check() -> None:
        """Called between programmed pieces; ``analog(check=...)`` replaces it (a raise stops, e.g. on cancel)."""

    def __init__(self, model, anatomy, noise, seed: int, device, adc_bounds=None):
        self.model, self.anatomy, self.noise, self.seed = model, anatomy, noise, seed
        self.device, self.adc_bounds = device, adc_bounds

    def program(self, stack, placement, dense_units) -> int:
        """Program every analog expert and dense unit; returns the bytes kept for exact restore."""
        clean = 0
        for m in self.anatomy.moe_layers:
            ids = list(placement.analog_experts(m.index))
            if ids:
                self.check()
                clean += self.experts(stack, m, ids)
        for uname, kind, unit in dense_units:
            self.check()
            clean += self.dense(stack, uname, kind, unit)
        return clean + self.finish(stack)

    def experts(self, stack, layer, ids: list[int]) -> int:
        """Put experts ``ids`` of MoE layer ``layer`` on tiles; returns bytes kept for restore."""
        raise NotImplementedError

    def dense(self, stack, uname: str, kind: str, unit) -> int:
        """Put one dense matrix-vector unit (nn.Linear or router weight) on tiles; returns bytes kept."""
        raise NotImplementedError

    def finish(self, stack) -> int:
        """Anything left once every unit is in place (e.g. programming all converted tiles)."""
        return 0
