#!/usr/bin/env python
"""Measure the shipped default model and write every number of its model card.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
        python scripts/default_metrics.py [--limit N]

Reads  hetmoe_core/assets/default (model), hetmoe_core/assets/tasks (held-out
test data), data/corpus/{train,validation}.jsonl (from scripts/build_corpus.py).
Writes hetmoe_core/assets/default/metrics.json and fills the block between the
metrics markers of hetmoe_core/assets/default/README.md.

Quality floor checked here:
  * per-domain test perplexity below an add-k bigram fitted on the same training tokens
  * every routed expert gets tokens on the validation split (min count reported)
  * routing depends on the domain: mutual information I(domain; expert) per layer, in bits
  * hetmoe_cloze / hetmoe_choice accuracy through lm-eval (HFLM on the model object)
"""
import argparse, json, math, os, sys

for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(k, "1")  # never reach for a hub
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores, see train_default.py
import numpy as np
import torch
from transformers import AutoTokenizer, OlmoeForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "hetmoe_core/assets/default")
TASKS = os.path.join(ROOT, "hetmoe_core/assets/tasks")
CORPUS = os.path.join(ROOT, "data/corpus")
SEQ = 256
VAL_WINDOWS = 32  # per domain: 32 x 256 tokens of validation text for loss + routing
SLICE_TOKENS = 128  # fixed slice re-checked by tests/test_default_model.py


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(l) for l in f]


def streams(rows, tok, max_tokens=None):
    """domain -> token stream of its documents joined by <|endoftext|> (as in training)."""
    out = {}
    for r in rows:
        s = out.setdefault(r["domain"], [])
        if max_tokens and len(s) >= max_tokens:
            continue
        s.extend(tok(r["text"])["input_ids"] + [tok.eos_token_id])
    return {d: np.asarray(v, dtype=np.int64) for d, v in sorted(out.items())}


@torch.no_grad()
def val_loss_and_routing(model, vstreams):
    """Mean next-token CE per domain and top-k expert counts [layer, domain, expert]."""
    cfg = model.config
    doms = list(vstreams)
    counts = np.zeros((cfg.num_hidden_layers, len(doms), cfg.num_experts), dtype=np.int64)
    loss = {}
    for di, d in enumerate(doms):
        x = torch.from_numpy(vstreams[d][: VAL_WINDOWS * SEQ].reshape(-1, SEQ))
        tot = 0.0
        for b in x.split(8):
            out = model(input_ids=b, labels=b, output_router_logits=True)
            tot += out.loss.item() - cfg.router_aux_loss_coef * out.aux_loss.item()  # pure CE
            for li, logits in enumerate(out.router_logits):  # (tokens, experts) per layer
                top = logits.topk(cfg.num_experts_per_tok, dim=-1).indices.flatten()
                counts[li, di] += np.bincount(top.numpy(), minlength=cfg.num_experts)
        loss[d] = tot / len(x.split(8))
    return loss, counts, doms


def mutual_information(c):
    """I(domain; expert) in bits from a [domain, expert] count table."""
    p = c / c.sum()
    pd, pe = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log2(p[nz] / (pd @ pe)[nz])).sum())


@torch.no_grad()
def model_nll(model, ids, eos):
    """Sum of -log p over all tokens of a passage: non-overlapping windows, each
    prefixed by <|endoftext|> so that every passage token (the first included) is predicted."""
    nll = 0.0
    for j in range(0, len(ids), SEQ - 1):
        w = torch.tensor([[eos] + ids[j:j + SEQ - 1]])
        logp = torch.log_softmax(model(input_ids=w).logits[0, :-1].float(), -1)
        nll -= logp.gather(1, w[0, 1:, None]).sum().item()
    return nll


class Bigram:
    """Add-k smoothed bigram over the same training token streams the model saw."""

    def __init__(self, train_streams, V):
        self.V = V
        c = np.zeros(V * V, dtype=np.int64)
        for s in train_streams.values():
            c += np.bincount(s[:-1] * V + s[1:], minlength=V * V)
        self.c = c.reshape(V, V)
        self.row = self.c.sum(1)
        self.k = 1.0

    def nll(self, ids, prev):
        ids = np.asarray(ids)
        p = np.concatenate([[prev], ids[:-1]])
        return float(-np.log((self.c[p, ids] + self.k) / (self.row[p] + self.k * self.V)).sum())


