"""Analog noise presets: immutable, documented configurations built on aihwkit's own classes.

A ``NoiseConfig`` names every nonideality of an analog in-memory-computing (AIMC) tile that hetmoe
simulates; it builds the aihwkit objects that both analog backends use (``hetmoe_core.analog``):

* DAC/ADC: aihwkit ``IOParameters`` (``inp_res``, ``out_res``, ``out_bound``, ``out_noise``),
  input range per token and tile (``NoiseManagementType.ABS_MAX``), no bound management
  (a chip with a fixed ADC range, arXiv 2603.02633 Table 1);
* programming noise, drift and read noise: an aihwkit noise model (``PCMLikeNoiseModel``,
  ``ReRamWan2022NoiseModel``, ``HermesNoiseModel``, ``StateIndependentNoiseModel``) applied to the
  conductances of aihwkit's ``SinglePairConductanceConverter``;
* drift compensation: aihwkit ``GlobalDriftCompensation``.

Units follow aihwkit's convention: weights are normalised per output channel and tile to an
absolute maximum of 1 (``MappingParameter.weight_scaling_omega=1``, columnwise), which maps to
``g_max`` (µS); inputs are normalised per token and tile to an absolute maximum of 1
(``inp_bound``); ADC bound and output noise are in these normalised output units, so a bound of
b clips a channel whose normalised dot product exceeds b (b = n_in would never clip).
The presets are factory entries (``PRESETS``) that only override ``NoiseConfig``'s defaults, in the
style of aihwkit's ``inference`` presets.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

NOISE_MODELS = ("none", "pcm", "reram-wan2022", "hermes", "gaussian")
"""Weight-noise models: none, aihwkit PCMLikeNoiseModel, ReRamWan2022NoiseModel, HermesNoiseModel,
StateIndependentNoiseModel with constant σ (additive Gaussian weight noise)."""

RERAM_TIMES = (1.0, 86400.0, 172800.0)
"""Times (s) at which aihwkit's ReRamWan2022NoiseModel was fitted (Wan et al., Nature 2022)."""

# StateIndependentNoiseModel set-up for additive Gaussian weight noise: each weight is a device
# pair offset by G_MIN so that the zero device never clips at 0 µS; σ of the pair difference is
# sqrt(2)·c0, i.e. c0 = std · (G_MAX - G_MIN) / sqrt(2) relative to the channel's abs-max.
_GAUSS_G_MAX, _GAUSS_G_MIN = 25.0, 5.0


