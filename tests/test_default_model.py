"""The embedded default model and its held-out lm-eval tasks work offline.

Run: HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 pytest tests/test_default_model.py
"""
import json
import os

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")

import pytest
import torch
from transformers import AutoTokenizer, OlmoeForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "hetmoe_core", "assets", "default")
TASKS = os.path.join(ROOT, "hetmoe_core", "assets", "tasks")


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    return OlmoeForCausalLM.from_pretrained(DEFAULT, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DEFAULT)


@pytest.fixture(scope="module")
def metrics():
    with open(os.path.join(DEFAULT, "metrics.json")) as f:
        return json.load(f)


def test_default_assets_load_offline(model, tok):
    cfg = model.config
    assert cfg.model_type == "olmoe"
    assert cfg.num_hidden_layers >= 4 and cfg.num_experts >= 16 and cfg.num_experts_per_tok >= 2
    assert next(model.parameters()).dtype == torch.float32  # stored bf16, upcast on load
    assert os.path.getsize(os.path.join(DEFAULT, "model.safetensors")) <= 25 * 2**20
    assert tok.eos_token is not None and tok.pad_token is not None
    assert tok.decode(tok("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"


def test_validation_slice_loss_matches_record(model, metrics):
    sl = metrics["val_slice"]
    x = torch.tensor(sl["input_ids"])
    with torch.no_grad():
        loss = model(input_ids=x, labels=x).loss.item()
    assert loss == pytest.approx(sl["loss"], rel=1e-3)


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    # include_defaults=False: indexing lm-eval's ~10k built-in yamls costs ~20 s and is not needed
    return TaskManager(include_path=TASKS, include_defaults=False)


def test_task_yamls_parse(task_manager):
    names = set(task_manager.all_tasks)
    assert {"hetmoe_cloze", "hetmoe_choice", "hetmoe_ppl", "hetmoe_ppl_pycode"} <= names


def test_lm_eval_runs_derived_tasks_offline(model, tok, task_manager):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=10, max_length=model.config.max_position_embeddings)
    res = simple_evaluate(model=lm, tasks=["hetmoe_cloze", "hetmoe_choice"], limit=10, bootstrap_iters=0,
                          task_manager=task_manager)
    r = res["results"]
    for task, metric in (("hetmoe_cloze", "acc,none"), ("hetmoe_choice", "acc,none"), ("hetmoe_choice", "acc_norm,none")):
        assert 0.0 <= r[task][metric] <= 1.0
