"""One source for each fact: the strategy and backend registries, the pinned transformers internals, and metric
direction taken from lm-eval and stored with the metric (old stores and snapshots stay readable)."""
import hashlib
import io
import json
import zipfile

import duckdb
import numpy as np
import pytest

from hetmoe_core import figures, moe_dispatch
from hetmoe_core.backend import BACKENDS, backend_class
from hetmoe_core.models import anatomy_of, tiny_model
from hetmoe_core.placement import DENSE_KINDS, DensePolicy, place
from hetmoe_core.store import Store
from hetmoe_core.strategies import STRATEGIES, get_strategy, register_strategy, strategy_scores


def test_strategy_registry_declares_once():
    assert get_strategy("frequency").needs == "stats" and get_strategy("maxnn").needs == "scores"
    assert get_strategy("random").needs is None
    assert figures.STRATEGY_LABELS["frequency"] == "Activation frequency" == STRATEGIES["frequency"].label
    with pytest.raises(ValueError, match=r"unknown strategy 'maxnorm'; Did you mean 'maxnn'\? choose one of maxnn"):
        get_strategy("maxnorm")
    with pytest.raises(ValueError, match="needs must be one of"):
        register_strategy("x", label="X", needs="weights")
    assert DENSE_KINDS == tuple(DensePolicy().__dataclass_fields__)


def test_a_new_strategy_is_one_decorated_function():
    a = anatomy_of(tiny_model("olmoe"))

    @register_strategy("last_expert", label="Last expert", needs=None)
    def _last(*, num_experts, **_):
        return [np.arange(e, dtype=float) for e in num_experts]
    try:
        p = place(a, "last_expert", 0.25)
        assert p.digital == ((6, 7), (6, 7))                     # 0.25 x 8 experts: the two highest ids
        with pytest.raises(ValueError, match="already registered"):
            register_strategy("last_expert", label="again")(_last)
    finally:
        del STRATEGIES["last_expert"]
    assert STRATEGIES["oracle"].needs == "measurement"
    with pytest.raises(ValueError, match="strategy 'oracle' needs measured scores under a noise preset"):
        strategy_scores("oracle", num_experts=[4])
    got = strategy_scores("oracle", num_experts=[2, 3], measured=[[0.5, float("nan")], [1, 2, 3]])
    assert [x.tolist() for x in got] == [[0.5, 0.0], [1.0, 2.0, 3.0]]     # NaN counts as no damage


def test_backend_registry_and_pinned_transformers(monkeypatch):
    assert list(BACKENDS) == ["fast", "aihwkit"]
    assert backend_class("fast").__name__ == "FastBackend" and backend_class("aihwkit").name == "aihwkit"
    with pytest.raises(ValueError, match="unknown analog backend 'gpu'; choose one of fast, aihwkit"):
        backend_class("gpu")
    import transformers
    monkeypatch.setattr(moe_dispatch, "_checked", False)
    monkeypatch.setattr(transformers, "__version__", "9.0.0")
    with pytest.raises(RuntimeError, match=r"read in transformers==5\.24\.0, but 9\.0\.0 is installed"):
        moe_dispatch.check_transformers()


def test_metric_direction_from_lm_eval_is_stored(tmp_path):
    from hetmoe_core.evaluate import evaluate_many
    db = tmp_path / "r.duckdb"
    res = evaluate_many("tiny:olmoe", store=db, strategies=["random"], budgets=[0.25], presets=["paper-pcm-c1.5"],
                        seeds=1, tasks=["hetmoe_cloze"], limit=2, batch_size=2, include_ideal=False)
    assert res[0]["higher_is_better"] == {"perplexity": False, "acc": True}
    again = evaluate_many("tiny:olmoe", store=db, strategies=["random"], budgets=[0.25], presets=["paper-pcm-c1.5"],
                          seeds=1, tasks=["hetmoe_cloze"], limit=2, batch_size=2, include_ideal=False)
    assert again[0]["cached"] and again[0]["higher_is_better"] == res[0]["higher_is_better"]
    s = Store(db).summary_frame()
    assert dict(zip(s.metric, s.higher_is_better)) == {"perplexity": False, "acc": True}


def _old_store(path):
    """A store written before metric direction was stored (schema version 1 without the column)."""
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE meta (name VARCHAR PRIMARY KEY, value VARCHAR); INSERT INTO meta VALUES "
                "('schema_version', '1'); CREATE TABLE metrics (key VARCHAR, task VARCHAR, metric VARCHAR, "
                "value DOUBLE, stderr DOUBLE, seed INTEGER, PRIMARY KEY (key, task, metric));"
                "INSERT INTO metrics VALUES ('k0', 'hetmoe_cloze', 'perplexity', 12.5, 0.5, 0)")
    con.close()


def test_old_store_and_old_snapshot_stay_readable(tmp_path):
    from hetmoe_core.report import _direction
    from hetmoe_core.snapshot import export_snapshot, import_snapshot
    _old_store(tmp_path / "old.duckdb")
    st = Store(tmp_path / "old.duckdb")
    st.put_result("k0", {"strategy": "maxnn", "budget": 0.25, "preset": "p", "seed": 0, "task": "hetmoe_cloze"},
                  [{"task": "hetmoe_cloze", "metric": "perplexity", "value": 12.5, "stderr": 0.5, "seed": 0}])
    got = st.get_results(["k0"])["k0"]["metrics"][0]
    assert got["value"] == 12.5 and got["higher_is_better"] is None       # not stored then
    assert _direction("perplexity", st.summary_frame()) is False          # lm-eval's registry answers
    export_snapshot(st, tmp_path / "s.zip")
    old = tmp_path / "old.zip"                                            # the snapshot as an old hetmoe wrote it
    with zipfile.ZipFile(tmp_path / "s.zip") as zin, zipfile.ZipFile(old, "w") as zout:
        manifest = json.loads(zin.read("manifest.json"))
        for name in zin.namelist():
            blob = zin.read(name)
            if name == "metrics.parquet":
                import pyarrow.parquet as pq
                t = pq.read_table(io.BytesIO(blob)).drop_columns(["higher_is_better"])
                buf = io.BytesIO()
                pq.write_table(t, buf)
                blob = buf.getvalue()
                manifest["tables"]["metrics"].update(sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob))
            if name != "manifest.json":
                zout.writestr(name, blob)
        zout.writestr("manifest.json", json.dumps(manifest))
    out = import_snapshot(old, Store(tmp_path / "new.duckdb"))
    assert out["added"]["metrics"] == 1 and out["added"]["runs"] == 1
