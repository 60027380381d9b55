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
from typing import Any, List, Literal, Optional

from omegaconf import OmegaConf

from pkmlm.data.config import DataConfig, default_cache_dir
from pkmlm.errors import UserError, checked_once, require, require_one_of
from pkmlm.finetune.config import FinetuneConfig, check_finetune_config  # finetune.*: with its modes
from pkmlm.metrics.memory_usage import MetricsConfig  # metrics.*: beside the trackers it configures
from pkmlm.metrics.sinks import check_wandb_mode
from pkmlm.model.transformer import ModelConfig
from pkmlm.optim.config import OptimConfig  # beside the optimizer: torch-only for the benchmarks
from pkmlm.parallel.parallelize import ParallelMode
from pkmlm.paths import dir_problem

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # src/pkmlm/config.py -> project root


def default_sample_dir() -> str:
    """`PKMLM_SAMPLE_DIR` when set, else the repository's own `data/` (data/README.md)."""
    env = os.environ.get("PKMLM_SAMPLE_DIR")
    return env if env else str(PROJECT_ROOT / "data")


def config_dir() -> str:
    """Where the YAML presets live: `PKMLM_CONFIG_DIR`, else `configs/` at the project root."""
    return os.environ.get("PKMLM_CONFIG_DIR") or str(PROJECT_ROOT / "configs")


# Integers beyond 2**53 lose their value in JSON readers, wandb and float arithmetic (the LR
# schedule divides by train.max_steps): no count in a config is meant to be that large.
MAX_INT = 2**53
# More optimizer steps than any run takes (1e10 steps at 1 ms each is 116 days); a typo like
# train.max_steps=1e23 is refused instead of scheduling a learning rate nobody will see.
MAX_STEPS = 10**10


@dataclass
class PathsConfig:
    sample_dir: str = "${pkmlm_sample_dir:}"  # $PKMLM_SAMPLE_DIR, else the repository's data/
    cache_dir: str = "${pkmlm_cache_dir:}"  # $PKMLM_CACHE_DIR, else ~/.cache/pkmlm (tokenizer cache)

    def validate(self) -> None:
        reason = dir_problem(self.cache_dir)
        require(
            reason is None,
            "paths.cache_dir",
            self.cache_dir,
            f"a directory this user can create or write ({reason}); set paths.cache_dir or PKMLM_CACHE_DIR",
        )


# train.device: auto, cpu, cuda or cuda:N (pkmlm-eval's `device` too); checked by `check_device`.
DEVICE_PATTERN = r"auto|cpu|cuda(:[0-9]+)?"
DEVICES = "auto, cpu, cuda or cuda:N"
Precision = Literal["auto", "fp32", "bf16"]  # train.precision (pkmlm-eval's `precision` too)


def check_device(key: str, device: str) -> None:
    """The device string's form; whether that device exists is `pkmlm.train.setup.pick_device`'s."""
    require(re.fullmatch(DEVICE_PATTERN, device) is not None, key, device, DEVICES)


