#!/usr/bin/env python
"""Train the default small OLMoE model of hetmoe on a 2-core CPU.

    # 1) measure throughput of candidate sizes / expert kernels (~1 min each)
    python scripts/train_default.py --bench 60 --size s --experts-impl batched_mm
    # 2) train in the background (time budget in minutes is a hard stop; the lr
    #    schedule follows max(step/steps, elapsed/budget) so it anneals either way)
    nohup python scripts/train_default.py --size s --steps 6000 --budget-min 75 > /tmp/hetmoe_train/train.log 2>&1 &
    # 3) resume after a crash from the last checkpoint
    python scripts/train_default.py ... --resume
    # 4) write the shipped folder (bf16 safetensors + tokenizer) from the final checkpoint
    python scripts/train_default.py --export hetmoe_core/assets/default

Data: data/corpus/*.jsonl and data/tokenizer from scripts/build_corpus.py.
Each training sequence is a random window of one domain's token stream; the
domain is drawn uniformly so every domain gets the same share of updates even
though their sizes differ.
"""
import argparse, json, math, os, random, shutil, sys, time

# Other processes share the 2 cores: OpenMP's default busy-waiting then burns the
# time slices we need (measured ~5x slower); passive waiting must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np
import torch
from transformers import OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS, TOKDIR = os.path.join(ROOT, "data/corpus"), os.path.join(ROOT, "data/tokenizer")
WORK = "/tmp/hetmoe_train"
SEED = 1234

# Candidate sizes. All keep >= 4 MoE layers, 16 routed experts, top-2, tied
# embeddings, and fit the 25 MB asset limit in bfloat16 (params * 2 bytes).
SIZES = {
    "xs": dict(hidden_size=192, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4),
    "s": dict(hidden_size=256, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4),
    "m": dict(hidden_size=320, intermediate_size=128, num_hidden_layers=4, num_attention_heads=5),
}


def make_config(size, tok, seq_len, experts_impl):
    cfg = OlmoeConfig(
        vocab_size=len(tok), **SIZES[size], num_key_value_heads=SIZES[size]["num_attention_heads"],
        num_experts=16, num_experts_per_tok=2, norm_topk_prob=False,
        output_router_logits=True, router_aux_loss_coef=0.01,  # switch-style load balancing keeps all experts alive
        max_position_embeddings=seq_len, tie_word_embeddings=True,  # tying halves the embedding bytes
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        use_cache=True,
    )
    cfg._experts_implementation = experts_impl
    return cfg


