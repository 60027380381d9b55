"""Shared test set-up: a private cache directory, quiet wandb, and paths to the sample corpora."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, triton kernels run through triton's interpreter on CPU tensors (tests/test_kernels.py).
# It must be set before triton is first imported (it decides then, for its own library too), so
# here, for the whole session; model.memory.kernel=auto still takes the torch path on CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = Path(os.environ.get("PKMLM_SAMPLE_DIR", PROJECT_ROOT / "data"))  # data/README.md
WIKI = SAMPLE_DIR / "wiki" / "enwiki2015_first800.jsonl.gz"
C4 = SAMPLE_DIR / "c4" / "c4_en_train_first1000.jsonl.gz"


@pytest.fixture(autouse=True, scope="session")
def _isolated_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("pkmlm-cache")
    old = {k: os.environ.get(k) for k in ("PKMLM_CACHE_DIR", "WANDB_SILENT", "HF_HUB_OFFLINE")}
    os.environ.update({"PKMLM_CACHE_DIR": str(cache), "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"})
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