def uses_bf16(precision: str, device_type: str) -> bool:
    """The precision rule: bf16 autocast on CUDA by default, fp32 on CPU unless bf16 is asked for."""
    return precision == "bf16" or (precision == "auto" and device_type == "cuda")


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
    # seconds of training time (evaluation and checkpoints excluded, summed over resumes); None = no time budget
    max_time: Optional[float] = None
    peak_flops: Optional[float] = None  # device peak FLOP/s for train/mfu; None = from the GPU's name
    # Several processes (torchrun): ddp (DistributedDataParallel) | fsdp (FSDP2 fully_shard per
    # block: parameters, gradients and optimizer state split over the ranks). pkmlm/parallel/parallelize.py
    parallel: str = "ddp"
    # Logical data streams making up the global batch, fixed for the run's life (saved in its
    # checkpoints) so that it resumes on any process count dividing it; None = the process count
    # at the start. pkmlm/parallel/data_shards.py
    data_shards: Optional[int] = None
    # With init_from: full (every parameter) | memory (the value tables only) | sparse_memory (the
    # finetune.top_t value rows per batch by TF-IDF, Lin et al. 2025). pkmlm/finetune/
    finetune: str = "full"

    def validate(self) -> None:
        """Every `train.*` value on its own and against the other `train.*` values."""
        require(
            1 <= self.max_steps <= MAX_STEPS, "train.max_steps", self.max_steps, f"an integer in [1, {MAX_STEPS:.0e}]"
        )
        require(
            self.stop_at_step is None or 1 <= self.stop_at_step <= self.max_steps,
            "train.stop_at_step",
            self.stop_at_step,
            f"null or in [1, train.max_steps={self.max_steps}]",
        )
        require(self.batch_size >= 1, "train.batch_size", self.batch_size, ">= 1")
        mb = self.micro_batch_size
        require(
            mb is None or (1 <= mb <= self.batch_size and self.batch_size % mb == 0),
            "train.micro_batch_size",
            mb,
            f"null or a divisor of train.batch_size={self.batch_size}",
        )
        check_device("train.device", self.device)
        require_one_of("train.precision", self.precision, Precision)
        require(
            self.max_consecutive_nonfinite >= 1,
            "train.max_consecutive_nonfinite",
            self.max_consecutive_nonfinite,
            ">= 1",
        )
        self._validate_budgets()
        require_one_of("train.parallel", self.parallel, ParallelMode)
        require(
            self.data_shards is None or (self.data_shards >= 1 and self.batch_size % self.data_shards == 0),
            "train.data_shards",
            self.data_shards,
            f"null (the process count) or a divisor of train.batch_size={self.batch_size}",
        )

    def _validate_budgets(self) -> None:
        require(
            self.max_tokens is None or self.max_tokens >= 1,
            "train.max_tokens",
            self.max_tokens,
            "null (no token budget) or a positive number of training tokens",
        )
        require(
            self.max_time is None or (self.max_time > 0 and math.isfinite(self.max_time)),
            "train.max_time",
            self.max_time,
            "null (no time budget) or a positive number of seconds",
        )
        require(
            self.peak_flops is None or (self.peak_flops > 0 and math.isfinite(self.peak_flops)),
            "train.peak_flops",
            self.peak_flops,
            "null (from the GPU's name) or the device's peak FLOP/s, e.g. 989e12",
        )


@dataclass
class EvalConfig:
    interval: int = 200  # steps between validations (and one at the end)
    max_batches: Optional[int] = None  # cap on validation batches; None = the whole split
    batch_size: Optional[int] = None  # None = train.micro_batch_size or train.batch_size
    recall: Optional[str] = None  # a qa.jsonl (pkmlm-facts): recall/* metrics at each evaluation
    recall_max_questions: Optional[int] = None  # score only the first questions (time per eval); None = all

    def validate(self) -> None:
        require(self.interval >= 1, "eval.interval", self.interval, ">= 1")
        require(self.max_batches is None or self.max_batches >= 1, "eval.max_batches", self.max_batches, "null or >= 1")
        require(self.batch_size is None or self.batch_size >= 1, "eval.batch_size", self.batch_size, "null or >= 1")
        require(
            self.recall_max_questions is None or self.recall_max_questions >= 1,
            "eval.recall_max_questions",
            self.recall_max_questions,
            "null (all) or >= 1",
        )


@dataclass
class CheckpointConfig:
    interval: int = 200  # steps between checkpoints (and one at the end / at stop_at_step)
    keep_last: int = 2  # the newest checkpoints kept (one format: pkmlm/checkpoint/store.py)

    def validate(self) -> None:
        require(self.interval >= 1, "checkpoint.interval", self.interval, ">= 1")
        require(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, ">= 1")