def load_streams(split, tok):
    """domain -> 1-D int32 token stream (documents joined by <|endoftext|>)."""
    streams = {}
    with open(os.path.join(CORPUS, f"{split}.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(l) for l in f]
    for r in rows:
        ids = tok(r["text"])["input_ids"] + [tok.eos_token_id]
        streams.setdefault(r["domain"], []).extend(ids)
    return {d: np.asarray(v, dtype=np.int32) for d, v in sorted(streams.items())}


def cached_streams(split, tok):
    path = os.path.join(WORK, f"{split}_tokens.npz")
    if not os.path.exists(path):
        os.makedirs(WORK, exist_ok=True)
        np.savez(path, **load_streams(split, tok))
    z = np.load(path)
    return {k: z[k] for k in sorted(z.files)}


def sample_batch(streams, rng, batch, seq_len):
    doms = list(streams)
    rows = []
    for _ in range(batch):
        s = streams[doms[rng.randrange(len(doms))]]
        i = rng.randrange(len(s) - seq_len - 1)
        rows.append(s[i:i + seq_len])
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def val_slice(streams, seq_len, per_domain):
    """Fixed validation slice: the first `per_domain` non-overlapping windows of each domain."""
    return {d: torch.from_numpy(s[: per_domain * seq_len].reshape(per_domain, seq_len).astype(np.int64))
            for d, s in streams.items()}


@torch.no_grad()
def evaluate(model, vslice, autocast):
    model.eval()
    out = {}
    for d, x in vslice.items():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out[d] = model(input_ids=x, labels=x, output_router_logits=False).loss.item()
    model.train()
    out["mean"] = sum(out.values()) / len(out)
    return out


def lr_at(progress, peak, warm=0.03, floor=0.1):
    if progress < warm:
        return peak * progress / warm
    p = min(1.0, (progress - warm) / (1 - warm))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="s", choices=SIZES)
    ap.add_argument("--experts-impl", default="grouped_mm", choices=["eager", "batched_mm", "grouped_mm"])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--budget-min", type=float, default=75.0, help="hard wall-clock stop")
    ap.add_argument("--bf16", type=int, default=1, help="bf16 autocast for matmuls (AMX on this CPU), fp32 master weights")
    ap.add_argument("--bench", type=float, default=0, help="only measure tokens/s for this many seconds")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--ckpt-min", type=float, default=5.0, help="checkpoint period in minutes")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--balance-steps", type=int, default=0,
                    help="after the main run: this many extra steps at the final lr with a PER-LAYER load-balancing loss")
    ap.add_argument("--balance-coef", type=float, default=0.1)
    ap.add_argument("--export", default=None, help="write the final checkpoint to this folder and exit")
    a = ap.parse_args()

    torch.set_num_threads(2)  # the machine has 2 cores (shared with other developers)
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    tok = PreTrainedTokenizerFast.from_pretrained(TOKDIR)
    ckpt = os.path.join(WORK, "ckpt.pt")

    if a.export:
        return export(ckpt, tok, a.export)
    if a.balance_steps:
        return balance(ckpt, a, rng)

    model = OlmoeForCausalLM(make_config(a.size, tok, a.seq_len, a.experts_impl))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"size={a.size} params={n_params/1e6:.2f}M experts_impl={a.experts_impl} bf16={a.bf16}", flush=True)
    # no weight decay on norms/router/embeddings would be marginal here; plain AdamW is enough
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    train = cached_streams("train", tok)
    vslice = val_slice(cached_streams("validation", tok), a.seq_len, 4)

    step, spent, history = 0, 0.0, []
    if a.resume and os.path.exists(ckpt):
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"]); opt.load_state_dict(st["opt"])
        step, spent, history = st["step"], st["spent"], st["history"]
        rng.setstate(st["rng"]); torch.set_rng_state(st["torch_rng"])
        print(f"resumed at step {step}, {spent/60:.1f} min spent", flush=True)

    model.train()
    t0, last_ckpt, tok_seen = time.time() - spent, time.time(), step * a.batch * a.seq_len
    bench_t, bench_tok = None, 0
    while step < a.steps:
        elapsed = time.time() - t0
        if a.bench and bench_t and time.time() - bench_t > a.bench:
            break
        if not a.bench and elapsed > a.budget_min * 60:
            print("time budget reached", flush=True)
            break
        progress = 0.0 if a.bench else max(step / a.steps, elapsed / (a.budget_min * 60))
        for g in opt.param_groups:
            g["lr"] = lr_at(progress, a.lr)
        x = sample_batch(train, rng, a.batch, a.seq_len)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(a.bf16)):
            out = model(input_ids=x, labels=x)  # loss = CE + router_aux_loss_coef * load-balancing loss
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        step += 1; tok_seen += x.numel()
        if a.bench:
            if step == 3:  # skip warm-up steps (allocator, first-call overheads)
                bench_t, bench_tok = time.time(), 0
            elif bench_t:
                bench_tok += x.numel()
            continue
        if step % 25 == 0:
            ce = out.loss.item() - 0.01 * out.aux_loss.item()
            print(f"step {step} ce {ce:.4f} aux {out.aux_loss.item():.3f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"tok {tok_seen} tok/s {tok_seen/(time.time()-t0):.0f} min {(time.time()-t0)/60:.1f}", flush=True)
            history.append({"step": step, "tokens": tok_seen, "train_ce": ce, "minutes": (time.time() - t0) / 60})
        if step % a.eval_every == 0:
            v = evaluate(model, vslice, bool(a.bf16))
            history[-1]["val"] = v
            print("val " + " ".join(f"{k}={x:.3f}" for k, x in v.items()), flush=True)
        if time.time() - last_ckpt > a.ckpt_min * 60:
            save(ckpt, model, opt, step, time.time() - t0, history, rng, a, tok_seen)
            last_ckpt = time.time()

    if a.bench:
        dt = time.time() - bench_t
        print(f"BENCH size={a.size} impl={a.experts_impl} bf16={a.bf16} batch={a.batch} seq={a.seq_len} "
              f"params={n_params/1e6:.2f}M steps={step-3} tok/s={bench_tok/dt:.0f}", flush=True)
        return
    v = evaluate(model, vslice, bool(a.bf16))
    history.append({"step": step, "tokens": tok_seen, "train_ce": history[-1]["train_ce"] if history else None,
                    "minutes": (time.time() - t0) / 60, "val": v})
    print("final val " + " ".join(f"{k}={x:.3f}" for k, x in v.items()), flush=True)
    save(ckpt, model, opt, step, time.time() - t0, history, rng, a, tok_seen)
    print("done", flush=True)


def per_layer_balance_loss(router_logits, k):
    """Switch-style balance loss computed PER LAYER and averaged. transformers' load_balancing_loss_func
    sums the counts of all layers before balancing, so expert i of one layer can starve while expert i of
    another layer is busy; with it alone the main run left an expert with ~0 validation tokens."""
    losses = []
    for lg in router_logits:
        p = torch.softmax(lg.float(), -1)
        f = torch.zeros_like(p[0]).scatter_add_(0, p.topk(k, -1).indices.flatten(), torch.ones(p.shape[0] * k)) / p.shape[0]
        losses.append(p.shape[-1] * (f * p.mean(0)).sum())
    return torch.stack(losses).mean()


def balance(ckpt, a, rng):
    """Short continuation of the main run that adds the per-layer balance loss (lr = the run's final lr)."""
    st = torch.load(ckpt, weights_only=False)
    model = OlmoeForCausalLM(OlmoeConfig.from_dict(st["config"]))
    model.load_state_dict(st["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr * 0.1, betas=(0.9, 0.95), weight_decay=0.1)
    opt.load_state_dict(st["opt"])
    for g in opt.param_groups:
        g["lr"] = a.lr * 0.1
    tok = PreTrainedTokenizerFast.from_pretrained(TOKDIR)
    train = cached_streams("train", tok)
    rng.setstate(st["rng"])
    step, tok_seen, history, t0 = st["step"], st["tokens_seen"], st["history"], time.time()
    model.train()
    for i in range(a.balance_steps):
        x = sample_batch(train, rng, a.batch, a.seq_len)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(a.bf16)):
            out = model(input_ids=x, labels=x)
        bal = per_layer_balance_loss(out.router_logits, model.config.num_experts_per_tok)
        (out.loss + a.balance_coef * bal).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        step += 1; tok_seen += x.numel()
        if step % 25 == 0:
            ce = out.loss.item() - 0.01 * out.aux_loss.item()
            print(f"balance step {step} ce {ce:.4f} per-layer-balance {bal.item():.3f}", flush=True)
            history.append({"step": step, "tokens": tok_seen, "train_ce": ce, "balance": bal.item(),
                            "minutes": st["spent"] / 60 + (time.time() - t0) / 60})
    run_args = argparse.Namespace(**{**st["args"], "balance_steps": a.balance_steps, "balance_coef": a.balance_coef,
                                     "balance_lr": a.lr * 0.1})  # keep the main run's recipe in the record
    save(ckpt, model, opt, step, st["spent"] + time.time() - t0, history, rng, run_args, tok_seen)


def save(path, model, opt, step, spent, history, rng, a, tok_seen):
    tmp = path + ".tmp"  # write-then-rename so a crash mid-save never corrupts the last checkpoint
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "spent": spent,
                "history": history, "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                "config": model.config.to_dict(), "args": vars(a), "tokens_seen": tok_seen}, tmp)
    os.replace(tmp, path)
    print(f"checkpoint step {step}", flush=True)


def export(ckpt, tok, out):
    st = torch.load(ckpt, weights_only=False)
    cfg = OlmoeConfig.from_dict(st["config"])
    model = OlmoeForCausalLM(cfg)
    model.load_state_dict(st["model"])
    # bfloat16 on disk keeps the folder under 25 MB; from_pretrained(dtype=torch.float32) upcasts exactly.
    model.to(torch.bfloat16)
    model.config.output_router_logits = False  # inference default; training used True
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    os.chmod(os.path.join(out, "model.safetensors"), 0o644)  # save_pretrained writes it 0600
    tok.model_max_length = cfg.max_position_embeddings  # lm-eval / pipelines truncate to the trained window
    tok.save_pretrained(out)
    log = {"args": st["args"], "steps": st["step"], "tokens_seen": st["tokens_seen"], "minutes": round(st["spent"] / 60, 1),
           "history": st["history"]}
    with open(os.path.join(out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=0)
    plot_loss(st["history"], os.path.join(out, "loss.png"))
    print(f"exported step {st['step']} ({st['tokens_seen']} tokens) to {out}")


def plot_loss(history, path, W=720, H=420):
    """Loss curve with PIL only (matplotlib is not a dependency): train CE and mean validation CE vs tokens."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (W, H), "white")
    g = ImageDraw.Draw(img)
    L, R, T, B = 60, 20, 30, 50
    tr = [(h["tokens"], h["train_ce"]) for h in history if h.get("train_ce") is not None]
    va = [(h["tokens"], h["val"]["mean"]) for h in history if "val" in h]
    xmax = max(t for t, _ in tr + va)
    ys = [y for _, y in tr + va]
    ylo, yhi = math.floor(min(ys)), math.ceil(min(max(ys), 9))
    X = lambda t: L + (W - L - R) * t / xmax
    Y = lambda y: T + (H - T - B) * (yhi - min(y, yhi)) / (yhi - ylo)
    g.rectangle([L, T, W - R, H - B], outline="black")
    for y in range(ylo, yhi + 1):
        g.line([L - 4, Y(y), L, Y(y)], fill="black"); g.text((L - 22, Y(y) - 6), str(y), fill="black")
    for i in range(6):
        t = xmax * i / 5
        g.line([X(t), H - B, X(t), H - B + 4], fill="black"); g.text((X(t) - 12, H - B + 8), f"{t/1e6:.1f}M", fill="black")
    g.line([(X(t), Y(y)) for t, y in tr], fill=(31, 119, 180), width=2)
    if len(va) > 1:
        g.line([(X(t), Y(y)) for t, y in va], fill=(214, 39, 40), width=2)
    for t, y in va:
        g.ellipse([X(t) - 3, Y(y) - 3, X(t) + 3, Y(y) + 3], fill=(214, 39, 40))
    g.text((L, 8), "cross-entropy (nats/token) vs training tokens;  blue: train batch, red: validation (mean of domains)", fill="black")
    g.text((W // 2 - 30, H - 20), "tokens seen", fill="black")
    img.save(path)


if __name__ == "__main__":
    main()
