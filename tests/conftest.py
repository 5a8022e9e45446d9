import os

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
