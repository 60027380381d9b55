"""What `pkmlm-train` does around a run under torchrun: before Hydra starts (`prepare_cli`) and
after the run (`finish_distributed_run`)."""

from __future__ import annotations

import datetime
import os

import torch.distributed as dist

from pkmlm.errors import UserError
from pkmlm.parallel.agree import broadcast_from_main
from pkmlm.parallel.env import (
    DistInfo,
    init_distributed,
    launched_with_several_processes,
)


def refuse_multirun(argv: list[str]) -> None:
    """Under torchrun, Hydra multirun (`-m`, `--multirun`, `hydra.mode=MULTIRUN`) is refused with one
    line: sweeps launch one torchrun job per configuration, never a sweep inside each rank. Checked
    before anything parses the overrides (a sweep's `a=1,2` is not a valid single-run value)."""
    if launched_with_several_processes() and any(
        a in ("-m", "--multirun") or a.replace(" ", "").lower() in ("hydra.mode=multirun", "+hydra.mode=multirun")
        for a in argv[1:]
    ):
        raise UserError(
            "Hydra multirun (-m) inside torchrun: launch one torchrun job per configuration instead "
            "(a shell loop, or pkmlm-train -m hydra/launcher=slurm with tasks_per_node; README, "
            "'Distributed training')"
        )


def prepare_cli(argv: list[str]) -> DistInfo | None:
    """What `pkmlm-train` does under torchrun before Hydra starts (None with one process):

    - refuses Hydra multirun (`refuse_multirun`; pkmlm-train also calls it before Hydra parses the
      overrides);
    - joins the process group and sets `PKMLM_RUN_TIME` to rank 0's clock, so the default run
      directory `outputs/<name>/<time>` (config.yaml, `${pkmlm_now:...}`) is the same on all ranks;
    - on ranks > 0, keeps Hydra from writing `.hydra/` and its log file into the shared directory.
    Returns the rank's `DistInfo`; `argv` (sys.argv) gets the extra Hydra overrides in place.
    """
    if not launched_with_several_processes():
        return None
    refuse_multirun(argv)
    info = init_distributed()
    os.environ["PKMLM_RUN_TIME"] = agreed_start_time(info)
    if not info.is_main:
        given = {a.split("=", 1)[0] for a in argv[1:]}
        if "hydra.output_subdir" not in given:
            argv.append("hydra.output_subdir=null")
        if "hydra/job_logging" not in given:
            argv.append("hydra/job_logging=stdout")
    return info


def agreed_start_time(info: DistInfo) -> str:
    """Rank 0's clock as ISO text: the timestamp in the shared run directory's name."""
    return broadcast_from_main(datetime.datetime.now().isoformat(timespec="seconds"), info)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish_distributed_run() -> NoReturn:  # noqa: F821
    """End a torchrun worker after a successful run: wait for every rank, destroy the process
    group, flush, and leave with `os._exit(0)`.

    Why `os._exit`: with gloo, the interpreter's teardown after `destroy_process_group` now and
    then aborts a rank ("terminate called without an active exception", SIGABRT; in 6 of about
    12 runs of tests/e2e/test_distributed.py on a loaded 2-core machine, always after the run's last
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
