"""Small configs and the one runner shared by the tests: `TINY` (a model and data that train a few
steps in seconds), `overrides`, `compose_config` / `train_in_process` (compose as `pkmlm-train`
does, then train in this process) and `run_cli` (a CLI in a subprocess, where the process is what
is tested)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import C4, PROJECT_ROOT
from omegaconf import OmegaConf

from pkmlm.model import MemoryConfig, ModelConfig, Transformer

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

    from pkmlm.config import config_dir, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=overrides(*extra))


def train_in_process(run_dir: Path, *extra: str) -> dict:
    """One training run in this process (`pkmlm.train.loop.train`) with `compose_config(*extra)`."""
    from pkmlm.train.loop import train

    cfg = compose_config(*extra)
    return train(OmegaConf.to_object(cfg), run_dir, OmegaConf.to_container(cfg, resolve=True))


def eval_in_process(*extra: str) -> dict:
    """`pkmlm-eval`'s result (`pkmlm.cli.eval.evaluate_run`) in this process, `extra` its overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pkmlm.cli.eval import evaluate_run  # registers eval's config schema
    from pkmlm.config import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=list(extra))
    return evaluate_run(OmegaConf.to_object(cfg))


# --- a small model of each memory preset (test_decoding, test_hf_export) -----------------------------

# The presets of configs/memory, each at test size (their structure kept: placement, norms, gate,
# PEER, shared pools, balance loss); the layer indices clamped into a 3-layer model.
PRESETS = ["none", "tiny", "memory_plus", "peer", "ultramem", "pkm_parallel"]
SMALL = dict(n_keys=8, knn=4, k_dim=8)
VOCAB = 97


def tiny_model(
    preset: str = "tiny", seed: int = 0, memory_overrides: dict | None = None, **model_kwargs
) -> Transformer:
    """A small model with `preset`'s memory, its weights moved away from the init (logits that spread
    over several units, so greedy choices are not near-ties) and BatchNorm running statistics that
    are not the identity; in eval mode."""
    memory = OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "configs" / "memory" / f"{preset}.yaml"))
    memory.update(SMALL)
    memory["layers"] = sorted({min(i, 2) for i in memory.get("layers", [])})
    memory["heads"] = min(memory.get("heads", 4), 2)
    memory.update(memory_overrides or {})
    args = dict(vocab_size=VOCAB, n_layers=3, dim=32, n_heads=2, max_seq_len=64, memory=MemoryConfig(**memory))
    args.update(model_kwargs)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**args))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1.0 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.3)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()
