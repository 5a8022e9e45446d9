"""Noisy evaluation with honest caching: real lm-eval runs on tiny models, real DuckDB stores, real subprocesses."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hetmoe_core import evaluate as ev
from hetmoe_core.evaluate import evaluate_many, plan, summarize
from hetmoe_core.models import LoadedModel, _tiny_tokenizer, anatomy_of, load_model, tiny_config
from hetmoe_core.paper_tasks import PAPER_TASKS, build_paper_suite
from hetmoe_core.store import Store

ROOT = Path(__file__).resolve().parent.parent
QUICK = dict(strategies=["maxnn"], budgets=[0.25], presets=["paper-pcm-c1.5"], seeds=2, tasks=["paper_arc_easy"],
             limit=3, batch_size=4)


def _count_forwards(model):
    calls = [0]

    def hook(*_):
        calls[0] += 1
    return calls, model.register_forward_hook(hook)


def test_cache_hit_without_forward_and_same_numbers(tmp_path):
    lm = load_model("tiny:olmoe")
    calls, h = _count_forwards(lm.model)
    seen = []
    first = evaluate_many("tiny:olmoe", lm=lm, store=tmp_path / "a.duckdb",
                          progress=lambda d, t, r: seen.append((d, t, r["cached"])), **QUICK)
    ran = calls[0]
    assert ran > 0 and len(first) == 3 and not any(r["cached"] for r in first)
    assert [r["ideal"] for r in first] == [True, False, False] and seen[-1] == (3, 3, False)
    assert first[0]["digital_share"] > first[1]["digital_share"] > 0   # ideal: everything digital
    # speed of a cache hit is measured in bench/bench_sweep.py (cached rerun), not here
    second = evaluate_many("tiny:olmoe", lm=lm, store=tmp_path / "a.duckdb", **QUICK)
    assert calls[0] == ran                                   # not one forward pass
    assert all(r["cached"] for r in second)
    assert [r["metrics"] for r in second] == [r["metrics"] for r in first]
    # without a loaded model, a full cache hit never loads one
    ev._loaded.clear()
    third = evaluate_many("tiny:olmoe", store=tmp_path / "a.duckdb", **QUICK)
    assert all(r["cached"] for r in third) and not ev._loaded
    # same config + same seed into a fresh store: identical numbers, recomputed
    again = evaluate_many("tiny:olmoe", lm=lm, store=tmp_path / "b.duckdb", **QUICK)
    assert calls[0] > ran and [r["metrics"] for r in again] == [r["metrics"] for r in first]
    h.remove()
    s = summarize(second)
    row = next(x for x in s if x["strategy"] == "maxnn" and x["metric"] == "acc_norm")
    assert row["n_seeds"] == 2 and row["cached"] and row["std"] is not None


def test_key_changes_with_every_part_of_the_config(monkeypatch):
    base = dict(strategies=["maxnn"], budgets=[0.25], presets=["paper-pcm-c1.5"], seeds=[0], tasks=["paper_piqa"],
                limit=5, num_fewshot=0, batch_size=8, backend="fast", scope="layer")

    def key(source="tiny:olmoe", **kw):
        specs = plan(source, **{**base, **kw})
        return specs[0].key, specs[1].key       # ideal, noisy

    ideal, noisy = key()
    assert key() == (ideal, noisy)               # same config -> same key
    variants = [dict(strategies=["random"]), dict(budgets=[0.5]), dict(scope="global"),
                dict(dense={"attention": False}), dict(presets=["paper-pcm-c2.5"]),
                dict(preset_overrides={"adc_bits": 6}), dict(seeds=[1]), dict(backend="aihwkit")]
    keys = {noisy}
    for v in variants:
        i, n = key(**v)
        assert i == ideal, v                      # the ideal result does not depend on the noisy setting
        keys.add(n)
    for v in [dict(tasks=["paper_boolq"]), dict(limit=6), dict(num_fewshot=1), dict(batch_size=4),
              dict(source="tiny:mixtral"), dict(dtype="bfloat16"), dict(device="cuda")]:
        i, n = key(**v)
        assert i != ideal, v
        keys.add(n)
    monkeypatch.setattr(ev, "_VERSIONS", {**ev.library_versions(), "lm_eval": "0.0.1"})
    keys.add(key()[1])
    monkeypatch.setattr(ev, "_VERSIONS", {**ev.library_versions(), "hetmoe": "9.9"})
    keys.add(key()[1])
    assert len(keys) == 1 + len(variants) + 7 + 2
    cfg = plan("tiny:olmoe", **base)[1].config()
    assert set(cfg["versions"]) == {"torch", "transformers", "aihwkit", "lm_eval", "hetmoe"}
    assert cfg["noise"]["prog_noise_scale"] == 1.5 and cfg["task"]["version"]   # every preset parameter, task version


@pytest.mark.parametrize("bad,match", [
    (dict(budgets=[1.5]), "budgets"), (dict(strategies=["best"]), "strategies"), (dict(presets=["nope"]), "preset"),
    (dict(seeds=0), "seeds"), (dict(batch_size=0), "batch size"), (dict(limit=-1), "limit"),
    (dict(tasks=""), "no task"), (dict(backend="gpu"), "backend"), (dict(tasks=["no_such_task_zz"]), "unknown task")])
def test_bad_input_clear_error_nothing_stored(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        evaluate_many("tiny:olmoe", store=tmp_path / "r.duckdb", **{**QUICK, **bad})
    if "tasks" not in bad or bad["tasks"] == "":
        assert not (tmp_path / "r.duckdb").exists()
    else:   # registry names are checked after the cache lookup, before any model is loaded
        assert Store(tmp_path / "r.duckdb").counts()["runs"] == 0


def _long_tiny():
    """Tiny OLMoE with 4096 positions: the byte-level tiny tokenizer makes paper prompts long."""
    import torch
    from transformers import AutoModelForCausalLM
    cfg = tiny_config("olmoe")
    cfg.max_position_embeddings = 4096
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return LoadedModel(model, _tiny_tokenizer(), anatomy_of(model), "tiny-long", "test:tiny-olmoe-4096")


def test_paper_suite_builds_with_lm_eval_prompts_and_runs(tmp_path):
    built = build_paper_suite()
    sizes = {k: v["docs"] for k, v in built["tasks"].items()}
    assert sizes == {"paper_arc_easy": 2376, "paper_arc_challenge": 1172, "paper_boolq": 3270,
                     "paper_hellaswag": 10042, "paper_piqa": 1838, "paper_winogrande": 1267, "paper_mmlu": 14042}
    assert "MathQA" in built["missing"]
    from lm_eval.tasks import TaskManager
    tm = TaskManager(include_path=built["path"], include_defaults=False)
    tasks = tm.load(list(PAPER_TASKS))["tasks"]
    prompts = {}
    for name, task in tasks.items():
        task.set_config("num_fewshot", 0)
        doc = next(iter(task.test_docs() if task.has_test_docs() else task.validation_docs()))
        prompts[name] = (task.fewshot_context(doc, 0), task.doc_to_choice(doc), task.doc_to_target(doc))
    q, choices, gold = prompts["paper_arc_easy"]
    assert q.startswith("Question: ") and q.endswith("\nAnswer:") and len(choices) == 4 and 0 <= gold < 4
    q, choices, _ = prompts["paper_boolq"]
    assert " -- " in q and q.endswith("?\nAnswer:") and choices == ["no", "yes"]
    q, choices, _ = prompts["paper_piqa"]
    assert q.startswith("Question: How do I ready a guinea pig cage") and len(choices) == 2
    q, choices, _ = prompts["paper_hellaswag"]
    assert q == "Roof shingle removal: A man is sitting on a roof. He" and len(choices) == 4
    q, choices, target = prompts["paper_winogrande"]     # lm-eval's partial scoring: contexts per option
    assert choices == ["Sarah was a much better surgeon than Maria so Sarah",
                       "Sarah was a much better surgeon than Maria so Maria"] and target == "always got the easier cases."
    q, choices, _ = prompts["paper_mmlu"]
    assert q.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert q.endswith("\nD. 6\nAnswer:") and choices == ["A", "B", "C", "D"]
    # and all seven run end to end (limit 2) under noise, with the ideal reference
    res = evaluate_many("tiny-long", lm=_long_tiny(), store=tmp_path / "p.duckdb", strategies=["maxnn"],
                        budgets=[0.0], presets=["paper-dac-adc-8bit"], seeds=1, tasks="paper", limit=2,
                        include_ideal=False)
    assert len(res) == 7 and {r["task"] for r in res} == set(PAPER_TASKS)
    for r in res:
        assert 0 <= r["metrics"]["acc"] <= 1


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "hetmoe_core", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_cli_evaluate_stores_then_says_cached(tmp_path):
    db = str(tmp_path / "r.duckdb")
    ev_args = ["evaluate", "default", "--strategy", "maxnn", "--budget", "0.25", "--preset", "paper-pcm-c1.5",
               "--seeds", "1", "--tasks", "paper_arc_easy", "--limit", "2", "--store", db, "--json"]
    out, err = _cli(*ev_args).communicate(timeout=300)
    first = json.loads(out)
    assert first["computed"] == 2 and first["cached"] == 0, err
    out, _ = _cli(*ev_args).communicate(timeout=300)
    second = json.loads(out)
    assert second["computed"] == 0 and all(r["cached"] for r in second["results"])
    assert [r["metrics"] for r in second["results"]] == [r["metrics"] for r in first["results"]]


def test_background_thread_progress_and_cancel(tmp_path):
    """The dashboard's way: evaluate_many in a thread, cached results reported at once, cancel mid-sweep."""
    import threading
    lm = load_model("tiny:olmoe")
    db = tmp_path / "t.duckdb"
    evaluate_many("tiny:olmoe", lm=lm, store=db, **{**QUICK, "seeds": 1})      # ideal + seed 0 cached
    cancel, seen, out = threading.Event(), [], {}

    def progress(done, total, r):
        seen.append((done, total, r["cached"]))
        if not r["cached"]:
            cancel.set()          # stop after the first computed result

    t = threading.Thread(target=lambda: out.update(r=evaluate_many(
        "tiny:olmoe", lm=lm, store=db, progress=progress, cancel=cancel, **{**QUICK, "seeds": 4})))
    t.start()
    t.join(120)
    assert not t.is_alive()
    assert seen[:2] == [(1, 5, True), (2, 5, True)]                 # cached first, before any model work
    assert [c for _, _, c in seen[2:]] == [False] and len(out["r"]) == 3
    st = Store(db)
    assert st.counts()["runs"] == 3 and st.counts()["metrics"] == 6  # whole results only


