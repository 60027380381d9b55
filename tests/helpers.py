"""Small configs and runners shared by the end-to-end tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import C4

# A model and data sized to train a few steps in seconds on a 2-core CPU, memory layer included.
TINY = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.max_seq_len=64",
    "model.memory.layers=[1]",
    "model.memory.n_keys=16",
    "model.memory.heads=2",
    "model.memory.knn=4",
    "model.memory.k_dim=16",
    f"data.files=[{C4}]",
    "data.seq_len=32",
    "data.vocab_size=512",
    "data.tokenizer_docs=40",
    "data.val_docs=3",
    "data.shuffle_buffer=8",
    "train.batch_size=4",
    "train.max_steps=6",
    "optim.warmup_steps=2",
    "eval.interval=3",
    "eval.max_batches=4",
    "checkpoint.interval=3",
    "logging.interval=1",
    "logging.wandb.mode=disabled",
    "logging.progress=false",
]


def run_cli(module: str, args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def overrides(*extra: str, base: list[str] = TINY) -> list[str]:
    """`base` with each `key=value` of `extra` replacing the same key (Hydra refuses duplicates)."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [a for a in base if a.split("=", 1)[0] not in keys] + list(extra)


def compose_config(*extra: str):
    """The root config as `pkmlm-train` composes it, with `overrides(*extra)` (TINY + extra)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pkmlm.config import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=overrides(*extra))


def train_in_process(run_dir: Path, *extra: str) -> dict:
    """One training run in this process (`pkmlm.train.loop.train`) with `compose_config(*extra)`."""
    from omegaconf import OmegaConf

    from pkmlm.train.loop import train

    cfg = compose_config(*extra)
    return train(OmegaConf.to_object(cfg), run_dir, OmegaConf.to_container(cfg, resolve=True))
