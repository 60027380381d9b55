"""Running one training job as several processes: torchrun set-up, DDP / FSDP2, sharded values.

Launch (README, "Distributed training"): `torchrun --nproc_per_node=N -m pkmlm.cli.train ...`.
torchrun starts one process per GPU (or CPU worker) and gives each `RANK`, `LOCAL_RANK`,
`WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT`; `init_distributed` reads them and joins the process
group: NCCL for CUDA tensors and gloo for CPU tensors (`cpu:gloo,cuda:nccl`, so small host-side
agreements never wait for the GPU), gloo alone on a machine without CUDA.

`parallelize` applies the parallelism to a model built as usual, torchtitan-style: the model code
knows nothing of it.
  1. `model.memory.shard_values=true`: every memory value table is replaced by a `ShardedValues`
     (its columns split over all ranks; `pkmlm.model.sharded_values` has the layout and the
     communication cost), before the model moves to the device, so no device ever holds a whole
     table. Its gradient is divided by the world size, the averaging that DDP / FSDP apply to
     every other gradient.
  2. `train.parallel=ddp` (default): `DistributedDataParallel` over the replicated parameters
     (sharded tables excluded). `train.parallel=fsdp`: FSDP2 `fully_shard` on every transformer
     block, then on the root (embeddings, final norm, a table shared by all memory layers), so each
     rank keeps 1/W of the parameters, gradients and optimizer state between uses.
With one process both are skipped and the model is returned as it is.

Also here: the small agreements between ranks the loop needs (a stop signal seen by one rank stops
all at the same step; rank 0 decides and the others follow), gradient clipping over sharded
gradients, and which validation batches each rank evaluates.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pkmlm.errors import ConfigError, UserError

PARALLEL_MODES = ("ddp", "fsdp")
T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job: rank in [0, world_size), its GPU index on the node."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: Optional[str] = None  # None: no process group (a single process)

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes metrics, wandb, config and tokenizer, and holds the run's lock."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer (torchrun sets it; "
                        "launch with torchrun or unset it)") from None


def launched_with_several_processes() -> bool:
    """Whether torchrun (or another launcher with its variables) started more than one process."""
    return _env_int("WORLD_SIZE", 1) > 1


def init_distributed() -> DistInfo:
    """Join the process group described by torchrun's environment (idempotent); a single process
    (no `WORLD_SIZE`, or 1) gets `DistInfo()` and no group."""
    if dist.is_available() and dist.is_initialized():
        return current_info()
    _export_submitit_environment()
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world <= 1:
        return DistInfo()
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is outside [0, WORLD_SIZE={world}); launch with torchrun")
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed; install a standard torch build")
    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    if cuda:
        # Before any CUDA work: NCCL binds each process to the GPU of its LOCAL_RANK.
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, backend=backend)


def _export_submitit_environment() -> None:
    """A multi-task SLURM job of the Hydra SLURM launcher (`hydra.launcher.tasks_per_node=8`): each
    task is one rank; submitit derives torchrun's variables (rank, world size, master address from
    the job's first node) from SLURM's. Plain `srun`/`sbatch` jobs use torchrun instead (README)."""
    if "WORLD_SIZE" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    if _env_int("SLURM_NTASKS", 1) <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def prepare_cli(argv: List[str]) -> Optional[DistInfo]:
    """What `pkmlm-train` does under torchrun before Hydra starts (None with one process):

    - refuses Hydra multirun (`-m`, `--multirun`, `hydra.mode=MULTIRUN`): sweeps launch one torchrun job per configuration, never a
      sweep inside each rank;
    - joins the process group and sets `PKMLM_RUN_TIME` to rank 0's clock, so the default run
      directory `outputs/<name>/<time>` (config.yaml, `${pkmlm_now:...}`) is the same on all ranks;
    - on ranks > 0, keeps Hydra from writing `.hydra/` and its log file into the shared directory.
    Returns the rank's `DistInfo`; `argv` (sys.argv) gets the extra Hydra overrides in place.
    """
    if not launched_with_several_processes():
        return None
    if any(a in ("-m", "--multirun") or a.replace(" ", "").lower() in ("hydra.mode=multirun", "+hydra.mode=multirun")
           for a in argv[1:]):
        raise UserError("Hydra multirun (-m) inside torchrun: launch one torchrun job per configuration instead "
                        "(a shell loop, or pkmlm-train -m hydra/launcher=slurm with tasks_per_node; README, "
                        "'Distributed training')")
    info = init_distributed()
    os.environ["PKMLM_RUN_TIME"] = agreed_start_time(info)
    if not info.is_main:
        given = {a.split("=", 1)[0] for a in argv[1:]}
        if "hydra.output_subdir" not in given:
            argv.append("hydra.output_subdir=null")
        if "hydra/job_logging" not in given:
            argv.append("hydra/job_logging=stdout")
    return info


def current_info() -> DistInfo:
    """The `DistInfo` of an already initialised process group (or of a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(rank=dist.get_rank(), local_rank=_env_int("LOCAL_RANK", dist.get_rank()),
                    world_size=dist.get_world_size(), backend=str(dist.get_backend()))


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish_distributed_run() -> "NoReturn":  # noqa: F821
    """End a torchrun worker after a successful run: wait for every rank, destroy the process
    group, flush, and leave with `os._exit(0)`.

    Why `os._exit`: with gloo, the interpreter's teardown after `destroy_process_group` now and
    then aborts a rank ("terminate called without an active exception", SIGABRT; in 6 of about
    12 runs of tests/test_distributed.py on a loaded 2-core machine, always after the run's last
    collective), and torchrun then reports the finished job as failed. Nothing is left to do at
    this point: metrics, checkpoints, wandb and the run directory's lock are closed; stdio and
    logging are flushed here.
    """
    import logging
    import sys

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank leaves while another still talks to it
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


def rank_device(device: torch.device, info: DistInfo) -> torch.device:
    """One GPU per process: with several processes, `cuda` means `cuda:LOCAL_RANK`."""
    if not info.distributed or device.type != "cuda":
        return device
    if device.index is not None and device.index != info.local_rank % torch.cuda.device_count():
        raise ConfigError("train.device", str(device),
                          "with several processes each rank takes cuda:LOCAL_RANK; use train.device=cuda or auto")
    return torch.device("cuda", info.local_rank % torch.cuda.device_count())


# --- agreements between ranks ---------------------------------------------------------------------


def _host_device(info: DistInfo) -> torch.device:
    """Where small agreement tensors live: the CPU when gloo serves it, else the rank's GPU."""
    if info.backend is None or "gloo" in info.backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when it is true on at least one."""
    if not info.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_host_device(info))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_mean(value: Tensor, info: DistInfo) -> Tensor:
    """The mean of `value` over ranks (a new tensor; `value` itself when there is one process)."""
    if not info.distributed:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / info.world_size


def broadcast_from_main(obj: T, info: DistInfo) -> T:
    """Rank 0's `obj` on every rank (pickled; for small values)."""
    if not info.distributed:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_on_main(fn: Callable[[], T], info: DistInfo) -> T:
    """Run `fn` on rank 0 only and return its (picklable) result on every rank; a `UserError`
    raised by rank 0 is raised on every rank, so all of them stop with the same one-line message."""
    if not info.distributed:
        return fn()
    outcome: Tuple[str, Any] = ("ok", None)
    if info.is_main:
        try:
            outcome = ("ok", fn())
        except UserError as e:
            outcome = ("error", str(e))
    outcome = broadcast_from_main(outcome, info)
    if outcome[0] == "error":
        raise UserError(outcome[1])
    return outcome[1]


@contextlib.contextmanager
def main_rank_holds(make_lock: Callable[[], Any], info: DistInfo) -> Iterator[None]:
    """Rank 0 enters the context manager `make_lock()` (the run directory's lock); the other ranks
    wait for it and stop with rank 0's error when it fails."""
    if not info.distributed:
        with make_lock():
            yield
        return
    lock = make_lock() if info.is_main else contextlib.nullcontext()
    error = None
    if info.is_main:
        try:
            lock.__enter__()
        except UserError as e:
            error = str(e)
    error = broadcast_from_main(error, info)
    if error is not None:
        raise UserError(error)
    try:
        yield
    finally:
        if info.is_main:
            lock.__exit__(None, None, None)


def agree_on_stop(received: Optional[str], budget: Optional[str], info: DistInfo) -> Tuple[Optional[str], Optional[str]]:
    """`(signal, budget)` as every rank will see them: a stop signal or a used-up budget seen by any
    rank (time budgets are measured per rank) stops all ranks after the same step. One rank
    checkpointing while another trains would wait on each other forever. One small all-reduce
    on the host (gloo) per step; with one process the values come back unchanged."""
    if not info.distributed:
        return received, budget
    signals, budgets = ("SIGTERM", "SIGINT", "SIGUSR1"), ("max_tokens", "max_time")

    def code(value: Optional[str], names: Tuple[str, ...]) -> int:
        return 0 if value is None else (names.index(value) + 1 if value in names else len(names) + 1)

    t = torch.tensor([code(received, signals), code(budget, budgets)], dtype=torch.int32,
                     device=_host_device(info))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)

    def name(value: Optional[str], c: int, names: Tuple[str, ...], other: str) -> Optional[str]:
        if c == 0:
            return None
        return value if value is not None else (names[c - 1] if c <= len(names) else other)

    return (name(received, int(t[0]), signals, "signal"), name(budget, int(t[1]), budgets, "budget"))