def test_perplexity_tasks_noise_moves_scores_per_seed(tmp_path):
    """Per-domain perplexity (rolling log-likelihood): the noisy model scores differ from the ideal and per seed."""
    import torch
    assert "hetmoe_ppl_sotu" in ev.task_aliases()["ppl"]
    lm = load_model("tiny:olmoe")
    with torch.no_grad():   # random 0.05-scale weights predict near-uniformly; x10 makes noise visible in the score
        for p in lm.model.parameters():
            if p.dim() >= 2:
                p.mul_(10)
    lm = LoadedModel(lm.model, lm.tokenizer, lm.anatomy, "tiny-x10", "test:tiny-olmoe-x10")
    res = evaluate_many("tiny-x10", lm=lm, store=tmp_path / "p.duckdb", strategies=["maxnn"], budgets=[0.0],
                        presets=["paper-pcm-c2.5"], seeds=2, tasks=["hetmoe_ppl_sotu"], limit=1)
    ideal, s0, s1 = (r["metrics"] for r in res)
    assert set(ideal) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert ideal["bits_per_byte"] > 0 and ideal["byte_perplexity"] > 1
    assert len({ideal["bits_per_byte"], s0["bits_per_byte"], s1["bits_per_byte"]}) == 3


def test_built_tasks_give_the_numbers_of_a_fresh_build():
    """lm-eval Task objects kept per model (tasks._built_tasks: no document reading per result) give the numbers of
    a fresh build whatever ran on them before: another limit, another few-shot count; their kept config dump is
    the one lm-eval makes."""
    from types import SimpleNamespace
    from hetmoe_core.tasks import _run_task, quiet_hflm, resolve_tasks
    lm = load_model("tiny:olmoe")
    hflm = quiet_hflm(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=4)
    for name in ("paper_arc_easy", "hetmoe_choice"):
        (ref,) = resolve_tasks([name])
        built: dict = {}
        for limit, shots in ((2, 0), (3, 1), (2, 0), (3, None)):
            spec = SimpleNamespace(limit=limit, num_fewshot=shots)
            assert _run_task(hflm, ref, spec, built) == _run_task(hflm, ref, spec), (name, limit, shots)
        assert len(built) == 3 and all(len(v) == 1 for v in built.values())   # one build per few-shot count
        for (task,) in built.values():   # the kept config dump (tasks._config_once) is lm-eval's own
            assert "dump_config" in vars(task) and task.dump_config() == type(task).dump_config(task)