@dataclass
class WandbConfig:
    mode: str = "offline"  # online | offline (files in the run dir, `wandb sync` later) | disabled
    project: str = "pkmlm"  # wandb project
    entity: Optional[str] = None  # wandb team or user; None = your default
    group: Optional[str] = None  # wandb group; None = the run name
    name: Optional[str] = None  # wandb run name; None = <name>/<run dir name>
    tags: List[str] = field(default_factory=list)  # wandb tags

    def validate(self) -> None:
        check_wandb_mode(self.mode)


@dataclass
class LoggingConfig:
    interval: int = 10  # steps between training rows (loss averaged over the interval)
    progress: bool = True  # console progress bar (a plain line every 30 s when not a terminal)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> None:
        require(self.interval >= 1, "logging.interval", self.interval, ">= 1")
        self.wandb.validate()


@dataclass
class Config:
    name: str = "default"  # experiment name: outputs/<name>/<timestamp>/
    seed: int = 1337  # model init, data shuffle and dropout
    resume: str = "auto"  # auto | never | PATH (a run directory or one checkpoints/step_XXXXXXXX.dcp directory)
    # A run directory or checkpoint whose model weights this run starts from (a fresh start only:
    # new optimizer and schedule, step 0, its own run directory, the source's tokenizer); not resume
    init_from: Optional[str] = None
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


def run_start_time(pattern: str) -> str:
    """`${pkmlm_now:%Y-...}`, Hydra's `${now:...}` except that all processes of a torchrun job get
    rank 0's start time (`PKMLM_RUN_TIME`, set by pkmlm-train), so they share one run directory."""
    import datetime

    shared = os.environ.get("PKMLM_RUN_TIME")
    moment = datetime.datetime.fromisoformat(shared) if shared else datetime.datetime.now()
    return moment.strftime(pattern)


# --- resolvers -------------------------------------------------------------------------------------

SWEEP_RESOLVER = "pkmlm_sweep_name"


def sweep_name(name: str, *, _root_: Any) -> str:
    """`${pkmlm_sweep_name:${name}}` in `hydra.sweep.dir`: one sweep, one directory.

    Hydra composes every job of a sweep anew with its own overrides, so a job that selects another
    experiment (a compare group's arms, `-m experiment=tiny/mem4,tiny/dense8`) has another `name`,
    and `multirun/${name}/...` would scatter one sweep over several directories. This returns the
    name that the sweep's own (master) config resolved, for every job: the first value returned is
    kept in the config's resolver cache, the same cache through which Hydra gives every job the
    master's `${now:...}` (`ConfigLoader.load_sweep_config` copies it into each job's config, and
    it travels with the config to joblib and SLURM workers)."""
    memo = OmegaConf.get_cache(_root_)[SWEEP_RESOLVER]  # a dict per resolver name (omegaconf: defaultdict)
    return memo.setdefault("first", name)