def shared_tokenizer(load: Callable[[], Tuple[Any, dict]], info: DistInfo) -> Tuple[Any, dict]:
    """`load()` -> `(tokenizer, info)` run by rank 0 alone (one writer of the tokenizer cache, which
    may be node-local), its result sent to the other ranks as JSON text."""
    if not info.distributed:
        return load()
    from pkmlm.data.tokenizer import tokenizer_from_str

    text, tok_info = run_on_main(lambda: (lambda t: (t[0].to_str(), t[1]))(load()), info)
    return tokenizer_from_str(text), tok_info


class NoMetrics:
    """The metrics file of the ranks that do not write one (all but rank 0)."""

    def write(self, row: Any) -> None:
        pass

    def close(self) -> None:
        pass


def check_batch_split(batch_size: int, micro_batch_size: Optional[int], info: DistInfo) -> None:
    """`train.batch_size` is the global batch: each rank gets batch_size / W sequences, split into
    micro-batches of `train.micro_batch_size` on that rank."""
    if batch_size % info.world_size:
        raise ConfigError("train.batch_size", batch_size,
                          f"the global batch must divide into the {info.world_size} processes")
    per_rank = batch_size // info.world_size
    if micro_batch_size is not None and per_rank % micro_batch_size:
        raise ConfigError("train.micro_batch_size", micro_batch_size,
                          f"a divisor of the per-process batch train.batch_size / {info.world_size} = {per_rank}")


