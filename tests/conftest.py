import os
import shutil
from pathlib import Path

import pytest

# Tests never touch the network: the Hugging Face hub is unreachable here and in CI.
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def store_env(tmp_path, monkeypatch):
    """A fresh results store for the dashboard (HETMOE_STORE points at it); returns its path."""
    path = tmp_path / "results.duckdb"
    monkeypatch.setenv("HETMOE_STORE", str(path))
    return path


@pytest.fixture(scope="session")
def example_results(tmp_path_factory):
    """``write(path)``: puts a results store holding the example results (what "Load example results" loads, by
    ``examples.load_examples``) at ``path`` and returns ``path``. The store is loaded once per session and copied
    (a load costs ~1.5 s, a copy ~0.05 s); each caller gets its own file."""
    from hetmoe_core.examples import load_examples
    from hetmoe_core.store import Store
    template = tmp_path_factory.mktemp("examples") / "results.duckdb"
    load_examples(Store(template))

    def write(path):
        shutil.copyfile(template, path)
        return Path(path)
    return write
