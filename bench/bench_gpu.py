"""Analog simulation of an OLMoE-1B-7B-shaped model on a GPU: memory, forward-time ratio, programming time.

    python bench/bench_gpu.py                                  # CUDA, OLMoE-1B-7B shapes, bf16, batch 32 x 512
    python bench/bench_gpu.py --device cpu --scale small       # the CPU-scaled variant (2 layers x 8 experts)

The model is ``OlmoeForCausalLM`` with OLMoE-1B-7B's real shapes (hidden 2048, 16 layers, 64 experts of intermediate
1024, top-8, 16 heads, vocab 50304; allenai/OLMoE-1B-7B-0924 config.json) and random weights (N(0, 0.02), the
config's initializer_range), built directly on the device in the chosen dtype. All routed experts are analog (the
paper's setting; attention, router and LM head digital). Prints:
  * peak memory of a clean forward and of a fast-noisy forward, the noisy one including the clean copies kept for
    exact restore (CUDA: torch.cuda.max_memory_allocated; CPU: peak RSS sampled every 2 ms);
  * fast-noisy / clean forward time (medians, forwards interleaved so drifting load hits both alike);
  * time to program one seed (entering ``analog(...)``: noise drawn and written into the expert weights);
  * ``validate`` throughput: experts measured per second (sensitivity.measure, each expert alone analog, one seed,
    on the benchmark batch as calibration tokens).
Scales: ``full`` (OLMoE-1B-7B, ~6.9 B parameters, ~14 GB in bf16: needs a GPU) and ``small`` (2 layers x 8 experts,
hidden 512: a few seconds on CPU). Nothing here runs in the test suite.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hetmoe_core.analog import analog  # noqa: E402
from hetmoe_core.models import anatomy_of  # noqa: E402
from hetmoe_core.noise import get_preset  # noqa: E402
from hetmoe_core.placement import Placement  # noqa: E402

# allenai/OLMoE-1B-7B-0924 config.json (the shapes; weights are random here)
OLMOE_1B_7B = dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
                   num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304,
                   max_position_embeddings=4096, norm_topk_prob=False)
SCALES = {"full": dict(OLMOE_1B_7B, batch=32, seq=512),
          "small": dict(OLMOE_1B_7B, hidden_size=512, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=8, num_experts=8, num_experts_per_tok=2,
                        vocab_size=8192, eos_token_id=0, pad_token_id=1, batch=8, seq=256)}


class Peak:
    """Peak memory above the level at entry (bytes): CUDA allocator statistics, or RSS sampled by a thread."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        import psutil
        self.proc, self.stop = psutil.Process(), False
        self.base = self.peak = self.proc.memory_info().rss
        self.t = threading.Thread(target=self._sample, daemon=True)
        self.t.start()
        return self

    def _sample(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.stop = True
            self.t.join()
        self.added = self.peak - self.base


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def forward_time(model, ids, device) -> float:
    sync(device)
    t = time.perf_counter()
    model(ids, use_cache=False)
    sync(device)
    return time.perf_counter() - t


def build(scale: str, device: torch.device, dtype: torch.dtype):
    from transformers import OlmoeConfig, OlmoeForCausalLM
    cfg = {k: v for k, v in SCALES[scale].items() if k not in ("batch", "seq")}
    config = OlmoeConfig(**cfg)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = OlmoeForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def validate_throughput(model, anatomy, ids, noise) -> tuple[float, float]:
    """(experts/s, seconds) of sensitivity.measure: each routed expert alone analog, one seed, on ``ids`` — the
    per-expert damage ``validate`` and the oracle strategy measure (validate repeats it per seed)."""
    from hetmoe_core.models import LoadedModel
    from hetmoe_core.sensitivity import measure
    lm = LoadedModel(model, None, anatomy, "random weights", "bench")
    sync(ids.device)
    t = time.perf_counter()
    measure(lm, noise, ids, seeds=1, all_but_this=False, dense=False, layers=False)
    sync(ids.device)
    dt = time.perf_counter() - t
    return sum(m.num_experts for m in anatomy.moe_layers) / dt, dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale", default=None, choices=list(SCALES), help="default: full on CUDA, small on CPU")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--preset", default="paper-pcm-c1.5")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run the CPU-scaled variant with --device cpu --scale small")
    scale = a.scale or ("full" if device.type == "cuda" else "small")
    batch, seq = a.batch or SCALES[scale]["batch"], a.seq or SCALES[scale]["seq"]
    dtype = getattr(torch, a.dtype)
    t0 = time.perf_counter()
    model = build(scale, device, dtype)
    an = anatomy_of(model)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    load = f", load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores" if device.type == "cpu" else ""
    print(f"{scale} OLMoE-1B-7B shapes: {len(an.moe_layers)} layers x {an.moe_layers[0].num_experts} experts, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.3f} B params, {a.dtype}, on {name}{load}; "
          f"built in {time.perf_counter() - t0:.1f} s; batch {batch} x {seq}, preset {a.preset}")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g).to(device)
    pl, noise = Placement.all_analog(an), get_preset(a.preset)
    forward_time(model, ids[:1, :16], device)   # warm-up (kernels, allocator)
    with Peak(device) as m_clean:
        forward_time(model, ids, device)
    with Peak(device) as m_noisy:
        sync(device)
        t0 = time.perf_counter()
        with analog(model, an, pl, noise, seed=0, backend="fast") as rep:
            sync(device)
            t_prog = time.perf_counter() - t0
            forward_time(model, ids, device)
    # fast-noisy vs clean, interleaved: re-entering the context re-programs the same seed (not timed)
    t_fast, t_clean = [], []
    for _ in range(a.repeats):
        t_clean.append(forward_time(model, ids, device))
        with analog(model, an, pl, noise, seed=0, backend="fast"):
            t_fast.append(forward_time(model, ids, device))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    t_fast, t_clean = med(t_fast), med(t_clean)
    gib = 2 ** 30
    print(f"clean forward      {t_clean * 1e3:9.1f} ms   peak +{m_clean.added / gib:7.3f} GiB")
    print(f"fast-noisy forward {t_fast * 1e3:9.1f} ms   peak +{m_noisy.added / gib:7.3f} GiB (clean copies "
          f"{rep.clean_copy_bytes / gib:.3f} GiB included; {rep.analog_params / 1e9:.3f} B analog params)")
    print(f"program one seed   {t_prog:9.2f} s")
    v, dt = validate_throughput(model, an, ids, noise)
    print(f"validate throughput {v:9.2f} experts/s (one seed, {ids.numel()} tokens, {dt:.1f} s for all experts)")
    print(f"RATIO fast-noisy/clean forward = {t_fast / t_clean:.3f} (goal <= 1.15)")
    print(f"RATIO peak noisy/clean memory  = {m_noisy.added / max(m_clean.added, 1):.2f}")


if __name__ == "__main__":
    main()
