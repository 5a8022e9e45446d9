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


def _param(default, help: str, unit: str, source: str, allowed=None, optional: str | None = None):
    """A NoiseConfig field whose documentation lives in its metadata (the single source the CLI's ``presets``
    command and the dashboard read): help, unit, source, allowed (lo, hi) inclusive range or a tuple of choices,
    optional (what None means, when None is allowed)."""
    return dataclasses.field(default=default, metadata={"help": help, "unit": unit, "source": source,
                                                        "allowed": allowed, "optional": optional})


TEN_YEARS_S = 3.16e8


@dataclass(frozen=True)
class NoiseConfig:
    """Nonidealities of the AIMC tiles the analog part of a model runs on (immutable).

    Construct through ``get_preset(name, **overrides)`` or ``NoiseConfig(...)``; invalid values (outside a
    field's ``metadata["allowed"]``) raise ValueError. ``to_dict()`` holds every parameter (it enters results
    cache keys). Each field's meaning, unit, source and allowed range are in its ``metadata``
    (see :func:`field_docs`).
    """

    name: str = _param("custom", "Preset name (free text for custom configurations).", "", "hetmoe")
    noise_model: str = _param(
        "none", "Weight-noise model: pcm = PCMLikeNoiseModel, reram-wan2022 = ReRamWan2022NoiseModel, hermes = "
        "HermesNoiseModel, gaussian = StateIndependentNoiseModel with constant sigma, none = no weight noise.",
        "", "aihwkit.inference.noise", allowed=NOISE_MODELS)
    dac_bits: int | None = _param(
        None, "DAC resolution on tile inputs: 2^bits - 1 symmetric levels in [-1, 1] of the per-token input range.",
        "bits", "aihwkit IOParameters.inp_res = 1/(2^bits - 2)", allowed=(1, 24), optional="ideal DAC")
    adc_bits: int | None = _param(
        None, "ADC resolution on tile outputs: 2^bits - 1 levels in [-out_bound, out_bound].",
        "bits", "aihwkit IOParameters.out_res = 1/(2^bits - 2)", allowed=(1, 24), optional="ideal ADC")
    out_bound: float = _param(
        0.0, "ADC clipping bound in normalised output units (input range x channel weight abs-max = 1); 0 = "
        "unbounded (only without ADC). aihwkit's default is 12; hetmoe's 8-bit presets use 16 (measured).",
        "normalised output units", "aihwkit IOParameters.out_bound", allowed=(0.0, 1e4))
    out_noise: float = _param(
        0.0, "Std of additive Gaussian noise on each tile output before the ADC (aihwkit's default is 0.06).",
        "normalised output units", "aihwkit IOParameters.out_noise", allowed=(0.0, 10.0))
    prog_noise_scale: float = _param(
        1.0, "Scale c of the noise model's programming noise (paper: c = 1.5, 2.5); noise_scale for ReRAM.",
        "unitless", "aihwkit prog_noise_scale; arXiv 2603.02633", allowed=(0.0, 100.0))
    read_noise_scale: float = _param(
        0.0, "Scale of the noise model's accumulated 1/f read noise at t_inference; 0 with drift_scale 0 = "
        "programming noise only.", "unitless", "aihwkit read_noise_scale", allowed=(0.0, 100.0))
    drift_scale: float = _param(
        0.0, "Scale of the noise model's conductance drift exponents nu.", "unitless", "aihwkit drift_scale",
        allowed=(0.0, 100.0))
    t_inference: float = _param(
        0.0, "Time of inference after programming (86400 = one day); drift and read noise act up to it.",
        "s", "aihwkit drift_analog_weights(t_inference)", allowed=(0.0, TEN_YEARS_S))
    g_max: float | None = _param(
        None, "Conductance the channel abs-max maps to.", "µS",
        "aihwkit noise model g_max (PCM 25, ReRAM 25 via its converter, Hermes 20.7 for 2 devices)",
        allowed=(1e-3, 1000.0), optional="the noise model's default")
    gaussian_std: float = _param(
        0.0, "For noise_model gaussian: std of additive weight noise relative to each channel's absolute maximum "
        "(per tile).", "fraction of channel abs-max", "aihwkit StateIndependentNoiseModel (constant sigma)",
        allowed=(0.0, 10.0))
    drift_compensation: bool = _param(
        True, "Global drift compensation when drift or read noise act.", "on/off",
        "aihwkit GlobalDriftCompensation", allowed=(False, True))
    tile_size: int = _param(
        512, "Largest tile, rows and columns; larger matrices split into equal tiles (paper: 512 x 512).",
        "rows/columns", "aihwkit MappingParameter.max_input_size / max_output_size; arXiv 2603.02633",
        allowed=(1, 8192))

    def __post_init__(self):
        bad = [m for f in dataclasses.fields(self) if (m := _out_of_range(f, getattr(self, f.name)))]
        if self.noise_model == "hermes" and self.g_max is not None and self.g_max > 20.7:
            bad.append("g_max for the Hermes model (2 devices) is at most 20.7 µS")
        if self.adc_bits is not None and not self.out_bound > 0:
            bad.append("an ADC needs out_bound > 0 (its range in normalised output units)")
        if self.noise_model == "reram-wan2022" and self.t_inference not in RERAM_TIMES:
            bad.append(f"ReRamWan2022NoiseModel is fitted only at t_inference in {RERAM_TIMES} s "
                       f"(1 s, 1 day, 2 days); got {self.t_inference}")
        if self.noise_model == "gaussian" and not self.gaussian_std > 0:
            bad.append("noise_model 'gaussian' needs gaussian_std > 0")
        if bad:
            raise ValueError(f"noise parameter{'s' if len(bad) > 1 else ''} not allowed: " + "; ".join(bad)
                             + "; change the parameter named")

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
    def deterministic(self) -> bool:
        """True when the config has no random part (no weight noise, no output noise): every seed gives the same
        numbers, so one seed's result stands for all."""
        return not self.weight_noise and not self.out_noise > 0

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


