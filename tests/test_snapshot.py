"""Snapshots: export -> import -> report round trip, idempotent import, and every kind of bad snapshot rejected."""
import hashlib
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hetmoe_core import snapshot
from hetmoe_core.report import report_data, write_report
from hetmoe_core.snapshot import SnapshotError, export_snapshot, import_snapshot, read_snapshot
from hetmoe_core.store import Store

ROOT = Path(__file__).resolve().parent.parent


def _filled(path) -> Store:
    """A store with a small sweep's worth of real rows: 2 strategies x 2 budgets x 2 seeds + the ideal."""
    st = Store(path)
    rows = [("ideal", 1.0, "ideal", 0, 0.60)]
    rows += [(s, b, "paper-pcm-c1.5", seed, 0.3 + b + (0.05 if s == "maxnn" else 0) + seed / 100)
             for s in ("maxnn", "random") for b in (0.0, 0.25) for seed in (0, 1)]
    for i, (s, b, p, seed, v) in enumerate(rows):
        pk = f"pl{s}{b}"
        st.put_result(f"k{i}", {"model_source": "default", "model_fingerprint": "sha256:abc", "strategy": s,
                                "budget": b, "preset": p, "seed": seed, "backend": "fast", "task": "hetmoe_cloze",
                                "placement_key": pk, "digital_share": 0.1 + b},
                      [{"task": "hetmoe_cloze", "metric": "acc", "value": v, "stderr": 0.02, "seed": seed},
                       {"task": "hetmoe_cloze", "metric": "acc_norm", "value": v / 2, "stderr": 0.02, "seed": seed}],
                      {"key": pk, "model_fingerprint": "sha256:abc", "strategy": s, "budget": b, "scope": "layer",
                       "seed": 0, "placement": json.dumps({"digital": [[0], []]})})
    st.put_expert_stats("sha256:abc", "scores", {"layers": [{"maxnn": [1.0, 2.0]}]})
    st.put_model_shapes("sha256:abc", "default", SHAPES)
    return st


SHAPES = {"source": "default", "total_params": 120, "dense": [{"kind": "attention", "name": "a", "depth": 1,
                                                              "matrices": [[4, 4]]}],
          "moe": [{"num_experts": 2, "top_k": 1, "matrices": [[8, 4], [4, 4]]}]}
"""Stand-in model shapes (energy.ModelShapes.to_dict form) of the filled store's model."""


@pytest.fixture
def snap(tmp_path):
    st = _filled(tmp_path / "src.duckdb")
    path = tmp_path / "snap.zip"
    export_snapshot(st, path)
    return st, path


def _file_hash(p):
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def test_round_trip_same_numbers_and_idempotent(snap, tmp_path):
    src, path = snap
    with zipfile.ZipFile(path) as z:
        assert sorted(z.namelist()) == sorted(snapshot.ALLOWED)
        assert not any(n.endswith((".pkl", ".pickle")) for n in z.namelist())
    dst = Store(tmp_path / "dst.duckdb")
    out = import_snapshot(path, dst)
    assert out["added"] == {"runs": 9, "metrics": 18, "placements": 5, "expert_stats": 1, "model_shapes": 1}
    assert import_snapshot(path, dst)["added"] == {"runs": 0, "metrics": 0, "placements": 0, "expert_stats": 0,
                                                   "model_shapes": 0}
    assert dst.get_model_shapes("sha256:abc") == SHAPES
    a, b = src.summary_frame(), dst.summary_frame()
    assert a.drop(columns=["seeds", "origins"]).equals(b.drop(columns=["seeds", "origins"]))
    assert set(a.origins) == {"computed"} and set(b.origins) == {f"imported from snap.zip (exported "
                                                                 f"{json.loads(zipfile.ZipFile(path).read('manifest.json'))['created_at']})"}
    maxnn = b[(b.strategy == "maxnn") & (b.budget == 0.25) & (b.metric == "acc")].iloc[0]
    assert maxnn["mean"] == pytest.approx(0.605) and maxnn["n_seeds"] == 2
    assert maxnn["std"] == pytest.approx(0.01 / 2 ** 0.5)
    # the report of the snapshot shows the same numbers, with plotly.js embedded (opens offline)
    rep = write_report(path, tmp_path / "r.html")
    html = Path(rep["path"]).read_text()
    assert rep["results"] == len(a) and rep["figures"] == 2 and rep["placements"] == 5
    assert "0.605 ± 0.0071" in html and "<script src=" not in html and "plotly.js v" in html
    summary, _ = report_data(path)
    assert summary.drop(columns=["seeds", "origins"]).equals(a.drop(columns=["seeds", "origins"]))