def agreed_start_time(info: DistInfo) -> str:
    """Rank 0's clock as ISO text: the timestamp in the shared run directory's name."""
    return broadcast_from_main(datetime.datetime.now().isoformat(timespec="seconds"), info)


# --- gradient clipping over replicated and sharded gradients --------------------------------------


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """`torch.nn.utils.clip_grad_norm_` that also takes DTensor gradients (FSDP2 shards, sharded
    values): each shard's squared norm is summed over the ranks of its mesh, replicated gradients
    count once. Returns the total norm (fp32 scalar on the gradients' device)."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    sharded = [p.grad for p in params if isinstance(p.grad, DTensor)]
    if not sharded:
        from pkmlm.train.optim import clip_grad_norm_ as clip_local_  # torch's, or with sparse value grads

        return clip_local_(params, max_norm)
    plain = [p.grad for p in params if not isinstance(p.grad, DTensor)]
    device = sharded[0].to_local().device
    total_sq = torch.zeros((), dtype=torch.float32, device=device)
    by_group: dict = {}
    for g in sharded:
        sq = g.to_local().float().pow(2).sum()
        if any(pl.is_shard() for pl in g.placements):  # each rank holds a part: sum over the mesh
            key = id(g.device_mesh.get_group())
            group, acc = by_group.get(key, (g.device_mesh.get_group(), torch.zeros_like(total_sq)))
            by_group[key] = (group, acc + sq)
        else:  # replicated DTensor: every rank holds all of it
            total_sq += sq
    for group, acc in by_group.values():
        dist.all_reduce(acc, op=dist.ReduceOp.SUM, group=group)
        total_sq += acc
    for g in plain:
        total_sq += g.float().pow(2).sum()
    total = total_sq.sqrt()
    if math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in params:
            (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).mul_(coef.to(p.grad.dtype))
    return total


# --- parallelising a model ------------------------------------------------------------------------


def check_parallel_config(parallel: str, shard_values: bool, v_dim: int, info: DistInfo) -> None:
    """Refuse what cannot run on this many processes, before any tensor is built."""
    if parallel not in PARALLEL_MODES:
        raise ConfigError("train.parallel", parallel, f"one of {'|'.join(PARALLEL_MODES)}")
    if shard_values and info.distributed and v_dim % info.world_size:
        raise ConfigError("model.memory.shard_values", True,
                          f"the value dim {v_dim} (model.memory.v_dim, or model.dim when null) must divide into "
                          f"the {info.world_size} processes; change the process count or v_dim, or turn "
                          "sharding off")


def _value_tables(model: nn.Module) -> List[Tuple[nn.Module, List[nn.Module]]]:
    """Each distinct value table of the model with the memory layers that read it."""
    from pkmlm.model.memory import ProductKeyMemory

    tables: dict = {}
    for m in model.modules():
        if isinstance(m, ProductKeyMemory):
            tables.setdefault(id(m.values), (m.values, []))[1].append(m)
    return list(tables.values())


def shard_value_tables(model: nn.Module, mesh, device: torch.device) -> List[str]:
    """Replace every value table by a `ShardedValues` over `mesh` (in place); returns the
    parameter names of the sharded tables. A table shared by several memory layers
    (`model.memory.share_values`) becomes one sharded table that they all read."""
    from pkmlm.model.sharded_values import ShardedValues

    for table, memories in _value_tables(model):
        sharded = ShardedValues(table.weight, mesh, device)
        for module in model.modules():  # the table's owner registers it; re-register the shard there
            for name, child in list(module._modules.items()):
                if child is table:
                    setattr(module, name, sharded)
        for memory in memories:
            memory.use_values(sharded, owned=memory._modules.get("values") is sharded)
    return [name for name, p in model.named_parameters() if _is_dtensor(p)]


def _is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@dataclass
class Parallelized:
    """A model after `parallelize`: `module` is what the training step calls (a DDP wrapper, the
    FSDP-sharded model itself, or the plain model); `model` is the unwrapped model (state dicts,
    evaluation)."""

    model: nn.Module
    module: nn.Module
    info: DistInfo
    mode: str = "none"  # none | ddp | fsdp
    sharded_params: List[str] = field(default_factory=list)

    @property
    def lockstep(self) -> bool:
        """Whether every forward is a collective (FSDP gathers parameters, sharded values exchange
        reads), so that all ranks must run the same forwards, evaluation included."""
        return self.mode == "fsdp" or bool(self.sharded_params)

    def eval_batches(self, batches: Sequence[Tensor]) -> Tuple[Sequence[Tensor], bool]:
        """This rank's validation batches and whether `evaluate` must sum over ranks: rank r takes
        batches r, r+W, ... (results summed over ranks); in lockstep every rank evaluates all of
        them (identical results, nothing to sum)."""
        if not self.info.distributed or self.lockstep:
            return batches, False
        return list(batches)[self.info.rank :: self.info.world_size], True

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Skip the gradient reduction of all micro-batches but the last of a step."""
        if enabled or self.mode == "none":
            yield
        elif self.mode == "ddp":
            with self.module.no_sync():
                yield
        else:
            self.module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.module.set_requires_gradient_sync(True)

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank, before evaluating or
        saving: each rank updates them from its own batches in training mode."""
        if not self.info.distributed:
            return
        for buffer in self.model.buffers():
            dist.broadcast(buffer, src=0)


def parallelize(model: nn.Module, parallel: str, info: DistInfo, device: torch.device,
                seed: Optional[int] = None) -> Parallelized:
    """Shard value tables (when `model.cfg.memory.shard_values`), move to `device`, wrap in DDP or
    FSDP2 per `parallel` (`ddp|fsdp`). With several processes and a `seed`, every rank's RNG is then
    reseeded with `seed + rank`, so that dropout masks differ across ranks."""
    mem_cfg = getattr(getattr(model, "cfg", None), "memory", None)
    shard = bool(getattr(mem_cfg, "shard_values", False))
    if not info.distributed:
        return Parallelized(model=model.to(device), module=model, info=info)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (info.world_size,))
    sharded: List[str] = []
    if shard and _value_tables(model):
        sharded = shard_value_tables(model, mesh, device)
    model.to(device)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        ignored = {p for name, p in model.named_parameters() if name in sharded}
        for block in getattr(model, "blocks", []):
            fully_shard(block, mesh=mesh, ignored_params=ignored & set(block.parameters()) or None)
        fully_shard(model, mesh=mesh, ignored_params=ignored or None)
        wrapped, mode = model, "fsdp"
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if sharded:
            DDP._set_params_and_buffers_to_ignore_for_model(model, sharded)
        ids = [device.index] if device.type == "cuda" else None
        wrapped, mode = DDP(model, device_ids=ids, gradient_as_bucket_view=True), "ddp"
    world = info.world_size
    for name, p in model.named_parameters():  # after `to()`, which may swap a DTensor's contents
        if name in sharded:
            # The read's backward sums the gradient over every rank's tokens; average it like the
            # data-parallel gradients of every other parameter (DDP and FSDP divide by W).
            p.register_hook(lambda g: g / world)
    if seed is not None:
        torch.manual_seed(seed + info.rank)
    return Parallelized(model=model, module=wrapped, info=info, mode=mode, sharded_params=sharded)


def check_same_run_dir(run_dir: Path, info: DistInfo) -> None:
    """All ranks must share one run directory (the CLI agrees on its timestamp)."""
    if not info.distributed:
        return
    main_dir = broadcast_from_main(str(Path(run_dir).resolve()), info)
    if any_rank(str(Path(run_dir).resolve()) != main_dir, info):
        raise UserError(f"the processes of one run were given different run directories (rank 0: {main_dir}); "
                        "give every rank the same hydra.run.dir")
