"""The root config: one typed dataclass per concern, composed here, registered with Hydra.

Defaults live in these dataclasses, presets in `configs/` (YAML deltas), and the command line
overrides both (`key=value`). The dataclasses are registered in Hydra's ConfigStore as the schema
`base_config`, so a misspelt key or a value of the wrong type is refused at start-up.

Importing this module needs omegaconf only; `register_configs()` imports Hydra.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf

from pkmlm.data.config import DataConfig, check_data_config, default_cache_dir
from pkmlm.errors import ConfigError
from pkmlm.model.transformer import ModelConfig
from pkmlm.train.optim import OptimConfig  # beside the optimizer: torch-only for the benchmarks

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # src/pkmlm/config.py -> project root


def default_sample_dir() -> str:
    """`PKMLM_SAMPLE_DIR` when set, else the repository's own `data/` (data/README.md)."""
    env = os.environ.get("PKMLM_SAMPLE_DIR")
    return env if env else str(PROJECT_ROOT / "data")


def config_dir() -> str:
    """Where the YAML presets live: `PKMLM_CONFIG_DIR`, else `configs/` at the project root."""
    return os.environ.get("PKMLM_CONFIG_DIR") or str(PROJECT_ROOT / "configs")


@dataclass
class PathsConfig:
    sample_dir: str = "${pkmlm_sample_dir:}"  # $PKMLM_SAMPLE_DIR, else the repository's data/
    cache_dir: str = "${pkmlm_cache_dir:}"  # $PKMLM_CACHE_DIR, else ~/.cache/pkmlm (tokenizer cache)


@dataclass
class TrainConfig:
    max_steps: int = 600  # optimizer steps; also the LR schedule's length
    stop_at_step: Optional[int] = None  # stop after this step with a checkpoint, schedule unchanged
    batch_size: int = 16  # sequences per optimizer step (across all ranks)
    micro_batch_size: Optional[int] = None  # per forward/backward; None = batch_size (no accumulation)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile the model for the training steps
    max_consecutive_nonfinite: int = 5  # non-finite steps are skipped; this many in a row stop the run
    # Budgets for fair comparisons: after the first step that reaches one, evaluate, checkpoint and
    # stop; the LR schedule is still train.max_steps long.
    max_tokens: Optional[int] = None  # training tokens; None = no token budget
    max_time: Optional[float] = None  # seconds of training time (evaluation and checkpoints excluded, summed over resumes); None = no time budget
    peak_flops: Optional[float] = None  # device peak FLOP/s for train/mfu; None = from the GPU's name
    # Several processes (torchrun): ddp (DistributedDataParallel) | fsdp (FSDP2 fully_shard per
    # block: parameters, gradients and optimizer state split over the ranks). train/distributed.py
    parallel: str = "ddp"
    # Logical data streams making up the global batch, fixed for the run's life (saved in its
    # checkpoints) so that it resumes on any process count dividing it; None = the process count
    # at the start. train/data_shards.py
    data_shards: Optional[int] = None


@dataclass
class EvalConfig:
    interval: int = 200  # steps between validations (and one at the end)
    max_batches: Optional[int] = None  # cap on validation batches; None = the whole split
    batch_size: Optional[int] = None  # None = train.micro_batch_size or train.batch_size


@dataclass
class CheckpointConfig:
    interval: int = 200  # steps between checkpoints (and one at the end / at stop_at_step)
    keep_last: int = 2
    # auto: torch.save file with one process and one data shard, else distributed checkpoint (DCP,
    # loads on any process count) | torch | dcp. train/dcp.py
    format: str = "auto"


@dataclass
class WandbConfig:
    mode: str = "offline"  # online | offline (files in the run dir, `wandb sync` later) | disabled
    project: str = "pkmlm"  # wandb project
    entity: Optional[str] = None  # wandb team or user; None = your default
    group: Optional[str] = None  # wandb group; None = the run name
    name: Optional[str] = None  # wandb run name; None = <name>/<run dir name>
    tags: List[str] = field(default_factory=list)  # wandb tags


@dataclass
class LoggingConfig:
    interval: int = 10  # steps between training rows (loss averaged over the interval)
    progress: bool = True  # console progress bar (a plain line every 30 s when not a terminal)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    name: str = "default"  # experiment name: outputs/<name>/<timestamp>/
    seed: int = 1337  # model init, data shuffle and dropout
    resume: str = "auto"  # auto | never | PATH (a checkpoint file or a run directory)
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def run_start_time(pattern: str) -> str:
    """`${pkmlm_now:%Y-...}`, Hydra's `${now:...}` except that all processes of a torchrun job get
    rank 0's start time (`PKMLM_RUN_TIME`, set by pkmlm-train), so they share one run directory."""
    import datetime

    shared = os.environ.get("PKMLM_RUN_TIME")
    moment = datetime.datetime.fromisoformat(shared) if shared else datetime.datetime.now()
    return moment.strftime(pattern)