def _out_of_range(f: dataclasses.Field, v) -> str | None:
    """Why value ``v`` is not allowed for field ``f`` (from its metadata), or None."""
    md = f.metadata
    allowed, unit = md.get("allowed"), md.get("unit")
    if allowed is None or (v is None and md.get("optional")):
        return None
    if isinstance(allowed[0], str):
        return None if v in allowed else f"{f.name} {v!r} unknown; choose one of {', '.join(allowed)}"
    lo, hi = allowed
    kind = bool if isinstance(lo, bool) else int if isinstance(lo, int) else float
    unit = f" {unit}" if unit and unit not in ("unitless", "on/off") else ""
    none = f", or None for {md['optional']}" if md.get("optional") else ""
    ok = isinstance(v, bool) if kind is bool else (
        isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or isinstance(v, int))
        and v == v and lo <= v <= hi)
    if ok:
        return None
    what = "True or False" if kind is bool else f"{'an integer' if kind is int else 'a number'} in [{lo:g}, {hi:g}]{unit}"
    return f"{f.name}={v!r}: allowed {what}{none}"


def field_docs() -> dict[str, dict]:
    """Every NoiseConfig parameter's documentation: {name: {help, unit, source, allowed, optional, default}}."""
    return {f.name: {**f.metadata, "default": f.default} for f in dataclasses.fields(NoiseConfig)}


def parse_value(name: str, text: str):
    """A NoiseConfig field's value from command-line text (``None``/``none`` for optional fields, true/false for
    switches, int or float by the field's type), checked against the field's allowed range.
    Raises ValueError naming the field and what it accepts."""
    value = _parse(name, text)
    why = _out_of_range({f.name: f for f in dataclasses.fields(NoiseConfig)}[name], value)
    if why:
        raise ValueError(why)
    return value


def _parse(name: str, text: str):
    fields = {f.name: f for f in dataclasses.fields(NoiseConfig)}
    if name not in fields:
        raise ValueError(f"unknown noise parameter {name!r}; choose from {', '.join(n for n in fields if n != 'name')}")
    f, t = fields[name], text.strip()
    md, default = f.metadata, f.default
    if t.lower() in ("none", "null") and md.get("optional"):
        return None
    allowed = md.get("allowed")
    if isinstance(default, bool):
        if t.lower() in ("true", "1", "on", "yes"):
            return True
        if t.lower() in ("false", "0", "off", "no"):
            return False
        raise ValueError(f"{name}: {text!r} is not true or false")
    if allowed and isinstance(allowed[0], str) or isinstance(default, str):
        return t
    try:
        x = float(t)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a number") from None
    if allowed and isinstance(allowed[0], int):   # an integer field: 8 and 8.0 are fine, 8.5 is not
        if not x.is_integer():
            raise ValueError(f"{name}: {text!r} is not an integer")
        return int(x)
    return x


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


def preset_label(name: str, noise=None) -> str:
    """How the pages name a noise setting: the preset name, plus the fields that differ from it in field order,
    e.g. "paper-dac-adc-8bit (edited: adc_bits)". ``noise``: a NoiseConfig, its to_dict() or its sorted items
    (RunSpec.noise); None or a name that is no preset gives the bare name."""
    if noise is None or name not in PRESETS:
        return str(name)
    got = noise.to_dict() if isinstance(noise, NoiseConfig) else dict(noise)
    ref = PRESETS[name].to_dict()
    edited = [k for k in ref if k != "name" and k in got and got[k] != ref[k]]
    return f"{name} (edited: {', '.join(edited)})" if edited else str(name)


SLOW_TILE_FACTOR = 8.0   # warn from this many times the preset's per-tile partial outputs on


def tile_partials(shapes, tile_size: int) -> int:
    """Partial outputs one token makes through analog matrices of ``shapes`` [(O, I), …]: each matrix splits its I
    inputs into ceil(I / tile_size) tiles (``tiles.split_sizes``; aihwkit MappingParameter.max_input_size) and every
    tile gives O partial sums, each through its own ADC, so the noisy forward's read-out work grows with this."""
    return sum(o * -(-i // tile_size) for o, i in shapes)


def slow_tile_warning(shapes, noise: NoiseConfig, base: NoiseConfig) -> str | None:
    """One line when ``noise.tile_size`` makes the routed experts' (``shapes``: [(O, I), …] of their matrices)
    read-out at least SLOW_TILE_FACTOR x the work at ``base``'s tile size (``tile_partials``), else None."""
    if noise.tile_size >= base.tile_size or not shapes:
        return None
    r = tile_partials(shapes, noise.tile_size) / tile_partials(shapes, base.tile_size)
    if r < SLOW_TILE_FACTOR:
        return None
    return (f"tile_size = {noise.tile_size} splits every expert matrix into {r:,.0f}x the partial outputs of "
            f"tile_size = {base.tile_size} (each tile's outputs go through their own ADC): expect each noisy result "
            f"to take many times longer (tile_size = 1 took over 120 s for one result of the default model).")
