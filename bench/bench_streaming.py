"""Streaming MaxNNScore / Router Norm from safetensors: throughput vs `cat FILES > /dev/null`, peak RSS vs tensor size.

Checkpoint: OLMoE-1B-7B's real shapes (hidden 2048, 64 experts, expert intermediate 1024, vocab 50304, 16 heads)
for --layers decoder layers (default 2; the real model has 16), generated into a temp dir in the hub's per-expert layout (``mlp.experts.E.gate_proj``) and/or
transformers 5's fused layout (``mlp.experts.gate_up_proj`` [64, 2048, 2048]), one shard per layer plus one for
embeddings / LM head. Fairness:
  * throughput = bytes of the tensors each reader reads / seconds; streaming reads expert and router tensors only,
    cat reads every byte of every shard, so both are rated on what they actually read;
  * page cache: "cold" evicts the shards from the page cache before every run with posix_fadvise(DONTNEED) (only
    these files, no global drop_caches on a shared machine); "warm" reads them once first; best of --repeat runs;
  * streaming and cat each run in a fresh subprocess; peak RSS is that process's ru_maxrss, so the generator's memory
    never counts. Reported as the increment over the process's RSS after imports (python + torch) and in total.
Goals (issue B): throughput ratio >= 0.8; peak RSS increment <= 2 x largest tensor.

    python bench/bench_streaming.py [--layout hub|fused|both] [--dtype bfloat16|float32] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
H, E, I, V = 2048, 64, 1024, 50304

_CHILD = r"""
import hashlib, inspect, json, resource, sys, time
sys.path.insert(0, sys.argv[2])
import torch, safetensors
from hetmoe_core.scores import stream_scores
from hetmoe_core.shards import _jobs, _plan, _shards
from hetmoe_core import kernels
from pathlib import Path
route = kernels.route()   # builds (first run on a machine) or loads the compiled kernels before the clock starts
if int(sys.argv[3]):
    torch.set_num_threads(int(sys.argv[3]))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t, c = time.perf_counter(), time.process_time()
s = stream_scores(sys.argv[1], threads=int(sys.argv[4]) or None)
dt, cpu = time.perf_counter() - t, time.process_time() - c
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
plan = _plan(_shards(Path(sys.argv[1])))
jobs = _jobs(plan, inspect.signature(stream_scores).parameters["chunk_bytes"].default)
h = hashlib.sha256()
for ls in s.layers:
    for p in sorted(ls.neuron_norms):
        h.update(ls.neuron_norms[p].tobytes())
    h.update(ls.router_norm.tobytes())
print(json.dumps({"seconds": dt, "cpu_s": cpu, "bytes": sum(p.nbytes for p in plan),
                  "largest_job": max(j.nbytes for j in jobs), "rss_base": base, "rss_peak": peak,
                  "layers": len(s.layers), "digest": h.hexdigest()[:16], "route": route}))
"""


def generate(folder: Path, layout: str, dtype: str, layers: int) -> None:
    """Write the checkpoint (run in a subprocess by main so its memory never meets the measured processes)."""
    import torch
    from safetensors.torch import save_file
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=0.02):
        return (torch.randn(*shape, generator=g) * scale).to(dt)

    def tiled(rows, cols):   # embeddings / LM head: read by cat only, so a tiled random block is enough
        return rnd(1024, cols).repeat(-(-rows // 1024), 1)[:rows].contiguous()

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "olmoe", "hidden_size": H, "num_experts": E,
                                                    "intermediate_size": I, "num_hidden_layers": layers}))
    save_file({"model.embed_tokens.weight": tiled(V, H), "lm_head.weight": tiled(V, H),
               "model.norm.weight": torch.ones(H, dtype=dt)}, str(folder / "model-embed.safetensors"))
    for layer in range(layers):
        p = f"model.layers.{layer}."
        sd = {p + f"self_attn.{n}_proj.weight": rnd(H, H) for n in "qkvo"}
        sd |= {p + f"self_attn.{n}_norm.weight": torch.ones(H, dtype=dt) for n in "qk"}
        sd |= {p + n: torch.ones(H, dtype=dt) for n in ("input_layernorm.weight", "post_attention_layernorm.weight")}
        sd[p + "mlp.gate.weight"] = rnd(E, H)
        # experts: one random draw per projection and layer, scaled per expert (1 + e/E) so MaxNNScores differ;
        # drawing 64 x 3 fresh matrices per layer made generation dominate the bench's time
        base = {n: torch.randn(*shape, generator=g) * 0.02 for n, shape in
                (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I)))}
        experts = {n: [(b * (1 + e / E)).to(dt) for e in range(E)] for n, b in base.items()}
        if layout == "hub":
            for e in range(E):
                for n in base:
                    sd[p + f"mlp.experts.{e}.{n}.weight"] = experts[n][e]
        else:
            sd[p + "mlp.experts.gate_up_proj"] = torch.cat([torch.stack(experts["gate_proj"]),
                                                            torch.stack(experts["up_proj"])], dim=1)
            sd[p + "mlp.experts.down_proj"] = torch.stack(experts["down_proj"])
        del experts
        save_file(sd, str(folder / f"model-{layer:05d}.safetensors"))
        del sd


def evict(files) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_cat(files) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of `cat FILES > /dev/null`."""
    r0, t = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    dt, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
    return dt, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)


