"""Activation density from router hooks: top-k sums, padding, DeepSeek-V3 bias routing, cache."""
import numpy as np
import pytest
import torch

from hetmoe_core.models import TINY_FAMILIES, anatomy_of, load_model, tiny_model
from hetmoe_core.routing import ActivationStats, activation_stats, densities

TEXTS = {"prose": ["The cat sat on the mat.", "A quick brown fox jumps over the lazy dog, again and again.", "Hi"],
         "code": ["def f(x): return x + 1", "for i in range(10): print(i * i)"]}


@pytest.fixture(scope="module")
def tok():
    return load_model("tiny:olmoe").tokenizer


def _manual_counts(model, tok, a, text):
    """Reference for one unpadded text: call each router by hand on the hidden states entering its MoE block."""
    seen = {}
    hooks = [m.router.register_forward_hook(lambda mod, i, o, li=li: seen.__setitem__(li, o[2].reshape(-1)))
             for li, m in enumerate(a.moe_layers)]
    with torch.no_grad():
        model(torch.tensor([tok(text)["input_ids"]]))
    for h in hooks:
        h.remove()
    return np.stack([np.bincount(seen[i].numpy(), minlength=m.num_experts) for i, m in enumerate(a.moe_layers)])


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_frequencies_sum_to_top_k_and_ignore_padding(family, tok):
    model = tiny_model(family, seed=2)
    a = anatomy_of(model)
    s = activation_stats(model, tok, a, TEXTS, batch_size=3, max_length=64)   # padded batches
    n_tokens = {d: sum(len(tok(t)["input_ids"]) for t in ts) for d, ts in TEXTS.items()}
    assert s.domains == ("prose", "code") and s.tokens.tolist() == [n_tokens["prose"], n_tokens["code"]]
    k = [m.top_k for m in a.moe_layers]
    np.testing.assert_allclose(s.frequency.sum(1), k)
    for d in s.domains:
        np.testing.assert_allclose(s.domain(d).frequency.sum(1), k)
    ref = sum(_manual_counts(model, tok, a, t) for ts in TEXTS.values() for t in ts)
    np.testing.assert_array_equal(s.counts.sum(0), ref)     # padding would add counts for pad tokens
    assert ((s.weight > 0) == (s.counts.sum(0) > 0)).all() and (s.weight[s.counts.sum(0) > 0] > 0).all()


def test_deepseek_v3_counts_the_routers_biased_choice(tok):
    """The correction bias decides DeepSeek-V3's top-k; a hook on the router sees it, a recomputed top-k would not."""
    model = tiny_model("deepseek_v3", seed=0)
    a = anatomy_of(model)
    with torch.no_grad():
        a.moe_layers[0].router.e_score_correction_bias[5] = 100.0
    s = activation_stats(model, tok, a, ["some calibration text for the test"], batch_size=1, max_length=32)
    assert s.frequency[0, 5] == 1.0 and s.frequency[1, 5] < 1.0


def test_weight_is_mean_routing_weight(tok):
    model = tiny_model("mixtral", seed=0)       # Mixtral renormalises top-k weights: they sum to 1 per token
    a = anatomy_of(model)
    s = activation_stats(model, tok, a, TEXTS["prose"], batch_size=2, max_length=64)
    np.testing.assert_allclose((s.weight * s.frequency).sum(1), 1.0, rtol=1e-6)