def register_resolvers() -> None:
    for name, fn in (("pkmlm_sample_dir", default_sample_dir), ("pkmlm_cache_dir", default_cache_dir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    if not OmegaConf.has_resolver("pkmlm_now"):
        OmegaConf.register_new_resolver("pkmlm_now", run_start_time, use_cache=True)  # cached like `now`
    if not OmegaConf.has_resolver(SWEEP_RESOLVER):
        OmegaConf.register_new_resolver(SWEEP_RESOLVER, sweep_name)


def register_configs() -> None:
    """Register resolvers and the schema `base_config` with Hydra (groups merge into it, typed)."""
    from hydra.core.config_store import ConfigStore

    register_resolvers()
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)


# --- validation: every value, once, before any work (one style: pkmlm.errors.require) ---------------


def _check_ints(node: Any, key: str = "") -> None:
    """Every integer of the config tree (dataclasses, lists) within [-MAX_INT, MAX_INT]."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            _check_ints(getattr(node, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            _check_ints(item, f"{key}[{i}]")
    elif isinstance(node, int) and not isinstance(node, bool):
        require(-MAX_INT <= node <= MAX_INT, key, node, f"an integer of magnitude at most 2**53 ({MAX_INT:.1e})")


def check_name(name: str) -> None:
    """The run directory is outputs/<name>/<time> (a sweep's multirun/<name>/<time>): `name` is a
    relative path whose parts are never `.` or `..`, so that no run lands outside them."""
    parts = str(name).replace("\\", "/").split("/")
    require(
        bool(name) and all(p not in ("", ".", "..") for p in parts) and "\0" not in name,
        "name",
        name,
        "a relative name such as tiny/mem4 (no leading /, no '.' or '..' parts): runs are written to "
        "outputs/<name>/ and multirun/<name>/",
    )


@checked_once  # the command line's check of each job and train() ask for it; it runs once
def validate(cfg: Config) -> None:
    """Check every value that would otherwise fail late; raise ConfigError on the first problem.

    Each group checks its own values (`cfg.<group>.validate()`); this adds the rules that span
    several groups."""
    check_name(cfg.name)
    cfg.paths.validate()
    model = cfg.model
    require(model.vocab_size >= 0, "model.vocab_size", model.vocab_size, "0 (from the tokenizer) or a positive size")
    # The model's vocabulary comes from the tokenizer when 0; validate the rest with a placeholder.
    dataclasses.replace(model, vocab_size=model.vocab_size or 1).validate()
    cfg.data.validate()  # every data.* value that needs no file; paths are checked by resolve_data
    _check_data_and_model(cfg.data, model)
    cfg.optim.validate()
    cfg.train.validate()
    require(
        not (model.memory.shard_values and cfg.optim.sparse_values),
        "model.memory.shard_values",
        model.memory.shard_values,
        "false with optim.sparse_values=true (a sharded table takes dense gradients)",
    )
    for group in (cfg.eval, cfg.checkpoint, cfg.logging, cfg.metrics):
        group.validate()
    require(
        cfg.resume in ("auto", "never") or len(cfg.resume) > 0, "resume", cfg.resume, "auto, never or a checkpoint path"
    )
    require(
        cfg.init_from is None or len(cfg.init_from) > 0,
        "init_from",
        cfg.init_from,
        "null or a run directory or checkpoint whose weights to start from",
    )
    check_finetune_config(
        cfg.train.finetune,
        cfg.finetune,
        init_from=cfg.init_from,
        memory_layers=model.memory.layers,
        shard_values=model.memory.shard_values,
    )
    _check_ints(cfg)  # the backstop for every other count: 2**53 at most


def _check_data_and_model(d: DataConfig, model: ModelConfig) -> None:
    """The data group against the model: sequence length, where the data comes from, vocabulary."""
    require(d.seq_len <= model.max_seq_len, "data.seq_len", d.seq_len, f"at most model.max_seq_len={model.max_seq_len}")
    if not d.files and not d.sources:  # data=prepared sets files: [] and needs data.prepared=DIR
        require(
            bool(d.prepared),
            "data.prepared" if d.prepared is not None or not d.files else "data.files",
            d.prepared,
            "a directory written by pkmlm-prepare (data=prepared needs data.prepared=DIR); "
            "or give data.files=[PATH,...] or data.sources",
        )
    # A tokenizer trained here has up to data.vocab_size ids; a fixed model vocabulary must hold them
    # all (checked again against the actual tokenizer once it is loaded).
    require(
        model.vocab_size == 0 or d.tokenizer is not None or model.vocab_size >= d.vocab_size,
        "model.vocab_size",
        model.vocab_size,
        f"0 (the tokenizer's size) or at least data.vocab_size={d.vocab_size}, the tokenizer's",
    )


# --- does the run fit the device? (checked before anything is allocated) ----------------------------

GB = 1e9


def estimate_train_memory(cfg: Config, world_size: int = 1, act_bytes: int = 4) -> dict[str, float]:
    """About how many bytes one process needs to train `cfg`, from the config alone: the parameters
    with their gradients and AdamW moments (4 copies; 3 for the values with optim.sparse_values,
    whose gradients are row-sparse; split over the ranks with FSDP), and the activations of one
    micro-batch kept for the backward pass, `act_bytes` each (2 under bf16 autocast). The model is
    built on the meta device (counts only, nothing allocated).

    Activations per token: each layer keeps about 8*dim + 2*ffn values (qkv, attention output, two
    norms, the residual, the FFN's hidden layer before and after its activation: 16*dim for
    ffn_mult=4, close to the 34*dim bytes of bf16 that Korthikanti et al. 2022 count), a memory layer
    its sub-key scores (heads * 2 * n_keys fp32), the logits V fp32 and their gradient. Attention
    scores are not counted (fused attention does not keep them)."""
    import torch

    from pkmlm.model.transformer import Transformer

    m = cfg.model
    vocab = m.vocab_size or -(-cfg.data.vocab_size // 64) * 64  # the loop pads the tokenizer's size to 64
    model_cfg = dataclasses.replace(m, vocab_size=vocab)
    with torch.device("meta"):
        model = Transformer(model_cfg)
    counts = model.count_parameters()
    values_bytes = 2 if m.memory.values_dtype == "bfloat16" else 4
    copies_values = 3 if getattr(cfg.optim, "sparse_values", False) else 4
    shards = world_size if cfg.train.parallel == "fsdp" else 1
    params = (
        counts["memory_values"] * values_bytes * copies_values + (counts["total"] - counts["memory_values"]) * 4 * 4
    ) / shards
    micro = cfg.train.micro_batch_size or cfg.train.batch_size
    tokens = max(1, micro // max(1, world_size)) * cfg.data.seq_len
    ffn = int(m.ffn_mult * m.dim)
    per_token = (
        m.n_layers * (8 * m.dim + 2 * ffn) * act_bytes
        + len(m.memory.layers) * m.memory.heads * 2 * m.memory.n_keys * 4
        + vocab * 4 * 2
    )
    activations = float(tokens * per_token)
    return {
        "total": params + activations,
        "params": params,
        "activations": activations,
        "n_params": float(counts["total"]),
        "n_values": float(counts["memory_values"]),
    }


def device_memory(device: Any) -> tuple[float, str]:
    """Bytes a run on `device` can use, and how they were measured: free device memory on CUDA,
    MemAvailable (/proc/meminfo) on the CPU."""
    import torch

    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return float(free), f"{device} has {free / GB:.1f} GB free of {total / GB:.1f} GB"
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return float(available), f"this machine has {available / GB:.1f} GB of RAM available"


def check_fits_device(cfg: Config, device: Any, world_size: int = 1) -> None:
    """Refuse, with the estimate and the device's capacity, a run whose parameters and activations
    (`estimate_train_memory`, an estimate: a run that only just fits may still run out) exceed the
    memory `device` has: one line, before anything allocates, instead of an allocator traceback
    minutes later."""
    bf16 = uses_bf16(cfg.train.precision, device.type)
    need = estimate_train_memory(cfg, world_size, act_bytes=2 if bf16 else 4)
    have, where = device_memory(device)
    if need["total"] <= have:
        return
    m = cfg.model
    if need["params"] >= need["activations"]:
        key = "model.memory.n_keys" if need["n_values"] * 2 > need["n_params"] else "model.dim"
        hint = f"lower {key} (now {m.memory.n_keys if key.endswith('n_keys') else m.dim})"
    else:
        hint = (
            f"lower train.micro_batch_size (now {cfg.train.micro_batch_size or cfg.train.batch_size} sequences "
            f"per forward pass) or data.seq_len (now {cfg.data.seq_len})"
        )
    raise UserError(
        f"the run does not fit {device.type}: training needs about {need['total'] / GB:,.1f} GB "
        f"({need['n_params']:.3g} "
        f"parameters with gradients and AdamW state: {need['params'] / GB:,.1f} GB; activations: "
        f"{need['activations'] / GB:,.1f} GB) but {where}; {hint}"
    )
