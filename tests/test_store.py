"""Results store on real DuckDB files: whole results, concurrency across processes and threads, kill -9."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from hetmoe_core.store import Store, config_key

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("acc", "acc_norm", "f1", "ppl", "bpb")

# A writer that stores results 0..N-1 (skipping stored ones, as a resumed sweep does), each a run + 5 metrics.
WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from hetmoe_core.store import Store
    st, n = Store(sys.argv[1]), int(sys.argv[2])
    have = st.existing_keys(f"k{{i}}" for i in range(n))
    for i in range(n):
        if f"k{{i}}" in have:
            continue
        st.put_result(f"k{{i}}", {{"task": "t", "seed": i, "strategy": "maxnn", "budget": i / n}},
                      [{{"task": "t", "metric": m, "value": i + j / 10, "stderr": 0.01, "seed": i}}
                       for j, m in enumerate({metrics!r})])
        if len(sys.argv) > 3:
            time.sleep(float(sys.argv[3]))   # a slow sweep, so a kill lands mid-way
    print("wrote", n - len(have))
""").format(root=str(ROOT), metrics=METRICS)

# A reader process: polls the store, checks every visible run is whole, never sees a count go down.
READER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from hetmoe_core.store import Store
    st, n, last = Store(sys.argv[1]), int(sys.argv[2]), 0
    deadline = time.time() + 90
    while time.time() < deadline:
        df = st.runs_frame()
        runs = df.groupby("key").metric.count()
        assert (runs == 5).all(), runs[runs != 5]
        assert len(runs) >= last, (len(runs), last)
        last = len(runs)
        if last == n:
            break
    print("reader saw", last)
