"""hetmoe: heterogeneous analog-digital Mixture-of-Experts workbench (arXiv 2603.02633)."""
import os as _os

__version__ = "0.1.0"

# OpenMP threads that busy-wait between parallel regions steal the CPU from each other and from other programs on a
# shared machine (a result at --limit 1 took 12.6 s instead of 2.1 s, bench/bench_overhead.py). The CLI, the
# dashboard and the scripts import hetmoe_core before torch, so this applies to them; a user's own setting wins.
# It changes only how idle threads wait, never a number.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