def lm_eval_tasks(model, tok, limit):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=16, max_length=SEQ)
    tasks = ["hetmoe_cloze", "hetmoe_choice", "hetmoe_ppl"]
    res = simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=TASKS, include_defaults=False),
                          limit=limit, log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    out = {}
    for t, r in res["results"].items():
        out[t] = {k.split(",")[0]: v for k, v in r.items() if k.endswith(",none") and "stderr" not in k}
    # per-domain accuracy (the dashboard shows tasks per domain)
    for t in ("hetmoe_cloze", "hetmoe_choice"):
        for metric in ("acc", "acc_norm"):
            by = {}
            for s in res["samples"][t]:
                if metric in s:
                    by.setdefault(s["doc"]["domain"], []).append(s[metric])
            if by:
                out[t][metric + "_by_domain"] = {d: float(np.mean(v)) for d, v in sorted(by.items())}
        out[t]["n"] = len(res["samples"][t])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None, help="lm-eval items per task (default: all)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)

    model = OlmoeForCausalLM.from_pretrained(DEFAULT, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(DEFAULT)
    cfg = model.config
    m = {"model": {"params": sum(p.numel() for p in model.parameters()), "layers": cfg.num_hidden_layers,
                   "experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok, "hidden": cfg.hidden_size,
                   "expert_intermediate": cfg.intermediate_size, "vocab": cfg.vocab_size}}

    # 1) fixed validation slice: first SLICE_TOKENS tokens of the first validation doc of each domain
    val_rows = read_jsonl(os.path.join(CORPUS, "validation.jsonl"))
    first = {}
    for r in val_rows:
        first.setdefault(r["domain"], r["text"])
    ids = [([tok.eos_token_id] + tok(t)["input_ids"])[:SLICE_TOKENS] for _, t in sorted(first.items())]
    x = torch.tensor(ids)
    with torch.no_grad():
        sl = model(input_ids=x, labels=x).loss.item()
    m["val_slice"] = {"domains": sorted(first), "input_ids": ids, "loss": sl}

    # 2) validation loss + routing statistics
    vstreams = streams(val_rows, tok, max_tokens=VAL_WINDOWS * SEQ + 1)
    vloss, counts, doms = val_loss_and_routing(model, vstreams)
    m["validation"] = {"tokens_per_domain": VAL_WINDOWS * SEQ, "loss_by_domain": vloss,
                       "loss_mean": float(np.mean(list(vloss.values())))}
    per_layer = counts.sum(1)  # [layer, expert]
    m["routing"] = {
        "domains": doms,
        "min_expert_count": int(per_layer.min()),
        "min_expert_count_by_layer": per_layer.min(1).tolist(),
        "max_expert_share_by_layer": (per_layer.max(1) / per_layer.sum(1)).tolist(),
        "mi_bits_by_layer": [mutual_information(counts[l]) for l in range(len(counts))],
        "mi_bits_max": math.log2(len(doms)),
        "counts": counts.tolist(),  # [layer][domain][expert] top-k selections
    }

    # 3) per-domain test perplexity, model vs add-k bigram on identical token sequences
    train_streams = streams(read_jsonl(os.path.join(CORPUS, "train.jsonl")), tok)
    bi = Bigram(train_streams, cfg.vocab_size)
    best = None
    for k in (0.003, 0.01, 0.03, 0.1, 0.3, 1.0):  # choose k on validation text, not on test
        bi.k = k
        v = sum(bi.nll(s[: VAL_WINDOWS * SEQ], tok.eos_token_id) for s in vstreams.values())
        best = min(best or (v, k), (v, k))
    bi.k = best[1]
    ppl, tot = {}, {}
    for r in read_jsonl(os.path.join(TASKS, "hetmoe_ppl.jsonl")):
        t_ids = tok(r["text"])["input_ids"]
        acc = tot.setdefault(r["domain"], [0.0, 0.0, 0])
        acc[0] += model_nll(model, t_ids, tok.eos_token_id)
        acc[1] += bi.nll(t_ids, tok.eos_token_id)
        acc[2] += len(t_ids)
    for d, (mn, bn, n) in sorted(tot.items()):
        ppl[d] = {"tokens": n, "model_ppl": math.exp(mn / n), "bigram_ppl": math.exp(bn / n)}
    m["test_perplexity"] = {"bigram_k": bi.k, "by_domain": ppl,
                            "model_below_bigram_all": all(v["model_ppl"] < v["bigram_ppl"] for v in ppl.values())}

    # 4) derived held-out tasks through lm-eval, offline, on the model object
    m["lm_eval"] = lm_eval_tasks(model, tok, args.limit)

    summary = {k: v for k, v in m.items() if k not in ("val_slice", "routing")}
    summary["routing"] = {k: v for k, v in m["routing"].items() if k != "counts"}
    print(json.dumps(summary, indent=1))
    if not args.no_write:
        with open(os.path.join(DEFAULT, "metrics.json"), "w") as f:
            json.dump(m, f, indent=1)
        fill_card(m)


def fill_card(m):
    """Replace the block between the markers in README.md with the measured numbers."""
    path = os.path.join(DEFAULT, "README.md")
    if not os.path.exists(path):
        return
    L = ["| domain | val loss | test ppl (model) | test ppl (bigram, k=%g) | cloze acc | choice acc | choice acc_norm |"
         % m["test_perplexity"]["bigram_k"], "|---|---|---|---|---|---|---|"]
    cl, ch = m["lm_eval"]["hetmoe_cloze"], m["lm_eval"]["hetmoe_choice"]
    for d, p in m["test_perplexity"]["by_domain"].items():
        L.append(f"| {d} | {m['validation']['loss_by_domain'][d]:.3f} | {p['model_ppl']:.1f} | {p['bigram_ppl']:.1f} | "
                 f"{cl['acc_by_domain'].get(d, float('nan')):.2f} | {ch['acc_by_domain'].get(d, float('nan')):.2f} | {ch['acc_norm_by_domain'].get(d, float('nan')):.2f} |")
    L.append(f"| **all** | {m['validation']['loss_mean']:.3f} | | | **{cl['acc']:.3f}** (n={cl['n']}) | "
             f"**{ch['acc']:.3f}** (n={ch['n']}) | **{ch['acc_norm']:.3f}** |")
    r = m["routing"]
    L += ["", f"- Validation loss on the fixed {len(r['domains'])}x{SLICE_TOKENS}-token slice (re-checked by the tests): "
          f"{m['val_slice']['loss']:.4f}",
          f"- Cloze perplexity of the target word: {cl['perplexity']:.1f}; chance accuracy ~0 (cloze), 25% (choice).",
          f"- Expert load on {m['validation']['tokens_per_domain']} validation tokens per domain: min top-{m['model']['top_k']} "
          f"selections of any expert = {r['min_expert_count']} (per layer {r['min_expert_count_by_layer']}); "
          f"largest expert share per layer {[round(x, 3) for x in r['max_expert_share_by_layer']]}.",
          f"- Mutual information I(domain; chosen expert) per layer, bits (max {r['mi_bits_max']:.2f}): "
          f"{[round(x, 3) for x in r['mi_bits_by_layer']]}",
          "- lm-eval `hetmoe_ppl` (rolling loglikelihood) bits per byte: " + ", ".join(
              f"{t.replace('hetmoe_ppl_', '')} {v['bits_per_byte']:.3f}" for t, v in sorted(m["lm_eval"].items())
              if t.startswith("hetmoe_ppl_"))]
    s = open(path, encoding="utf-8").read()
    a, b = "<!-- metrics:start -->", "<!-- metrics:end -->"
    if a in s and b in s:
        s = s[: s.index(a) + len(a)] + "\n" + "\n".join(L) + "\n" + s[s.index(b):]
        open(path, "w", encoding="utf-8").write(s)


if __name__ == "__main__":
    main()
