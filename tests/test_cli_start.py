"""Commands that answer from the store start without the deep-learning stack: each runs in a fresh interpreter and
reports which heavy modules it imported (a speed test by construction, not by a timer)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hetmoe_core.evaluate import plan
from hetmoe_core.store import Store

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "aihwkit", "lm_eval")
PROBE = """
import json, sys
from hetmoe_core.cli import main
rc = main(sys.argv[1:])
sys.stdout.flush()
print("HEAVY=" + json.dumps([m for m in %r if m in sys.modules]), file=sys.stderr)
sys.exit(rc)
""" % (HEAVY,)


def run_cli(*args):
    """(exit code, stdout, heavy modules imported) of ``python -m hetmoe_core <args>`` in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    line = [ln for ln in out.stderr.splitlines() if ln.startswith("HEAVY=")]
    assert line, out.stderr
    return out.returncode, out.stdout, json.loads(line[-1][6:])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real store holding the maxnn and ideal results of the default model on hetmoe_cloze (limit 2, 2 seeds),
    keyed exactly as `evaluate` keys them; the metric values are stand-ins (no forward pass needed here)."""
    path = tmp_path_factory.mktemp("cli") / "r.duckdb"
    st = Store(path)
    for i, spec in enumerate(plan("default", tasks="hetmoe_cloze", limit=2, seeds=2)):
        metrics = [{"task": "hetmoe_cloze", "metric": "acc", "value": 0.5 + i / 8, "stderr": 0.25, "seed": spec.seed,
                    "higher_is_better": True}]
        st.put_result(spec.key, {**spec.row(), "duration_s": 1.0, "digital_share": 0.4}, metrics)
    return path


def test_runs_json_without_deep_learning_stack(store):
    rc, out, heavy = run_cli("runs", "--store", str(store), "--json")
    assert rc == 0 and heavy == []
    rows = json.loads(out)["rows"]
    assert len(rows) == 3 and sorted(r["value"] for r in rows) == [0.5, 0.625, 0.75]
    assert all(r["created_at"][10] == "T" for r in rows)   # ISO time, as before
    rc, out, heavy = run_cli("runs", "--store", str(store), "--summary", "--where", "strategy=maxnn", "--json")
    (row,) = json.loads(out)["rows"]
    assert rc == 0 and heavy == [] and row["n_seeds"] == 2 and row["mean"] == pytest.approx(0.6875)
    assert row["std"] == pytest.approx(0.0883883, rel=1e-5) and row["seeds"] == [0, 1]


def test_export_and_report_without_deep_learning_stack(store, tmp_path):
    rc, out, heavy = run_cli("export", "--store", str(store), str(tmp_path / "s.zip"), "--json")
    assert rc == 0 and heavy == [] and json.loads(out)["tables"]["runs"]["rows"] == 3
    rc, out, heavy = run_cli("report", str(tmp_path / "s.zip"), "--out", str(tmp_path / "r.html"), "--json")
    assert rc == 0 and heavy == [] and (tmp_path / "r.html").stat().st_size > 10_000


EVAL = ("evaluate", "tiny:olmoe", "--tasks", "hetmoe_cloze", "--limit", "2", "--json")


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
    """A store of real results computed by `evaluate` in a fresh interpreter (tiny:olmoe, hetmoe_cloze, 2 documents:
    the ideal and maxnn at 12.5 %), so it holds their placements and the model's shapes as evaluate stores them."""
    path = tmp_path_factory.mktemp("computed") / "c.duckdb"
    rc, out, heavy = run_cli(*EVAL, "--store", str(path))
    assert rc == 0 and "torch" in heavy and json.loads(out)["computed"] == 2
    return path


def _energy_titles(html_path) -> list[str]:
    """The subtitle (hardware, routing, batch, how the shapes were had) of each energy figure of a report."""
    import re
    text = Path(html_path).read_text(encoding="utf-8")
    for code, char in (("\\u003c", "<"), ("\\u003e", ">"), ("\\u002f", "/")):   # as plotly's JSON escapes them
        text = text.replace(code, char)
    return re.findall(r"vs energy per token[^\"]*?<sup>([^<]*)</sup>", text)


