"""Cost model of a placement (hetmoe_core.energy): hand calculations on a tiny model, aihwkit's tile split, the
roofline's response to batch size, monotonicity in the digital budget, the Table-2 ordering, CLI errors."""
import json

import numpy as np
import pytest

from hetmoe_core.energy import (cost, olmoe_1b_7b, pareto_front, reference_placements, shapes_of, table2,
                                tile_split, tiles_of)
from hetmoe_core.hardware import HARDWARE, get_hardware
from hetmoe_core.models import anatomy_of, tiny_model
from hetmoe_core.placement import place

# Round numbers so that every expected value below is a hand calculation: 10 pJ/byte, 1 pJ/MAC, 1e12 MAC/s,
# 1 TB/s; tiles of 64 x 64 at 0.4096 nJ per full MVM = 0.1 pJ per MAC, 0.5 pJ per tile output, 100 ns, 4 per chip.
ROUND = get_hardware("h100+pcm", digital=dict(hbm_bandwidth=1.0, hbm_energy=10.0, peak_tflops=2.0, mac_energy=1.0),
                     analog=dict(tile_size=64, mvm_energy=0.4096, mvm_latency=100.0, tiles_per_chip=4,
                                 periphery_energy=0.5))


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("olmoe")
    a = anatomy_of(model)
    return model, a, shapes_of(model, a, "tiny:olmoe")


def test_tiny_shapes(tiny):
    _, a, s = tiny
    # tiny olmoe: H 32, 4 heads of 8, 2 KV heads, experts of width 16, 8 experts top-2, vocab 128, 2 layers
    att = [m.matrices for m in s.dense if m.kind == "attention"]
    assert att == [((32, 32), (16, 32), (16, 32), (32, 32))] * 2
    assert [m.matrices for m in s.dense if m.kind == "router"] == [((8, 32),)] * 2
    assert [m.matrices for m in s.dense if m.kind == "lm_head"] == [((128, 32),)]
    assert [(m.num_experts, m.top_k, m.matrices) for m in s.moe] == [(8, 2, ((32, 32), (32, 16)))] * 2
    assert s.total_params == a.total_params


def test_all_digital_limit_by_hand(tiny):
    _, _, s = tiny
    c = cost(s, reference_placements(s)["all_digital"], ROUND, batch=4)
    dense = 2 * (1024 + 512 + 512 + 1024) + 2 * 256 + 4096          # 10752 weights every token uses
    expert = 32 * 32 + 32 * 16                                      # 1536 weights per expert
    fetched = 8 * (1 - 0.75 ** 4)                                   # experts a batch of 4 touches per layer (p = 2/8)
    step_bytes = 2 * (dense + 2 * fetched * expert)                 # 55104 bytes per step
    macs = dense + 2 * 8 * 0.25 * expert                            # 16896 MACs per token
    assert c.energy_j["hbm"] == pytest.approx(step_bytes * 10e-12 / 4, rel=1e-12)
    assert c.energy_j["digital_mac"] == pytest.approx(macs * 1e-12, rel=1e-12)
    assert c.energy_per_token_j == pytest.approx(1.54656e-7, rel=1e-12)
    # roofline: dense compute-bound (4 x 10752 MAC / 1e12 > 21504 B / 1e12), each expert layer memory-bound
    step = max(2 * dense / 1e12, 4 * dense / 1e12) + 2 * max(2 * fetched * expert / 1e12, 4 * 0.25 * 8 * expert / 1e12)
    assert c.latency_s == pytest.approx(step, rel=1e-12) and c.latency_s == pytest.approx(7.6608e-8, rel=1e-12)
    assert c.tokens_per_s == pytest.approx(4 / 7.6608e-8, rel=1e-12)
    assert (c.tiles, c.chips, c.analog_params) == (0, 0, 0)
    assert c.digital_bytes == 2 * s.total_params