def test_kept_requests_give_the_numbers_of_a_fresh_build(monkeypatch, caplog):
    """A kept zero-shot lm-eval task builds its requests once per limit (tasks._requests_once) and every later call
    runs fresh copies of them: the numbers of lm-eval's own build each call, for a local and a paper task; a
    few-shot task builds them every call. Each kept task lists its documents once per limit (tasks._docs_once).
    lm-eval's list of selected tasks is built only when its logger shows INFO (tasks._task_log_when_shown), and
    then it is logged."""
    import logging
    from types import SimpleNamespace
    from lm_eval.api.task import ConfigurableTask
    from hetmoe_core.tasks import _run_task, quiet_hflm, resolve_tasks
    builds = []
    real = ConfigurableTask.build_all_requests

    def counted(self, **kw):
        builds.append((self.config.task, kw["limit"]))
        return real(self, **kw)
    monkeypatch.setattr(ConfigurableTask, "build_all_requests", counted)
    lm = load_model("tiny:olmoe")
    hflm = quiet_hflm(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=4)
    for name, shots in (("hetmoe_cloze", 0), ("paper_arc_easy", 0), ("paper_arc_easy", 2)):
        (ref,) = resolve_tasks([name])
        built: dict = {}
        for limit in (2, 3, 2, 2, 3):
            spec = SimpleNamespace(limit=limit, num_fewshot=shots)
            n = len(builds)
            kept = _run_task(hflm, ref, spec, built)
            mine = len(builds) - n
            assert kept == _run_task(hflm, ref, spec), (name, shots, limit)   # lm-eval's own build
            assert len(builds) - n == mine + 1 and any(r["value"] > 0 for r in kept)
        (task,) = built[(ref.name, ref.include_path, shots)]
        own = [b for b in builds if b[0] == task.config.task]
        assert sorted(task.doc_iterator.kept) == [(0, 2, 1), (0, 3, 1)]   # documents listed once per limit
        assert [d for _, d in task.doc_iterator.kept[(0, 2, 1)]] == list(task.eval_docs)[:2]
        if shots == 0:   # two kept builds (limits 2 and 3) for five calls, each request fresh per call
            assert sorted(k[0][0] for k in task.build_all_requests.kept) == [("fewshot_as_multiturn", True)] * 2
            assert all(not i.resps and not i.filtered_resps for v in task.build_all_requests.kept.values() for i in v)
            assert len(own) == 2 + 5 and task.instances[0] is not next(iter(task.build_all_requests.kept.values()))[0]
        else:
            assert not task.build_all_requests.kept and len(own) == 10 and ("paper_arc_easy", 2) in builds
        builds.clear()
    (ref,) = resolve_tasks(["hetmoe_cloze"])
    spec = SimpleNamespace(limit=1, num_fewshot=0)
    with caplog.at_level(logging.INFO, logger="lm_eval.evaluator_utils"):
        _run_task(hflm, ref, spec, {})
    assert "Task: hetmoe_cloze" in caplog.text
    caplog.clear()
    _run_task(hflm, ref, spec, {})
    assert "Task: hetmoe_cloze" not in caplog.text


