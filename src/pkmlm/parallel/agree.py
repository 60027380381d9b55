"""Small agreements between the ranks of a job, each a no-op with one process.

A stop signal or a used-up budget seen by one rank stops all of them after the same step; rank 0
decides what only one process may decide (which checkpoint to resume, the run directory's lock)
and the others follow; a user error raised on rank 0 is raised on every rank, so that all of them
stop with the same one-line message instead of waiting for each other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from pkmlm.errors import ConfigError, UserError
from pkmlm.parallel.env import DistInfo

T = TypeVar("T")


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
    outcome: tuple[str, Any] = ("ok", None)
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


def agree_on_stop(received: str | None, budget: str | None, info: DistInfo) -> tuple[str | None, str | None]:
    """`(signal, budget)` as every rank will see them: a stop signal or a used-up budget seen by any
    rank (time budgets are measured per rank) stops all ranks after the same step. One rank
    checkpointing while another trains would wait on each other forever. One small all-reduce
    on the host (gloo) per step; with one process the values come back unchanged."""
    if not info.distributed:
        return received, budget
    signals, budgets = ("SIGTERM", "SIGINT", "SIGUSR1"), ("max_tokens", "max_time")

    def code(value: str | None, names: tuple[str, ...]) -> int:
        return 0 if value is None else (names.index(value) + 1 if value in names else len(names) + 1)

    t = torch.tensor([code(received, signals), code(budget, budgets)], dtype=torch.int32, device=_host_device(info))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)

    def name(value: str | None, c: int, names: tuple[str, ...], other: str) -> str | None:
        if c == 0:
            return None
        return value if value is not None else (names[c - 1] if c <= len(names) else other)

    return (name(received, int(t[0]), signals, "signal"), name(budget, int(t[1]), budgets, "budget"))


def check_batch_split(batch_size: int, micro_batch_size: int | None, info: DistInfo) -> None:
    """`train.batch_size` is the global batch: each rank gets batch_size / W sequences, split into
    micro-batches of `train.micro_batch_size` on that rank."""
    if batch_size % info.world_size:
        raise ConfigError(
            "train.batch_size", batch_size, f"the global batch must divide into the {info.world_size} processes"
        )
    per_rank = batch_size // info.world_size
    if micro_batch_size is not None and per_rank % micro_batch_size:
        raise ConfigError(
            "train.micro_batch_size",
            micro_batch_size,
            f"a divisor of the per-process batch train.batch_size / {info.world_size} = {per_rank}",
        )


def check_same_run_dir(run_dir: Path, info: DistInfo) -> None:
    """All ranks must share one run directory (the CLI agrees on its timestamp)."""
    if not info.distributed:
        return
    main_dir = broadcast_from_main(str(Path(run_dir).resolve()), info)
    if any_rank(str(Path(run_dir).resolve()) != main_dir, info):
        raise UserError(
            f"the processes of one run were given different run directories (rank 0: {main_dir}); "
            "give every rank the same hydra.run.dir"
        )
