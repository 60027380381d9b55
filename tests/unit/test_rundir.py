"""The resume check of the run directory: which config differences refuse a resume."""

from __future__ import annotations

import copy

from omegaconf import OmegaConf

from pkmlm.config import Config
from pkmlm.train.rundir import config_differences, resume_conflicts


def _config() -> dict:
    return OmegaConf.to_container(OmegaConf.structured(Config), resolve=False)


def test_a_key_added_to_the_schema_after_a_run_was_saved_does_not_strand_it():
    current = _config()
    saved = copy.deepcopy(current)
    del saved["model"]["memory"]["balance_loss"]  # a run saved before the key existed
    del saved["finetune"]
    assert config_differences(saved, current) == []
    assert resume_conflicts(saved, 10, current) == []


def test_a_new_key_set_away_from_its_default_is_a_difference():
    current = _config()
    saved = copy.deepcopy(current)
    del saved["model"]["memory"]["balance_loss"]
    current["model"]["memory"]["balance_loss"] = 0.5
    assert config_differences(saved, current) == ["model.memory.balance_loss: '<missing>' -> 0.5"]


def test_changed_and_removed_keys_are_differences():
    current = _config()
    saved = copy.deepcopy(current)
    saved["model"]["dim"] = current["model"]["dim"] * 2
    saved["model"]["old_key_no_longer_in_the_schema"] = 1
    diffs = config_differences(saved, current)
    assert any(d.startswith("model.dim:") for d in diffs)
    assert any(d.startswith("model.old_key_no_longer_in_the_schema:") for d in diffs)
    current["logging"]["progress"] = not current["logging"]["progress"]  # may differ on resume
    assert not any(d.startswith("logging.") for d in config_differences(saved, current))