def test_kept_template_compiles_give_lm_evals_numbers(monkeypatch):
    """lm-eval's prompt templates compiled once per process (tasks._templates_once) render the prompts lm-eval's own
    per-call compile renders: the same metrics on a local task and a few-shot paper task, with the kept compiles
    actually reused."""
    from types import SimpleNamespace
    from lm_eval import utils
    from hetmoe_core import tasks
    lm = load_model("tiny:olmoe")
    hflm = tasks.quiet_hflm(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=4)
    for name, shots in (("hetmoe_cloze", 0), ("paper_arc_easy", 2)):
        (ref,) = tasks.resolve_tasks([name])
        spec = SimpleNamespace(limit=3, num_fewshot=shots)
        tasks._run_task(hflm, ref, spec)
        kept = utils.apply_template.compiled.cache_info().hits
        memo = tasks._run_task(hflm, ref, spec)
        assert utils.apply_template.compiled.cache_info().hits > kept   # the second call compiled nothing anew
        with monkeypatch.context() as m:   # lm-eval's own apply_template, compiling every call
            m.setattr(utils, "apply_template", utils.apply_template.lm_eval_apply_template)
            m.setattr(tasks, "_templates_once", lambda: None)
            plain = tasks._run_task(hflm, ref, spec)
        assert memo == plain and any(r["value"] > 0 for r in memo), name



