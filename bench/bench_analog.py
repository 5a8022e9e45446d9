"""Forward-time ratios of the analog backends, from one run.

    python bench/bench_analog.py [--source default] [--preset paper-pcm-c1.5] [--batch 8] [--seq 256]
    python bench/bench_analog.py --ppl 16 --preset paper-dac-adc-8bit   # perplexity cost instead

Prints, per dtype (float32 and bfloat16 by default), fast-noisy / clean forward time (goal <= 1.15) as
wall time on the configured threads and as CPU time on one thread (load-robust: what the simulation
costs whatever else the shared machine runs), medians with clean and fast forwards interleaved; the
one-off programming time and the peak resident memory the phase adds (RSS sampled every 2 ms); with
--aihwkit also the aihwkit / fast forward-time ratio. All routed experts are analog (the paper's
setting; dense modules digital). OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE unless set), as
in scripts/example_results.py: busy-waiting threads slow every parallel op 5-100x on a shared CPU.
"""
import argparse
import os
import sys
import threading
import time

import psutil

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as scripts/example_results.py: busy-waiting OpenMP threads crawl on a shared CPU
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402

from hetmoe_core.analog import analog, calibrate  # noqa: E402
from hetmoe_core.models import load_model  # noqa: E402
from hetmoe_core.noise import get_preset  # noqa: E402
from hetmoe_core.placement import Placement  # noqa: E402


class PeakRSS:
    """Peak resident memory above the level at entry, sampled by a thread (bytes)."""

    def __enter__(self):
        self.proc, self.stop = psutil.Process(), False
        self.base = self.peak = self.proc.memory_info().rss
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.stop = True
        self.t.join()
        self.added = self.peak - self.base


