"""`setup()`: from a validated config and a locked run directory to everything the loop needs.

Order (cheap checks first, so a bad config fails in a second, never after an hour): device and
parallel checks -> the checkpoint to resume (rank 0 picks, all read it) -> tokenizer -> model ->
parallelisation -> optimizer -> data -> state restored from the checkpoint -> sinks.

Extension points (docs/architecture.md): `build_model` is where `init_from` weights and frozen
parameters belong; `build_optimizer` (pkmlm.optim) skips frozen parameters already.

Finetuning (`init_from`, `train.finetune`; pkmlm/finetune/): a fresh start with `init_from` takes
the source checkpoint's tokenizer and weights (its model config must match, one line naming the
keys that differ), the memory modes freeze all but the value tables and train them with
`finetune_optimizer`, and `sparse_memory` counts the background once (cached in the run directory)
and restricts each step's value gradients to its top rows (`Trainer.selection`, used by
`train_step`).

Saved state: `Trainer.states` (train/states.py registers its pieces: model, optimizers, data
position, RNG streams, `TrainState`, staleness, ...), restored here and saved by the loop through
the same `States` object.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from pkmlm.checkpoint import pieces, store
from pkmlm.checkpoint.export import checked_model_config, is_export, load_export_weights, read_export
from pkmlm.checkpoint.files import atomic_write
from pkmlm.checkpoint.states import States, saved_names
from pkmlm.config import DEVICES, Config, uses_bf16
from pkmlm.data.batch_source import BatchSource
from pkmlm.data.config import DataConfig
from pkmlm.data.loader import (
    build_train_batches,
    load_or_train_tokenizer,
    resolve_data,
    validation_batches,
)
from pkmlm.data.tokenizer import checked_tokenizer, eos_id, tokenizer_from_str
from pkmlm.errors import ConfigError, UserError
from pkmlm.finetune import (
    BACKGROUND_FILE,
    BackgroundCounts,
    RowSelection,
    apply_finetune_mode,
    count_background,
    finetune_optimizer,
    init_from_mismatch,
    load_background,
    row_selection,
    save_background,
    slot_pools,
)
from pkmlm.finetune.config import background_batch_count
from pkmlm.metrics.flops import peak_flops
from pkmlm.metrics.recall import check_recall_fits, read_questions
from pkmlm.metrics.sinks import ConsoleProgress, MetricsFile, Sinks, WandbSink
from pkmlm.metrics.table_usage import SideUsageWindow
from pkmlm.model import variants
from pkmlm.model.kernels import cpu_topk, resolve_kernel, resolve_topk
from pkmlm.model.transformer import ModelConfig, Transformer
from pkmlm.optim import build_optimizer, use_sparse_value_grads, value_parameters
from pkmlm.optim.groups import Optimizer
from pkmlm.parallel.agree import check_batch_split, run_on_main
from pkmlm.parallel.data_shards import build_batches, plan_data_shards
from pkmlm.parallel.env import DistInfo, rank_device
from pkmlm.parallel.parallelize import Parallelized, check_parallel_config, parallelize
from pkmlm.train.clock import RunClock
from pkmlm.train.rundir import (
    check_output_dirs,
    code_version,
    fresh_start_conflicts,
    fresh_start_refusal,
    resume_conflicts,
    resume_refusal,
)
from pkmlm.train.state import TrainState
from pkmlm.train.states import StateParts, build_states

VOCAB_MULTIPLE = 64  # pad the embedding to a multiple of 64: tensor-core friendly (nanoGPT: 50257 -> 50304)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError("train.device", name, DEVICES) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device", name, "cuda needs a CUDA build of torch and a GPU (no CUDA here); use cpu or auto"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError("train.device", name, f"cuda:N with N < {torch.cuda.device_count()} (the GPUs visible)")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast or none (fp32), by the one precision rule `pkmlm.config.uses_bf16`."""
    return torch.bfloat16 if uses_bf16(precision, device.type) else None


