"""Activation density of routed experts from calibration text (the paper's Activation Frequency / Weight baselines).

Forward hooks on every MoE router record the router module's own top-k choice — transformers 5 routers of all
supported families return ``(router_logits, top_k_weights, top_k_index)`` — so families whose choice uses a
correction bias or expert groups (DeepSeek-V2/V3) are counted exactly as the model routes, never re-derived
from the logits. Padding tokens are masked out. Densely activated modules (attention, LM head, shared experts,
router, dense MLP layers) are used by every token: density 1.0.

Results are cached as ``.npz`` (no pickle) under ``cache/activation`` keyed by the model fingerprint and a
sha256 of the calibration text and max_length.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .placement import DENSE_KINDS

DEFAULT_CACHE = Path(__file__).resolve().parent.parent / "cache" / "activation"
SHIPPED_CACHE = Path(__file__).resolve().parent / "assets" / "default" / "activation"
"""Statistics of the default model on its shipped calibration text (~115k tokens, minutes of CPU), computed by
``scripts/build_corpus.py --calibration-only`` and read like any cache entry (same key), so a fresh install never
routes the whole calibration text again."""
_VERSION = 2   # 2: texts cut into windows instead of truncated. Bump when the statistics change meaning (invalidates the cache)


@dataclass(frozen=True, eq=False)
class ActivationStats:
    """Routing statistics per calibration domain, MoE layer (anatomy.moe_layers order) and routed expert.

    domains: domain names (D); counts: int64 [D, L, E] tokens routed to each expert; weight_sum: float64 [D, L, E]
    sum of the routing weights those tokens gave the expert (the router's top_k_weights, as the model applies
    them, e.g. DeepSeek's routed_scaling_factor included); tokens: int64 [D] non-padding tokens; top_k: per layer.
    """
    domains: tuple
    counts: np.ndarray
    weight_sum: np.ndarray
    tokens: np.ndarray
    top_k: tuple

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.sum())

    @property
    def frequency(self) -> np.ndarray:
        """float64 [L, E]: share of tokens routed to the expert (Activation Frequency); rows sum to top-k."""
        return self.counts.sum(0) / max(1, self.num_tokens)

    @property
    def weight(self) -> np.ndarray:
        """float64 [L, E]: mean routing weight over the tokens routed to the expert (Activation Weight); 0 if never."""
        c = self.counts.sum(0)
        return np.divide(self.weight_sum.sum(0), c, out=np.zeros(c.shape), where=c > 0)

    def domain(self, name: str) -> "ActivationStats":
        """Statistics of one calibration domain. Raises ValueError for an unknown domain."""
        if name not in self.domains:
            raise ValueError(f"unknown domain {name!r}; have {', '.join(self.domains)}")
        i = self.domains.index(name)
        return ActivationStats((name,), self.counts[i:i + 1], self.weight_sum[i:i + 1], self.tokens[i:i + 1],
                               self.top_k)

    def to_dict(self) -> dict:
        """JSON-able: overall and per-domain frequency and weight [L][E], token counts."""
        per = {d: {"tokens": int(self.tokens[i]), "frequency": self.domain(d).frequency.tolist(),
                   "weight": self.domain(d).weight.tolist()} for i, d in enumerate(self.domains)}
        return {"tokens": self.num_tokens, "top_k": list(self.top_k), "frequency": self.frequency.tolist(),
                "weight": self.weight.tolist(), "domains": per}

    def save(self, path: Path) -> None:
        """Write as .npz (plain arrays; domain names as a unicode array, so loading needs no pickle)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, domains=np.array(self.domains, dtype=str), counts=self.counts, weight_sum=self.weight_sum,
                 tokens=self.tokens, top_k=np.array(self.top_k, dtype=np.int64))
        tmp.replace(path)   # atomic: a reader never sees half a file

    @classmethod
    def load(cls, path: Path) -> "ActivationStats":
        with np.load(path, allow_pickle=False) as z:
            return cls(tuple(str(d) for d in z["domains"]), z["counts"], z["weight_sum"], z["tokens"],
                       tuple(int(k) for k in z["top_k"]))


ASSETS = Path(__file__).resolve().parent / "assets"
BUILTIN_CALIBRATION = {
    "prose": ["The quick brown fox jumps over the lazy dog.", "She opened the window and the cold air came in.",
              "A river runs through the old town, past the market and the church."],
    "science": ["Water boils at 100 degrees Celsius at sea level.", "The mitochondria produce most of the cell's ATP."],
    "code": ["def add(a, b):\n    return a + b", "for i in range(10):\n    print(i * i)"],
}
"""Seven short sentences (a few dozen tokens): the calibration text of ``tiny:`` test models only, whose byte-level
tokenizer would turn the shipped calibration file into ~400k tokens. Never a stand-in for a real model's data."""
BUILTIN_TEXTS = "built-in sentences (7 short texts, for tiny: test models only"
BUILTIN_NOTE = BUILTIN_TEXTS + "; use --calib FILE for real statistics)"   # the CLI's wording; pages: ui.calibration