def test_export_selected_keys(snap, tmp_path):
    src, _ = snap
    m = export_snapshot(src, tmp_path / "one.zip", keys=["k0"])
    assert m["tables"]["runs"]["rows"] == 1 and m["tables"]["metrics"]["rows"] == 2
    m = export_snapshot(src, tmp_path / "f.zip", filters={"strategy": "random"})
    assert m["tables"]["runs"]["rows"] == 4
    with pytest.raises(ValueError, match="no stored results match"):
        export_snapshot(src, tmp_path / "none.zip", keys=["nope"])


def _rewrite(path, out, edit):
    """Copy a snapshot, letting edit(name, data) -> [(name, data), ...] change members."""
    with zipfile.ZipFile(path) as z:
        members = [(n, z.read(n)) for n in z.namelist()]
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for n, d in members:
            for n2, d2 in edit(n, d):
                z.writestr(n2, d2)
    return out


def _manifest_edit(fn):
    def edit(n, d):
        if n == "manifest.json":
            m = json.loads(d)
            fn(m)
            return [(n, json.dumps(m))]
        return [(n, d)]
    return edit


def _plus(name):
    return lambda n, d: [(n, d)] + ([(name, b"x")] if n == "manifest.json" else [])


def _bad_shapes(path, out):
    """The snapshot with its model shapes made impossible (top-k 0), checksums and sizes made to match."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    with zipfile.ZipFile(path) as z:
        t = pq.read_table(io.BytesIO(z.read("model_shapes.parquet")))
    bad = {**SHAPES, "moe": [{**SHAPES["moe"][0], "top_k": 0}]}
    t = t.set_column(t.column_names.index("shapes"), "shapes", pa.array([json.dumps(bad)]))
    buf = io.BytesIO()
    pq.write_table(t, buf)
    blob = buf.getvalue()

    def edit(n, d):
        if n == "manifest.json":
            m = json.loads(d)
            m["tables"]["model_shapes"].update(sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob))
            return [(n, json.dumps(m))]
        return [(n, blob if n == "model_shapes.parquet" else d)]
    return _rewrite(path, out, edit)


def _bad_snapshots(path, tmp):
    def flip(n, d):
        return [(n, d[:-20] + bytes(20) if n == "metrics.parquet" else d)]

    def version(m):
        m["schema_version"] = 99

    yield "schema version 99", _rewrite(path, tmp / "v.zip", _manifest_edit(version))
    yield "model shapes of sha256:abc: top_k must be an integer >= 1, got 0", _bad_shapes(path, tmp / "sh.zip")
    yield "checksum mismatch", _rewrite(path, tmp / "c.zip", flip)
    yield "escapes the archive", _rewrite(path, tmp / "s.zip", _plus("../evil.parquet"))
    yield "escapes the archive", _rewrite(path, tmp / "a.zip", _plus("/etc/evil.parquet"))
    yield "unexpected or repeated", _rewrite(path, tmp / "u.zip", _plus("evil.py"))
    yield "no manifest", _rewrite(path, tmp / "m.zip", lambda n, d: [] if n == "manifest.json" else [(n, d)])
    text = tmp / "notes.zip"
    text.write_text("just some text, not a zip")
    yield "not a zip", text
    # zip bomb: 50 MB of zeros deflate to ~50 kB (ratio ~1000)
    yield "zip bomb", _rewrite(path, tmp / "b.zip",
                               lambda n, d: [(n, d if n != "runs.parquet" else bytes(50 << 20))])


def test_bad_snapshots_rejected_store_untouched(snap, tmp_path):
    src, path = snap
    dst = tmp_path / "dst.duckdb"
    Store(dst)
    before = _file_hash(dst)
    cases = list(_bad_snapshots(path, tmp_path))
    assert len(cases) == 9
    for msg, bad in cases:
        with pytest.raises(SnapshotError, match=msg):
            import_snapshot(bad, Store(dst))
        assert _file_hash(dst) == before, msg
    assert Store(dst).counts() == {"runs": 0, "metrics": 0, "placements": 0, "expert_stats": 0, "model_shapes": 0}


def test_lying_declared_size_and_oversized(snap, tmp_path, monkeypatch):
    _, path = snap
    # a member whose header declares fewer bytes than it holds: the bounded read refuses it
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("runs.parquet")
    central = raw.rfind(b"PK\x01\x02", 0, len(raw))
    # patch the declared uncompressed size in the local header and in every central entry of runs.parquet
    local = info.header_offset
    raw[local + 22:local + 26] = (info.file_size - 100).to_bytes(4, "little")
    i = raw.find(b"PK\x01\x02")
    while i != -1 and i <= central:
        name_len = int.from_bytes(raw[i + 28:i + 30], "little")
        if raw[i + 46:i + 46 + name_len] == b"runs.parquet":
            raw[i + 24:i + 28] = (info.file_size - 100).to_bytes(4, "little")
        i = raw.find(b"PK\x01\x02", i + 4)
    lie = tmp_path / "lie.zip"
    lie.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError):
        read_snapshot(lie)
    monkeypatch.setattr(snapshot, "MAX_FILE_BYTES", 1000)
    with pytest.raises(SnapshotError, match="over the 1000 byte"):
        read_snapshot(path)


def test_wrong_columns_rolled_back(snap, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    _, path = snap
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": ["x"], "evil": [1]}), buf)
    blob = buf.getvalue()

    def edit(n, d):
        if n == "placements.parquet":
            return [(n, blob)]
        if n == "manifest.json":
            m = json.loads(d)
            m["tables"]["placements"].update(sha256=hashlib.sha256(blob).hexdigest(), rows=1)
            return [(n, json.dumps(m))]
        return [(n, d)]
    bad = _rewrite(path, tmp_path / "cols.zip", edit)
    dst = Store(tmp_path / "dst.duckdb")
    with pytest.raises(SnapshotError, match="columns"):
        import_snapshot(bad, dst)
    assert dst.counts()["runs"] == 0          # runs were inserted before placements failed: rolled back


def test_cli_export_import_report(snap, tmp_path):
    src, _ = snap

    def cli(*a):
        return subprocess.run([sys.executable, "-m", "hetmoe_core", *a], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
    out = cli("export", str(tmp_path / "c.zip"), "--store", str(src.path), "--where", "strategy=maxnn", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["tables"]["runs"]["rows"] == 4
    out = cli("import", str(tmp_path / "c.zip"), "--store", str(tmp_path / "new.duckdb"), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["added"]["runs"] == 4
    out = cli("runs", "--store", str(tmp_path / "new.duckdb"), "--summary", "--json")
    rows = json.loads(out.stdout)["rows"]
    assert {r["budget"] for r in rows} == {0.0, 0.25} and len(rows) == 4
    out = cli("report", str(tmp_path / "c.zip"), "--out", str(tmp_path / "c.html"), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["figures"] == 2
    bad = tmp_path / "bad.zip"
    bad.write_text("nope")
    out = cli("import", str(bad), "--store", str(tmp_path / "never.duckdb"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "not a zip" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "never.duckdb").exists()