def test_kept_token_ids_and_cpu_seeding_give_lm_evals_numbers(monkeypatch):
    """The wrapper's kept token ids (quiet_hflm's tok_encode) and the CPU-only torch seeding (tasks._torch_seed_cheap)
    give lm-eval's own numbers: a loglikelihood task, a rolling-perplexity task and a few-shot paper task scored
    from the kept ids equal lm-eval's HFLM encoding every string with its own torch.manual_seed; the second run
    encodes nothing anew; the cheap seeding leaves torch's generator in torch.manual_seed's state."""
    from types import SimpleNamespace
    import torch
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from hetmoe_core import tasks
    lm = load_model("tiny:olmoe")
    hflm = tasks.quiet_hflm(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=4)
    plain = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=4)
    encodes = [0]
    real = HFLM.tok_encode

    def counted(self, *a, **k):
        encodes[0] += 1
        return real(self, *a, **k)
    monkeypatch.setattr(HFLM, "tok_encode", counted)
    for name, shots in (("hetmoe_cloze", 0), ("hetmoe_ppl_pycode", 0), ("paper_arc_easy", 2)):
        (ref,) = tasks.resolve_tasks([name])
        spec = SimpleNamespace(limit=3, num_fewshot=shots)
        first = tasks._run_task(hflm, ref, spec)
        n = encodes[0]
        kept = tasks._run_task(hflm, ref, spec)
        assert encodes[0] == n and len(hflm._hetmoe_tokens.entries) > 0, name   # every id from the kept ones
        assert evaluator.set_torch_seed.hetmoe_cheap
        with monkeypatch.context() as m:   # lm-eval's own seeding and encoding
            m.setattr(evaluator, "set_torch_seed", evaluator.set_torch_seed.lm_eval_set_torch_seed)
            m.setattr(tasks, "_torch_seed_cheap", lambda: None)
            own = tasks._run_task(plain, ref, spec)
        assert first == kept == own and any(r["value"] > 0 for r in own), name
    torch.manual_seed(1234)
    want = torch.get_rng_state()
    torch.rand(3)
    evaluator.set_torch_seed(1234)
    assert torch.equal(torch.get_rng_state(), want)