def test_all_analog_limit_by_hand(tiny):
    _, _, s = tiny
    c = cost(s, reference_placements(s)["all_analog"], ROUND, batch=4)
    # every matrix fits one 64-tile except the LM head [128, 32] (2 tiles): 2 x (4 + 1 + 8 x 2) + 2
    assert (c.tiles, c.chips) == (44, 11)
    weights = 10752 + 2 * 8 * 1536
    assert c.analog_params == weights and c.tile_utilization == pytest.approx(weights / (44 * 64 * 64))
    outputs = 2 * (96 + 8 + 2 * (32 + 32)) + 128                    # tile outputs per token: 592
    assert c.energy_j["analog_tile"] == pytest.approx(16896 * 0.1e-12, rel=1e-12)
    assert c.energy_j["periphery"] == pytest.approx(outputs * 0.5e-12, rel=1e-12)
    assert c.energy_per_token_j == pytest.approx(1.9856e-9, rel=1e-12)
    assert c.energy_j["hbm"] == 0 and c.energy_j["digital_mac"] == 0
    # attention (depth 2): (4 + 1) MVMs, router 4, experts (1 + 1) per layer; LM head 4 -> 26 x 100 ns
    assert c.latency_s == pytest.approx(2.6e-6, rel=1e-12) and c.tokens_per_s == pytest.approx(4 / 2.6e-6)
    assert c.digital_bytes == 2 * (s.total_params - weights)


def test_tile_split_is_aihwkits():
    from aihwkit.simulator.configs import TorchInferenceRPUConfig
    from aihwkit.simulator.tiles.array import TileModuleArray
    from hetmoe_core.tiles import split_sizes
    rpu = TorchInferenceRPUConfig()
    rpu.mapping.max_input_size = rpu.mapping.max_output_size = 512
    arr = TileModuleArray(700, 1030, rpu, False)                   # out 700, in 1030
    assert (arr.out_sizes, arr.in_sizes) == (tile_split(700, 512), tile_split(1030, 512)) == ([350, 350],
                                                                                               [344, 343, 343])
    assert tiles_of(700, 1030, 512) == len(arr.array) * len(arr.array[0]) == 6
    for size in (1, 255, 256, 257, 511, 512, 513, 1024, 1030, 2048, 3000, 50304):
        for tile in (64, 256, 512):
            assert tile_split(size, tile) == TileModuleArray.get_split_sizes(None, size, tile) \
                == split_sizes(size, tile)                 # what hetmoe's analog backends tile with


def test_roofline_and_batch(tiny):
    _, _, s = tiny
    p = reference_placements(s)["all_digital"]
    mem = get_hardware("h100+pcm", digital=dict(peak_tflops=1e6))      # compute never limits: memory-bound
    for B in (1, 4, 32):
        step_bytes = 2 * (10752 + 2 * 8 * (1 - 0.75 ** B) * 1536)
        c = cost(s, p, mem, B)
        assert c.digital_bound == "memory"
        assert c.tokens_per_s == pytest.approx(B * 3.35e12 / step_bytes, rel=1e-12)
    comp = get_hardware("h100+pcm", digital=dict(peak_tflops=1e-3))    # 5e8 MAC/s: compute-bound at any batch
    rates = [cost(s, p, comp, B).tokens_per_s for B in (1, 8, 64)]
    assert rates == pytest.approx([5e8 / 16896] * 3, rel=1e-12)
    assert cost(s, p, comp, 1).digital_bound == "compute"
    # real H100: batch 1 is memory-bound and throughput grows with the batch
    tp = [cost(s, p, "h100+pcm", B) for B in (1, 2, 8, 32, 128)]
    assert tp[0].digital_bound == "memory"
    assert all(b.tokens_per_s > a.tokens_per_s for a, b in zip(tp, tp[1:]))


def test_energy_non_decreasing_in_budget(tiny):
    _, a, s = tiny
    rng = np.random.default_rng(0)
    skew = [rng.dirichlet(np.ones(8) * 0.5) * 2 for _ in range(2)]     # measured-like frequencies, rows sum to top-k
    for scope in ("layer", "global"):
        for stats in (None, skew):
            for B in (1, 32):
                e = [cost(s, place(a, "maxnn", b / 16, scope=scope), "h100+pcm", B, stats).energy_per_token_j
                     for b in range(17)]
                assert all(y >= x for x, y in zip(e, e[1:])), (scope, B, e)
                assert e[-1] > e[0]


def test_table2_ordering_and_shares():
    rows = {r["configuration"]: r for r in table2("h100+pcm", 32)}
    tpj = [rows[k]["tokens_per_j"] for k in ("all-analog", "dense-only digital", "dense + 25% experts digital",
                                             "all-digital")]
    assert tpj == sorted(tpj, reverse=True) and tpj[0] > 10 * tpj[-1]
    assert rows["dense-only digital"]["digital_share_pct"] == pytest.approx(5.398, abs=1e-3)
    assert rows["dense + 25% experts digital"]["digital_share_pct"] == pytest.approx(28.676, abs=1e-3)
    # 16 layers x 64 experts x (fused gate/up [2048, 2048] = 16 tiles + down [2048, 1024] = 8 tiles)
    assert rows["dense-only digital"]["tiles"] == 16 * 64 * 24 == 24576
    shapes, _ = olmoe_1b_7b()
    assert shapes.total_params == 6_919_161_856