def test_report_prices_stored_runs_without_deep_learning_stack(computed, tmp_path):
    """The energy figures price each stored placement with the model's stored shapes: neither the report of the
    store nor that of its snapshot builds the model (before: a transformers model on the meta device, ~8 s)."""
    from hetmoe_core.energy import run_costs, shapes_from_source
    st = Store(computed, read_only=True)
    assert st.counts()["model_shapes"] == 1 and st.counts()["placements"] == 2
    rc, out, heavy = run_cli("report", str(computed), "--out", str(tmp_path / "a.html"), "--json")
    assert rc == 0 and heavy == [] and json.loads(out)["energy_figures"] == 2        # acc, perplexity
    assert _energy_titles(tmp_path / "a.html") == ["h100+pcm, uniform routing, batch 32"] * 2
    rc, out, heavy = run_cli("export", "--store", str(computed), str(tmp_path / "s.zip"), "--json")
    assert rc == 0 and heavy == [] and json.loads(out)["tables"]["model_shapes"]["rows"] == 1
    rc, out, heavy = run_cli("report", str(tmp_path / "s.zip"), "--out", str(tmp_path / "b.html"), "--json")
    assert rc == 0 and heavy == [] and json.loads(out)["energy_figures"] == 2
    assert _energy_titles(tmp_path / "b.html") == _energy_titles(tmp_path / "a.html")
    # the very energies the meta-device model gives (here in the test's process, which may import torch)
    runs, note = run_costs(st, "tiny:olmoe:seed0")
    assert note == "uniform routing, batch 32" and runs.energy_per_token_j.notna().all()
    import shutil
    import duckdb
    shutil.copy(computed, tmp_path / "none.duckdb")
    with duckdb.connect(str(tmp_path / "none.duckdb")) as con:   # as if the shapes had never been stored
        con.execute("DELETE FROM model_shapes")
    shapes_from_source.cache_clear()
    meta, meta_note = run_costs(Store(tmp_path / "none.duckdb", read_only=True), "tiny:olmoe:seed0")
    assert meta_note.startswith("uniform routing, batch 32; model shapes built from its config")
    assert meta.energy_per_token_j.tolist() == runs.energy_per_token_j.tolist()
    assert meta.tokens_per_s.tolist() == runs.tokens_per_s.tolist() and meta.tiles.tolist() == runs.tiles.tolist()


def test_cache_hit_of_computed_results_and_presets_without_deep_learning_stack(computed):
    rc, out, heavy = run_cli(*EVAL, "--store", str(computed))
    assert rc == 0 and heavy == [] and (json.loads(out)["computed"], json.loads(out)["cached"]) == (0, 2)
    rc, out, heavy = run_cli("presets")
    assert rc == 0 and heavy == [] and "paper-pcm-c1.5" in out
    rc, out, heavy = run_cli("presets", "paper-pcm-c2.5", "--json")
    assert rc == 0 and heavy == []
    assert json.loads(out)["paper-pcm-c2.5"]["parameters"]["prog_noise_scale"]["value"] == 2.5


def test_example_report_without_deep_learning_stack(tmp_path, example_results):
    """The shipped example snapshot carries the default model's shapes (exactly the meta-device model's), so its
    report prices every placement without building the model."""
    from hetmoe_core.energy import shapes_from_source, stored_shapes
    from hetmoe_core.examples import EXAMPLES
    st = Store(example_results(tmp_path / "ex.duckdb"), read_only=True)
    (fp,) = st.runs_frame().model_fingerprint.unique()
    assert stored_shapes(st, fp, "default") == shapes_from_source("default")[0]
    rc, out, heavy = run_cli("report", str(EXAMPLES), "--out", str(tmp_path / "ex.html"), "--json")
    assert rc == 0 and heavy == [] and json.loads(out)["energy_figures"] == 7      # 7 domains, word_perplexity
    assert set(_energy_titles(tmp_path / "ex.html")) == {"h100+pcm, measured routing, batch 32"}


def _as_schema_2(zip_in, zip_out):
    """A snapshot as hetmoe wrote it with schema 2: no model_shapes member."""
    import zipfile
    with zipfile.ZipFile(zip_in) as zin, zipfile.ZipFile(zip_out, "w") as zout:
        manifest = json.loads(zin.read("manifest.json"))
        manifest["schema_version"] = 2
        del manifest["tables"]["model_shapes"]
        for name in zin.namelist():
            if name not in ("manifest.json", "model_shapes.parquet"):
                zout.writestr(name, zin.read(name))
        zout.writestr("manifest.json", json.dumps(manifest))


