"""The aihwkit reference backend: analog experts and dense Linears converted with aihwkit itself.

Each analog expert is unfused into ``nn.Linear``s, converted with ``aihwkit.nn.conversion.convert_to_analog``
(``TorchInferenceRPUConfig``), programmed and drifted the aihwkit way (``program_analog_weights``,
``drift_analog_weights(t_inference)``); analog dense ``nn.Linear`` modules are swapped for their converted copies.
Slow (a loop over experts): it checks the fast backend against aihwkit's own tiles.
"""
from __future__ import annotations

import torch
from torch import nn

from .backend import AnalogBackend
from .moe_dispatch import apply_gate, set_state
from .noise import NoiseConfig
from .tiles import _derive_seed, _seeded_global_rng, _w_in


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
            h = apply_gate(mod, h) if gated else mod.act_fn(h)
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


class AihwkitBackend(AnalogBackend):
    """Converts analog experts / dense Linears with aihwkit, then programs and drifts them."""
    name = "aihwkit"

    def __init__(self, model, anatomy, noise, seed, device, adc_bounds=None):
        super().__init__(model, anatomy, noise, seed, device, adc_bounds)
        self.analog_lins: list[tuple[str, nn.Module]] = []

    def program(self, stack, placement, dense_units) -> int:
        with _seeded_global_rng(_derive_seed(self.seed, "build"), self.device):  # nn.Linear init draws globally
            clean = super().program(stack, placement, dense_units)
        stack.enter_context(_seeded_global_rng(_derive_seed(self.seed, "forward"), self.device))
        return clean

    def experts(self, stack, m, ids) -> int:
        noise, adc_bounds = self.noise, self.adc_bounds
        ex = m.experts
        lins = {}
        for e in ids:
            self.check()
            w_in = _w_in(m)[e]
            w_in = w_in.T if m.transposed else w_in                                    # [O, I]
            w_dn = m.experts.down_proj[e]
            w_dn = w_dn.T if m.transposed else w_dn
            b_in = (ex.gate_up_proj_bias if m.gated else ex.up_proj_bias)[e] if m.has_bias else None
            b_dn = ex.down_proj_bias[e] if m.has_bias else None
            nz_in, nz_dn = noise, noise
            if adc_bounds is not None and noise.adc_bits:
                nz_in = noise.replace(out_bound=adc_bounds.bounds[(m.index, "in")])
                nz_dn = noise.replace(out_bound=adc_bounds.bounds[(m.index, "down")])
            lins[e] = (_to_analog_linear(w_in.detach(), b_in.detach() if b_in is not None else None, nz_in),
                       _to_analog_linear(w_dn.detach(), b_dn.detach() if b_dn is not None else None, nz_dn))
            self.analog_lins += [(f"{m.experts_name}[{e}].in", lins[e][0]), (f"{m.experts_name}[{e}].down", lins[e][1])]
        set_state(ex, _AihwkitExperts(m, lins))
        return 0

    def dense(self, stack, uname, kind, unit) -> int:
        noise, model = self.noise, self.model
        if type(unit) is not nn.Linear:
            raise ValueError(f"{uname} ({kind}, {type(unit).__name__}) is not a plain nn.Linear, so aihwkit's "
                             f"convert_to_analog cannot convert it; keep {kind} digital or use backend='fast'")
        alin = _to_analog_linear(unit.weight.detach(), unit.bias.detach() if unit.bias is not None else None, noise)
        parent_name, _, attr = uname.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, _AnalogLinearWrap(alin))
        stack.callback(lambda parent=parent, attr=attr, unit=unit: setattr(parent, attr, unit))
        self.analog_lins.append((uname, alin))
        return 0

    def finish(self, stack) -> int:
        noise = self.noise
        if noise.weight_noise:
            for name, alin in self.analog_lins:
                self.check()
                with _seeded_global_rng(_derive_seed(self.seed, name), self.device):
                    alin.program_analog_weights()
                    if noise.drifts:
                        alin.drift_analog_weights(noise.t_inference)
        return 0