@dataclass(frozen=True)
class NoiseConfig:
    """Nonidealities of the AIMC tiles the analog part of a model runs on (immutable).

    Construct through ``get_preset(name, **overrides)`` or ``NoiseConfig(...)``; invalid values
    raise ValueError. ``to_dict()`` holds every parameter (it enters results cache keys).
    """

    name: str = "custom"
    """Preset name (free text for custom configurations)."""

    noise_model: str = "none"
    """Weight-noise model, one of ``NOISE_MODELS``. Source: aihwkit.inference.noise."""

    dac_bits: int | None = None
    """DAC resolution on tile inputs (bits); None = ideal DAC. Levels: 2^bits - 1 symmetric levels
    in [-1, 1] of the per-token input range (aihwkit ``IOParameters.inp_res = 1/(2^bits-2)``)."""

    adc_bits: int | None = None
    """ADC resolution on tile outputs (bits); None = ideal ADC. 2^bits - 1 levels in
    [-out_bound, out_bound] (aihwkit ``IOParameters.out_res = 1/(2^bits-2)``)."""

    out_bound: float = 0.0
    """ADC clipping bound in normalised output units (input range × channel weight abs-max = 1);
    0 = unbounded (only without ADC). aihwkit ``IOParameters.out_bound`` (its default is 12)."""

    out_noise: float = 0.0
    """Std of additive Gaussian noise on each tile output before the ADC, normalised output units.
    aihwkit ``IOParameters.out_noise`` (its default is 0.06)."""

    prog_noise_scale: float = 1.0
    """Scale c of the model's programming noise (paper: c = 1.5, 2.5). Unitless; aihwkit
    ``prog_noise_scale`` (``noise_scale`` for ReRAM)."""

    read_noise_scale: float = 0.0
    """Scale of the model's accumulated 1/f read noise at t_inference. Unitless; aihwkit
    ``read_noise_scale``. 0 with drift_scale 0 = programming noise only."""

    drift_scale: float = 0.0
    """Scale of the model's drift exponents ν. Unitless; aihwkit ``drift_scale``."""

    t_inference: float = 0.0
    """Time of inference after programming (s); drift and read noise act up to it. aihwkit
    ``drift_analog_weights(t_inference)``."""

    g_max: float | None = None
    """Conductance the channel abs-max maps to (µS); None = the noise model's default
    (PCM 25, ReRAM 25 via its converter, Hermes 20.7 for 2 devices)."""

    gaussian_std: float = 0.0
    """For ``noise_model="gaussian"``: std of additive weight noise relative to each channel's
    absolute maximum (per tile). Built as aihwkit StateIndependentNoiseModel (constant σ)."""

    drift_compensation: bool = True
    """Global drift compensation (aihwkit ``GlobalDriftCompensation``) when drift/read noise act."""

    tile_size: int = 512
    """Largest tile, rows and columns (paper: 512 × 512). aihwkit ``MappingParameter.max_input_size``
    and ``max_output_size``; larger matrices split into equal tiles as aihwkit's TileModuleArray."""

    def __post_init__(self):
        bad = []
        if self.noise_model not in NOISE_MODELS:
            bad.append(f"noise_model {self.noise_model!r} unknown; choose one of {', '.join(NOISE_MODELS)}")
        for f in ("dac_bits", "adc_bits"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 24):
                bad.append(f"{f}={v!r}: give an integer 1..24 (bits), or None for an ideal converter")
        for f in ("out_bound", "out_noise", "prog_noise_scale", "read_noise_scale", "drift_scale",
                  "t_inference", "gaussian_std"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0 or v == float("inf"):
                bad.append(f"{f}={v!r}: must be a finite number >= 0")
        if self.g_max is not None and not (isinstance(self.g_max, (int, float)) and self.g_max > 0):
            bad.append(f"g_max={self.g_max!r}: give a conductance > 0 µS or None")
        if self.noise_model == "hermes" and self.g_max is not None and self.g_max > 20.7:
            bad.append("g_max for the Hermes model (2 devices) is at most 20.7 µS")
        if not isinstance(self.tile_size, int) or self.tile_size < 1:
            bad.append(f"tile_size={self.tile_size!r}: give the tile's rows/columns as an integer >= 1")
        if self.adc_bits is not None and not self.out_bound > 0:
            bad.append("an ADC needs out_bound > 0 (its range in normalised output units)")
        if self.noise_model == "reram-wan2022" and self.t_inference not in RERAM_TIMES:
            bad.append(f"ReRamWan2022NoiseModel is fitted only at t_inference in {RERAM_TIMES} s "
                       f"(1 s, 1 day, 2 days); got {self.t_inference}")
        if self.noise_model == "gaussian" and not self.gaussian_std > 0:
            bad.append("noise_model 'gaussian' needs gaussian_std > 0")
        if bad:
            raise ValueError("invalid NoiseConfig: " + "; ".join(bad))

    # ------------------------------------------------------------------ plain views
    def to_dict(self) -> dict:
        """Every parameter as a JSON-able dict (used in cache keys)."""
        return dataclasses.asdict(self)

    def replace(self, **kw) -> "NoiseConfig":
        """Copy with some fields changed (validated). Unknown field -> ValueError."""
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown NoiseConfig field(s) {sorted(unknown)}; "
                             f"editable: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **kw)

    @property
    def weight_noise(self) -> bool:
        """True when programming (and possibly drift) noise changes the analog weights."""
        if self.noise_model == "none":
            return False
        return self.noise_model in ("reram-wan2022", "gaussian") or self.prog_noise_scale > 0 or self.drifts

    @property
    def drifts(self) -> bool:
        """True when the drift / read-noise step at ``t_inference`` runs after programming."""
        if self.noise_model == "reram-wan2022":
            return True  # its fitted deviation at t_inference replaces the programmed state
        return (self.noise_model in ("pcm", "hermes") and self.t_inference > 0
                and (self.read_noise_scale > 0 or self.drift_scale > 0))

    @property
    def io_active(self) -> bool:
        """True when tile inputs/outputs are changed (DAC, ADC or output noise)."""
        return self.dac_bits is not None or self.adc_bits is not None or self.out_noise > 0

    # ------------------------------------------------------------------ aihwkit objects
    def build_noise_model(self):
        """The aihwkit noise model of this config (None for ``noise_model="none"``)."""
        from aihwkit.inference.converter.conductance import SinglePairConductanceConverter
        kw = {} if self.g_max is None else {"g_max": float(self.g_max)}
        if self.noise_model == "pcm":
            from aihwkit.inference.noise.pcm import PCMLikeNoiseModel
            return PCMLikeNoiseModel(prog_noise_scale=self.prog_noise_scale, read_noise_scale=self.read_noise_scale,
                                     drift_scale=self.drift_scale, **kw)
        if self.noise_model == "hermes":
            from aihwkit.inference.noise.hermes import HermesNoiseModel
            return HermesNoiseModel(prog_noise_scale=self.prog_noise_scale, read_noise_scale=self.read_noise_scale,
                                    drift_scale=self.drift_scale, num_devices=2, **kw)
        if self.noise_model == "reram-wan2022":
            from aihwkit.inference.noise.reram import ReRamWan2022NoiseModel
            return ReRamWan2022NoiseModel(noise_scale=self.prog_noise_scale, **kw)
        if self.noise_model == "gaussian":
            from aihwkit.inference.noise.custom import StateIndependentNoiseModel
            conv = SinglePairConductanceConverter(g_max=_GAUSS_G_MAX, g_min=_GAUSS_G_MIN)
            c0 = self.gaussian_std * (_GAUSS_G_MAX - _GAUSS_G_MIN) / 2 ** 0.5
            return StateIndependentNoiseModel(g_converter=conv, prog_coeff=[c0, 0.0, 0.0], prog_noise_scale=1.0,
                                              drift_scale=0.0, read_noise_scale=0.0)
        return None

    def io_parameters(self):
        """aihwkit ``IOParameters`` of the tile forward pass (DAC, ADC, output noise)."""
        from aihwkit.simulator.parameters.io import IOParameters
        from aihwkit.simulator.parameters.enums import BoundManagementType, NoiseManagementType
        if not self.io_active:
            return IOParameters(is_perfect=True)
        return IOParameters(
            is_perfect=False, inp_bound=1.0, inp_noise=0.0, out_noise=float(self.out_noise),
            inp_res=1.0 / (2 ** self.dac_bits - 2) if self.dac_bits else -1.0,
            out_res=1.0 / (2 ** self.adc_bits - 2) if self.adc_bits else -1.0,
            out_bound=float(self.out_bound) if self.adc_bits else -1.0,
            noise_management=NoiseManagementType.ABS_MAX if self.dac_bits else NoiseManagementType.NONE,
            bound_management=BoundManagementType.NONE)

    def rpu_config(self):
        """aihwkit ``TorchInferenceRPUConfig`` for the reference backend: 512×512 tiles, weights
        normalised per output channel and tile (omega = 1), digital bias, this config's IO,
        noise model and drift compensation."""
        from aihwkit.simulator.configs import TorchInferenceRPUConfig
        from aihwkit.inference.compensation.drift import GlobalDriftCompensation
        c = TorchInferenceRPUConfig()
        c.forward = self.io_parameters()
        c.mapping.max_input_size = c.mapping.max_output_size = self.tile_size
        c.mapping.weight_scaling_omega = 1.0
        c.mapping.weight_scaling_columnwise = True
        c.mapping.learn_out_scaling = False
        c.mapping.digital_bias = True
        nm = self.build_noise_model()
        if nm is not None:
            c.noise_model = nm
        c.drift_compensation = GlobalDriftCompensation() if (self.drift_compensation and self.drifts) else None
        return c


# ---------------------------------------------------------------------------- presets
# Each entry only overrides NoiseConfig's defaults. PAPER_OUT_BOUND: fixed ADC range of the 8-bit
# presets, in normalised output units (aihwkit's IOParameters default is 12). Measured with
# ``analog.calibrate`` (99.9% quantile of normalised tile outputs, per-token DAC range): an OLMoE of
# the default's shape trained briefly on the project corpus gives 12.6-16.9 for gate/up tiles and
# 4.3-5.1 for down tiles (random init: 6.3-6.6 / 3.4-3.7); 8-bit DAC/ADC on all routed experts cost
# +2.1% perplexity with bound 8, +0.14% with 12, -0.02% with 16. For a given model tune the bound per
# layer with ``analog.calibrate(...)``, as the paper tunes the ADC bound.
PAPER_OUT_BOUND = 16.0
_8BIT = dict(dac_bits=8, adc_bits=8, out_bound=PAPER_OUT_BOUND)

_PRESET_OVERRIDES: dict[str, tuple[str, dict]] = {
    "ideal": ("No nonidealities: reproduces the digital outputs bit-exactly.", {}),
    "paper-dac-adc-8bit": ("8-bit DAC on inputs and 8-bit ADC on outputs only (arXiv 2603.02633 Table 1).",
                           dict(_8BIT)),
    "paper-pcm-c1.5": ("PCMLikeNoiseModel programming noise scaled by c=1.5, plus 8-bit DAC/ADC (paper).",
                       dict(_8BIT, noise_model="pcm", prog_noise_scale=1.5)),
    "paper-pcm-c2.5": ("PCMLikeNoiseModel programming noise scaled by c=2.5, plus 8-bit DAC/ADC (paper).",
                       dict(_8BIT, noise_model="pcm", prog_noise_scale=2.5)),
    "aihwkit-pcm-drift": ("PCMLikeNoiseModel programming + read noise + drift at 1 day, global drift "
                          "compensation, 8-bit DAC/ADC.",
                          dict(_8BIT, noise_model="pcm", read_noise_scale=1.0, drift_scale=1.0, t_inference=86400.0)),
    "aihwkit-reram-wan2022": ("ReRamWan2022NoiseModel at 1 day (valid only at 1 s, 1 day, 2 days), 8-bit DAC/ADC.",
                              dict(_8BIT, noise_model="reram-wan2022", t_inference=86400.0)),
    "aihwkit-hermes": ("HermesNoiseModel (IBM HERMES PCM chip, 2 devices/weight) programming + read noise + "
                       "drift at 1 day, global drift compensation, 8-bit DAC/ADC.",
                       dict(_8BIT, noise_model="hermes", read_noise_scale=1.0, drift_scale=1.0, t_inference=86400.0)),
    "gaussian-weight": ("Additive Gaussian weight noise, std 2% of each channel's abs-max per tile; ideal converters.",
                        dict(noise_model="gaussian", gaussian_std=0.02)),
}

PRESETS: dict[str, NoiseConfig] = {n: NoiseConfig(name=n, **kw) for n, (_, kw) in _PRESET_OVERRIDES.items()}
PRESET_DOCS: dict[str, str] = {n: doc for n, (doc, _) in _PRESET_OVERRIDES.items()}


def get_preset(name: str, **overrides) -> NoiseConfig:
    """A preset by name, optionally with fields overridden (``get_preset("paper-pcm-c1.5", adc_bits=6)``).

    Raises:
        ValueError: unknown preset name, unknown field or invalid value.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown noise preset {name!r}; choose one of {', '.join(PRESETS)} "
                         f"or build NoiseConfig(...) for a custom one")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
