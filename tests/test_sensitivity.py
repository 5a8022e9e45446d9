"""Measured expert sensitivity: batched = one-at-a-time, ideal = 0, stored once, criteria, oracle, CLI."""
import json

import numpy as np
import pytest
import torch

from hetmoe_core import cli
from hetmoe_core.analog import analog
from hetmoe_core.criteria import correlate
from hetmoe_core.models import load_model
from hetmoe_core.noise import get_preset
from hetmoe_core.placement import Placement, place
from hetmoe_core.routing import BUILTIN_CALIBRATION
from hetmoe_core import sensitivity as S

# strong enough that expert noise moves the NLL far above float rounding in the tiny model
NOISE = get_preset("paper-pcm-c2.5", noise_model="gaussian", gaussian_std=0.3)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread avoids thread hand-offs that dominate on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lm():
    lm = load_model("tiny:olmoe")
    with torch.no_grad():   # experts that matter: scale the routed experts up (the router stays as it is)
        for m in lm.anatomy.moe_layers:
            for p in m.experts.parameters():
                p.mul_(6.0)
    return lm


@pytest.fixture(scope="module")
def ids(lm):
    return S.calibration_tokens(lm.tokenizer, BUILTIN_CALIBRATION, 256, seq_len=64)


def test_batched_equals_one_expert_at_a_time(lm, ids):
    """Replayed lower layers and only the expert's own rows recomputed give exactly the naive loop's numbers
    (analog() with one expert analog, full forward), for several experts of both MoE layers, same seed; the
    whole-layer path gives the same bits, R experts per forward the same to float32 rounding."""
    m = S.measure(lm, NOISE, ids, seeds=[3], dense=False)
    picks = [(0, 1), (0, 6), (1, 0), (1, 7)]
    ref = S.naive_only_this(lm, NOISE, ids, seeds=[3], experts=picks)
    for i, e in picks:
        assert m.only_this[0, i, e] == ref[0, i, e]
    whole = S.measure(lm, NOISE, ids, seeds=[3], dense=False, reuse_rows=False)
    blocks = S.measure(lm, NOISE, ids, seeds=[3], group=3, dense=False)   # R row blocks per forward
    assert np.allclose(blocks.only_this, m.only_this, rtol=1e-4, atol=1e-9)
    assert np.allclose(blocks.all_but_this, m.all_but_this, rtol=1e-4, atol=1e-9)
    assert np.array_equal(whole.only_this, m.only_this) and np.array_equal(whole.all_but_this, m.all_but_this)
    assert np.array_equal(whole.layers, m.layers) and (m.all_but_this != 0).all()
    got = np.array([m.only_this[0, i, e] for i, e in picks])
    assert np.abs(got).max() > 1e-5 and len(set(got.round(9))) == len(picks)   # real, distinct damages


def test_ideal_damage_is_exactly_zero(lm, ids):
    m = S.measure(lm, "ideal", ids, seeds=2, dense=False)
    assert not m.only_this.any() and not m.all_but_this.any() and not m.layers.any() and not m.all_experts.any()
    assert not m.topk_changed.any()


def test_criterion_correlates_perfectly_with_itself():
    rng = np.random.default_rng(1)
    damage = rng.gamma(1.0, 1e-3, size=(4, 2, 8))
    mean = damage.mean(0)
    rows, best = correlate({"self": list(mean), "noise": list(rng.normal(size=(2, 8)))}, damage, n_boot=300)
    for r in rows:
        if r["criterion"] == "self":
            assert r["spearman"] == pytest.approx(1.0) and r["kendall"] == pytest.approx(1.0)
            if r["scope"] == "pooled":
                assert r["spearman_hi"] == pytest.approx(1.0)
    from scipy.stats import kendalltau, spearmanr
    pooled = next(r for r in rows if r["criterion"] == "noise" and r["scope"] == "pooled")
    assert pooled["n"] == 16
    assert best["criterion"] == "self"
    # the vectorised bootstrap statistics agree with scipy on one row
    from hetmoe_core.criteria import _kendall_rows, _spearman_rows
    a, b = rng.normal(size=20), rng.normal(size=20).round(0)   # ties in b
    assert _spearman_rows(a[None], b[None])[0] == pytest.approx(spearmanr(a, b).statistic)
    assert _kendall_rows(a[None], b[None])[0] == pytest.approx(kendalltau(a, b).statistic)