def test_schema_2_store_and_snapshot_are_read_and_upgraded(computed, tmp_path):
    """A store of schema 2 (before the model_shapes table) is read as it is, read-only: `runs` answers, the report
    prices its runs with shapes built from the config and says so; a writer upgrades it to schema 3 with an empty
    model_shapes table, nothing lost. A schema-2 snapshot (no model_shapes member) imports and reports alike."""
    import shutil
    import duckdb
    from hetmoe_core.snapshot import import_snapshot
    from hetmoe_core.store_schema import SCHEMA_VERSION
    old = tmp_path / "old.duckdb"
    shutil.copy(computed, old)
    con = duckdb.connect(str(old))
    con.execute("DROP TABLE model_shapes")
    con.execute("UPDATE meta SET value='2' WHERE name='schema_version'")
    con.close()
    rc, out, heavy = run_cli("runs", "--store", str(old), "--json")
    assert rc == 0 and heavy == [] and json.loads(out)["count"] == 4
    assert Store(old, read_only=True).counts()["model_shapes"] == 0
    rc, out, heavy = run_cli("report", str(old), "--out", str(tmp_path / "old.html"), "--json")
    assert rc == 0 and json.loads(out)["energy_figures"] == 2 and "torch" in heavy    # the fallback builds it
    built = ("h100+pcm, uniform routing, batch 32; model shapes built from its config: the store holds none for "
             "this model (made before hetmoe stored them)")
    assert _energy_titles(tmp_path / "old.html") == [built] * 2
    rc, out, heavy = run_cli("export", "--store", str(old), str(tmp_path / "s.zip"), "--json")
    assert rc == 0 and heavy == [] and json.loads(out)["tables"]["model_shapes"]["rows"] == 0
    st = Store(old)                                                     # a writer upgrades it in place
    assert st.query("SELECT value FROM meta WHERE name='schema_version'").value[0] == str(SCHEMA_VERSION) == "3"
    assert st.counts() == {"runs": 2, "metrics": 4, "placements": 2, "expert_stats": 1, "model_shapes": 0}
    _as_schema_2(tmp_path / "s.zip", tmp_path / "s2.zip")
    added = import_snapshot(tmp_path / "s2.zip", Store(tmp_path / "new.duckdb"))["added"]
    assert added == {"runs": 2, "metrics": 4, "placements": 2, "expert_stats": 1}
    rc, out, heavy = run_cli("report", str(tmp_path / "s2.zip"), "--out", str(tmp_path / "s2.html"), "--json")
    assert rc == 0 and json.loads(out)["energy_figures"] == 2 and _energy_titles(tmp_path / "s2.html") == [built] * 2


def test_cache_hit_evaluate_without_deep_learning_stack(store):
    """The key of every result is computed from the request and the weights' file hash, not from the model."""
    rc, out, heavy = run_cli("evaluate", "default", "--store", str(store), "--tasks", "hetmoe_cloze", "--limit", "2",
                             "--seeds", "2", "--json")
    res = json.loads(out)
    assert rc == 0 and heavy == [] and (res["computed"], res["cached"]) == (0, 3)
    (maxnn,) = [r for r in res["summary"] if r["strategy"] == "maxnn"]
    assert maxnn["mean"] == pytest.approx(0.6875) and maxnn["n_seeds"] == 2


def test_cache_hit_validate_without_deep_learning_stack(tmp_path):
    """The first call measures (tiny model, 128 tokens, 2 seeds); the same request again answers from the store
    with the same numbers and imports none of the heavy modules."""
    args = ("validate", "tiny:olmoe", "--store", str(tmp_path / "v.duckdb"), "--preset", "paper-pcm-c2.5",
            "--seeds", "2", "--tokens", "128", "--bootstrap", "50", "--json")
    rc, out, heavy = run_cli(*args)
    first = json.loads(out)
    assert rc == 0 and "torch" in heavy and first["cached"] is False
    rc, out, heavy = run_cli(*args)
    again = json.loads(out)
    assert rc == 0 and heavy == [] and again["cached"] is True
    assert {**again, "cached": False} == first
    assert len(first["experts"]) == 16 and first["seeds"] == [0, 1]
    assert any(a != b for a, b in (r["only_this_seeds"] for r in first["experts"]))   # measured, not zeros


def test_misspelt_task_fails_before_a_store_is_created(tmp_path):
    """A task no one knows is refused before anything is written: no empty store file is left behind."""
    path = tmp_path / "x.duckdb"
    rc, out, heavy = run_cli("evaluate", "default", "--tasks", "nosuchtask", "--store", str(path))
    assert rc == 2 and not path.exists() and not list(tmp_path.iterdir())
    assert "torch" not in heavy                     # nor is a model loaded to find out