def test_pareto_front():
    e = [1.0, 2.0, 3.0, 2.5, 0.5]
    acc = [0.5, 0.7, 0.9, 0.6, 0.2]
    assert pareto_front(e, acc).tolist() == [4, 0, 1, 2]
    assert pareto_front(e, [5.0, 6.0, 3.0, 4.5, 6.0], higher_is_better=False).tolist() == [4, 0, 3, 2]


def test_bad_input(tiny):
    _, _, s = tiny
    p = reference_placements(s)["all_digital"]
    for b in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch must be an integer >= 1"):
            cost(s, p, "h100+pcm", b)
    with pytest.raises(ValueError, match="unknown hardware 'tpu'; choose one of h100"):
        cost(s, p, "tpu")
    with pytest.raises(ValueError, match="unknown AnalogConfig field"):
        get_hardware("h100+pcm", analog={"tile": 3})
    with pytest.raises(ValueError, match="hbm_bandwidth=0"):
        get_hardware("h100+pcm", digital={"hbm_bandwidth": 0})
    assert set(HARDWARE) >= {"h100+pcm", "a100+pcm"}


def test_cli_energy(capsys):
    from hetmoe_core.cli import main
    assert main(["energy", "tiny:olmoe", "--budget", "0.25", "--batch", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for k in ("energy_per_token_j", "tokens_per_s", "tiles", "chips", "digital_bytes", "citations", "references"):
        assert k in out
    assert out["batch"] == 8 and out["tiles"] == 2 * 6 * 2 and out["chips"] == 2   # 6 analog experts x 2 tiles
    assert "Le Gallo" in out["citations"]["analog.mvm_energy"]
    assert main(["place", "tiny:olmoe", "--budget", "0.25", "--json"]) == 0
    placed = json.loads(capsys.readouterr().out)
    assert placed["energy"]["batch"] == 32 and placed["energy"]["tiles"] == out["tiles"]      # tiles: batch-free
    assert placed["energy"]["energy_per_token_j"] < out["energy_per_token_j"]      # weights shared by 32 tokens
    for argv, msg in ((["--batch", "0"], "batch must be an integer >= 1"),
                      (["--hardware", "tpu"], "unknown hardware 'tpu'")):
        assert main(["energy", "tiny:olmoe", "--budget", "0.25", *argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1


def test_placement_page_energy_live(tmp_path, monkeypatch):
    """Placement page (AppTest, default model): energy per token follows the budget slider, the batch slider and
    an edited hardware constant."""
    from pathlib import Path
    from streamlit.testing.v1 import AppTest
    monkeypatch.setenv("HETMOE_STORE", str(tmp_path / "results.duckdb"))
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=120).run()
    at.switch_page("pages/placement.py").run()

    def uj():
        assert not at.exception, [e.value for e in at.exception]
        return float(next(m.value for m in at.metric if m.label == "Energy per token").split()[0])
    e0 = uj()
    at.slider(key="budget_pct").set_value(100.0).run()
    e100 = uj()
    assert e100 > e0 and next(m.value for m in at.metric if m.label == "AIMC tiles") == "0"
    at.number_input(key="hw_h100+pcm_digital_hbm_energy").set_value(2 * 31.76).run()
    assert uj() > 1.5 * e100                       # HBM traffic dominates an all-digital decode step
    tps = lambda: float(next(m.value for m in at.metric if m.label == "Throughput (tokens/s)").replace(",", ""))
    t32 = tps()
    at.select_slider(key="energy_batch").set_value(1).run()
    assert tps() < t32 / 4                         # batch 1: memory-bound, each weight fetch serves one token


def test_stored_runs_energy_and_report(tiny, tmp_path):
    """Results store -> energy per configuration (run_costs, config_points) -> the HTML report's figure."""
    from hetmoe_core.energy import config_points, run_costs
    from hetmoe_core.report import write_report
    from hetmoe_core.store import Store
    _, a, s = tiny
    st = Store(tmp_path / "r.duckdb")
    i = 0
    for b, acc in ((0.0, 0.40), (0.25, 0.46), (0.5, 0.45), (1.0, 0.50)):
        p = place(a, "maxnn", b)
        for seed in (0, 1):
            st.put_result(f"k{i}", {"model_source": "tiny:olmoe", "model_fingerprint": "tiny:olmoe:seed0",
                                    "strategy": "maxnn", "budget": b, "scope": "layer", "preset": "paper-pcm-c1.5",
                                    "seed": seed, "backend": "fast", "task": "hetmoe_cloze", "placement_key": p.key},
                          [{"task": "hetmoe_cloze", "metric": "acc", "value": acc + seed / 100, "seed": seed}],
                          {"key": p.key, "model_fingerprint": "tiny:olmoe:seed0", "strategy": "maxnn", "budget": b,
                           "scope": "layer", "seed": 0, "placement": p.to_json()})
            i += 1
    runs, note = run_costs(st, "tiny:olmoe:seed0", "h100+pcm", 32)   # no shapes stored: built from the config
    assert note == ("uniform routing, batch 32; model shapes built from its config: the store holds none for this "
                    "model (made before hetmoe stored them)")
    built = runs.energy_per_token_j.tolist()
    assert st.put_model_shapes("tiny:olmoe:seed0", "tiny:olmoe", s.to_dict())   # as evaluate stores them
    runs, note = run_costs(st, "tiny:olmoe:seed0", "h100+pcm", 32)
    assert note == "uniform routing, batch 32" and runs.energy_per_token_j.tolist() == built
    pts = config_points(runs).sort_values("budget")
    assert pts.n_seeds.tolist() == [2] * 4 and pts["mean"].tolist() == pytest.approx([0.405, 0.465, 0.455, 0.505])
    assert pts.energy_per_token_j.tolist() == pytest.approx(
        [cost(s, place(a, "maxnn", b), "h100+pcm", 32).energy_per_token_j for b in (0.0, 0.25, 0.5, 1.0)])
    # budget 0.5 costs more than 0.25 and scores lower: off the Pareto front
    assert pareto_front(pts.energy_per_token_j, pts["mean"]).tolist() == [0, 1, 3]
    rep = write_report(st, tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert rep["energy_figures"] == 1 and "vs energy per token" in html and "Pareto front" in html


@pytest.mark.parametrize("source", ["default", "tiny:olmoe", "tiny:qwen2_moe", "tiny:deepseek_v3"])
def test_stored_shapes_are_the_meta_models(source, tmp_path):
    """The shapes evaluate stores (keep_shapes: from the loaded model) read back from the store exactly as the
    meta-device route builds them from the config (shapes_from_source), through the store's JSON."""
    from hetmoe_core.energy import keep_shapes, shapes_from_source, stored_shapes
    from hetmoe_core.models import load_model
    from hetmoe_core.store import Store
    lm = load_model(source, tokenizer=False)
    st = Store(tmp_path / "s.duckdb")
    assert keep_shapes(st, lm) and not keep_shapes(st, lm)          # append-only: once per fingerprint
    got = stored_shapes(Store(tmp_path / "s.duckdb", read_only=True), lm.fingerprint)
    meta, _ = shapes_from_source(source)
    assert got == meta == shapes_of(lm.model, lm.anatomy, source)
    assert got.total_params == lm.anatomy.total_params and len(got.moe) == len(lm.anatomy.moe_layers)


def test_malformed_stored_shapes_are_refused_with_one_line(tiny):
    from hetmoe_core.energy import ModelShapes
    d = tiny[2].to_dict()
    assert ModelShapes.from_dict(json.loads(json.dumps(d))) == tiny[2]
    with pytest.raises(ValueError, match="lack or mistype 'moe'"):
        ModelShapes.from_dict({k: v for k, v in d.items() if k != "moe"})
    with pytest.raises(ValueError, match="top_k must be an integer >= 1, got 0"):
        ModelShapes.from_dict({**d, "moe": [{**d["moe"][0], "top_k": 0}]})
    with pytest.raises(ValueError, match=r"expert matrices must be a non-empty list of \[rows, cols\] pairs"):
        ModelShapes.from_dict({**d, "moe": [{**d["moe"][0], "matrices": [[16, 32, 1]]}]})


def test_tiles_match_the_analog_backends_coverage(tiny):
    """Tiles counted by the cost model == tiles the analog context reports for the same placement (ideal noise)."""
    from hetmoe_core.analog import analog
    from hetmoe_core.noise import get_preset
    from hetmoe_core.placement import DensePolicy
    model, a, s = tiny
    p = place(a, "maxnn", 0.25, dense=DensePolicy(attention=False, lm_head=False))
    noise = get_preset("ideal", tile_size=16)
    with analog(model, a, p, noise, seed=0) as rep:
        covered = rep.tiles
    c = cost(s, p, get_hardware("h100+pcm", analog={"tile_size": 16}))
    assert c.tiles == covered > 0


def test_energy_module_cli_bad_batch_is_one_line(capsys):
    """`python -m hetmoe_core.energy h100+pcm abc` (or 0, -5): one line saying what to pass, exit code 2."""
    from hetmoe_core.energy import main
    for batch in ("abc", "0", "-5"):
        assert main(["h100+pcm", batch]) == 2
        err = capsys.readouterr().err
        assert "batch must be an integer >= 1" in err and repr(batch) in err and len(err.strip().splitlines()) == 1
    assert main(["tpu"]) == 2 and "unknown hardware 'tpu'" in capsys.readouterr().err
    assert main(["h100+pcm", "8"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 4 and all("tokens/J" in r for r in rows)


def test_edited_preset_is_priced_on_the_results_energy_chart(tmp_path, monkeypatch):
    """An edited preset (``--set adc_bits=6 --set t_inference=3600``) is labelled on the Results page's table and
    filters as ``paper-pcm-c1.5 (adc_bits=6, t_inference=3600)``; run_costs labels its rows the same way, so the
    accuracy-vs-energy chart shows it (it showed only the ideal point), apart from the unedited preset's point."""
    import subprocess
    import sys
    from pathlib import Path
    from streamlit.testing.v1 import AppTest
    from hetmoe_core.energy import config_points, run_costs, unpriced
    from hetmoe_core.store import Store
    root = Path(__file__).resolve().parent.parent
    db = tmp_path / "r.duckdb"
    base = [sys.executable, "-m", "hetmoe_core", "evaluate", "tiny:olmoe", "--tasks", "hetmoe_cloze", "--limit", "5",
            "--store", str(db)]
    for extra in ([], ["--set", "adc_bits=6", "--set", "t_inference=3600"]):
        out = subprocess.run(base + extra, capture_output=True, text=True, cwd=root, timeout=300)
        assert out.returncode == 0, out.stderr
    st = Store(db, read_only=True)
    summary = st.summary_frame()
    edited = "paper-pcm-c1.5 (adc_bits=6, t_inference=3600)"
    assert set(summary.preset) == {"ideal", "paper-pcm-c1.5", edited}
    runs, note = run_costs(st, "tiny:olmoe:seed0")
    assert note == "uniform routing, batch 32" and unpriced(runs) == []
    assert set(runs.preset) == set(summary.preset) and set(runs.preset_name) == {"ideal", "paper-pcm-c1.5"}
    pts = config_points(runs[runs.metric == "acc"])
    assert sorted(pts.preset) == sorted(["ideal", "paper-pcm-c1.5", edited])      # never averaged together
    assert pts.energy_per_token_j.notna().all() and (pts.n_seeds == 1).all()
    acc = summary[summary.metric == "acc"].set_index("preset")["mean"]
    assert pts.set_index("preset")["mean"].to_dict() == pytest.approx(acc.to_dict())
    from hetmoe_core.results import paired_runs          # the paired statistics keep the two presets apart too
    both = paired_runs(st.runs_frame({}), "acc", 5, ["paper-pcm-c1.5", edited], ["maxnn"], ["fast"])
    assert both.groupby("preset").size().to_dict() == {"ideal": 1, "paper-pcm-c1.5": 1, edited: 1}
    only = paired_runs(st.runs_frame({}), "acc", 5, [edited], ["maxnn"], ["fast"])
    assert set(only.preset) == {"ideal", edited}

    monkeypatch.setenv("HETMOE_STORE", str(db))
    at = AppTest.from_file(str(root / "app.py"), default_timeout=120).run()
    at.switch_page("pages/results.py").run()
    assert not at.exception and at.selectbox(key="res_limit").value == 5
    at.selectbox(key="res_metric").set_value("acc").run()
    assert edited in at.multiselect(key="res_presets").value
    fig = json.loads(next(c for c in at.get("plotly_chart") if c.proto.id.endswith("res_energy")
                          or "energy per token" in c.proto.spec).proto.spec)
    names = {t.get("name") for t in fig["data"]}
    assert any(n and n.endswith(edited) for n in names), names
    assert any(n and n.endswith("· paper-pcm-c1.5") for n in names), names
    assert not any("Not on this chart" in c.value for c in at.caption)
