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
    assert calls[-1] == (5, 5) and len(list(tmp_path.glob("*.npz"))) == 1
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
    assert sum(map(len, texts.values())) > 0 and isinstance(where, str)
