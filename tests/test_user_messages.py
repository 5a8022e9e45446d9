"""What a user of a shared server is told: no absolute server path, one clear line for a bad model source or link
value, readable numbers on the cards — through Streamlit's AppTest and a real DuckDB store."""
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from hetmoe_core.models import TINY_FAMILIES, load_model, resolve_source
from hetmoe_core.store import DEFAULT_PATH, Store, shown_path

APP = str(Path(__file__).resolve().parent.parent / "app.py")


def app(query=None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update(query or {})
    return at.run()


def texts(at) -> str:
    """Every caption, markdown, error and warning of this run, as one string."""
    out = []
    for kind in ("caption", "markdown", "error", "warning", "info", "success"):
        out += [str(e.value) for e in at.get(kind)]
    return "\n".join(out)


def test_store_is_named_by_file_name_or_app_relative_path(tmp_path):
    assert shown_path(tmp_path / "cache" / "results.duckdb") == "results.duckdb"
    assert shown_path(DEFAULT_PATH) == "cache/results.duckdb"


def test_results_and_share_pages_hide_the_server_path(store_env):
    at = app({"model": "tiny:olmoe"})
    for name in ("results", "share"):
        at.switch_page(f"pages/{name}.py").run()
        assert not at.exception, [e.value for e in at.exception]
        shown = texts(at)
        assert "`results.duckdb`" in shown, (name, shown)
        assert str(store_env.parent) not in shown and "/tmp" not in shown, (name, shown)


def test_report_names_the_store_file_only(tmp_path):
    from hetmoe_core.evaluate import plan, source_fingerprint
    from hetmoe_core.report import write_report
    st = Store(tmp_path / "deep" / "results.duckdb")
    for s in plan("default", fingerprint=source_fingerprint("default"), tasks="hetmoe_cloze", budgets=(0.0,),
                  limit=4):
        st.put_result(s.key, {**s.row(), "duration_s": 1.0, "digital_share": 0.2},
                      [{"task": s.task.name, "metric": "acc", "value": 0.5, "stderr": 0.01, "seed": s.seed}])
    write_report(st, tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert "from results.duckdb." in html and str(tmp_path) not in html


@pytest.mark.parametrize("source, expect, says", [
    ("a" * 300 + "/" + "b" * 300, "hub", "'" + "a" * 40 + "…' is not a valid hub id"),
    ("ü/ñ✓", "hub", "'ü/ñ✓' is not a valid hub id"),
    ("../../etc/passwd", "hub", "is not a valid hub id"),
    ("../../etc/passwd", None, "../../etc/passwd is not a folder with a model (config.json + *.safetensors)"),
    ("~", "folder", "~ is not a folder with a model"),
    ("/etc", None, "/etc is not a folder with a model"),
    ("tiny:nosuchfamily", None, "olmoe, mixtral"),
])
def test_bad_sources_say_what_is_valid_in_one_short_line(source, expect, says):
    with pytest.raises(ValueError) as e:
        resolve_source(source, expect)   # what the sidebar checks first, then the load itself
        load_model(source)
    msg = str(e.value)
    assert says in msg and "\n" not in msg and len(msg) < 260, msg
    assert "owner/name" in msg or "not a folder" in msg or "tiny" in msg
    for leak in ("/root", "Errno", "unreachable", "is a file", "holds no"):
        assert leak not in msg, msg


def test_sidebar_hub_id_is_validated_without_blaming_the_network(store_env):
    at = app()
    at.sidebar.radio(key="source_kind").set_value("Hub id").run().run()   # AppTest draws the box a run later
    at.sidebar.text_input(key="source_text").set_value("a" * 300 + "/" + "b" * 300).run()
    assert not at.exception and at.sidebar.radio(key="source_kind").value == "Hub id"
    err = at.error[0].value
    assert "is not a valid hub id" in err and "96 characters" in err and "a" * 41 not in err
    assert "Errno" not in err and "unreachable" not in err


def test_link_with_unknown_tiny_family_is_an_invalid_value_naming_the_families(store_env):
    at = app({"model": "tiny:nosuchfamily"})
    assert not at.exception
    warning = " ".join(w.value for w in at.sidebar.warning)
    assert "The link held an invalid value" in warning and "tiny:nosuchfamily" in warning
    assert ", ".join(TINY_FAMILIES) in warning
    assert at.sidebar.radio(key="source_kind").value == "Default"


def test_signed_numbers_and_resolution_of_the_all_analog_damage():
    from hetmoe_core.validation import damage_resolved, signed
    assert signed(-1e-8) == "-1.0e-08 nats" and signed(0.01234) == "+0.0123 nats" and signed(0.0) == "0 nats"
    v = {"clean_nll": 4.85, "seeds": [0, 1, 2, 3, 4], "all_experts": {"damage": 0.05, "se": 0.01}}
    assert damage_resolved(v)
    assert not damage_resolved({**v, "all_experts": {"damage": 0.05, "se": 0.02}})    # t(4) interval covers 0
    assert not damage_resolved({**v, "all_experts": {"damage": 1e-8, "se": 1e-10}})   # below float32 rounding
    assert damage_resolved({**v, "all_experts": {"damage": 0.05, "se": 0.017}})       # t(4)=2.776: 0.047 < 0.05
    assert not damage_resolved({**v, "all_experts": {"damage": 0.05, "se": 0.019}})   # 0.053 > 0.05


def test_calibration_source_reads_for_people():
    from hetmoe_core.validation import calibration_source
    assert calibration_source({"calibration": {"source": "given"}}) == "calibration text"   # stored before naming
    assert calibration_source({}) == "calibration text"
    assert calibration_source({"calibration": {"source": "built-in sentences"}}) == "built-in sentences"


def test_every_criterion_has_a_readable_label():
    from hetmoe_core import figures
    from hetmoe_core.criteria import PAPER_CRITERIA
    rows = [{"scope": "pooled", "criterion": c, **{f"{s}{x}": 0.1 for s in ("spearman", "kendall")
                                                     for x in ("", "_lo", "_hi")}} for c in PAPER_CRITERIA]
    names = set(figures.correlation_forest(rows).layout.yaxis.ticktext)
    assert "Max neuron norm of gate_proj" in names and not any("_max" in n for n in names), names


def test_validate_card_on_a_tiny_model_judges_no_criterion(store_env):
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("pages/validate.py").run()
    at.sidebar.radio(key="source_kind").set_value("Tiny (random)").run()
    assert at.session_state["source"] == "tiny:olmoe"
    at.number_input(key="val_seeds").set_value(2)
    at.selectbox(key="val_tokens").set_value(256)
    at.button(key="val_run").click().run()
    assert at.session_state["val_job"].handle.lm.source == "tiny:olmoe"
    import time
    t0 = time.time()
    while at.session_state["val_job"].running and time.time() - t0 < 120:
        time.sleep(0.3)
    for _ in range(2):   # under AppTest the first run after the job falls back to the default source
        at.sidebar.radio(key="source_kind").set_value("Tiny (random)").run()
    assert not at.exception, [e.value for e in at.exception]
    cards = {m.label: m.value for m in at.metric}
    damage = at.session_state["val_job"].result["all_experts"]["damage"]
    assert abs(damage) < 1e-5                      # the tiny model's weights are too small for this noise to show
    assert "e-" in cards["all routed experts analog"] and "+-" not in cards["all routed experts analog"]
    assert cards["best criterion"] == "none can be judged"
    assert any("no criterion can be judged" in w.value for w in at.warning)
    shown = texts(at)
    assert "of given" not in shown and "tokens of built-in sentences" in shown


@pytest.mark.parametrize("part, name, says", [
    ("digital", "mac_energy", "mac_energy=1e+30: allowed a number in [0.0001, 1000] pJ/MAC"),
    ("digital", "weight_bytes", "weight_bytes=1e+30: allowed a number in [0.125, 8] bytes/weight"),
    ("analog", "mvm_latency", "mvm_latency=1e+30: allowed a number in [0.01, 1e+07] ns"),
])
def test_hardware_constants_have_a_range_in_their_metadata(part, name, says):
    import dataclasses
    from hetmoe_core.hardware import HARDWARE, AnalogConfig, DigitalConfig, get_hardware
    for cls in (DigitalConfig, AnalogConfig):
        for f in dataclasses.fields(cls):
            if f.name != "name":
                lo, hi = f.metadata["allowed"]
                assert all(lo <= getattr(getattr(hw, "digital" if cls is DigitalConfig else "analog"), f.name) <= hi
                           for hw in HARDWARE.values()), f.name
    with pytest.raises(ValueError) as e:
        get_hardware("h100+pcm", **{part: {name: 1e30}})
    assert says in str(e.value) and "\n" not in str(e.value)
    part = (DigitalConfig if part == "digital" else AnalogConfig).PART     # the part as the editor titles it, and
    assert str(e.value).startswith(f"{part} constant out of range: ")       # what to do; never the Python class
    assert str(e.value).endswith("enter a value in the allowed range") and "Config" not in str(e.value)
    with pytest.raises(ValueError, match=r"tile_size=3.5: allowed an integer in \[8, 16384\]"):
        get_hardware("h100+pcm", analog={"tile_size": 3.5})


def test_placement_refuses_a_huge_constant_in_one_line_and_formats_the_limits(store_env):
    from hetmoe_core.figures import si
    assert [si(x) for x in (4602219.1855, 999960, 53.7, 0.605, 2.2e-5)] == ["4.60 M", "1.00 M", "53.7", "0.605",
                                                                             "2.2e-05"]
    at = app()
    at.switch_page("pages/placement.py").run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    energy = next(m.value for m in at.metric if m.label == "Energy per token")
    at.number_input(key="hw_h100+pcm_digital_mac_energy").set_value(1e30).run()
    assert not at.exception
    assert any("mac_energy=1e+30: allowed a number in [0.0001, 1000] pJ/MAC" in w.value for w in at.warning)
    assert next(m.value for m in at.metric if m.label == "Energy per token") == energy   # the preset's values
    at.session_state["limits_open"] = True     # the limits table is built only while its expander is open
    at.run()
    table = next(d.value for d in at.dataframe if "tokens/s" in d.value.columns)
    assert all(v.endswith((" k", " M", " G")) and len(v.split()[0]) <= 4 for v in table["tokens/s"]), table


def test_unknown_task_fails_before_lm_eval_indexes_its_tasks_and_says_how_to_list(tmp_path):
    import os
    import subprocess
    import sys
    from hetmoe_core.tasks import lm_eval_may_know
    assert lm_eval_may_know(["nosuchtask_xyz", "arc_easy"]) == ["arc_easy"]
    code = ("from hetmoe_core import evaluate, tasks\n"
            "specs = evaluate.plan('default', tasks='nosuchtask_xyz', budgets=(0.0,))\n"
            "try:\n    evaluate._check_registry_tasks(specs)\nexcept ValueError as e:\n    print(e)\n"
            "print('task managers built:', len(tasks._task_managers))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HETMOE_STORE": str(tmp_path / "s.duckdb")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=Path(APP).parent).stdout
    assert "unknown task(s) nosuchtask_xyz" in out and "`python -m hetmoe_core tasks`" in out, out
    assert "task managers built: 0" in out
    listing = subprocess.run([sys.executable, "-m", "hetmoe_core", "tasks"], capture_output=True, text=True,
                             env=env, timeout=120, cwd=Path(APP).parent).stdout
    assert "local: hetmoe_choice, hetmoe_cloze" in listing and "paper: paper_arc_easy" in listing
