"""Placement invariants: budget extremes, nesting, rounding, parameter shares, JSON round-trip, stable hash."""
import json

import numpy as np
import pytest

from hetmoe_core.models import anatomy_of, load_model, tiny_model
from hetmoe_core.placement import DensePolicy, Placement, digital_share, place
from hetmoe_core.routing import activation_stats
from hetmoe_core.scores import STRATEGIES, expert_scores

TEXTS = ["The cat sat on the mat.", "A quick brown fox jumps over the lazy dog.", "def f(x): return x + 1"]


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("qwen2_moe", seed=0)      # 2 MoE layers of 8 experts, a dense MLP layer, shared experts
    a = anatomy_of(model)
    stats = activation_stats(model, load_model("tiny:olmoe").tokenizer, a, TEXTS, batch_size=2, max_length=32)
    return a, stats, expert_scores(a)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_budget_extremes_and_nesting(setup, strategy, scope):
    a, stats, sc = setup
    ps = [place(a, strategy, b, scope=scope, stats=stats, scores=sc, seed=7) for b in np.linspace(0, 1, 17)]
    assert ps[0].digital == ((), ()) and ps[-1].digital == (tuple(range(8)), tuple(range(8)))
    for small, big in zip(ps, ps[1:]):
        for d_s, d_b in zip(small.digital, big.digital):
            assert set(d_s) <= set(d_b)
    for p in ps:
        for i in range(2):
            assert sorted(p.digital[i] + p.analog_experts(i)) == list(range(8))


def test_per_layer_counts_round_half_up(setup):
    a, stats, sc = setup
    for b, n in [(0.0625, 1), (0.06, 0), (0.125, 1), (0.1875, 2), (0.25, 2), (0.3, 2), (0.5, 4), (0.95, 8)]:
        assert place(a, "maxnn", b, scores=sc).per_layer_digital == (n, n), b
    # global: floor(b * 16 + 0.5) over both layers together
    for b, n in [(0.03, 0), (0.0625, 1), (0.25, 4), (0.5, 8)]:
        assert sum(place(a, "maxnn", b, scope="global", scores=sc).per_layer_digital) == n


def test_highest_scores_are_digital(setup):
    a, stats, sc = setup
    p = place(a, "maxnn", 0.25, scores=sc)
    for i, ls in enumerate(sc.layers):
        assert set(p.digital[i]) == set(np.argsort(-ls.maxnn)[:2].tolist())
    f = place(a, "frequency", 0.25, stats=stats)
    for i in range(2):   # every digital expert is at least as frequent as every analog one
        assert min(stats.frequency[i][list(f.digital[i])]) >= max(stats.frequency[i][list(f.analog_experts(i))])
    g = place(a, "maxnn", 0.25, scope="global", scores=sc)
    flat = sorted(((s, li, e) for li, ls in enumerate(sc.layers) for e, s in enumerate(ls.maxnn)), reverse=True)
    assert {(li, e) for _, li, e in flat[:4]} == {(li, e) for li, d in enumerate(g.digital) for e in d}


def test_ties_break_by_expert_id():
    a = anatomy_of(tiny_model("olmoe"))
    with_ties = type("S", (), {"frequency": np.full((2, 8), 0.25), "weight": np.ones((2, 8))})()
    assert place(a, "frequency", 0.25, stats=with_ties).digital == ((0, 1), (0, 1))
    assert place(a, "weight", 0.25, scope="global", stats=with_ties).digital == ((0, 1, 2, 3), ())


def test_random_is_seeded(setup):
    a, _, _ = setup
    assert place(a, "random", 0.5, seed=1) == place(a, "random", 0.5, seed=1)
    assert place(a, "random", 0.5, seed=1).digital != place(a, "random", 0.5, seed=2).digital
    assert place(a, "maxnn", 0.5, seed=1).key == place(a, "maxnn", 0.5, seed=2).key   # seed unused: same key