""").format(root=str(ROOT))


def _script(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _put(st, key, value=0.5, seed=0):
    return st.put_result(key, {"task": "t", "seed": seed, "strategy": "maxnn", "budget": 0.25, "preset": "p"},
                         [{"task": "t", "metric": "acc", "value": value, "stderr": 0.1, "seed": seed}])


def test_put_get_append_only_and_filters(tmp_path):
    st = Store(tmp_path / "r.duckdb")
    assert _put(st, "a", 0.5, seed=0) is True
    assert _put(st, "a", 0.9, seed=0) is False            # append-only: first result wins
    _put(st, "b", 0.7, seed=1)
    assert st.get_result("a")["metrics"][0]["value"] == 0.5
    assert st.get_result("missing") is None
    assert st.existing_keys(["a", "b", "c"]) == {"a", "b"}
    s = st.summary_frame({"strategy": "maxnn"})
    assert s["mean"].iloc[0] == pytest.approx(0.6) and s["n_seeds"].iloc[0] == 2
    assert s["std"].iloc[0] == pytest.approx(((0.1 ** 2 * 2) / 1) ** 0.5)
    assert len(st.runs_frame({"seed": [1]})) == 1
    with pytest.raises(ValueError, match="unknown filter"):
        st.runs_frame({"nope": 1})
    st.put_failure("c", {"task": "t"}, "boom")              # failures never count as cache hits
    assert "c" not in st.existing_keys(["c"])
    assert _put(st, "c", 0.1) is True                       # and are replaced by a success


def test_config_key_canonical():
    assert config_key({"a": 1, "b": [1, 2]}) == config_key({"b": [1, 2], "a": 1})
    assert config_key({"a": 1.0}) != config_key({"a": 1.5})


def test_schema_version_mismatch(tmp_path):
    import duckdb
    p = tmp_path / "r.duckdb"
    Store(p)
    con = duckdb.connect(str(p))
    con.execute("UPDATE meta SET value='99' WHERE name='schema_version'")
    con.close()
    with pytest.raises(ValueError, match="schema version 99"):
        Store(p)
    with pytest.raises(ValueError, match="no results store"):
        Store(tmp_path / "none.duckdb", create=False)


def test_concurrent_writer_and_readers_processes_and_threads(tmp_path):
    """One writer process, two reader processes and three reader threads: no lock error, no lost row."""
    db, n = str(tmp_path / "r.duckdb"), 40
    Store(db)
    w, r = _script(tmp_path, "w.py", WRITER), _script(tmp_path, "r.py", READER)
    readers = [subprocess.Popen([sys.executable, r, db, str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    writer = subprocess.Popen([sys.executable, w, db, str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors, seen = [], []

    def thread_reader():   # a dashboard session: its own Store object, short reads
        st = Store(db)
        try:
            while writer.poll() is None:
                seen.append(len(st.summary_frame()) + len(st.get_results([f"k{i}" for i in range(n)])))
        except Exception as e:   # pragma: no cover - the assertion below reports it
            errors.append(repr(e))
    threads = [threading.Thread(target=thread_reader) for _ in range(3)]
    for t in threads:
        t.start()
    out, err = writer.communicate(timeout=120)
    for t in threads:
        t.join(30)
    assert writer.returncode == 0, err
    assert out.strip() == f"wrote {n}"
    for p in readers:
        o, e = p.communicate(timeout=120)
        assert p.returncode == 0, e
        assert o.strip() == f"reader saw {n}"
    assert not errors and seen
    st = Store(db)
    assert st.counts()["runs"] == n and st.counts()["metrics"] == 5 * n


def test_kill_9_leaves_whole_results_and_resume_runs_only_missing(tmp_path):
    db, n = str(tmp_path / "r.duckdb"), 60
    Store(db)
    w = _script(tmp_path, "w.py", WRITER)
    p = subprocess.Popen([sys.executable, w, db, str(n), "0.05"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    st = Store(db)
    deadline = time.time() + 60
    while st.counts()["runs"] < 8 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)   # mid-sweep, possibly mid-transaction
    p.wait()
    assert p.returncode == -signal.SIGKILL
    st = Store(db)                    # opens (WAL replayed), holds whole results only
    c = st.counts()
    assert 8 <= c["runs"] < n and c["metrics"] == 5 * c["runs"]
    assert (st.runs_frame().groupby("key").metric.count() == 5).all()
    done = c["runs"]
    out = subprocess.run([sys.executable, w, db, str(n)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"wrote {n - done}"    # only what was missing
    c = Store(db).counts()
    assert c["runs"] == n and c["metrics"] == 5 * n     # no duplicates


def test_cli_sweep_killed_mid_way_then_resumed(tmp_path):
    """A real `sweep` process (tiny model, real lm-eval runs) killed with SIGKILL, then rerun: it completes,
    only the missing results run, and no result is duplicated. Each result is written as it is done
    (HETMOE_WRITE_EVERY_S=0; a sweep writes every 2 s by default, which the tiny sweep would not outlast).
    13 results: a result of the tiny model takes tens of ms, so a sweep of 5 could end between two polls."""
    import json
    from hetmoe_core.evaluate import plan
    db = str(tmp_path / "r.duckdb")
    grid = dict(strategies="maxnn,random", budgets="0,0.25,0.5", presets="paper-pcm-c1.5", seeds=2,
                tasks="paper_arc_easy", limit=2)
    sw = [sys.executable, "-m", "hetmoe_core", "sweep", "tiny:olmoe", "--budgets", grid["budgets"], "--strategies",
          grid["strategies"], "--presets", grid["presets"], "--seeds", "2", "--tasks", grid["tasks"], "--limit", "2",
          "--store", db, "--json"]
    keys = {x.key for x in plan("tiny:olmoe", **grid)}
    n = len(keys)
    assert n == 13
    st = Store(db)
    p = subprocess.Popen(sw, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "HETMOE_WRITE_EVERY_S": "0"})
    deadline = time.time() + 240
    while len(st.existing_keys(keys)) < 2 and time.time() < deadline:   # the dashboard's kind of polling
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.communicate()
    done = len(Store(db).existing_keys(keys))
    assert 2 <= done < n
    out = subprocess.run(sw, cwd=ROOT, capture_output=True, text=True, timeout=400)
    res = json.loads(out.stdout)
    assert len(res["results"]) == n and res["computed"] + res["shared"] == n - done and res["cached"] == done, out.stderr
    runs = Store(db).runs_frame()
    assert set(runs.key) == keys and len(runs) == 2 * len(keys)   # 2 metrics per run, no duplicates


def test_non_duckdb_file_or_folder_is_a_clear_error(tmp_path):
    bad = tmp_path / "notes.duckdb"
    bad.write_text("not a database")
    with pytest.raises(ValueError, match="not a readable DuckDB store"):
        Store(bad)
    assert bad.read_text() == "not a database"      # nothing overwritten
    with pytest.raises(ValueError, match="is a folder"):
        Store(tmp_path)


def test_put_results_writes_many_at_once_and_never_twice(tmp_path):
    """A sweep's batch of results goes in one transaction; a key already stored ok is left as it is (False), a
    failed row is replaced, and every other result is stored whole."""
    st = Store(tmp_path / "r.duckdb")
    _put(st, "a", 0)
    st.put_failure("b", {"task": "t", "seed": 1, "strategy": "maxnn"}, "boom")
    row = lambda s: {"task": "t", "seed": s, "strategy": "maxnn", "budget": 0.25, "preset": "p"}
    metric = lambda v: [{"task": "t", "metric": "acc", "value": v, "stderr": 0.1, "seed": 0}]
    assert st.put_results([("a", row(0), metric(9.0), None), ("b", row(1), metric(1.5), None),
                           ("c", row(2), metric(2.5), None), ("c", row(2), metric(7.0), None)]) == [False, True, True, False]
    runs = st.runs_frame().set_index("key")
    assert runs.loc["a", "value"] != 9.0 and runs.loc["b", "value"] == 1.5 and runs.loc["c", "value"] == 2.5
    assert st.put_results([]) == [] and len(st.runs_frame(status=None)) == 3


def test_put_results_batch_keeps_every_value_and_null(tmp_path):
    """One INSERT per table and set of columns: runs with different columns, a NULL stderr and many metrics per
    result all arrive as given; the schema check of this process survives its own writes (no re-open to check)."""
    from hetmoe_core import store as store_mod
    st = Store(tmp_path / "r.duckdb")
    items = [(f"k{i}", {"task": "t", "seed": i, "strategy": "maxnn", "budget": i / 8, **({"preset": "p"} if i % 2 else {})},
              [{"task": "t", "metric": m, "value": i + j / 10, "stderr": None if j else 0.5, "seed": i}
               for j, m in enumerate(METRICS)],
              {"key": f"pl{i % 3}", "model_fingerprint": "f", "strategy": "maxnn", "budget": 0.5, "scope": "layer",
               "seed": 0, "placement": "{}"}) for i in range(7)]
    assert st.put_results(items) == [True] * 7
    assert store_mod._file_id(st.path) in store_mod._READY
    df = st.runs_frame().sort_values(["seed", "metric"])
    assert len(df) == 7 * len(METRICS) and set(df.preset.dropna()) == {"p"} and df.preset.isna().sum() == 4 * 5
    for i in range(7):
        got = df[df.key == f"k{i}"].set_index("metric")
        assert [got.loc[m, "value"] for m in METRICS] == [i + j / 10 for j in range(len(METRICS))]
        assert got.loc["acc", "stderr"] == 0.5 and got.drop("acc").stderr.isna().all()
        assert got.budget.iloc[0] == i / 8
    assert st.counts()["placements"] == 3


def test_store_file_is_attached_per_operation_and_released_after(tmp_path):
    """Each operation attaches the file to the thread's in-memory DuckDB connection (dbhost) and detaches it after:
    while an operation holds it another process cannot open it read-write, afterwards it can; a nested operation of
    the same thread works; an operation that raises inside its transaction loses nothing stored and leaves the
    store usable, with its rows rolled back."""
    from hetmoe_core import dbhost
    db = tmp_path / "h.duckdb"
    st = Store(db)
    _put(st, "a")
    probe = [sys.executable, "-c", f"import duckdb; duckdb.connect({str(db)!r}).close()"]
    with st.read_connection() as con:
        assert dbhost._host.busy and con.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
        held = subprocess.run(probe, capture_output=True, text=True)
        assert held.returncode != 0 and "lock" in held.stderr.lower()
        assert st.get_result("a")["metrics"][0]["value"] == 0.5   # nested: a connection of its own
    assert not dbhost._host.busy and subprocess.run(probe).returncode == 0
    with pytest.raises(RuntimeError, match="mid-way"):
        with st.write_transaction() as con:
            con.execute("INSERT INTO meta VALUES ('probe', 'x')")
            raise RuntimeError("mid-way")
    assert dbhost._host.con is None                                # the failed operation's host was closed
    assert _put(st, "b") and st.counts()["runs"] == 2
    assert st.query("SELECT count(*) AS n FROM meta WHERE name = 'probe'").n[0] == 0
    assert dbhost._host.con is not None and subprocess.run(probe).returncode == 0


def test_rows_inserted_as_arrow_equal_rows_bound_as_parameters(tmp_path, monkeypatch):
    """A batch whose columns each hold one Python type goes in as one Arrow table (store._arrow_table): every value,
    NULL, timestamp and default equals what one bound parameter per value stores; a column mixing types takes the
    parameter path."""
    import datetime as dt
    from hetmoe_core import store as store_mod
    t0 = dt.datetime(2026, 1, 2, 3, 4, 5, 678901)
    items = [(f"k{i}", {"task": "t", "seed": i, "strategy": "maxnn", "budget": i / 3, "started_at": t0,
                        "duration_s": None if i else 1.25, "config": '{"a": "é"}', "digital_share": 0.1 * i},
              [{"task": "t", "metric": m, "value": i + j / 7, "stderr": None if j else 0.5, "seed": i,
                "higher_is_better": bool(j % 2)} for j, m in enumerate(METRICS)], None) for i in range(4)]
    assert store_mod._arrow_table(("a",), [{"a": 1}, {"a": 2.5}]) is None        # int and float: parameters
    frames = []
    for name, arrow in (("arrow", True), ("params", False)):
        with monkeypatch.context() as m:
            if not arrow:
                m.setattr(store_mod, "_arrow_table", lambda cols, rows: None)
            st = Store(tmp_path / f"{name}.duckdb")
            st.put_results(items)
            frames.append(st.runs_frame().drop(columns=["created_at"]).sort_values(["key", "metric"])
                          .reset_index(drop=True))
    a, p = frames
    assert a.equals(p) and len(a) == 4 * len(METRICS)
    assert a.started_at.iloc[0] == t0 and a.duration_s.isna().sum() == 3 * len(METRICS) and a.origin.eq("computed").all()


def _hold(args, ready="held"):
    """A second process that holds the store (started with ``args``) until its stdin closes."""
    p = subprocess.Popen([sys.executable, "-c", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == ready
    return p


def _release(p):
    p.stdin.close()
    assert p.wait(30) == 0


def _put_shown(st, key):
    """A result as the Results page lists it (model, task, strategy, budget, preset, backend)."""
    return st.put_result(key, {"model_source": "tiny:olmoe", "model_fingerprint": "tiny:olmoe:seed0", "task": "t",
                               "seed": 0, "strategy": "maxnn", "budget": 0.25, "scope": "layer", "preset": "p",
                               "backend": "fast"},
                         [{"task": "t", "metric": "acc", "value": 0.5, "stderr": 0.1, "seed": 0}])


def test_locked_store_fails_fast_with_the_writer_named_and_pages_stay_usable(tmp_path, monkeypatch):
    """While another process holds the DuckDB file read-write (the duckdb CLI, a notebook), a read gives up after
    store_file.READ_WAIT s, not the store's 60 s timeout, with one line naming the process; `runs --summary` prints
    that line; the Results page shows it with Retry (nothing else waits), and a page read before shows the results
    as last read with a warning; the store is whole again once the process lets go."""
    from streamlit.testing.v1 import AppTest
    from hetmoe_core.store_file import READ_WAIT, StoreBusy
    db = tmp_path / "r.duckdb"
    st = Store(db)
    _put_shown(st, "a")
    fresh = tmp_path / "fresh.duckdb"
    _put_shown(Store(fresh), "b")
    monkeypatch.setenv("HETMOE_STORE", str(db))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    at.switch_page("pages/results.py").run()     # read once: the page's last answer
    assert not at.exception and not at.error and len(at.dataframe) >= 1
    hold = "import duckdb, sys; c = duckdb.connect(sys.argv[1]); c.execute('SELECT 1'); print('held', flush=True); " \
           "sys.stdin.read()"
    for path in (db, fresh):
        os.utime(path)   # another writer touched it: this process checks its schema again
    holder = _hold([hold, str(db)])
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreBusy) as e:
            Store(db).query("SELECT count(*) FROM runs")
        waited = time.monotonic() - t0
        assert st.timeout == 60 and READ_WAIT <= waited < 30    # not the whole timeout
        msg = str(e.value)
        assert msg.startswith(f"the store {db} is being written by another process (pid {holder.pid}, ")
        assert msg.endswith("); retry in a moment") and "\n" not in msg
        cli = subprocess.run([sys.executable, "-m", "hetmoe_core", "runs", "--summary", "--store", str(db)],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert cli.returncode == 1 and cli.stderr.strip().splitlines() == [f"error: {msg}"]
        at.run()                                      # a page that read before: its last answer, one warning
        assert not at.exception and len(at.dataframe) >= 1
        assert [w.value for w in at.warning if "last read" in w.value] == [
            f"Showing the results as last read. The store {db} is being written by another process "
            f"(pid {holder.pid}, {msg.split(', ', 1)[1]}."]
        monkeypatch.setenv("HETMOE_STORE", str(fresh))
        holder2 = _hold([hold, str(fresh)])
        try:
            at2 = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
            at2.switch_page("pages/results.py").run()   # nothing read before: the one line and Retry
            assert not at2.exception and [x.value for x in at2.error] == [
                f"The store {fresh} is being written by another process (pid {holder2.pid}, "
                f"{msg.split(', ', 1)[1]}."]
            assert at2.button(key="store_busy_retry")
        finally:
            _release(holder2)
        at2.button(key="store_busy_retry").click().run()
        assert not at2.error and len(at2.dataframe) >= 1
    finally:
        _release(holder)
    assert Store(db).counts()["runs"] == 1


def test_a_hetmoe_writer_holding_the_store_is_named_by_pid(tmp_path, monkeypatch):
    """A hetmoe process inside a long write transaction (e.g. a snapshot import) holds the store's flock: a reader
    gives up after HETMOE_READ_WAIT s (shortened here) naming that process's pid."""
    from hetmoe_core import store_file
    db = tmp_path / "r.duckdb"
    _put(Store(db), "a")
    monkeypatch.setattr(store_file, "HETMOE_READ_WAIT", 0.5)
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from hetmoe_core.store import Store\n"
            "with Store(sys.argv[1]).write_transaction():\n    print('held', flush=True); sys.stdin.read()")
    holder = _hold([code, str(db)])
    try:
        with pytest.raises(store_file.StoreBusy, match=rf"\(pid {holder.pid}, hetmoe\); retry in a moment$"):
            Store(db).get_result("a")
    finally:
        _release(holder)
    assert Store(db).get_result("a")["metrics"][0]["value"] == 0.5
