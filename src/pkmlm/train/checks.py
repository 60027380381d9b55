"""Everything a training run can be refused for before it starts, in one function.

`pkmlm-train` calls `check_run` for every job before Hydra writes anything (cli/_common.py) and
`train()` calls it on the config it is given (it is also called from Python); `checked_once` makes
the second call a lookup, so a run checks its config, data paths, tokenizer and memory estimate
once per process (tests/e2e/test_config_train.py counts it). The data plan found by the first check is the
run's.
"""

from __future__ import annotations

import os

import torch

from pkmlm.config import Config, check_fits_device, validate
from pkmlm.data.loader import resolve_data
from pkmlm.data.mixing import DataPlan
from pkmlm.data.tokenizer import check_special_tokens, load_tokenizer
from pkmlm.errors import checked_once, require
from pkmlm.train.rundir import check_input_paths
from pkmlm.train.setup import pick_device


@checked_once
def check_run(cfg: Config) -> DataPlan:
    """Cheapest first: every value (`pkmlm.config.validate`), the data's inputs (globs expanded,
    files stat'd, the prepared index read), the tokenizer and resume paths (a given tokenizer must
    define data.special_tokens), and whether the model fits the device's memory. Returns the data
    plan (`resolve_data`)."""
    validate(cfg)
    plan = resolve_data(cfg.data)
    check_input_paths(cfg)
    if cfg.data.tokenizer and cfg.data.special_tokens:  # a given tokenizer is not extended: it must have them
        check_special_tokens(load_tokenizer(cfg.data.tokenizer), cfg.data)
    device = pick_device(cfg.train.device)
    if device.type == "cuda" and device.index is None:  # torchrun: this process's GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    # DDP's gradient buckets cannot hold sparse COO gradients: with several processes the first step
    # failed inside DDP ("Cannot access storage of SparseTensorImpl"), for any memory model.
    require(
        not (cfg.optim.sparse_values and world_size > 1),
        "optim.sparse_values",
        cfg.optim.sparse_values,
        f"false when training on {world_size} processes (WORLD_SIZE={world_size}): DDP cannot reduce sparse "
        "gradients; train on one process or with dense value gradients",
    )
    check_fits_device(cfg, device, world_size=world_size)
    return plan