def read_calibration(path: str | Path) -> dict[str, list[str]]:
    """Calibration text from a file: .txt (one text per non-empty line), .json (a list of texts or
    {domain: [texts]}), .jsonl (objects with "text" and optional "domain"). Raises ValueError if unreadable/empty,
    or for a .json {domain: "one string"} (it must be a list of texts per domain)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"calibration file {path} not found")
    try:
        if path.suffix == ".txt":
            out = {"all": [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]}
        elif path.suffix == ".json":
            d = json.loads(path.read_text(encoding="utf-8"))
            out = d if isinstance(d, dict) else {"all": d}
        elif path.suffix == ".jsonl":
            out = {}
            for ln in path.read_text(encoding="utf-8").splitlines():
                if ln.strip():
                    r = json.loads(ln)
                    out.setdefault(str(r.get("domain", "all")), []).append(r["text"])
        else:
            raise ValueError(f"calibration file {path} must be .txt, .json or .jsonl")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"calibration file {path} is malformed ({e}); see routing.read_calibration") from None
    try:
        return _as_domains(out)
    except ValueError as e:
        raise ValueError(f"calibration file {path}: {e}") from None


CALIBRATION_FILES = (ASSETS / "default" / "calibration.jsonl",)
"""The shipped calibration text: 114,662 tokens (default tokenizer) of the default model's VALIDATION split, 16k per
domain (7 domains), whole documents or the head of one (at most 4096 tokens each), written by
``scripts/build_corpus.py`` (seed 1234 split, as the model was trained; licences in assets/default/LICENSES.md)."""


def default_calibration(source: str | None = None) -> tuple[dict[str, list[str]], str]:
    """(texts by domain, where they came from) for a model ``source``.

    ``tiny:<family>`` test models get BUILTIN_CALIBRATION (where = BUILTIN_NOTE); every other model (the default,
    hub ids, local folders, and ``source=None``) gets the shipped validation text, the first of CALIBRATION_FILES
    (where = its path). Raises ValueError if that file is missing (a broken install: reinstall hetmoe, or pass
    --calib FILE) — never a silent fall-back to the built-in sentences.
    """
    if source is not None and str(source).startswith("tiny:"):
        return {k: list(v) for k, v in BUILTIN_CALIBRATION.items()}, BUILTIN_NOTE
    for p in CALIBRATION_FILES:
        if p.exists():   # named relative to the install, so a stored result does not carry this machine's path
            return read_calibration(p), shipped_name(p)
    raise ValueError(f"the shipped calibration text {CALIBRATION_FILES[0]} is missing (reinstall hetmoe or rebuild "
                     "it with scripts/build_corpus.py --calibration-only); or give your own with --calib FILE")


def shipped_name(path) -> str:
    """A file shipped inside hetmoe named relative to the install (``hetmoe_core/assets/...``); other paths as given."""
    mark = "/" + ASSETS.parent.name + "/" + ASSETS.name + "/"          # "/hetmoe_core/assets/", in any checkout
    text = Path(path).as_posix()
    return text[text.index(mark) + 1:] if Path(path).is_absolute() and mark in text else str(path)


def is_builtin(where: str) -> bool:
    """True when ``where`` (default_calibration's second value) names the built-in tiny-model sentences."""
    return where == BUILTIN_NOTE


def densities(anatomy, stats: ActivationStats) -> dict:
    """Activation density per module kind: dense kinds -> 1.0 (every token uses them; kinds the model lacks are
    left out); "routed_experts" -> [L][E] share of tokens routed to each expert (stats.frequency)."""
    out = {k: 1.0 for k in DENSE_KINDS if anatomy.modules.get(k)}
    out["routed_experts"] = stats.frequency.tolist()
    return out


def calibration_hash(texts: dict[str, list[str]], max_length: int) -> str:
    """sha256 of the canonical JSON of {domain: texts} and max_length (the cache key's data part)."""
    blob = json.dumps({"texts": texts, "max_length": max_length, "v": _VERSION}, sort_keys=True,
                      ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _as_domains(texts) -> dict[str, list[str]]:
    if isinstance(texts, str):
        raise ValueError("calibration text must be a list of strings or {domain: list of strings}, not one string")
    d = dict(texts) if isinstance(texts, dict) else {"all": list(texts)}
    if bad := [str(k) for k, v in d.items() if isinstance(v, str) or not isinstance(v, (list, tuple))]:
        raise ValueError(f"calibration domain(s) {', '.join(map(repr, bad))} must hold a list of texts, e.g. "
                         f'{{"{bad[0]}": ["first text", "second text"]}}, not one string')
    d = {str(k): [t for t in v if isinstance(t, str) and t.strip()] for k, v in d.items()}
    if not d or not any(d.values()):
        raise ValueError("calibration text is empty; give at least one non-empty text")
    return {k: v for k, v in d.items() if v}


def _windows(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of every text, cut into consecutive windows of at most ``max_length`` tokens (no token dropped)."""
    out = []
    for ids in tokenizer(texts, verbose=False)["input_ids"]:
        out += [ids[i:i + max_length] for i in range(0, len(ids), max_length)]
    return out


def _batches(windows: list[list[int]], pad: int, batch_size: int):
    """Right-padded (input_ids, attention_mask) batches; windows sorted by length to waste little padding."""
    import torch
    ids = sorted((x for x in windows if x), key=len)
    for i in range(0, len(ids), batch_size):
        chunk = ids[i:i + batch_size]
        n = max(map(len, chunk))
        inp = torch.full((len(chunk), n), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for j, x in enumerate(chunk):
            inp[j, :len(x)] = torch.tensor(x)
            mask[j, :len(x)] = 1
        yield inp, mask


def activation_stats(model, tokenizer, anatomy, texts, batch_size: int = 8, max_length: int = 256,
                     progress: Callable[[int, int], None] | None = None, cache_dir: str | Path | None = None,
                     fingerprint: str | None = None) -> ActivationStats:
    """Count each routed expert's top-k selections over calibration text.

    texts: list[str] or {domain: list[str]} (a list is one domain "all"). Each text is tokenized whole and cut into
    consecutive windows of ``max_length`` tokens (every token counts; a window's tokens attend only within it);
    batches of ``batch_size`` windows are right-padded and padding is masked out.
    progress(done_windows, total_windows) after each batch. With ``fingerprint`` (LoadedModel.fingerprint) the result is
    cached under ``cache_dir`` (default ``cache/activation``) as ``<sha256>.npz`` (SHIPPED_CACHE is read too);
    without it nothing is cached.
    Source: Activation Frequency / Activation Weight baselines of arXiv 2603.02633.
    Raises ValueError for empty text, batch_size/max_length < 1, or a router whose output is not
    (logits, top_k_weights, top_k_index).
    """
    import torch   # here, not at the top: reading calibration text and its hash needs no torch
    domains = _as_domains(texts)
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be >= 1 (got {batch_size}, {max_length})")
    path = None
    if fingerprint:
        key = hashlib.sha256(f"{fingerprint}|{calibration_hash(domains, max_length)}".encode()).hexdigest()[:32]
        path = Path(cache_dir or DEFAULT_CACHE) / f"{key}.npz"
        for p in (path, SHIPPED_CACHE / f"{key}.npz"):
            if p.exists():
                return ActivationStats.load(p)
    layers = anatomy.moe_layers
    E = max(m.num_experts for m in layers)
    D, L = len(domains), len(layers)
    counts = np.zeros((D, L, E), dtype=np.int64)
    wsum = np.zeros((D, L, E), dtype=np.float64)
    tokens = np.zeros(D, dtype=np.int64)
    state = {}

    def hook(li, m):
        def fn(_module, _inp, out):
            if not (isinstance(out, tuple) and len(out) >= 3):
                raise ValueError(f"router {m.router_name} returned {type(out).__name__}; expected "
                                 "(router_logits, top_k_weights, top_k_index)")
            w, idx = out[1].detach(), out[2].detach()
            keep = state["mask"]
            idx, w = idx.reshape(keep.numel(), -1)[keep], w.reshape(keep.numel(), -1)[keep]
            if idx.shape[1] != m.top_k:
                raise ValueError(f"router {m.router_name} chose {idx.shape[1]} experts per token, top_k is {m.top_k}")
            flat = idx.reshape(-1).cpu()
            counts[state["d"], li] += torch.bincount(flat, minlength=E).numpy()[:E]
            wsum[state["d"], li] += torch.bincount(flat, weights=w.reshape(-1).double().cpu(), minlength=E).numpy()[:E]
        return fn

    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    device = next(model.parameters()).device
    pad = next((p for p in (tokenizer.pad_token_id, tokenizer.eos_token_id) if p is not None), 0)
    windows = {name: _windows(tokenizer, ts, max_length) for name, ts in domains.items()}
    total, done = sum(map(len, windows.values())), 0
    handles = [m.router.register_forward_hook(hook(i, m)) for i, m in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for d, name in enumerate(domains):
            state["d"] = d
            for inp, mask in _batches(windows[name], pad, batch_size):
                state["mask"] = mask.reshape(-1).bool().to(device)
                tokens[d] += int(mask.sum())
                with torch.no_grad():
                    base(input_ids=inp.to(device), attention_mask=mask.to(device), use_cache=False)
                done += inp.shape[0]
                if progress:
                    progress(done, total)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if tokens.sum() == 0:
        raise ValueError("calibration text produced no tokens")
    stats = ActivationStats(tuple(domains), counts, wsum, tokens, tuple(m.top_k for m in layers))
    if path is not None:
        stats.save(path)
    return stats