def test_log_softmax_at_scored_positions_gives_lm_evals_numbers(monkeypatch):
    """The quiet wrapper takes the log-softmax over the vocabulary only at the positions lm-eval scores
    (tasks._Logits): the rows equal those of lm-eval's whole-batch log-softmax bit for bit (float32, bfloat16, with
    lm-eval's softmax dtype), every loglikelihood request goes that way (a cloze answer's over fewer positions than
    its row), and a loglikelihood task, a rolling perplexity task and a few-shot paper task score as lm-eval's own
    HFLM does."""
    from types import SimpleNamespace
    import torch
    import torch.nn.functional as F
    from lm_eval.models.huggingface import HFLM
    from hetmoe_core import tasks
    x = torch.randn(3, 9, 4096, generator=torch.Generator().manual_seed(0)) * 6
    for dt, sd in ((torch.float32, None), (torch.bfloat16, torch.float32), (torch.bfloat16, None)):
        rows = F.log_softmax(tasks._Logits(x.to(dt)), dim=-1, dtype=sd)
        full = F.log_softmax(x.to(dt), dim=-1, dtype=sd)
        assert [r.shape for r in rows] == [full[0].shape] * 3
        for r, f, (s0, s1) in zip(rows, full, ((6, 9), (0, 1), (2, 7))):
            assert torch.equal(r.log_softmax(r.raw[s0:s1]), f[s0:s1])
    assert torch.equal(F.softmax(tasks._Logits(x), dim=-1), F.softmax(x, dim=-1))   # anything else: unchanged
    lm = load_model("tiny:olmoe")
    hflm = tasks.quiet_hflm(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=4)
    plain = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=4)
    scored = []
    real = tasks._RowLogits.log_softmax

    def counted(self, sliced):
        scored.append(sliced.shape[0] < self.raw.shape[0] or self.raw.shape[0] == 1)
        return real(self, sliced)
    monkeypatch.setattr(tasks._RowLogits, "log_softmax", counted)
    for name, shots in (("hetmoe_cloze", 0), ("hetmoe_ppl_pycode", 0), ("paper_arc_easy", 2)):
        (ref,) = tasks.resolve_tasks([name])
        spec = SimpleNamespace(limit=3, num_fewshot=shots)
        n = len(scored)
        mine = tasks._run_task(hflm, ref, spec)
        assert len(scored) > n and not hflm._hetmoe_rows, name
        assert mine == tasks._run_task(plain, ref, spec) and any(r["value"] > 0 for r in mine), name
        if name == "hetmoe_cloze":   # a cloze answer is a few tokens after its context: fewer positions than the row
            assert all(scored[n:]), scored[n:]

def test_units_of_a_seed_run_in_a_chain_of_near_placements(tmp_path):
    """Within one (noise, seed) the units run so that consecutive placements differ in fewer experts than in the
    planned order (the fast backend copies only changed experts), every unit once, the first one first; the sweep
    run that way stores the numbers each result gets alone."""
    from hetmoe_core.sweep import units
    lm = load_model("tiny:olmoe")
    kw = dict(strategies=["maxnn", "random"], budgets=[0.25, 0.5, 0.75], presets=["paper-pcm-c2.5"], seeds=[0],
              tasks=["hetmoe_cloze"], limit=1, include_ideal=False)
    groups = ev._seed_major(units(plan("tiny:olmoe", fingerprint=lm.fingerprint, **kw)))
    placed = {id(g): ev._unit_placement(lm, None, g[0], None, {}) for g in groups}
    chained = ev._chained(groups, placed)

    def changes(order):
        sets = [{(n, e) for n, d in enumerate(placed[id(g)].digital) for e in d} for g in order]
        return sum(len(a ^ b) for a, b in zip(sets, sets[1:]))
    assert sorted(map(id, chained)) == sorted(map(id, groups)) and chained[0] is groups[0]
    assert changes(chained) < changes(groups)
    res = evaluate_many("tiny:olmoe", lm=lm, store=tmp_path / "a.duckdb", **kw)
    alone = [evaluate_many("tiny:olmoe", lm=lm, store=tmp_path / f"{i}.duckdb", **{**kw, "strategies": [r["strategy"]],
                                                                                   "budgets": [r["budget"]]})[0]
             for i, r in enumerate(res[:3])]
    assert [r["metrics"] for r in res[:3]] == [r["metrics"] for r in alone]


