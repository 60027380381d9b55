"""`pkmlm-train [key=value ...]`: train a model (Hydra app; `-m` runs sweeps).

With no overrides this is the embedded default run: `model=tiny` + a tiny memory on the
Wikipedia sample, on CPU in a few minutes.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pkmlm.cli._common import fail, hydra_files, precheck_overrides, user_errors_exit_2
from pkmlm.config import Config, config_dir, register_configs
from pkmlm.experiments.sweep import sweep_group

register_configs()


def job_config(cfg: DictConfig, sweep_dir: Optional[str]) -> Config:
    """The typed config a job trains with, the same in the precheck and in the job (so that its
    checks run once): the jobs of a sweep (`sweep_dir`) share one wandb group, that directory."""
    if sweep_dir is not None and cfg.logging.wandb.group is None:
        cfg.logging.wandb.group = sweep_group(sweep_dir)
    return OmegaConf.to_object(cfg)


def check_job(cfg: DictConfig, sweep_dir: Optional[str], job_dir: Path) -> None:
    """pkmlm-train's check of one job before Hydra runs: the one `train()` makes (`check_run`), and
    the resume check that `train()` makes again under the run's lock (`check_resume_early`)."""
    from pkmlm.train.checks import check_run
    from pkmlm.train.rundir import check_resume_early

    typed = job_config(cfg, sweep_dir)
    check_run(typed)
    check_resume_early(typed.resume, job_dir, OmegaConf.to_container(cfg, resolve=True))


@user_errors_exit_2
def _run(cfg: DictConfig) -> float:
    from pkmlm.train.loop import train

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    files = hydra_files(cfg)  # written by train() once it accepts the run (cli/_common.py)
    typed = job_config(cfg, str(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    summary = train(typed, run_dir, resolved, run_files=files)
    stopped = summary.get("stopped_by")
    if hydra_cfg.mode == RunMode.MULTIRUN and stopped in ("SIGTERM", "SIGINT", "SIGUSR1"):
        # The job has checkpointed; a stop signal ends the sweep too, rather than starting its next
        # job (relaunch with the same hydra.sweep.dir to resume every job).
        raise SystemExit(128 + signal.Signals[stopped].value)
    # Returned to Hydra (e.g. for sweepers that optimise a value): final validation loss.
    return float(summary.get("val/loss", float("nan")))


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float:
    return _run(cfg)


def main() -> None:
    # SLURM sweeps (hydra/launcher=slurm): submitit asks SLURM for this signal before the time
    # limit; USR1 is one the loop handles (finish the step, checkpoint, exit). Read by submitit
    # at import, here and (inherited) in each job.
    os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    from pkmlm.errors import UserError
    from pkmlm.parallel.launch import finish_distributed_run, prepare_cli, refuse_multirun, shutdown_distributed

    try:
        refuse_multirun(sys.argv)  # under torchrun, before the overrides are parsed as one run's
    except UserError as e:
        fail(str(e))
    # Every job's config, data paths and memory estimate, before Hydra writes anything (cli/_common.py).
    precheck_overrides(config_dir(), "config", check=check_job, writes_hydra_files=True)
    # torchrun (several processes): one process group, one shared run directory.

    try:
        info = prepare_cli(sys.argv)
    except UserError as e:
        fail(str(e))
    try:
        _hydra_main()
    except BaseException:  # a user error (exit 2) or a bug: leave the group, keep the exit status
        shutdown_distributed()
        raise
    if info is not None:
        finish_distributed_run()  # all ranks together, then os._exit(0) (see its docstring)


if __name__ == "__main__":
    main()
