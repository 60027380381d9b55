"""Processes of one job: torchrun's environment, the process group, launch and shutdown.

Launch (README, "Distributed training"): `torchrun --nproc_per_node=N -m pkmlm.cli.train ...`.
torchrun starts one process per GPU (or CPU worker) and gives each `RANK`, `LOCAL_RANK`,
`WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT`; `init_distributed` reads them and joins the process
group: NCCL for CUDA tensors and gloo for CPU tensors (`cpu:gloo,cuda:nccl`, so small host-side
agreements never wait for the GPU), gloo alone on a machine without CUDA.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pkmlm.errors import ConfigError, UserError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job: rank in [0, world_size), its GPU index on the node."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None  # None: no process group (a single process)

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
        raise UserError(
            f"environment variable {name}={raw!r} is not an integer (torchrun sets it; "
            "launch with torchrun or unset it)"
        ) from None


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


def current_info() -> DistInfo:
    """The `DistInfo` of an already initialised process group (or of a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(
        rank=dist.get_rank(),
        local_rank=_env_int("LOCAL_RANK", dist.get_rank()),
        world_size=dist.get_world_size(),
        backend=str(dist.get_backend()),
    )


def rank_device(device: torch.device, info: DistInfo) -> torch.device:
    """One GPU per process: with several processes, `cuda` means `cuda:LOCAL_RANK`."""
    if not info.distributed or device.type != "cuda":
        return device
    if device.index is not None and device.index != info.local_rank % torch.cuda.device_count():
        raise ConfigError(
            "train.device",
            str(device),
            "with several processes each rank takes cuda:LOCAL_RANK; use train.device=cuda or auto",
        )
    return torch.device("cuda", info.local_rank % torch.cuda.device_count())