def test_parameter_shares_add_up(setup):
    a, _, sc = setup
    pc = a.param_counts
    per_expert = pc["routed_experts"] // 16
    p = place(a, "maxnn", 0.25, scores=sc)
    r = digital_share(p, a)
    assert r["digital_params"] + r["analog_params"] + r["memory_params"] == r["total_params"] == sum(pc.values())
    dense = pc["attention"] + pc["lm_head"] + pc["shared_experts"] + pc["router"] + pc["dense_mlp"] + pc["other"]
    assert r["digital_params"] == dense + 4 * per_expert
    assert r["digital_share"] == pytest.approx((dense + 4 * per_expert) / sum(pc.values()))
    assert r["memory_params"] == pc["embeddings"] + pc["norms"]
    assert r["per_layer_digital"] == [2, 2] and r["routed_digital_share"] == 0.25
    full = digital_share(Placement.all_digital(a), a)
    assert full["analog_params"] == 0 and full["digital_params"] == sum(pc.values()) - pc["embeddings"] - pc["norms"]
    bare = digital_share(Placement.all_analog(a, dense=DensePolicy(False, False, False, False, False)), a)
    assert bare["digital_params"] == pc["other"] and bare["digital_share"] == pc["other"] / sum(pc.values())
    no_attn = digital_share(place(a, "maxnn", 0.25, scores=sc, dense=DensePolicy(attention=False)), a)
    assert no_attn["digital_params"] == r["digital_params"] - pc["attention"]


def test_tied_lm_head_counts_embedding_table_as_lm_head():
    from hetmoe_core.models import tiny_config
    from transformers import AutoModelForCausalLM
    cfg = tiny_config("olmoe")
    cfg.tie_word_embeddings = True
    a = anatomy_of(AutoModelForCausalLM.from_config(cfg))
    if not a.tied_lm_head:
        pytest.fail("tiny olmoe with tie_word_embeddings=True should report a tied LM head")
    r = digital_share(Placement.all_analog(a), a)
    assert r["by_kind"]["embeddings"]["digital"] == a.param_counts["embeddings"] + a.param_counts["lm_head"]
    assert r["digital_params"] + r["analog_params"] + r["memory_params"] == r["total_params"]


def test_json_roundtrip_and_stable_hash(setup):
    a, stats, sc = setup
    p = place(a, "frequency", 0.25, scope="global", stats=stats, dense=DensePolicy(shared_experts=False))
    q = Placement.from_json(p.to_json())
    assert q == p and q.key == p.key and q.dense.shared_experts is False
    assert json.loads(p.to_json())["digital"] == [list(d) for d in p.digital]
    # the hash of a fixed placement never changes (stored results are keyed by it)
    fixed = Placement("maxnn", 0.25, "layer", 0, (4, 4), ((1, 3), (0, 2)))
    assert fixed.to_json() == ('{"budget":0.25,"dense":{"attention":true,"dense_mlp":true,"lm_head":true,'
                               '"router":true,"shared_experts":true},"digital":[[1,3],[0,2]],"num_experts":[4,4],'
                               '"scope":"layer","seed":0,"strategy":"maxnn"}')
    import hashlib
    assert fixed.key == hashlib.sha256(fixed.to_json().encode()).hexdigest()
    assert Placement("maxnn", 0.25, "layer", 0, [4, 4], [[3, 1], [2, 0]]).key == fixed.key   # normalised


def test_bad_values(setup):
    a, _, sc = setup
    for b in (1.4, -0.1, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="budget must be a number in \\[0, 1\\]"):
            place(a, "maxnn", b, scores=sc)
    with pytest.raises(ValueError, match="unknown strategy"):
        place(a, "maxnorm", 0.25)
    with pytest.raises(ValueError, match="scope"):
        place(a, "maxnn", 0.25, scope="model")
    with pytest.raises(ValueError, match="needs activation statistics"):
        place(a, "frequency", 0.25)
    with pytest.raises(ValueError, match="distinct ids"):
        Placement("maxnn", 0.25, "layer", 0, (4,), ((4,),))
    with pytest.raises(ValueError, match="not valid JSON"):
        Placement.from_json("{")
    with pytest.raises(ValueError, match="fields"):
        Placement.from_json('{"strategy": "maxnn"}')
    with pytest.raises(ValueError, match="experts per layer"):
        digital_share(Placement("maxnn", 0.0, "layer", 0, (4,), ((),)), a)


