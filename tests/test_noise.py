"""Noise presets: names, validation, to_dict completeness and the aihwkit objects they build."""
import dataclasses

import pytest
import torch
from aihwkit.inference.compensation.drift import GlobalDriftCompensation
from aihwkit.inference.noise.hermes import HermesNoiseModel
from aihwkit.inference.noise.pcm import PCMLikeNoiseModel
from aihwkit.inference.noise.reram import ReRamWan2022NoiseModel
from aihwkit.simulator.parameters.enums import BoundManagementType, NoiseManagementType

from hetmoe_core.noise import PRESET_DOCS, PRESETS, RERAM_TIMES, NoiseConfig, get_preset

REQUIRED = ("ideal", "paper-dac-adc-8bit", "paper-pcm-c1.5", "paper-pcm-c2.5", "aihwkit-pcm-drift",
            "aihwkit-reram-wan2022", "aihwkit-hermes", "gaussian-weight")


def test_required_presets_exist_documented_and_named():
    for n in REQUIRED:
        p = get_preset(n)
        assert p.name == n and PRESET_DOCS[n]
    assert get_preset("ideal").io_active is False and get_preset("ideal").weight_noise is False
    paper = get_preset("paper-dac-adc-8bit")
    assert (paper.dac_bits, paper.adc_bits, paper.noise_model, paper.out_noise) == (8, 8, "none", 0.0)
    assert get_preset("paper-pcm-c1.5").prog_noise_scale == 1.5 and get_preset("paper-pcm-c2.5").prog_noise_scale == 2.5
    assert not get_preset("paper-pcm-c2.5").drifts and get_preset("aihwkit-pcm-drift").drifts
    assert all(p.tile_size == 512 for p in PRESETS.values())


def test_to_dict_holds_every_field_and_config_is_immutable():
    p = get_preset("aihwkit-pcm-drift")
    d = p.to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(NoiseConfig)}
    assert d["t_inference"] == 86400.0 and d["read_noise_scale"] == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.dac_bits = 4
    q = p.replace(adc_bits=6, t_inference=3600.0)
    assert (q.adc_bits, q.t_inference, p.adc_bits) == (6, 3600.0, 8)
    assert q.to_dict() != p.to_dict()
    assert get_preset("paper-pcm-c1.5", adc_bits=6).adc_bits == 6


@pytest.mark.parametrize("kw, msg", [
    (dict(out_noise=-0.1), "out_noise"),
    (dict(prog_noise_scale=-1.0), "prog_noise_scale"),
    (dict(dac_bits=0), "dac_bits"),
    (dict(adc_bits=8, out_bound=0.0), "out_bound"),
    (dict(tile_size=0), "tile_size"),
    (dict(noise_model="memristor"), "noise_model"),
    (dict(noise_model="reram-wan2022", t_inference=3600.0), "fitted only"),
    (dict(noise_model="gaussian"), "gaussian_std"),
    (dict(t_inference=float("nan")), "t_inference"),
])
def test_invalid_values_raise_clear_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        NoiseConfig(**kw)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown noise preset"):
        get_preset("pcm-2030")
    with pytest.raises(ValueError, match="unknown NoiseConfig field"):
        get_preset("ideal", bits=8)


def test_reram_valid_only_at_fitted_times():
    for t in RERAM_TIMES:
        assert get_preset("aihwkit-reram-wan2022", t_inference=t).t_inference == t
    with pytest.raises(ValueError, match="1 s, 1 day, 2 days"):
        get_preset("aihwkit-reram-wan2022", t_inference=0.0)


def test_aihwkit_objects_built_from_configs():
    pcm = get_preset("paper-pcm-c2.5").build_noise_model()
    assert isinstance(pcm, PCMLikeNoiseModel) and pcm.prog_noise_scale == 2.5 and pcm.g_max == 25.0
    assert isinstance(get_preset("aihwkit-hermes").build_noise_model(), HermesNoiseModel)
    assert isinstance(get_preset("aihwkit-reram-wan2022").build_noise_model(), ReRamWan2022NoiseModel)
    assert get_preset("paper-dac-adc-8bit").build_noise_model() is None
    c = get_preset("paper-pcm-c1.5").rpu_config()
    assert c.forward.inp_res == pytest.approx(1 / 254) and c.forward.out_res == pytest.approx(1 / 254)
    assert c.forward.noise_management == NoiseManagementType.ABS_MAX
    assert c.forward.bound_management == BoundManagementType.NONE
    assert c.mapping.max_input_size == c.mapping.max_output_size == 512 and c.mapping.weight_scaling_columnwise
    assert c.drift_compensation is None                       # programming noise only: nothing to compensate
    assert isinstance(get_preset("aihwkit-pcm-drift").rpu_config().drift_compensation, GlobalDriftCompensation)
    assert get_preset("ideal").rpu_config().forward.is_perfect


def _prog_noise_std(cfg, w, seed=0):
    torch.manual_seed(seed)
    noisy, _ = cfg.build_noise_model().apply_programming_noise(w)
    return (noisy - w).std().item()


def test_programming_noise_scales_with_c():
    w = torch.rand(256, 256) * 2 - 1  # normalised weights, abs-max ~1
    s15 = _prog_noise_std(get_preset("paper-pcm-c1.5"), w)
    s25 = _prog_noise_std(get_preset("paper-pcm-c2.5"), w)
    assert s25 / s15 == pytest.approx(2.5 / 1.5, rel=0.05)
    # PCM polynomial at these conductances: sigma ~ 0.26..1.05 uS of 25 uS -> a few % of abs-max
    assert 0.01 < s15 < 0.08


def test_gaussian_weight_noise_is_additive_relative_to_absmax():
    w = torch.rand(256, 256) * 2 - 1
    w[0, 0] = 1.0
    cfg = get_preset("gaussian-weight")
    torch.manual_seed(0)
    noisy, _ = cfg.build_noise_model().apply_programming_noise(w)
    d = noisy - w
    assert d.std().item() == pytest.approx(0.02, rel=0.05)
    assert abs(d.mean().item()) < 1e-3                        # unbiased: no clipping at 0 uS
    small, large = d[w.abs() < 0.2].std(), d[w.abs() > 0.8].std()
    assert small.item() == pytest.approx(large.item(), rel=0.1)  # state independent