def test_validate_is_stored_and_second_call_runs_no_forward(lm, tmp_path):
    store = tmp_path / "s.duckdb"
    v1 = S.validate(lm, NOISE, seeds=2, texts=BUILTIN_CALIBRATION, tokens=128, store=store, n_boot=50)
    d1 = v1.to_dict()
    assert not d1["cached"] and len(d1["experts"]) == 16 and d1["calibration"]["tokens"] == 128
    assert {r["kind"] for r in d1["dense"]} == {"attention", "lm_head", "router"}
    assert d1["all_experts"]["damage"] > 0 and all(r["only_this_se"] is not None for r in d1["experts"])
    json.dumps(d1, allow_nan=False)
    calls = []
    h = lm.model.register_forward_pre_hook(lambda *a: calls.append(1))
    hd = lm.model.get_decoder().register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        v2 = S.validate(lm, NOISE, seeds=2, texts=BUILTIN_CALIBRATION, tokens=128, store=store, n_boot=50)
    finally:
        h.remove()
        hd.remove()
    assert calls == [] and v2.cached
    assert {k: v for k, v in v2.to_dict().items() if k != "cached"} == {k: v for k, v in d1.items() if k != "cached"}


def test_oracle_at_full_budget_is_ideal(lm, ids):
    m = S.measure(lm, NOISE, ids, seeds=1, all_but_this=False, dense=False)
    measured = list(m.only_this.mean(0))
    p = place(lm.anatomy, "oracle", 1.0, measured=measured)
    assert p.digital == Placement.all_digital(lm.anatomy).digital
    dec = lm.model.get_decoder()
    with torch.no_grad():
        ideal = S.token_nll(lm.model, dec(input_ids=ids).last_hidden_state, ids)
        with analog(lm.model, lm.anatomy, p, NOISE, seed=0):
            got = S.token_nll(lm.model, dec(input_ids=ids).last_hidden_state, ids)
    assert torch.equal(got, ideal)
    # at a quarter budget the oracle keeps the most damaged expert of each layer digital
    q = place(lm.anatomy, "oracle", 0.25, measured=measured)
    assert [int(np.argmax(x)) in d for x, d in zip(measured, q.digital)] == [True, True]
    with pytest.raises(ValueError, match="measured"):
        place(lm.anatomy, "oracle", 0.25)


def test_cli_validate_bad_input_is_one_line_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    store = str(tmp_path / "never.duckdb")
    for extra in (["--seeds", "0"], ["--preset", "ideal"], ["--calib", str(empty)], ["--tokens", "0"]):
        argv = ["validate", "tiny:olmoe", "--preset", "paper-pcm-c2.5", "--store", store, *extra]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err
    assert not (tmp_path / "never.duckdb").exists()


def test_cli_place_oracle_and_local_error(tmp_path, capsys):
    calib = tmp_path / "c.txt"
    calib.write_text("\n".join(sum(BUILTIN_CALIBRATION.values(), [])))
    for strat in ("local_error", "oracle"):
        argv = ["place", "tiny:olmoe", "--strategy", strat, "--preset", "paper-pcm-c2.5", "--budget", "0.25",
                "--calib", str(calib), "--seeds", "1", "--tokens", "128", "--store", str(tmp_path / "s.duckdb"),
                "--json"]
        assert cli.main(argv) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["placement"]["strategy"] == strat and out["per_layer_digital"] == [2, 2]
    assert cli.main(["place", "tiny:olmoe", "--strategy", "oracle", "--budget", "0.25"]) == 2
    assert "--preset" in capsys.readouterr().err


def test_routing_drift_and_local_error(lm, ids):
    """Ideal noise moves no token's top-k set and gives zero local error; strong noise on every expert of the
    first MoE layer re-routes tokens in the second (the router of the first sees clean inputs)."""
    from hetmoe_core.criteria import local_error_scores
    full = Placement.all_analog(lm.anatomy)
    ideal = S.routing_drift(lm, full, "ideal", ids, seeds=1)
    assert [r["changed_share"] for r in ideal] == [0.0, 0.0]
    assert all(r["load_max_over_mean_ideal"] == r["load_max_over_mean_noisy"] >= 1 for r in ideal)
    noisy = S.routing_drift(lm, full, NOISE, ids, seeds=2)
    assert noisy[0]["changed_share"] == 0.0 and 0.0 < noisy[1]["changed_share"] < 1.0
    assert all(not x.any() for x in local_error_scores(lm, "ideal", ids, seeds=[0]))
    le = local_error_scores(lm, NOISE, ids, seeds=[0, 1])
    assert all((x > 0).all() and len(x) == 8 for x in le)


def test_validate_reports_progress_and_cancels_without_storing(lm, tmp_path):
    from hetmoe_core.evaluate import Cancelled
    from hetmoe_core.store import Store
    seen = []
    with pytest.raises(Cancelled):
        S.validate(lm, NOISE, seeds=2, texts=BUILTIN_CALIBRATION, tokens=128, store=tmp_path / "c.duckdb",
                   progress=lambda done, total: seen.append((done, total)), cancel=lambda: len(seen) >= 3)
    assert [d for d, _ in seen] == [1, 2, 3] and seen[0][1] > 3
    assert Store(tmp_path / "c.duckdb").sensitivity_frame().empty


