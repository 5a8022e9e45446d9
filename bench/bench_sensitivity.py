"""Time of all only-this damages (batched, replayed) against the naive loop and a clean forward, from one run.

    python bench/bench_sensitivity.py [--source default] [--preset paper-pcm-c2.5] [--seeds 5] [--tokens 16384]
                                      [--naive-per-layer 2] [--calib FILE]

Measures every routed expert's only-this damage with ``sensitivity.measure`` (seeds x tokens, nothing else) and
times the naive loop (``sensitivity.naive_only_this``: one full forward under ``analog()`` per expert and seed)
on ``--naive-per-layer`` experts of every MoE layer for the first seed; the naive total is that mean time per
expert-seed x experts x seeds. Prints batched / naive (goal <= 0.5) and batched / (one clean forward over the
same tokens x seeds), and checks that the sampled experts' damages are identical in both.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hetmoe_core import sensitivity as S  # noqa: E402
from hetmoe_core.models import load_model  # noqa: E402
from hetmoe_core.routing import default_calibration, read_calibration  # noqa: E402


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="default")
    ap.add_argument("--preset", default="paper-pcm-c2.5")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--naive-per-layer", type=int, default=2)
    ap.add_argument("--calib", default=None)
    a = ap.parse_args()
    lm = load_model(a.source)
    texts = read_calibration(a.calib) if a.calib else default_calibration()[0]
    ids = S.calibration_tokens(lm.tokenizer, texts, a.tokens)
    seeds = list(range(a.seeds))
    n_exp = sum(m.num_experts for m in lm.anatomy.moe_layers)
    print(f"{a.source}: {n_exp} routed experts, {len(seeds)} seeds, {ids.numel()} tokens ({tuple(ids.shape)}), "
          f"{torch.get_num_threads()} threads")

    dec = lm.model.get_decoder()
    B = max(1, S.ROWS_PER_FORWARD // ids.shape[1])
    t = time.perf_counter()
    for c in ids.split(B):
        S.token_nll(lm.model, dec(input_ids=c, use_cache=False).last_hidden_state, c)
    clean = (time.perf_counter() - t) * len(seeds)

    t = time.perf_counter()
    m = S.measure(lm, a.preset, ids, seeds=seeds, all_but_this=False, dense=False, layers=False)
    batched = time.perf_counter() - t

    picks = [(ml.index, e) for ml in lm.anatomy.moe_layers
             for e in range(0, ml.num_experts, max(1, ml.num_experts // a.naive_per_layer))]
    t = time.perf_counter()
    ref = S.naive_only_this(lm, a.preset, ids, seeds=seeds[:1], experts=picks)
    per = (time.perf_counter() - t) / len(picks)
    naive = per * n_exp * len(seeds)
    same = all(ref[0, i, e] == m.only_this[0, i, e] for i, e in picks)

    print(f"clean forward x seeds : {clean:9.1f} s")
    print(f"batched only-this     : {batched:9.1f} s   ({batched / (n_exp * len(seeds)):.3f} s per expert-seed)")
    print(f"naive loop (from {len(picks)} experts): {naive:9.1f} s   ({per:.3f} s per expert-seed)")
    print(f"ratio batched / naive : {batched / naive:.3f}   (goal <= 0.5)")
    print(f"ratio batched / clean : {batched / clean:.2f}   (one clean forward over the same tokens x seeds)")
    print(f"sampled experts identical in both: {same}")


if __name__ == "__main__":
    main()