def model_config_for(cfg: ModelConfig, tokenizer_vocab: int) -> ModelConfig:
    if cfg.vocab_size == 0:
        size = math.ceil(tokenizer_vocab / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        return dataclasses.replace(cfg, vocab_size=size)
    if cfg.vocab_size < tokenizer_vocab:
        raise ConfigError(
            "model.vocab_size",
            cfg.vocab_size,
            f"at least the tokenizer's vocabulary ({tokenizer_vocab}), or 0 to take it from the tokenizer",
        )
    return cfg


@dataclass
class Trainer:
    """What `setup` builds and the loop works with. `model` is the plain model (state dicts,
    evaluation), `par.module` the wrapped one, `step_fn` what the training step calls (compiled
    when `train.compile`)."""

    cfg: Config
    run_dir: Path
    info: DistInfo
    device: torch.device
    amp_dtype: torch.dtype | None
    model: Transformer
    par: Parallelized
    step_fn: nn.Module
    optimizer: Optimizer
    batches: BatchSource  # endless (B, T+1) batches of this rank, with state (one source, or DataShards)
    val: list
    tokenizer: Any
    sinks: Sinks
    state: TrainState  # the loop's counters (also the `train` piece of `states`)
    states: States  # every piece of saved state (train/states.py): saved, restored and logged together
    clock: RunClock
    resumed_from: Path | None
    meta: dict  # what every checkpoint of this run records beside the state (config, tokenizer, ...)
    init_from: Path | None = None  # the checkpoint whose weights the run started from (init_from)
    selection: RowSelection | None = None  # train.finetune=memory|sparse_memory: the rows a step may change
    kept_fresh: list[str] = dataclasses.field(default_factory=list)  # pieces a resume left as built
    side_usage: SideUsageWindow | None = None  # the side layers' reads since the last training row

    def __post_init__(self) -> None:
        self.side_usage = SideUsageWindow(self.model)  # observers on the side layers (none: empty)

    @property
    def micro_batch_size(self) -> int:
        return self.cfg.train.micro_batch_size or self.cfg.train.batch_size

    @property
    def stop_at(self) -> int:
        t = self.cfg.train
        return min(t.stop_at_step or t.max_steps, t.max_steps)

    @functools.cached_property
    def value_params(self) -> list:
        """The memory value tables' weights (after `parallelize`: sharded ones included)."""
        return value_parameters(self.model)


def shared_tokenizer(load: Callable[[], tuple[Any, dict]], info: DistInfo) -> tuple[Any, dict]:
    """`load()` -> `(tokenizer, info)` run by rank 0 alone (one writer of the tokenizer cache, which
    may be node-local), its result sent to the other ranks as JSON text."""
    text, tok_info = run_on_main(lambda: (lambda t: (t[0].to_str(), t[1]))(load()), info)
    return tokenizer_from_str(text), tok_info


def _check_resume(
    cfg: Config, run_dir: Path, resolved: dict, resumed: Path | None, meta: dict | None, info: DistInfo
) -> None:
    """A resume must match the run's config; a fresh start must not mix with another run's files."""
    if resumed is not None:
        diffs = resume_conflicts(meta["config"], meta["step"], resolved)
        if diffs:
            raise resume_refusal(resumed, diffs)
    elif cfg.resume == "auto":  # no checkpoint: a fresh start, unless the directory is another run's
        diffs = run_on_main(lambda: fresh_start_conflicts(run_dir, resolved), info)
        if diffs:
            raise fresh_start_refusal(run_dir, diffs)


def _check_resumed_meta(path: Path, meta: dict) -> None:
    """A resumed checkpoint's meta.json holds what a resume reads, of the right kinds (field types:
    `store.read_meta`): the config, the model config (a model that fits in memory) and a tokenizer
    whose ids lie inside that model's vocabulary."""
    where = str(path / store.META)
    missing = [k for k in ("config", "model_config", "tokenizer") if k not in meta]
    if missing:
        raise UserError(
            f"{where}: no {', '.join(missing)} (not a training run's checkpoint, or edited); give another "
            "checkpoint with resume=PATH"
        )
    vocab = checked_model_config(meta["model_config"], where).vocab_size
    checked_tokenizer(meta["tokenizer"], where, vocab)


def build_model(
    cfg: Config, model_cfg: ModelConfig, init_from: Path | None = None, info: DistInfo | None = None
) -> Transformer:
    """The model as training starts it: seeded init, then the weights of checkpoint `init_from`
    when given (a fresh start with `init_from`), then the parameters `train.finetune` freezes."""
    pieces.seed_all(cfg.seed)  # python, numpy and torch: a fresh run's every RNG starts from the seed
    model = Transformer(model_cfg)
    if init_from is not None:
        load_weights(model, init_from, info or DistInfo())
    if cfg.train.finetune != "full":  # memory modes: the value tables alone train (also on resume)
        apply_finetune_mode(model, cfg.train.finetune)
    return model


def adapt_side_layers(model: Transformer, tokenizer: Any, run_dir: Path, info: DistInfo) -> None:
    """What the side layers take from the run's tokenizer (`SideLayer.adapt_to_tokenizer`: Engram's
    compression, loaded from the run directory or built and saved there by rank 0)."""
    for side in model.side_layers().values():
        side.adapt_to_tokenizer(tokenizer, eos_id(tokenizer), str(run_dir), write=info.is_main)


def load_weights(model: nn.Module, path: Path, info: DistInfo) -> None:
    """The model weights of checkpoint `path` (a verified one: `store.find_for_reading`) or of a
    `pkmlm-export` directory, through safe loading (the store's, or safetensors: no pickled object
    is ever unpickled); optimizer state is not read."""
    if is_export(path):
        load_export_weights(model, path, key="init_from")
        return
    template = pieces.model_state_template(model)
    store.load_tensors(path, template, info)
    pieces.load_model_state(model, template)


def init_source(cfg: Config, meta: dict | None, info: DistInfo) -> tuple[Path | None, dict | None]:
    """The checkpoint this run takes its weights from, and (on a fresh start) its meta.json.

    A fresh start resolves `init_from` (a run directory: its newest valid checkpoint, rank 0 picks;
    a checkpoint; or a `pkmlm-export` directory, whose config.json and tokenizer.json stand in for
    the meta.json) and refuses a source without the model config and tokenizer it needs; a resumed run keeps the
    checkpoint its start resolved (recorded in its checkpoints' `init_from`), so a source run that
    went on training since changes nothing."""
    if cfg.init_from is None:
        return None, None
    if meta is not None:
        return (Path(meta["init_from"]) if meta.get("init_from") else None), None
    given = Path(cfg.init_from).expanduser()
    if is_export(given):
        return given, read_export(given, key="init_from")
    found = run_on_main(lambda: str(store.find_for_reading(given, key="init_from")), info)
    source, source_meta = Path(found), store.read_meta(Path(found))
    missing = [k for k in ("model_config", "tokenizer", "config") if k not in source_meta]
    if not missing:  # the schema of what a fresh start takes from it, before anything is built
        where = f"init_from={cfg.init_from!r}: {source / store.META}"
        vocab = checked_model_config(source_meta["model_config"], where).vocab_size
        checked_tokenizer(source_meta["tokenizer"], where, vocab)
    if missing:
        raise UserError(
            f"init_from={cfg.init_from!r}: checkpoint {source} has no {', '.join(missing)} in its "
            "meta.json (not a training run's checkpoint); give a run directory or checkpoint of "
            "pkmlm-train"
        )
    return source, source_meta


def source_data_config(cfg: Config, source_meta: dict) -> DataConfig:
    """The `init_from` run's training data (its `data.*`), read in-process, in windows of this run's
    `data.seq_len`: the background sample of `sparse_memory` (Lin et al. 2025: pretraining data)."""
    raw = source_meta["config"].get("data", {})
    known = {f.name for f in dataclasses.fields(DataConfig)}
    typed = OmegaConf.merge(OmegaConf.structured(DataConfig), {k: v for k, v in raw.items() if k in known})
    return dataclasses.replace(OmegaConf.to_object(typed), seq_len=cfg.data.seq_len, num_workers=0)


def finetune_background(
    cfg: Config, run_dir: Path, model: Transformer, source: Path, tokenizer: Any, info: DistInfo, weights_loaded: bool
) -> BackgroundCounts:
    """`sparse_memory`'s background: per slot, how many of `finetune.background_batches` batches
    (of `train.batch_size` sequences) of the source run's training data read it, counted once with
    the source's weights and cached in `RUN/finetune_background.safetensors`; a resume reads the
    cache (and recounts, with the source's weights loaded first, only when it is gone)."""
    if not (source is not None and (store.is_checkpoint(source) or is_export(source))):
        raise UserError(
            f"train.finetune=sparse_memory: the init_from checkpoint {source} is gone, and so is "
            f"{run_dir / BACKGROUND_FILE}; restore either, or start a new run"
        )
    source_meta = read_export(source, key="init_from") if is_export(source) else store.read_meta(source)
    data_cfg = source_data_config(cfg, source_meta)
    num_batches = background_batch_count(cfg.finetune.background_batches, int(source_meta["step"]))
    fingerprint = {
        "init_from": str(source),
        "step": source_meta["step"],
        "data": source_meta["config"].get("data"),
        "seq_len": cfg.data.seq_len,
        "batch_size": cfg.train.batch_size,
        "num_batches": num_batches,
        "seed": cfg.seed,
    }
    path = run_dir / BACKGROUND_FILE
    tables = {name: pool.n_slots for name, pool in slot_pools(model).items()}
    device = next(iter(slot_pools(model).values())).device
    cached = load_background(path, fingerprint, tables)
    if run_on_main(lambda: cached is not None, info):  # rank 0 decides: every rank loads, or every rank counts
        if cached is None:
            raise UserError(
                f"{path}: rank {info.rank} cannot read the cache that rank 0 reads; the run directory "
                "must be one directory shared by all processes"
            )
        return cached.to(device)
    if not weights_loaded:
        load_weights(model, source, info)  # the restore that follows puts this run's own weights back
    try:
        plan = resolve_data(data_cfg)
    except UserError as e:
        raise UserError(
            f"train.finetune=sparse_memory counts slots on the init_from run's training data, "
            f"which cannot be read now: {e}"
        ) from None
    if info.is_main and cfg.logging.progress:
        print(
            f"pkmlm | sparse_memory: counting slot reads of {num_batches} background "
            f"batches of {source}'s training data (once; cached in {path.name})",
            flush=True,
        )
    # Every rank counts the same batches (a forward may be a collective); rank 0 writes the cache.
    batches = build_train_batches(data_cfg, plan, tokenizer, batch_size=cfg.train.batch_size, seed=cfg.seed)
    bar = None
    if info.is_main and cfg.logging.progress:
        from tqdm import tqdm

        bar = tqdm(total=num_batches, desc="background batches", file=sys.stderr, leave=False, dynamic_ncols=True)
    try:
        counts = count_background(model, batches, num_batches, progress=(lambda _: bar.update(1)) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    if info.is_main:
        save_background(path, counts, fingerprint)
    return counts


def resume_point(cfg: Config, run_dir: Path, resolved: dict, info: DistInfo) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume (rank 0 picks, all read it) and its checked meta.json, or None, None
    for a fresh start (checked not to mix with another run's files)."""
    resumed = store.resolve_shared(cfg.resume, run_dir, info)  # rank 0 picks, all read it
    meta = store.read_meta(resumed) if resumed is not None else None
    if meta is not None:  # the schema of what a resume reads, before anything is built
        _check_resumed_meta(resumed, meta)
    _check_resume(cfg, run_dir, resolved, resumed, meta, info)
    return resumed, meta


def run_tokenizer(
    cfg: Config, run_dir: Path, resolved: dict, files: Any, info: DistInfo, meta: dict | None, source_meta: dict | None
) -> tuple[Any, str, ModelConfig]:
    """The run's tokenizer, where it came from, and the model config sized to it; checked against
    the recall questions and the `init_from` source's model; `tokenizer.json` and `config.yaml`
    written into the run directory (rank 0)."""
    # Tokenizer: a resumed run keeps its own, whatever the cache holds now; init_from takes the source's.
    if meta is not None:
        tokenizer, tok_source = tokenizer_from_str(meta["tokenizer"]), "checkpoint"
    elif source_meta is not None:
        tokenizer, tok_source = tokenizer_from_str(source_meta["tokenizer"]), "init_from"
    else:  # with several processes rank 0 loads or trains it and sends it to the others
        tokenizer, tok_info = shared_tokenizer(
            lambda: load_or_train_tokenizer(cfg.data, files, cfg.paths.cache_dir), info
        )
        tok_source = tok_info["source"]
    model_cfg = model_config_for(cfg.model, tokenizer.get_vocab_size())
    if cfg.eval.recall:  # every answer must fit the window: refused now, not at the first evaluation
        check_recall_fits(
            read_questions(Path(cfg.eval.recall).expanduser()), tokenizer, model_cfg.max_seq_len, cfg.eval.recall
        )
    if source_meta is not None:  # the same model, or one line naming the keys that differ
        mismatch = init_from_mismatch(cfg.init_from, model_cfg, source_meta["model_config"])
        if mismatch is not None:
            raise mismatch
    if info.is_main:  # rank 0 writes the shared run directory's files, atomically
        atomic_write(run_dir / "tokenizer.json", tokenizer.to_str().encode())
        # config.yaml shows the vocabulary actually built; checkpoints keep the config as given.
        written = {**resolved, "model": {**resolved["model"], "vocab_size": model_cfg.vocab_size}}
        atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(written)).encode())
    return tokenizer, tok_source, model_cfg


def finetune_selection(
    cfg: Config,
    run_dir: Path,
    model: Transformer,
    source: Path | None,
    tokenizer: Any,
    info: DistInfo,
    meta: dict | None,
) -> RowSelection:
    """The memory modes' row selection; `sparse_memory`'s with its background counts: those of the
    resumed checkpoint (its `background` piece, filled in by the restore), else the run directory's
    cache or a count (`finetune_background`), made before any observer is attached (these reads are
    not training reads)."""
    background = None
    if cfg.train.finetune == "sparse_memory" and meta is not None and "background" in saved_names(meta):
        device = next(iter(slot_pools(model).values())).device
        background = BackgroundCounts.zeros({n: p.n_slots for n, p in slot_pools(model).items()}, device)
    elif cfg.train.finetune == "sparse_memory":
        background = finetune_background(cfg, run_dir, model, source, tokenizer, info, weights_loaded=meta is None)
    return row_selection(model, cfg.train.finetune, cfg.finetune, background)


def run_clock(
    cfg: Config,
    model: Transformer,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    info: DistInfo,
    state: TrainState,
) -> RunClock:
    """The run's clock, continuing the times of its earlier segments (`state`, restored)."""
    device_peak = peak_flops(device, amp_dtype, cfg.train.peak_flops)
    clock = RunClock(
        device,
        model.flops_per_token(cfg.data.seq_len),
        # tokens/s counts all ranks' tokens, so MFU is against all devices' peak
        device_peak * info.world_size if device_peak is not None else None,
        wall_before_s=state.wall_time_s,
        train_before_s=state.train_time_s,
    )
    return clock


def run_meta(
    resolved: dict, model_cfg: ModelConfig, tokenizer: Any, info: DistInfo, n_shards: int, source: Path | None
) -> dict:
    """What every checkpoint of the run records beside its states: the run's constants."""
    return {
        "config": resolved,
        "model_config": dataclasses.asdict(model_cfg),
        "tokenizer": tokenizer.to_str(),
        "code_version": code_version(),
        "world_size": info.world_size,
        "data_shards": n_shards,
        **({"init_from": str(source)} if source is not None else {}),
    }


def check_memory_paths(cfg: Config, device: torch.device, info: DistInfo) -> None:
    """The memory's read kernel on this device (e.g. kernel=triton in a CPU run: refused now, not at
    the first step) and, on CPU, its top-k (`topk_impl=auto`: the C++ kernel, built here on first
    use); where that kernel cannot be built, one line says why torch.topk runs instead."""
    if not cfg.model.memory.layers:
        return
    resolve_kernel(cfg.model.memory.kernel, device)
    if device.type == "cpu" and resolve_topk(cfg.model.memory.topk_impl) == "torch" and info.is_main:
        reason = cpu_topk.unavailable_reason()
        if reason is not None:
            print(f"pkmlm | model.memory.topk_impl=auto: torch.topk (the C++ CPU top-k: {reason})", file=sys.stderr)


def setup(cfg: Config, run_dir: Path, resolved: dict, files: Any, info: DistInfo) -> Trainer:
    device = rank_device(pick_device(cfg.train.device), info)  # several processes: cuda:LOCAL_RANK each
    check_parallel_config(
        cfg.train.parallel,
        cfg.model.memory.shard_values,
        cfg.model.memory.v_dim or cfg.model.dim,
        info,
        down=variants.down_table(cfg.model.memory, cfg.model.dim),
    )
    check_batch_split(cfg.train.batch_size, cfg.train.micro_batch_size, info)
    check_memory_paths(cfg, device, info)
    run_on_main(lambda: check_output_dirs(run_dir), info)  # before any step: where checkpoints go
    resumed, meta = resume_point(cfg, run_dir, resolved, info)
    source, source_meta = init_source(cfg, meta, info)  # init_from: the checkpoint whose weights a fresh run takes
    tokenizer, tok_source, model_cfg = run_tokenizer(cfg, run_dir, resolved, files, info, meta, source_meta)
    model = build_model(cfg, model_cfg, init_from=source if meta is None else None, info=info)
    adapt_side_layers(model, tokenizer, run_dir, info)
    # Shard value tables, move to the device, wrap in DDP or FSDP2 (pkmlm.parallel); with one
    # process only the move. `model` stays the unwrapped model (state dicts, evaluation).
    par = parallelize(
        model, cfg.train.parallel, info, device, shard_values=cfg.model.memory.shard_values, seed=cfg.seed
    )
    if cfg.optim.sparse_values:
        use_sparse_value_grads(model)
    mode = cfg.train.finetune
    selection = finetune_selection(cfg, run_dir, model, source, tokenizer, info, meta) if mode != "full" else None
    optimizer = finetune_optimizer(model, cfg.finetune) if mode != "full" else build_optimizer(model, cfg.optim, device)
    # The global batch is `n_shards` data streams; each rank runs its share (pkmlm.parallel.data_shards).
    n_shards = plan_data_shards(
        cfg.train.data_shards, cfg.train.batch_size, info, meta.get("data_shards") if meta is not None else None
    )
    batches = build_batches(
        lambda shard, n, size: build_train_batches(
            cfg.data, files, tokenizer, batch_size=size, seed=cfg.seed, rank=shard, world_size=n
        ),
        cfg.train.batch_size,
        n_shards,
        info,
    )
    val = validation_batches(
        cfg.data,
        files,
        tokenizer,
        batch_size=cfg.eval.batch_size or cfg.train.micro_batch_size or cfg.train.batch_size,
        max_batches=cfg.eval.max_batches,
    )
    trainer_state = TrainState()
    states = build_states(StateParts(cfg, info, model, optimizer, batches, trainer_state, selection))
    kept_fresh = states.restore(resumed, meta, info) if resumed is not None else []
    step_fn = torch.compile(par.module) if cfg.train.compile else par.module

    amp_dtype = autocast_dtype(cfg.train.precision, device)
    clock = run_clock(cfg, model, device, amp_dtype, info, trainer_state)
    sinks = make_sinks(cfg, run_dir, resolved, info, trainer_state)
    trainer = Trainer(
        cfg=cfg,
        run_dir=run_dir,
        info=info,
        device=device,
        amp_dtype=amp_dtype,
        model=model,
        par=par,
        step_fn=step_fn,
        optimizer=optimizer,
        batches=batches,
        val=val,
        tokenizer=tokenizer,
        sinks=sinks,
        state=trainer_state,
        states=states,
        clock=clock,
        resumed_from=resumed,
        meta=run_meta(resolved, model_cfg, tokenizer, info, n_shards, source),
        init_from=source,
        selection=selection,
        kept_fresh=kept_fresh,
    )
    sinks.console.write(_start_line(trainer, tok_source, n_shards))
    return trainer


def make_sinks(cfg: Config, run_dir: Path, resolved: dict, info: DistInfo, state: TrainState) -> Sinks:
    """Rank 0 alone writes metrics.jsonl and wandb (a resumed run continues its own wandb run);
    rows hold values averaged (or summed) over ranks."""
    w = cfg.logging.wandb
    wandb = WandbSink(
        mode=w.mode if info.is_main else "disabled",
        project=w.project,
        entity=w.entity,
        name=w.name or f"{cfg.name}/{run_dir.name}",
        group=w.group or cfg.name,
        tags=list(w.tags),
        config=resolved,
        dir=str(run_dir),
        run_id=state.wandb_run_id,
    )
    state.wandb_run_id = wandb.run_id or state.wandb_run_id
    progress = ConsoleProgress(
        total_steps=min(cfg.train.stop_at_step or cfg.train.max_steps, cfg.train.max_steps),
        initial_step=state.step,
        enabled=cfg.logging.progress and info.is_main,
    )
    metrics = MetricsFile(run_dir / "metrics.jsonl") if info.is_main else None
    return Sinks(metrics, progress, wandb, main=info.is_main)


def _start_line(t: Trainer, tok_source: str, n_shards: int) -> str:
    counts = t.model.count_parameters()
    return (
        f"pkmlm | run dir {t.run_dir} | device {t.device}{' bf16' if t.amp_dtype else ' fp32'} | params "
        f"{counts['total'] / 1e6:.2f}M total, {counts['active'] / 1e6:.2f}M active | memory layers "
        f"{list(t.model.memory_layers()) or 'none'} | tokenizer {tok_source} "
        f"(vocab {t.tokenizer.get_vocab_size()}) | {len(t.val)} validation batches"
        + (f" | resumed from {t.resumed_from.name} at step {t.state.step}" if t.resumed_from is not None else "")
        + (f" (left as built: {', '.join(t.kept_fresh)})" if t.kept_fresh else "")
        + (f" | init_from {t.init_from} (train.finetune={t.cfg.train.finetune})" if t.init_from is not None else "")
        + (
            f" | {t.info.world_size} processes ({t.par.mode}, {n_shards} data shards"
            f"{', values sharded' if t.par.sharded_params else ''})"
            if t.info.distributed
            else ""
        )
    )