def run_stream(folder: Path, threads: int, workers: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(ROOT), str(threads), str(workers)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench(folder: Path, repeat: int, threads: int, workers: int) -> dict:
    files = sorted(folder.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    from safetensors import safe_open
    largest = 0
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                n = 1
                for s in sl.get_shape():
                    n *= s
                largest = max(largest, n * {"BF16": 2, "F16": 2, "F32": 4}[sl.get_dtype()])
    res = {"files_bytes": total, "largest_tensor_bytes": largest}
    for mode in ("cold", "warm"):
        cats, streams = [], []
        for _ in range(repeat):
            (evict(files) if mode == "cold" else run_cat(files))
            cats.append(run_cat(files))
            (evict(files) if mode == "cold" else run_cat(files))
            streams.append(run_stream(folder, threads, workers))
        st, cat = min(streams, key=lambda r: r["seconds"]), min(cats)
        cat_bps, st_bps = total / cat[0], st["bytes"] / st["seconds"]
        res[mode] = {"cat_s": cat[0], "cat_GBps": cat_bps / 1e9, "stream_s": st["seconds"],
                     "stream_bytes": st["bytes"], "stream_GBps": st_bps / 1e9, "ratio": st_bps / cat_bps,
                     "cat_cpu_s_per_GB": min(c for _, c in cats) / (total / 1e9),
                     "stream_cpu_s_per_GB": min(r["cpu_s"] for r in streams) / (st["bytes"] / 1e9),
                     "digests": sorted({r["digest"] for r in streams}), "route": st["route"]}
        res["rss"] = {"base_MB": st["rss_base"] / 2**20, "peak_MB": st["rss_peak"] / 2**20,
                      "increment_MB": (st["rss_peak"] - st["rss_base"]) / 2**20,
                      "largest_job_MB": st["largest_job"] / 2**20, "largest_tensor_MB": largest / 2**20,
                      "increment_over_largest": (st["rss_peak"] - st["rss_base"]) / largest,
                      "peak_over_largest": st["rss_peak"] / largest}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", default="both", choices=["hub", "fused", "both"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (OLMoE-1B-7B has 16; each adds 0.8 GB)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the streaming process (0: torch's "
                    "default, what the CLI gets; stream_scores' workers run torch single-threaded anyway)")
    ap.add_argument("--workers", type=int, default=0, help="stream_scores worker threads (0: its default, "
                    "the usable CPUs, at most 8)")
    ap.add_argument("--generate", default=None, help=argparse.SUPPRESS)   # internal: generator subprocess
    args = ap.parse_args()
    if args.generate:
        layout, folder = args.generate.split(":", 1)
        generate(Path(folder), layout, args.dtype, args.layers)
        return
    layouts = ["hub", "fused"] if args.layout == "both" else [args.layout]
    digests = {}
    with tempfile.TemporaryDirectory(prefix="hetmoe-bench-") as tmp:
        for layout in layouts:
            folder = Path(tmp) / layout
            t = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--dtype", args.dtype, "--layers", str(args.layers),
                            "--generate", f"{layout}:{folder}"],
                           check=True)
            gen = time.perf_counter() - t
            r = bench(folder, args.repeat, args.threads, args.workers)
            print(f"== layout {layout}, {args.dtype}, workers {args.workers or 'default'}, torch threads "
                  f"{args.threads}, load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores, "
                  f"{r['files_bytes'] / 1e9:.2f} GB in "
                  f"{len(list(folder.glob('*.safetensors')))} shards (generated in {gen:.0f} s); bf16 kernels: "
                  f"{r['warm']['route']}")
            for mode in ("cold", "warm"):
                m = r[mode]
                print(f"  {mode}: cat {m['cat_GBps']:.2f} GB/s ({m['cat_s']:.2f} s), stream {m['stream_GBps']:.2f} "
                      f"GB/s ({m['stream_bytes'] / 1e9:.2f} GB in {m['stream_s']:.2f} s) -> ratio {m['ratio']:.2f} "
                      f"(goal >= 0.8: {'met' if m['ratio'] >= 0.8 else 'NOT met'}); CPU s/GB: cat "
                      f"{m['cat_cpu_s_per_GB']:.3f}, stream {m['stream_cpu_s_per_GB']:.3f}")
            q = r["rss"]
            print(f"  RSS: peak {q['peak_MB']:.0f} MB = {q['peak_over_largest']:.2f} x largest tensor "
                  f"({q['largest_tensor_MB']:.0f} MB) (goal <= 2: {'met' if q['peak_over_largest'] <= 2 else 'NOT met'}"
                  f"); after imports {q['base_MB']:.0f} MB, increment {q['increment_MB']:.0f} MB = "
                  f"{q['increment_over_largest']:.2f} x largest tensor; largest job mapped {q['largest_job_MB']:.0f} MB")
            digests[layout] = {d for m in ("cold", "warm") for d in r[m]["digests"]}
            print("  json:", json.dumps({"layout": layout, "dtype": args.dtype, **r}))
            shutil.rmtree(folder)
    same = len(set().union(*digests.values())) == 1
    print(f"same numbers (digest of every norm) across runs{' and layouts' if len(digests) > 1 else ''}: "
          f"{'yes' if same else 'NO'} ({', '.join(sorted(set().union(*digests.values())))})")


if __name__ == "__main__":
    main()