def test_cache_roundtrip_and_key(tmp_path, tok):
    model = tiny_model("olmoe", seed=0)
    a = anatomy_of(model)
    calls = []
    s1 = activation_stats(model, tok, a, TEXTS, batch_size=2, max_length=32, cache_dir=tmp_path, fingerprint="fp1",
                          progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (6, 6) and len(list(tmp_path.glob("*.npz"))) == 1   # 5 texts, one cut into two windows of 32
    s2 = activation_stats(None, None, a, TEXTS, max_length=32, cache_dir=tmp_path, fingerprint="fp1")  # from cache
    assert isinstance(s2, ActivationStats) and s2.domains == s1.domains
    np.testing.assert_array_equal(s1.counts, s2.counts)
    np.testing.assert_array_equal(s1.weight_sum, s2.weight_sum)
    activation_stats(model, tok, a, TEXTS, max_length=16, cache_dir=tmp_path, fingerprint="fp1")
    activation_stats(model, tok, a, TEXTS, max_length=32, cache_dir=tmp_path, fingerprint="fp2")
    assert len(list(tmp_path.glob("*.npz"))) == 3
    np.load(next(tmp_path.glob("*.npz")), allow_pickle=False)        # plain arrays, no pickle
    d = densities(a, s1)
    assert d["attention"] == 1.0 and d["lm_head"] == 1.0 and "shared_experts" not in d
    assert np.allclose(np.sum(d["routed_experts"], axis=1), 2)


def test_errors(tok):
    model = tiny_model("olmoe")
    a = anatomy_of(model)
    for bad in ([], ["", "  "], {"x": []}, "just one string"):
        with pytest.raises(ValueError, match="calibration text"):
            activation_stats(model, tok, a, bad)
    with pytest.raises(ValueError, match="batch_size"):
        activation_stats(model, tok, a, ["x"], batch_size=0)


def test_read_calibration_formats(tmp_path):
    from hetmoe_core.routing import default_calibration, read_calibration
    (tmp_path / "a.txt").write_text("first text\n\n  \nsecond text\n")
    assert read_calibration(tmp_path / "a.txt") == {"all": ["first text", "second text"]}
    (tmp_path / "b.jsonl").write_text('{"domain": "code", "doc": "x", "text": "x = 1"}\n{"text": "plain"}\n')
    assert read_calibration(tmp_path / "b.jsonl") == {"code": ["x = 1"], "all": ["plain"]}
    (tmp_path / "c.json").write_text('{"d1": ["a", ""], "d2": ["b"]}')
    assert read_calibration(tmp_path / "c.json") == {"d1": ["a"], "d2": ["b"]}
    (tmp_path / "d.jsonl").write_text('{"domain": "code"}\n')
    with pytest.raises(ValueError, match="malformed"):
        read_calibration(tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match="must be .txt"):
        (tmp_path / "e.csv").write_text("x")
        read_calibration(tmp_path / "e.csv")
    texts, where = default_calibration()
    assert sum(map(len, texts.values())) > 0 and where.endswith("calibration.jsonl")
    (tmp_path / "f.json").write_text('{"bible": "In the beginning", "code": ["x = 1"]}')   # one string, not a list
    with pytest.raises(ValueError, match="'bible' must hold a list of texts"):
        read_calibration(tmp_path / "f.json")


def test_default_calibration_is_the_validation_split():
    """The default model's calibration: >= 100k tokens of its validation split over the 7 domains; tiny models
    alone get the built-in sentences."""
    import json
    from transformers import AutoTokenizer
    from hetmoe_core.routing import ASSETS, BUILTIN_CALIBRATION, default_calibration, is_builtin
    texts, where = default_calibration("default")
    assert not is_builtin(where) and sorted(texts) == ["bible_en", "bible_es", "commentary", "pycode", "pydoc",
                                                       "shakespeare", "sotu"]
    tok = AutoTokenizer.from_pretrained(ASSETS / "default")
    per = {d: sum(len(x) for x in tok(ts, verbose=False)["input_ids"]) for d, ts in texts.items()}
    assert sum(per.values()) >= 100_000 and min(per.values()) >= 16_000, per
    rows = [json.loads(ln) for ln in open(ASSETS / "default" / "calibration.jsonl", encoding="utf-8")]
    assert sum(r["tokens"] for r in rows) == sum(per.values())   # the file's own counts are the tokenizer's
    # never test text: no calibration document is one the held-out tasks were cut from
    tasks = {json.loads(ln)["doc"] for ln in open(ASSETS / "tasks" / "hetmoe_ppl.jsonl", encoding="utf-8")}
    assert tasks and not tasks & {r["doc"] for r in rows}
    tiny, where = default_calibration("tiny:olmoe")
    assert is_builtin(where) and tiny == BUILTIN_CALIBRATION
    # named relative to the install: no machine's path travels in stored results or snapshots
    assert default_calibration()[1] == default_calibration("some/hub-model")[1] == "hetmoe_core/assets/default/calibration.jsonl"


def test_long_texts_are_windowed_not_truncated(tok):
    """Every token of a text longer than max_length is routed (windows of max_length tokens)."""
    model = tiny_model("olmoe", seed=1)
    a = anatomy_of(model)
    text = "abcdefghij " * 30   # 330 byte tokens
    s = activation_stats(model, tok, a, [text], batch_size=2, max_length=64)
    assert s.num_tokens == len(tok(text)["input_ids"]) == 330
    k = [m.top_k for m in a.moe_layers]
    assert s.counts.sum(axis=(0, 2)).tolist() == [330 * x for x in k]


def test_shipped_statistics_of_the_default():
    """The default's statistics on the shipped calibration ship as a cache entry: read, not recomputed, and
    consistent (every calibration token routed top-k times per layer)."""
    from hetmoe_core.routing import SHIPPED_CACHE, default_calibration
    lm = load_model("default")
    texts, _ = default_calibration("default")

    def boom(*_a, **_k):
        raise AssertionError("the shipped statistics were recomputed")
    hook = lm.model.register_forward_pre_hook(boom)
    try:
        s = activation_stats(lm.model, lm.tokenizer, lm.anatomy, texts, fingerprint=lm.fingerprint,
                             cache_dir=SHIPPED_CACHE)
    finally:
        hook.remove()
    per = [sum(len(x) for x in lm.tokenizer(texts[d], verbose=False)["input_ids"]) for d in s.domains]
    assert s.tokens.tolist() == per and s.num_tokens >= 100_000
    assert (s.counts.sum(2) == s.tokens[:, None] * 2).all()   # top-2 in every layer
    assert (s.counts.sum(0) > 0).all()   # the balance phase left no dead expert (card: min 170 on 8k/domain)