def test_a_second_sweep_at_a_seed_starts_its_chain_near_the_last_placement(tmp_path):
    """A sweep keeps, per (noise, seed, backend), the digital set of the unit it ran last on the model; the next
    sweep there starts its chain at its unit nearest to that set (the fused tensors still hold it), with fewer
    changed experts in all than from its first unit, and stores the same numbers as without it."""
    from hetmoe_core.sweep import units
    lm = load_model("tiny:olmoe")
    kw = dict(strategies=["maxnn", "random"], presets=["paper-pcm-c2.5"], seeds=[7], tasks=["hetmoe_cloze"], limit=1,
              include_ideal=False)
    evaluate_many("tiny:olmoe", lm=lm, store=tmp_path / "a.duckdb", budgets=[0.125, 0.25, 0.75], **kw)
    last = ev._state(lm)["last_digital"]
    (k,) = [k for k in last if k[1] == 7]
    groups = ev._seed_major(units(plan("tiny:olmoe", fingerprint=lm.fingerprint, budgets=[0.375, 0.5, 0.625], **kw)))
    placed = {id(g): ev._unit_placement(lm, None, g[0], None, {}) for g in groups}
    sets = {id(g): ev._digital_set(placed[id(g)]) for g in groups}
    chained = ev._chained(groups, placed, {k: last[k]})
    near = min(groups, key=lambda g: len(last[k] ^ sets[id(g)]))

    def changes(order):
        return len(last[k] ^ sets[id(order[0])]) + sum(len(sets[id(a)] ^ sets[id(b)]) for a, b in zip(order, order[1:]))
    assert chained[0] is near and sorted(map(id, chained)) == sorted(map(id, groups))
    assert changes(chained) < changes(ev._chained(groups, placed)) and len(last[k] ^ sets[id(groups[0])]) > 0
    second = evaluate_many("tiny:olmoe", lm=lm, store=tmp_path / "a.duckdb", budgets=[0.375, 0.5, 0.625], **kw)
    assert last[k] == sets[id(chained[-1])]   # where the next sweep's chain will start
    last.clear()   # without the kept set: the chain starts at the first unit; the same numbers
    again = evaluate_many("tiny:olmoe", lm=lm, store=tmp_path / "b.duckdb", budgets=[0.375, 0.5, 0.625], **kw)
    assert [r["metrics"] for r in second] == [r["metrics"] for r in again] and not any(r["cached"] for r in again)


def test_cli_evaluate_rerun_prints_the_same_rows_in_the_same_order(tmp_path, capsys):
    """A rerun answered from the store lists its rows as the first run did (plan order, metrics by name): before,
    stored results listed their metrics in another order than the freshly computed ones."""
    from hetmoe_core.cli import main
    argv = ["evaluate", "tiny:olmoe", "--strategy", "maxnn,random", "--budget", "0.5", "--seeds", "1",
            "--tasks", "hetmoe_ppl_sotu", "--limit", "2", "--no-ideal", "--store", str(tmp_path / "r.duckdb")]
    rows = []
    for _ in range(2):
        assert main(argv) == 0
        rows.append([ln.removesuffix(" cached").split()[:3] for ln in capsys.readouterr().out.splitlines()[:-1]])
    assert rows[0] == rows[1] and len(rows[0]) == 6
    assert [r[1] for r in rows[0][:3]] == ["bits_per_byte", "byte_perplexity", "word_perplexity"]
    assert [r[2] for r in rows[0]] == ["maxnn"] * 3 + ["random"] * 3
