"""Hardware a placement runs on: a digital accelerator (GPU-class) and an AIMC chip of PCM tiles.

Immutable, documented configurations in the style of ``noise.NoiseConfig``: every field carries its unit, meaning
and source in ``field(metadata={"unit", "help", "source"})`` (the dashboard and the CLI read them from there) and
a docstring with the derivation where a figure is derived. Presets (``HARDWARE``) only override defaults.
The cost model that uses them is ``hetmoe_core.energy``.

Sources (what the ``search`` tool returned; figures it could not confirm are marked so in their field):

* NVIDIA H100 SXM5: 3.35 TB/s HBM3, 989.4 TFLOP/s dense bf16 (1978.9 with 2:4 sparsity), 700 W, 80 GB
  (NVIDIA H100 datasheet, as tabulated at glennklockwood.com/garden/processors/h100 from NVIDIA's documents).
* NVIDIA A100 SXM4 80 GB: 2.039 TB/s HBM2e, 312 TFLOP/s dense bf16, 400 W (NVIDIA A100 datasheet
  nvidia-a100-datasheet-us-nvidia-1758950-r4, as tabulated at glennklockwood.com/garden/processors/A100).
* M. Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014 (45 nm, 0.9 V):
  FP32 add 0.9 pJ, FP32 mult 3.7 pJ (confirmed: PMC8934428 Table 3 quoting Horowitz); FP16 mult 1.1 pJ,
  FP16 add 0.4 pJ (found only in a third-party energy table citing Horowitz ISSCC 2014, stillwater-sc/esim).
* M. O'Connor et al., "Fine-Grained DRAM: Energy-Efficient DRAM for Extreme Bandwidth Systems", MICRO 2017:
  HBM2 access energy 3.97 pJ/bit = 1.21 (row activation) + 2.54 (on-die data movement) + 0.22 (I/O). The
  search returned the paper's abstract (FGDRAM 2x better than HBM2) and this breakdown only inside a third-party
  GPU energy model, not the paper's own table: treat the digits as unconfirmed. No HBM3 figure was found, so the
  H100 preset uses the HBM2 value (HBM3 is unlikely to be worse per bit).
* M. Le Gallo, R. Khaddam-Aljameh et al., "A 64-core mixed-signal in-memory compute chip based on phase-change
  memory for deep neural network inference", Nature Electronics 6, 680 (2023), arXiv 2212.02872: 64 AIMC cores
  of 256 x 256 unit cells, 14 nm CMOS with back-end PCM, on-chip digital activations; for 8-bit input/output
  MVMs 63.1 TOPS at 9.76 TOPS/W (one-phase read) or 16.1 TOPS at 2.48 TOPS/W (four-phase, high precision).
* R. Khaddam-Aljameh et al., "HERMES-Core — a 1.59-TOPS/mm² PCM on 14-nm CMOS in-memory compute core using
  300-ps/LSB linearized CCO-based ADCs", IEEE JSSC 2022: the core of that chip, 256 CCO-based ADCs and a local
  digital processing unit (affine scaling, ReLU), 10.5 TOPS/W at 1 GHz.
* J. Büchel et al., "Efficient scaling of large language models with mixture of experts and 3D analog in-memory
  computing", Nature Computational Science 5, 13 (2025): MoE experts held in place on (3D) AIMC tiles remove the
  parameter-fetching bottleneck of von Neumann hardware. Only its abstract was reachable; none of its hardware
  figures is used here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

# ---------------------------------------------------------------------------------------------- cited figures
H100_SRC = "NVIDIA H100 SXM5 datasheet (via glennklockwood.com/garden/processors/h100)"
A100_SRC = "NVIDIA A100 SXM4 80GB datasheet r4 (via glennklockwood.com/garden/processors/A100)"
HOROWITZ = "Horowitz, ISSCC 2014, energy table (45 nm, 0.9 V)"
OCONNOR = "O'Connor et al., MICRO 2017, HBM2 energy breakdown (digits unconfirmed by search)"
LE_GALLO = "Le Gallo et al., Nature Electronics 2023 (64-core PCM chip), one-phase 8-bit MVMs"
PAPER = "arXiv 2603.02633 (tiles of 512 x 512, digest)"

# Le Gallo et al. 2023: 64 cores of 256 x 256, 63.1 TOPS and 9.76 TOPS/W for 8-bit MVMs (1 op = 1 multiply or add).
_CORE, _CORES, _TOPS, _TOPS_W = 256, 64, 63.1e12, 9.76e12
CORE_MVM_ENERGY_NJ = 2 * _CORE * _CORE / _TOPS_W * 1e9
"""Energy of one full 256 x 256 MVM: 2·256² ops / 9.76 TOPS/W = 13.43 nJ (DAC, array, ADC, core digital)."""
CORE_MVM_LATENCY_NS = 2 * _CORE * _CORE / (_TOPS / _CORES) * 1e9
"""Latency of one MVM on one core: 2·256² ops / (63.1 TOPS / 64 cores) = 132.9 ns (all cores busy at peak)."""


def _f(default, unit: str, help: str, source: str, allowed: tuple):
    """A hardware field documented in its metadata (unit, help, source) with its ``allowed`` (lo, hi) inclusive
    range: wide enough for any real or projected part, narrow enough that a typo (1e30) is refused with one line
    rather than turned into an energy of 1e30 µJ or a throughput of 0 tokens/s. Checked by ``_check``."""
    return field(default=default, metadata={"unit": unit, "help": help, "source": source, "allowed": allowed})


def _check(obj) -> None:
    """Raise ValueError (one line for people: which part, each bad constant as typed with its allowed range and
    unit, what to do) unless every field with an ``allowed`` range holds a number of the right kind inside it
    (noise.NoiseConfig's rule, ``noise._out_of_range``). The part is named by its ``PART`` (as the editor titles
    it), never by the Python class."""
    from .noise import _out_of_range
    bad = [why for f in dataclasses.fields(obj) if (why := _out_of_range(f, getattr(obj, f.name)))]
    if bad:
        raise ValueError(f"{obj.PART} constant{'s' if len(bad) > 1 else ''} out of range: " + "; ".join(bad)
                         + f"; enter {'values' if len(bad) > 1 else 'a value'} in the allowed range")


@dataclass(frozen=True)
class DigitalConfig:
    """A digital accelerator (GPU-class) running the digital modules in bf16 from HBM.

    Energy per token = weight bytes fetched from HBM x ``hbm_energy`` + MACs x ``mac_energy``; time per step =
    max(bytes / ``hbm_bandwidth``, MACs / peak MAC rate) (roofline). Static and idle power are not modelled.
    """

    PART: ClassVar[str] = "Digital accelerator"
    """What this part is called for people (the hardware editor's heading, error messages)."""

    name: str = "h100-sxm"
    """Accelerator name (free text for custom values)."""

    hbm_bandwidth: float = _f(3.35, "TB/s", "Peak HBM bandwidth: weights stream from HBM at this rate.",
                              H100_SRC + ": 3.35 TB/s HBM3", (1e-3, 1e3))
    """Peak HBM bandwidth (TB/s = 1e12 bytes/s)."""

    hbm_energy: float = _f(3.97 * 8, "pJ/byte", "Energy to read one byte of weights from HBM.",
                           OCONNOR + ": 3.97 pJ/bit x 8", (0.01, 1e4))
    """HBM read energy (pJ per byte): 3.97 pJ/bit x 8 = 31.76 pJ/byte (HBM2; no HBM3 figure was found)."""

    peak_tflops: float = _f(989.4, "TFLOP/s", "Peak dense bf16 tensor-core rate (1 MAC = 2 FLOP).",
                            H100_SRC + ": 989.4 TFLOP/s dense bf16", (1e-3, 1e6))
    """Peak dense bf16 rate (TFLOP/s, dense, no 2:4 sparsity); the peak MAC rate is half of it."""

    mac_energy: float = _f(1.5, "pJ/MAC", "Energy of one bf16 multiply-accumulate (operands in registers).",
                           HOROWITZ + ": FP16 mult 1.1 pJ + FP16 add 0.4 pJ", (1e-4, 1e3))
    """Energy of one 16-bit floating-point MAC (pJ): Horowitz's FP16 multiply 1.1 pJ + add 0.4 pJ at 45 nm.
    Cross-check: H100 TDP / peak MAC rate = 700 W / 494.7e12 MAC/s = 1.41 pJ/MAC, an upper bound that also pays
    for memory, so 1.5 pJ is the right order for a 4 nm part with its register and on-chip traffic."""

    weight_bytes: float = _f(2.0, "bytes/weight", "Bytes per stored weight (bf16 = 2).", "bf16 storage", (0.125, 8.0))
    """Bytes per weight in HBM (2 for bf16)."""

    memory_gb: float = _f(80.0, "GB", "HBM capacity of one accelerator (sets how many are needed).",
                          H100_SRC + ": 80 GB", (0.01, 1e5))
    """HBM capacity per accelerator (GB = 1e9 bytes)."""

    def __post_init__(self):
        _check(self)

    @property
    def peak_macs(self) -> float:
        """Peak MAC rate (MAC/s) = peak_tflops · 1e12 / 2."""
        return self.peak_tflops * 1e12 / 2


@dataclass(frozen=True)
class AnalogConfig:
    """An AIMC chip of PCM tiles holding weights in place (no weight traffic), 8-bit DAC/ADC.

    One tile MVM takes ``mvm_latency`` whatever its fill; its energy scales with the cells in use: a matrix block
    of r x c weights costs ``mvm_energy`` · r·c / ``tile_size``² (the chip's measured energy per operation, which
    includes DAC, array and ADC), plus ``periphery_energy`` for each of its r outputs (the digital accumulation
    of partial sums across input tiles). Tiles of a layer work in parallel.
    """

    PART: ClassVar[str] = "AIMC chip"
    """What this part is called for people (the hardware editor's heading, error messages)."""

    name: str = "pcm-64core-512"
    """Chip name (free text for custom values)."""

    tile_size: int = _f(512, "rows = columns", "Largest tile: matrices split into ceil(size / tile) near-equal "
                        "parts per dimension, as aihwkit's TileModuleArray.", PAPER, (8, 16384))
    """Tile rows and columns (the paper's 512 x 512); the same rule as ``NoiseConfig.tile_size``."""

    mvm_energy: float = _f(4 * CORE_MVM_ENERGY_NJ, "nJ", "Energy of one full tile MVM with 8-bit DAC and ADC.",
                           LE_GALLO + ": 2·256²/9.76 TOPS/W = 13.43 nJ per 256² core, x 4 cores per 512² tile",
                           (1e-4, 1e5))
    """Energy of one MVM on a fully used tile (nJ), DAC/ADC conversions included. Derivation: a 512 x 512 tile
    is 2 x 2 cores of the 64-core chip, each core MVM costs 2·256² ops / 9.76 TOPS/W = 13.43 nJ, so 53.7 nJ
    (0.205 pJ per MAC)."""

    mvm_latency: float = _f(CORE_MVM_LATENCY_NS, "ns", "Time of one tile MVM, conversions included.",
                            LE_GALLO + ": 2·256² ops / (63.1 TOPS / 64 cores) = 132.9 ns", (0.01, 1e7))
    """Latency of one tile MVM (ns): 2·256² ops per core at 63.1 TOPS / 64 cores = 132.9 ns; the 2 x 2 cores of
    a 512-tile run in parallel, so the same time (the sum of their halves is the periphery's job)."""

    tiles_per_chip: int = _f(_CORES // 4, "tiles", "Tiles on one chip (sets how many chips a placement needs).",
                             LE_GALLO + ": 64 cores of 256² = 16 tiles of 512²", (1, 1_000_000))
    """Tiles per chip: 64 cores of 256 x 256 = 16 tiles of 512 x 512."""

    periphery_energy: float = _f(0.9, "pJ/output", "Digital periphery per tile output: adding partial sums "
                                 "of input tiles (one FP32 add).", HOROWITZ + ": FP32 add 0.9 pJ", (1e-4, 1e4))
    """Digital periphery per tile output value (pJ): one FP32 add to accumulate the partial sums of the input
    tiles (Horowitz FP32 add 0.9 pJ). Per-channel affine scaling is done in the core's LDPU (HERMES-Core) and is
    in ``mvm_energy`` already."""

    def __post_init__(self):
        _check(self)

    @property
    def mac_energy_pj(self) -> float:
        """Energy per analog MAC (pJ) = mvm_energy / tile_size² (0.205 pJ for the default)."""
        return self.mvm_energy * 1e3 / self.tile_size ** 2


@dataclass(frozen=True)
class Hardware:
    """A heterogeneous system: digital modules on ``digital``, analog ones on chips of ``analog`` tiles."""

    name: str = "h100+pcm"
    digital: DigitalConfig = DigitalConfig()
    analog: AnalogConfig = AnalogConfig()

    def replace(self, digital: dict | None = None, analog: dict | None = None, **kw) -> "Hardware":
        """Copy with fields changed: ``hw.replace(digital={"hbm_bandwidth": 2.0}, analog={"tile_size": 256})``.

        Raises ValueError for an unknown field or an invalid value (naming the editable fields)."""
        def rep(cfg, ch):
            unknown = set(ch or {}) - {f.name for f in dataclasses.fields(cfg)}
            if unknown:
                raise ValueError(f"unknown {type(cfg).__name__} field(s) {sorted(unknown)}; editable: "
                                 f"{[f.name for f in dataclasses.fields(cfg)]}")
            return dataclasses.replace(cfg, **(ch or {}))
        return dataclasses.replace(self, digital=rep(self.digital, digital), analog=rep(self.analog, analog), **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def citations(self) -> dict[str, str]:
        """{"digital.<field>" / "analog.<field>": source} of every cited figure."""
        return {f"{part}.{f.name}": f.metadata["source"] for part in ("digital", "analog")
                for f in dataclasses.fields(getattr(self, part)) if "source" in f.metadata}


def field_docs(cls) -> list[dict]:
    """[{name, unit, help, source, allowed}] of a config class's numeric fields (the dashboard's editor reads these)."""
    return [{"name": f.name, **f.metadata} for f in dataclasses.fields(cls) if f.metadata]


# ---------------------------------------------------------------------------------------------- presets
_A100 = dict(name="a100-sxm-80gb", hbm_bandwidth=2.039, peak_tflops=312.0)
_CORE_TILE = dict(name="pcm-64core-256", tile_size=_CORE, mvm_energy=CORE_MVM_ENERGY_NJ, tiles_per_chip=_CORES)

_PRESET_OVERRIDES: dict[str, tuple[str, dict, dict]] = {
    "h100+pcm": ("NVIDIA H100 SXM5 + PCM chips of 512 x 512 tiles (2 x 2 cores of Le Gallo et al. 2023; the "
                 "paper's tile size).", {}, {}),
    "a100+pcm": ("NVIDIA A100 SXM4 80 GB + PCM chips of 512 x 512 tiles.", _A100, {}),
    "h100+pcm-core": ("NVIDIA H100 SXM5 + the 64-core PCM chip as built: 256 x 256 tiles, 64 per chip.", {},
                      _CORE_TILE),
}
HARDWARE: dict[str, Hardware] = {n: Hardware(n, DigitalConfig(**d), AnalogConfig(**a))
                                 for n, (_, d, a) in _PRESET_OVERRIDES.items()}
HARDWARE_DOCS: dict[str, str] = {n: doc for n, (doc, _, _) in _PRESET_OVERRIDES.items()}
DEFAULT_HARDWARE = "h100+pcm"


def get_hardware(name: str = DEFAULT_HARDWARE, digital: dict | None = None, analog: dict | None = None) -> Hardware:
    """A hardware preset by name, optionally with fields changed (see ``Hardware.replace``).

    Raises ValueError for an unknown preset (listing the known ones), field or invalid value."""
    if name not in HARDWARE:
        raise ValueError(f"unknown hardware {name!r}; choose one of {', '.join(HARDWARE)}")
    hw = HARDWARE[name]
    return hw.replace(digital=digital, analog=analog) if (digital or analog) else hw
