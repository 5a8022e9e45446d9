"""Loaders for the hetmoe_* lm-eval local tasks.

The data sits next to this file, so the tasks work from any working directory
and fully offline: TaskManager(include_path=<this folder>) is all that is needed.
Built by scripts/build_corpus.py from TEST-split documents only.
"""
import json
import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name, domain=None, **_):
    with open(os.path.join(HERE, f"{name}.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    if domain:
        rows = [r for r in rows if r["domain"] == domain]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_cloze(**kwargs):
    return _load("hetmoe_cloze", **kwargs)


def load_choice(**kwargs):
    return _load("hetmoe_choice", **kwargs)


def load_ppl(**kwargs):
    return _load("hetmoe_ppl", **kwargs)