def test_cli_place(capsys, tmp_path):
    from hetmoe_core.cli import main
    assert main(["place", "tiny:qwen2_moe", "--budget", "0.25", "--strategy", "maxnn", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    a = anatomy_of(tiny_model("qwen2_moe"))
    p = place(a, "maxnn", 0.25)
    assert out["key"] == p.key and Placement(**out["placement"]) == p
    assert out["digital_share"] == pytest.approx(digital_share(p, a)["digital_share"])
    assert out["per_layer_digital"] == [2, 2]
    assert main(["place", "tiny:qwen2_moe", "--budget", "0.5", "--strategy", "random", "--scope", "global",
                 "--seed", "3", "--analog-dense", "attention", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sum(out["per_layer_digital"]) == 8 and out["placement"]["dense"]["attention"] is False
    (tmp_path / "empty.txt").write_text("\n  \n")
    for argv, msg in [(["--budget", "1.4"], "argument --budget: got 1.4; give a share of routed experts in [0, 1]"),
                      (["--budget", "x"], "argument --budget: 'x' is not a number"),
                      (["--budget", "0.25", "--strategy", "maxnorm"], "unknown strategy 'maxnorm'"),
                      (["--budget", "0.25", "--scope", "model"], "scope must be one of"),
                      (["--budget", "0.25", "--analog-dense", "mlp"], "unknown dense kind"),
                      (["--budget", "0.25", "--strategy", "frequency", "--calib", str(tmp_path / "empty.txt")],
                       "calibration text is empty")]:
        assert main(["place", "tiny:olmoe", *argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_measured_strategies_caption_says_by_what_they_place_or_why_they_are_absent(tmp_path, example_results):
    """The Placement page's line about Oracle / Local output error: with the example results stored (their damage
    measurement under paper-pcm-c1.5) it names both, the preset and the measurement's seeds x tokens; under the
    ideal preset it says nothing is damaged; with nothing stored it says where to measure and with what request."""
    from hetmoe_core.store import Store
    from hetmoe_core.validation import measured_caption, stored_strategy_scores
    st = Store(example_results(tmp_path / "ex.duckdb"))
    v, scores = stored_strategy_scores("default", "paper-pcm-c1.5", store=st)
    assert set(scores) == {"oracle", "local_error"}
    text = measured_caption("paper-pcm-c1.5", v, scores)
    assert text.startswith("Oracle (measured damage) and Local output error place by the damage measured under "
                           "**paper-pcm-c1.5**") and f"{len(v.seeds)} seeds × {v.tokens:,} tokens" in text
    only = measured_caption("paper-pcm-c1.5", v, {"oracle": scores["oracle"]})
    assert only.startswith("Oracle (measured damage) places by") and "Local output error" not in only
    assert measured_caption("ideal", None, {}) == (
        "Oracle (measured damage) and Local output error are not offered: the Evaluate page's noise preset is "
        "*ideal*, which damages nothing.")
    none = measured_caption("paper-pcm-c2.5", *stored_strategy_scores("default", "paper-pcm-c2.5",
                                                                      store=tmp_path / "empty.duckdb"))
    assert "not offered: no damage measurement of this model under **paper-pcm-c2.5**" in none
    assert none.endswith("Measure it on the Validate page (any seeds and tokens; 5 seeds × 16,384 tokens is what "
                         "Evaluate's oracle measures).")


def test_place_text_output_is_readable(capsys):
    """`place` without --json: nested results as indented key: value lines and tables, no line over 110 chars
    (before: placement, by_kind, help and energy were each one JSON line of hundreds of characters)."""
    from hetmoe_core.cli import main
    assert main(["place", "tiny:olmoe", "--budget", "0.25"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 110 and "  digital: [[4, 6], [3, 7]]" in lines
    row = next(ln.split() for ln in lines if ln.split()[:1] == ["routed_experts"])
    assert row == ["routed_experts", "24576", "6144", "18432", "0"]          # params, digital, analog, memory
    assert any(ln.startswith("  energy_per_token_j: ") for ln in lines)