def test_runs_summary_tells_apart_ideal_results_of_two_sweeps(tmp_path):
    """Two sweeps whose ideal references differ only in num_fewshot (or limit) printed two identical ideal lines;
    the columns that tell shown rows apart are printed now."""
    st = Store(tmp_path / "r.duckdb")
    for fewshot in (0, 1):
        for spec in plan("default", tasks="hetmoe_cloze", limit=2, num_fewshot=fewshot):
            st.put_result(spec.key, {**spec.row(), "duration_s": 1.0, "digital_share": 0.4},
                          [{"task": "hetmoe_cloze", "metric": "acc", "value": 0.5, "stderr": 0.1, "seed": spec.seed}])
    rc, out, heavy = run_cli("runs", "--store", str(tmp_path / "r.duckdb"), "--summary", "--where", "strategy=ideal")
    lines = out.splitlines()
    ideal = [ln for ln in lines if " ideal " in ln and "hetmoe_cloze" in ln]
    assert rc == 0 and heavy == [] and len(ideal) == 2 and len(set(ideal)) == 2, out
    head = lines[0].split()
    assert "num_fewshot" in head and "limit" in head
    assert sorted(int(ln.split()[head.index("num_fewshot")]) for ln in ideal) == [0, 1]


def test_place_oracle_answers_from_the_stored_measurement(tmp_path):
    """The oracle's placement from a stored measurement needs no model weights: the second call reads the
    measurement and the model's config only, and gives the very placement, share and energy of the first."""
    args = ("place", "tiny:olmoe", "--strategy", "oracle", "--preset", "paper-pcm-c2.5", "--seeds", "2", "--tokens",
            "128", "--budget", "0.25", "--store", str(tmp_path / "o.duckdb"), "--json")
    rc, out, _ = run_cli(*args)
    first = json.loads(out)
    assert rc == 0 and first.pop("measurement") == "measured"
    rc, out, heavy = run_cli(*args)
    again = json.loads(out)
    assert rc == 0 and again.pop("measurement") == "stored" and again == first
    assert "lm_eval" not in heavy and sum(again["per_layer_digital"]) == 4     # 25 % of 2 layers x 8 experts


def test_runs_summary_cut_tables_name_every_task_and_what_they_left_out(tmp_path, capsys, example_results):
    """The example results fill 200 rows with one task per table: each of the three `runs --summary` tables
    shows every task with every metric of the configurations it keeps (before: each task's first rows in name
    order, bits_per_byte only, so word_perplexity was cut away), and says which configurations it left out."""
    from hetmoe_core.cli import main
    path = example_results(tmp_path / "ex.duckdb")
    rc = main(["runs", "--store", str(path), "--summary", "--where", "strategy=maxnn,frequency,ideal",
               "--max-rows", "42"])
    out = capsys.readouterr().out
    assert rc == 0
    tables = out.split("\n\n")
    assert len(tables) == 3 and "recovered fraction" in tables[1] and "paired deltas" in tables[2]
    for table in tables:
        rows = [ln.split()[:2] for ln in table.strip().splitlines() if ln.strip().startswith("hetmoe_ppl_")]
        assert len(rows) == 42 and len({t for t, _ in rows}) == 7          # 6 rows of each of the 7 tasks
        assert {(t, m) for t, m in rows} == {(t, m) for t, _ in rows for m in
                                             ("bits_per_byte", "byte_perplexity", "word_perplexity")}
    notes = [ln for ln in out.splitlines() if ln.startswith("(") and "more" in ln]
    assert len(notes) == 3 and all("7 tasks (hetmoe_ppl_bible_en … hetmoe_ppl_sotu): the first 2 of " in n
                                   and "every metric of each (bits_per_byte, byte_perplexity, word_perplexity)" in n
                                   for n in notes)
    # summary: 7 tasks x 3 metrics x (2 presets x 2 strategies x 5 budgets + ideal); table order strategy, budget,
    # preset: frequency at budget 0 under both presets is shown, then budget 0.125 under paper-pcm-c1.5 is cut
    assert notes[0].startswith("(399 more summary rows left out") and "--max-rows to 441" in notes[0]
    assert "every one from frequency, budget 0.125, paper-pcm-c1.5 on left out (of strategies frequency, ideal, " \
           "maxnn)" in notes[0]
    assert notes[1].startswith("(378 more recovered-fraction rows") and "--max-rows to 420" in notes[1]
    assert "every one from paper-pcm-c1.5, budget 0.5, frequency vs maxnn on left out" in notes[2]
