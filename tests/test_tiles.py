"""Tile programming: the shortcut for non-drifting presets gives aihwkit's own programmed weights, bit for bit."""
import pytest
import torch

from hetmoe_core.noise import get_preset
from hetmoe_core.tiles import _programming_noise


@pytest.mark.parametrize("preset", ["paper-pcm-c1.5", "gaussian-weight", "aihwkit-pcm-drift", "aihwkit-hermes"])
def test_programming_noise_equals_aihwkit(preset):
    """Same global seed -> the same weights as BaseNoiseModel.apply_programming_noise, and the RNG ends in the same
    state (later draws, e.g. the next tile's, are unchanged too)."""
    noise = get_preset(preset)
    nm = noise.build_noise_model()
    w = torch.randn(3, 16, 24, generator=torch.Generator().manual_seed(0))
    w = w / w.abs().amax(-1, keepdim=True)
    torch.manual_seed(7)
    ref, nu_ref = nm.apply_programming_noise(w)
    after_ref = torch.rand(4)
    torch.manual_seed(7)
    got, nu = _programming_noise(nm, w, noise.drifts)
    assert torch.equal(got, ref) and torch.equal(torch.rand(4), after_ref)
    assert not torch.equal(got, w)                    # noise was applied
    assert (nu is None) == (not noise.drifts)          # drift coefficients are built only when they are used
    if noise.drifts:
        assert all(torch.equal(a, b) for a, b in zip(nu, nu_ref))
