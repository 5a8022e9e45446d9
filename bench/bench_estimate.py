"""Validate's time estimate against a real run: one clean forward timed at the measurement's tokens per forward,
x the forward count (plus one seed's forwards), vs the wall time of validate() itself (1 seed x 256 tokens).

    /work/quiet.sh python bench/bench_estimate.py default tiny:qwen3_moe
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hetmoe_core.models import load_model  # noqa: E402
from hetmoe_core.sensitivity import forward_seconds, measurement_estimate, validate  # noqa: E402

for src in sys.argv[1:] or ["default"]:
    lm = load_model(src)
    f256, f8k = forward_seconds(lm, 256), forward_seconds(lm, 8192)
    e = measurement_estimate(lm, seeds=1, tokens=256)
    t = time.perf_counter()
    validate(lm, "paper-pcm-c1.5", seeds=1, tokens=256, store=False)
    real = time.perf_counter() - t
    print(f"{src}: clean forward 256 tok {f256:.3f} s, 8192 tok {f8k:.3f} s (ratio {f8k / f256:.1f}); "
          f"estimate 1x256: ({e['forwards']} + {e['extra_forwards']}) forwards x {e['forward_s']:.3f} s + "
          f"{e['fixed_s']:g} s = {e['seconds']:.1f} s; real {real:.1f} s")