def test_example_snapshot_restores_the_stored_measurement(tmp_path):
    """A validation travels in a snapshot with its store key: loading it makes the same request a cache hit."""
    from hetmoe_core.evaluate import evaluate_many
    from hetmoe_core.examples import load_examples, put_validation, stored_validations
    from hetmoe_core.snapshot import export_snapshot
    from hetmoe_core.store import Store
    from hetmoe_core.validation import stored_validation
    a, b = Store(tmp_path / "a.duckdb"), Store(tmp_path / "b.duckdb")
    kw = dict(seeds=2, tokens=128, n_boot=50)
    v = S.validate("tiny:olmoe", "paper-pcm-c2.5", store=a, **kw)
    evaluate_many("tiny:olmoe", store=a, strategies=["maxnn"], budgets=[0.25], presets=["paper-pcm-c2.5"], seeds=1,
                  tasks=["hetmoe_cloze"], limit=1, batch_size=4, include_ideal=False)
    put_validation(a, v.to_dict())   # as the Validate page keeps it: no store key in the store itself
    assert "store_key" not in next(iter(stored_validations(a).values()))
    export_snapshot(a, tmp_path / "x.zip")
    assert stored_validation("tiny:olmoe", "paper-pcm-c2.5", store=b, **kw) is None
    assert load_examples(b, tmp_path / "x.zip")["added"]["sensitivity"] == 1
    hit = stored_validation("tiny:olmoe", "paper-pcm-c2.5", store=b, **kw)
    assert hit is not None and hit.cached and hit.experts == v.experts and hit.best == v.best
    kept = next(iter(stored_validations(b).values()))
    assert kept["store_key"] and kept["experts"] == v.experts
    assert "sensitivity" not in load_examples(b, tmp_path / "x.zip")["added"]   # idempotent
    # any snapshot carries the measurements, even of a store that never kept them as statistics
    c, d = Store(tmp_path / "c.duckdb"), Store(tmp_path / "d.duckdb")
    S.validate("tiny:olmoe", "paper-pcm-c2.5", store=c, **kw)
    evaluate_many("tiny:olmoe", store=c, strategies=["maxnn"], budgets=[0.25], presets=["paper-pcm-c2.5"], seeds=1,
                  tasks=["hetmoe_cloze"], limit=1, batch_size=4, include_ideal=False)
    assert not stored_validations(c)
    assert cli.main(["export", str(tmp_path / "y.zip"), "--store", str(c.path)]) == 0
    assert cli.main(["import", str(tmp_path / "y.zip"), "--store", str(d.path)]) == 0
    assert stored_validation("tiny:olmoe", "paper-pcm-c2.5", store=d, **kw).experts == v.experts


def test_measurements_before_the_first_result_count_their_forwards(lm, tmp_path, capsys):
    """Oracle and Local output error measure before an evaluation's first result; their progress counts forwards
    up to the total, in the line the dashboard's job progress and the CLI show (before: the step, no count)."""
    from hetmoe_core import evaluate as ev
    from hetmoe_core.store import Store
    specs = ev.plan("tiny:olmoe", fingerprint=lm.fingerprint, strategies=["oracle", "local_error"], budgets=[0.25],
                    presets=["paper-pcm-c2.5"], seeds=1, tasks=["paper_arc_easy"], limit=2)
    seen = []
    ev._measured(lm, specs, Store(tmp_path / "s.duckdb"), BUILTIN_CALIBRATION, None,
                 lambda line, done, total: seen.append((line, done, total)))
    for head, n in (("measuring expert damage under paper-pcm-c2.5 for Oracle (measured damage): ", 5),
                    ("measuring Local output error under paper-pcm-c2.5: ", 0)):
        got = [(d, t) for line, d, t in seen if line == f"{head}{d:,} / {t:,} forwards"]
        total = got[-1][1]
        assert [d for d, _ in got] == list(range(1, total + 1)) and {t for _, t in got} == {total}
        if n:   # the oracle: validate's count, sensitivity.measurement_forwards, for the tokens the text holds
            assert total == S.measurement_forwards(lm.anatomy, seeds=n, tokens=S.calibration_tokens(
                lm.tokenizer, BUILTIN_CALIBRATION, S.ORACLE_TOKENS).numel())
    assert len(seen) == sum(t for _, d, t in seen if d == 1)
    # the CLI prints the same line on stderr (not a terminal here: at every tenth of the way and at the end)
    calib = tmp_path / "c.txt"
    calib.write_text("\n".join(sum(BUILTIN_CALIBRATION.values(), [])))
    assert cli.main(["place", "tiny:olmoe", "--strategy", "local_error", "--preset", "paper-pcm-c2.5", "--budget",
                     "0.25", "--calib", str(calib), "--store", str(tmp_path / "s.duckdb")]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("measuring Local output error under paper-pcm-c2.5: ") and \
        lines[-1].endswith(" forwards") and 2 <= len(lines) <= 11
    done, total = lines[-1].split(": ")[1].split(" forwards")[0].split(" / ")
    assert done == total
