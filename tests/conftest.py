"""Shared test set-up: a private cache directory, quiet wandb, paths to the sample corpora, and the
fixtures several test files use (one per concept): `tok`, the data tests' small BPE tokenizer, and
`one_thread`. Test layout: tests/unit/ (no training run, `make test-fast`), tests/e2e/ (training
runs and CLIs in subprocesses); helpers.py holds the one runner, data_fixtures.py the corpora."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, triton kernels run through triton's interpreter on CPU tensors (tests/e2e/test_kernels.py).
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


@pytest.fixture(scope="session")
def tok():
    """The data tests' tokenizer: a 320-id BPE trained once on data_fixtures' documents (and the
    words the tests write as their own documents)."""
    from data_fixtures import make_docs

    from pkmlm.data.tokenizer import train_bpe

    return train_bpe(make_docs(300, seed=99) + ["val", "VAL", "wet", "pq"], vocab_size=320)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads and lose much on a busy machine (threads waiting on each
    other): one intra-op thread for the module that asks (`pytest.mark.usefixtures`), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The tiny run's steps: 2 steps of helpers.TINY, a checkpoint at each, no evaluation until the end.
TINY_RUN_STEPS = ("train.max_steps=2", "checkpoint.interval=1", "eval.interval=100")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One tiny trained run (`TINY_RUN_STEPS`: 2 checkpoints), trained once for the session and read by
    the tests of several files; a test that edits or resumes it works on a copy."""
    from helpers import train_in_process

    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    train_in_process(run_dir, *TINY_RUN_STEPS)
    return run_dir