@torch.no_grad()
def timed(model, ids, repeats):
    model(ids[:1, :16])  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(ids)
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def corpus_ids(tok, n, seq, split):
    """``[n, seq]`` token windows from data/corpus/<split>.jsonl (documents joined by EOS)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "corpus", f"{split}.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"{path} is missing: build it with scripts/build_corpus.py")
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    random.Random(0).shuffle(texts)  # all domains, a fixed sample
    ids = []
    for t in texts:
        ids += tok(t)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= n * seq:
            break
    return torch.tensor(ids[: n * seq]).view(n, seq)


@torch.no_grad()
def ppl_cost(lm, preset, n, seq, seeds):
    """Perplexity of all-routed-experts-analog vs digital on validation windows, per seed,
    with the fixed ADC bound and with a bound calibrated on training windows."""
    model, an = lm.model, lm.anatomy
    ev, cal_ids = corpus_ids(lm.tokenizer, n, seq, "validation"), corpus_ids(lm.tokenizer, 8, seq, "train")
    loss = lambda: sum(model(ev[i:i + 8], labels=ev[i:i + 8]).loss.item() for i in range(0, n, 8)) / math.ceil(n / 8)
    noise, pl = get_preset(preset), Placement.all_analog(an)
    clean = math.exp(loss())
    cal = calibrate(model, an, cal_ids, noise)
    print(f"model {lm.source}: digital perplexity {clean:.3f} on {n}x{seq} validation tokens; preset {preset}")
    print(f"calibrated ADC bounds (quantile {cal.quantile}): " +
          ", ".join(f"{k}={v:.2f}" for k, v in cal.to_dict()["bounds"].items()))
    for label, c in (("fixed out_bound", None), ("calibrated", cal)):
        ps = []
        for s in seeds:
            with analog(model, an, pl, noise, seed=s, calibration=c):
                ps.append(math.exp(loss()))
        rel = [p / clean - 1 for p in ps]
        print(f"{label:16s} perplexity {sum(ps) / len(ps):.3f}  increase {100 * sum(rel) / len(rel):+.2f}% "
              f"(seeds {list(seeds)}: " + ", ".join(f"{100 * r:+.2f}%" for r in rel) + ")")


GOAL = 1.15  # fast-noisy / clean forward time


def fast_vs_clean(model, an, pl, noise, ids, repeats, clock=time.perf_counter):
    """Median fast-noisy and clean forward times (s) by ``clock``, forwards interleaved (the shared machine's load
    drifts): inside ``analog()`` the clean forward runs the model's own experts implementation on the same tensors
    (analog experts then compute with their programmed weights but without converters; dense modules are digital).
    Returns ((noisy median, min), (clean median, min), programming seconds, CoverageReport)."""
    cfgs = list({id(m.experts.config): m.experts.config for m in an.moe_layers}.values())
    own_impl = [c._experts_implementation for c in cfgs]

    @torch.no_grad()
    def once():
        t = clock()
        model(ids)
        return clock() - t
    t0 = time.perf_counter()
    with torch.no_grad(), analog(model, an, pl, noise, seed=0, backend="fast") as rep:
        prog = time.perf_counter() - t0
        analog_impl = [c._experts_implementation for c in cfgs]
        model(ids[:1, :16])  # warm-up
        t_fast, t_clean = [], []
        for _ in range(repeats):
            t_fast.append(once())
            for c, v in zip(cfgs, own_impl):
                c._experts_implementation = v
            t_clean.append(once())
            for c, v in zip(cfgs, analog_impl):
                c._experts_implementation = v
    return (statistics.median(t_fast), min(t_fast)), (statistics.median(t_clean), min(t_clean)), prog, rep


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="default")
    ap.add_argument("--preset", default="paper-pcm-c1.5")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32,bfloat16", help="one or more model dtypes, comma-separated")
    ap.add_argument("--aihwkit", action="store_true", help="also time the aihwkit reference backend (slow)")
    ap.add_argument("--ppl", type=int, default=0, help="measure the perplexity cost on this many windows instead")
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args()
    if a.ppl:
        lm = load_model(a.source, dtype=a.dtype.split(",")[0])
        return ppl_cost(lm, a.preset, a.ppl, a.seq, range(a.seeds))
    mib, threads = 2 ** 20, torch.get_num_threads()
    print(f"batch {a.batch}x{a.seq}, preset {a.preset}, all routed experts analog (dense digital), torch threads "
          f"{threads}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    for dtype in a.dtype.split(","):
        lm = load_model(a.source, dtype=dtype)
        model, an = lm.model, lm.anatomy
        vocab = model.get_input_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
        pl, noise = Placement.all_analog(an), get_preset(a.preset)
        print(f"model {lm.source} ({an.family}, {an.total_params / 1e6:.2f}M params, {dtype}), experts impl "
              f"{model.config._experts_implementation}")
        with PeakRSS() as m_fast:
            (t_fast, f_min), (t_clean, c_min), prog, rep = fast_vs_clean(model, an, pl, noise, ids, a.repeats)
        # the same on one thread by CPU time: what the noise simulation costs, whatever else the machine runs
        torch.set_num_threads(1)
        try:
            (c_fast, _), (c_clean, _), _, _ = fast_vs_clean(model, an, pl, noise, ids, a.repeats, clock=time.thread_time)
        finally:
            torch.set_num_threads(threads)
        print(f"  clean forward {t_clean * 1e3:8.1f} ms   fast forward {t_fast * 1e3:8.1f} ms   peak +"
              f"{m_fast.added / mib:.1f} MiB   programming {prog:.2f} s   clean copies {rep.clean_copy_bytes / mib:.1f} MiB "
              f"({rep.analog_params / 1e6:.2f}M analog params)")
        print(f"  RATIO fast-noisy/clean {dtype:8s} wall ({threads} threads) = {t_fast / t_clean:.3f} (min/min {f_min / c_min:.3f}; goal <= {GOAL}); "
              f"CPU time (1 thread) = {c_fast / c_clean:.3f} (goal <= {GOAL}; {c_fast * 1e3:.1f} / {c_clean * 1e3:.1f} ms)")
        if a.aihwkit:
            with PeakRSS() as m_aihw:
                t0 = time.perf_counter()
                with analog(model, an, pl, noise, seed=0, backend="aihwkit"):
                    prog_aihw = time.perf_counter() - t0
                    t_aihw = timed(model, ids, max(1, a.repeats // 2))
            print(f"  aihwkit forward {t_aihw * 1e3:9.1f} ms   peak +{m_aihw.added / mib:7.1f} MiB   programming "
                  f"{prog_aihw:.2f} s")
            print(f"  RATIO aihwkit/fast {dtype} = {t_aihw / t_fast:.2f}")


if __name__ == "__main__":
    main()
