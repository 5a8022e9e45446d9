"""Validate's time estimate against a real run (views7): one clean forward timed at the measurement's tokens per
forward, x the forward count, vs the wall time of validate() itself, on the default model and a tiny one."""
import sys
import time

from hetmoe_core.models import load_model
from hetmoe_core.sensitivity import forward_seconds, measurement_estimate, validate

for src in sys.argv[1:] or ["default"]:
    lm = load_model(src)
    f256, f8k = forward_seconds(lm, 256), forward_seconds(lm, 8192)
    e = measurement_estimate(lm, seeds=1, tokens=256)
    t = time.perf_counter()
    validate(lm, "paper-pcm-c1.5", seeds=1, tokens=256, store=False)
    real = time.perf_counter() - t
    print(f"{src}: clean forward 256 tok {f256:.3f} s, 8192 tok {f8k:.3f} s (ratio {f8k / f256:.1f}); "
          f"estimate 1x256: {e['forwards']} forwards x {e['forward_s']:.3f} s = {e['seconds']:.1f} s; real {real:.1f} s")
