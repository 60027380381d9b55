"""`parallelize`: a model built as usual, made to run on several processes (torchtitan-style: the
model code knows nothing of it).

  1. `shard_values=True` (`model.memory.shard_values`): every memory value table is replaced by a
     `ShardedValues` (its columns split over all ranks; `pkmlm.model.sharded_values` has the
     layout and the communication cost), before the model moves to the device, so no device ever
     holds a whole table. Its gradient is divided by the world size, the averaging that DDP / FSDP
     apply to every other gradient.
  2. `parallel="ddp"` (default): `DistributedDataParallel` over the replicated parameters
     (sharded tables excluded). `parallel="fsdp"`: FSDP2 `fully_shard` on every transformer
     block, then on the root (embeddings, final norm, a table shared by all memory layers), so each
     rank keeps 1/W of the parameters, gradients and optimizer state between uses.
With one process both are skipped and the model is only moved to the device.

`Parallelized` also says which validation batches each rank evaluates and how gradient
synchronisation is skipped for all micro-batches of a step but the last.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pkmlm.errors import ConfigError
from pkmlm.model.sharded_values import ShardedValues
from pkmlm.parallel.env import DistInfo

ParallelMode = Literal["ddp", "fsdp"]  # train.parallel (checked with the config: TrainConfig.validate)


def check_parallel_config(
    parallel: ParallelMode, shard_values: bool, v_dim: int, info: DistInfo, down_dim: int | None = None
) -> None:
    """Refuse what cannot run on this many processes, before any tensor is built. `down_dim`: the
    columns of PEER's down vectors (model.dim), sharded like the values; None without them."""
    if shard_values and info.distributed and v_dim % info.world_size:
        raise ConfigError(
            "model.memory.shard_values",
            True,
            f"the value dim {v_dim} (model.memory.v_dim, or model.dim when null) must divide into "
            f"the {info.world_size} processes; change the process count or v_dim, or turn "
            "sharding off",
        )
    if shard_values and info.distributed and down_dim is not None and down_dim % info.world_size:
        raise ConfigError(
            "model.memory.shard_values",
            True,
            f"PEER's down vectors (model.memory.values_kind=peer) have model.dim={down_dim} "
            f"columns, which must divide into the {info.world_size} processes; change the "
            "process count or model.dim, or turn sharding off",
        )


def _value_tables(model: nn.Module) -> dict:
    """The model's value tables by module name (`Transformer.value_tables`; none for other models)."""
    return model.value_tables() if hasattr(model, "value_tables") else {}


def shard_value_tables(model: nn.Module, mesh, device: torch.device) -> list[str]:
    """Replace every value table (PEER's down vectors included) by a `ShardedValues` over `mesh`,
    in place, under its owner's name; returns the parameter names of the sharded tables. A pool
    shared by several memory layers (`model.memory.share_values`) is owned by the model, which
    passes it to them at every call, so it becomes one sharded table that they all read."""
    for name, table in _value_tables(model).items():
        model.set_submodule(name, ShardedValues(table.weight, mesh, device))
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
    sharded_params: list[str] = field(default_factory=list)

    @property
    def lockstep(self) -> bool:
        """Whether every forward is a collective (FSDP gathers parameters, sharded values exchange
        reads), so that all ranks must run the same forwards, evaluation included."""
        return self.mode == "fsdp" or bool(self.sharded_params)

    def eval_batches(self, batches: Sequence[Tensor]) -> tuple[Sequence[Tensor], bool]:
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


def parallelize(
    model: nn.Module,
    parallel: ParallelMode,
    info: DistInfo,
    device: torch.device,
    *,
    shard_values: bool = False,
    seed: int | None = None,
) -> Parallelized:
    """Shard value tables (when `shard_values`), move to `device`, wrap in DDP or FSDP2 per
    `parallel` (`ddp|fsdp`). With several processes and a `seed`, every rank's RNG is then reseeded
    with `seed + rank`, so that dropout masks differ across ranks."""
    if not info.distributed:
        return Parallelized(model=model.to(device), module=model, info=info)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (info.world_size,))
    sharded: list[str] = []
    if shard_values and _value_tables(model):
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