def register_resolvers() -> None:
    for name, fn in (("pkmlm_sample_dir", default_sample_dir), ("pkmlm_cache_dir", default_cache_dir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    if not OmegaConf.has_resolver("pkmlm_now"):
        OmegaConf.register_new_resolver("pkmlm_now", run_start_time, use_cache=True)  # cached like `now`
    from pkmlm.experiments.sweep import register_sweep_resolver  # hydra.sweep.dir: one dir per sweep

    register_sweep_resolver()


def register_configs() -> None:
    """Register resolvers and the schema `base_config` with Hydra (groups merge into it, typed)."""
    from hydra.core.config_store import ConfigStore

    register_resolvers()
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def validate(cfg: Config) -> None:
    """Check every value that would otherwise fail late; raise ConfigError on the first problem."""
    model = cfg.model
    _check(model.vocab_size >= 0, "model.vocab_size", model.vocab_size, "0 (from the tokenizer) or a positive size")
    # The model's vocabulary comes from the tokenizer when 0; validate the rest with a placeholder.
    dataclasses.replace(model, vocab_size=model.vocab_size or 1).validate()

    d = cfg.data
    check_data_config(d)  # every data.* value that needs no file; paths are checked by resolve_data
    _check(d.seq_len <= model.max_seq_len, "data.seq_len", d.seq_len,
           f"at most model.max_seq_len={model.max_seq_len}")
    if not d.files and not d.sources:  # data=prepared sets files: [] and needs data.prepared=DIR
        _check(bool(d.prepared), "data.prepared" if d.prepared is not None or not d.files else "data.files",
               d.prepared, "a directory written by pkmlm-prepare (data=prepared needs data.prepared=DIR); "
               "or give data.files=[PATH,...] or data.sources")
    # A tokenizer trained here has up to data.vocab_size ids; a fixed model vocabulary must hold them
    # all (checked again against the actual tokenizer once it is loaded).
    _check(model.vocab_size == 0 or d.tokenizer is not None or model.vocab_size >= d.vocab_size, "model.vocab_size",
           model.vocab_size, f"0 (the tokenizer's size) or at least data.vocab_size={d.vocab_size}, the tokenizer's")

    o = cfg.optim
    _check(o.lr > 0 and math.isfinite(o.lr), "optim.lr", o.lr, "a positive finite number")
    _check(o.values_lr >= 0 and math.isfinite(o.values_lr), "optim.values_lr", o.values_lr, ">= 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
    _check(0 <= o.beta1 < 1, "optim.beta1", o.beta1, "in [0, 1)")
    _check(0 <= o.beta2 < 1, "optim.beta2", o.beta2, "in [0, 1)")
    _check(o.eps > 0 and math.isfinite(o.eps), "optim.eps", o.eps, "a positive finite number (AdamW's denominator)")
    _check(o.schedule in ("cosine", "inv_sqrt", "constant"), "optim.schedule", o.schedule,
           "one of cosine, inv_sqrt, constant")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, ">= 0")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "in [0, 1]")
    _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, ">= 0 (0 disables clipping)")

    t = cfg.train
    _check(t.max_steps >= 1, "train.max_steps", t.max_steps, ">= 1")
    _check(t.stop_at_step is None or 1 <= t.stop_at_step <= t.max_steps, "train.stop_at_step", t.stop_at_step,
           f"null or in [1, train.max_steps={t.max_steps}]")
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, ">= 1")
    mb = t.micro_batch_size
    _check(mb is None or (1 <= mb <= t.batch_size and t.batch_size % mb == 0), "train.micro_batch_size", mb,
           f"null or a divisor of train.batch_size={t.batch_size}")
    _check(re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", t.device) is not None, "train.device", t.device,
           "auto, cpu, cuda or cuda:N")
    _check(t.precision in ("auto", "fp32", "bf16"), "train.precision", t.precision, "one of auto, fp32, bf16")
    _check(t.max_consecutive_nonfinite >= 1, "train.max_consecutive_nonfinite", t.max_consecutive_nonfinite, ">= 1")
    _check(t.max_tokens is None or t.max_tokens >= 1, "train.max_tokens", t.max_tokens,
           "null (no token budget) or a positive number of training tokens")
    _check(t.max_time is None or (t.max_time > 0 and math.isfinite(t.max_time)), "train.max_time", t.max_time,
           "null (no time budget) or a positive number of seconds")
    _check(t.peak_flops is None or (t.peak_flops > 0 and math.isfinite(t.peak_flops)), "train.peak_flops",
           t.peak_flops, "null (from the GPU's name) or the device's peak FLOP/s, e.g. 989e12")
    _check(t.parallel in ("ddp", "fsdp"), "train.parallel", t.parallel, "one of ddp, fsdp")
    _check(t.data_shards is None or (t.data_shards >= 1 and t.batch_size % t.data_shards == 0), "train.data_shards",
           t.data_shards, f"null (the process count) or a divisor of train.batch_size={t.batch_size}")
    _check(not (model.memory.shard_values and getattr(cfg.optim, "sparse_values", False)), "model.memory.shard_values",
           model.memory.shard_values, "false with optim.sparse_values=true (a sharded table takes dense gradients)")

    _check(cfg.eval.interval >= 1, "eval.interval", cfg.eval.interval, ">= 1")
    _check(cfg.eval.max_batches is None or cfg.eval.max_batches >= 1, "eval.max_batches", cfg.eval.max_batches,
           "null or >= 1")
    _check(cfg.eval.batch_size is None or cfg.eval.batch_size >= 1, "eval.batch_size", cfg.eval.batch_size,
           "null or >= 1")
    _check(cfg.checkpoint.interval >= 1, "checkpoint.interval", cfg.checkpoint.interval, ">= 1")
    _check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", cfg.checkpoint.keep_last, ">= 1")
    _check(cfg.checkpoint.format in ("auto", "torch", "dcp"), "checkpoint.format", cfg.checkpoint.format,
           "one of auto, torch, dcp")
    _check(cfg.logging.interval >= 1, "logging.interval", cfg.logging.interval, ">= 1")
    _check(cfg.logging.wandb.mode in ("online", "offline", "disabled"), "logging.wandb.mode",
           cfg.logging.wandb.mode, "one of online, offline, disabled")
    _check(cfg.resume in ("auto", "never") or len(cfg.resume) > 0, "resume", cfg.resume,
           "auto, never or a checkpoint path")
