"""A run's saved state as one mapping of Stateful pieces (pkmlm.checkpoint.states, pkmlm.train.states):
each kind of piece round-trips; a piece registered by one `@register_piece` is saved, restored and
logged with no other edit; a checkpoint in the layout written before `states` existed resumes bit
for bit; a piece an older checkpoint lacks is refused in one line, or left as built when optional."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import read_rows, train_in_process

from pkmlm.checkpoint import store
from pkmlm.checkpoint.files import write_manifest
from pkmlm.checkpoint.pieces import ModelState, RngStreams
from pkmlm.checkpoint.states import Piece, States, saved_names
from pkmlm.config import register_configs
from pkmlm.errors import UserError
from pkmlm.parallel.env import DistInfo
from pkmlm.train import states as train_states
from pkmlm.train.state import TrainState

register_configs()


class ReadCounts:
    """A real small piece: how often each of 8 buckets was hit, as a tensor."""

    def __init__(self) -> None:
        self.counts = torch.zeros(8, dtype=torch.int64)

    def state_dict(self) -> dict:
        return {"counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.counts.copy_(state["counts"])


def _states(linear: torch.nn.Linear, progress: TrainState, extra: Piece | None = None) -> States:
    pieces = [
        Piece("model", ModelState(linear), "tensors"),
        Piece("rng", RngStreams(0), "rank_files", "the RNG states"),
        Piece("train", progress, "meta"),
    ]
    return States(pieces + ([extra] if extra else []))


def _reseal(ckpt: Path, edit) -> None:
    meta = json.loads((ckpt / store.META).read_text())
    (ckpt / store.META).write_text(json.dumps(edit(meta)))
    (ckpt / "checksums.sha256").unlink()
    write_manifest(ckpt)


def test_each_kind_of_piece_round_trips(tmp_path):
    torch.manual_seed(0)
    linear, progress, counts = torch.nn.Linear(3, 2), TrainState(step=5, tokens=40), ReadCounts()
    counts.counts[3] = 7
    saved = _states(linear, progress, Piece("counts", counts, "tensors"))
    ckpt = saved.save(tmp_path, 5, {"note": "x"}, DistInfo(), keep_last=2)
    draw = torch.rand(4)  # the RNG stream after the save
    meta = store.read_meta(ckpt)
    assert meta["states"] == ["model", "rng", "train", "counts"] and meta["note"] == "x"
    assert (ckpt / "rng" / "rank_00000.json").is_file()

    torch.manual_seed(1)
    other, fresh, fresh_counts = torch.nn.Linear(3, 2), TrainState(), ReadCounts()
    kept = _states(other, fresh, Piece("counts", fresh_counts, "tensors")).restore(ckpt, meta, DistInfo())
    assert kept == []
    assert torch.equal(other.weight, linear.weight) and torch.equal(other.bias, linear.bias)
    assert (fresh.step, fresh.tokens) == (5, 40) and fresh_counts.counts[3] == 7
    assert torch.equal(torch.rand(4), draw)


def test_a_piece_older_checkpoints_lack_is_refused_or_left_as_built(tmp_path):
    linear, progress = torch.nn.Linear(3, 2), TrainState(step=2)
    ckpt = _states(linear, progress).save(tmp_path, 2, {}, DistInfo(), keep_last=2)
    meta = store.read_meta(ckpt)
    required = _states(torch.nn.Linear(3, 2), TrainState(), Piece("counts", ReadCounts(), "tensors", "the counts"))
    with pytest.raises(UserError) as err:
        required.restore(ckpt, meta, DistInfo())
    assert "\n" not in str(err.value) and "no saved 'counts' piece (the counts)" in str(err.value)
    optional = ReadCounts()
    optional.counts += 1
    states = _states(torch.nn.Linear(3, 2), TrainState(), Piece("counts", optional, "tensors", optional=True))
    assert states.restore(ckpt, meta, DistInfo()) == ["counts"] and optional.counts.sum() == 8


def test_checkpoints_without_a_states_list_hold_the_fixed_set():
    assert saved_names({"step": 1}) == {"model", "optim", "data", "rng", "train"}
    assert saved_names({"stale_slots": [1]}) == {"model", "optim", "data", "rng", "train", "stale"}
    assert saved_names({"states": ["model", "x"]}) == {"model", "x"}


class StepsSeen:
    """A real small piece of training state: steps seen by this run, across resumes (also logged)."""

    def __init__(self) -> None:
        self.steps = torch.zeros((), dtype=torch.int64)

    def step_done(self) -> None:
        self.steps += 1

    def metrics(self) -> dict[str, float]:
        return {"test/steps_seen": float(self.steps)}

    def state_dict(self) -> dict:
        return {"steps": self.steps.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.steps.copy_(state["steps"])


def test_a_registered_piece_is_saved_restored_and_logged_with_no_other_edit(tmp_path, monkeypatch):
    monkeypatch.setattr(train_states, "PIECES", list(train_states.PIECES))
    train_states.register_piece(lambda parts: Piece("steps_seen", StepsSeen(), "tensors", "the steps seen"))
    steps = ["train.max_steps=4", "eval.interval=2", "checkpoint.interval=100"]
    train_in_process(tmp_path / "run", *steps, "train.stop_at_step=2")
    ckpt = store.latest_valid(tmp_path / "run" / "checkpoints")
    assert "steps_seen" in store.read_meta(ckpt)["states"]
    assert int(store.read(ckpt)["steps_seen"]["steps"]) == 2
    train_in_process(tmp_path / "run", *steps)  # resumed: counts on from 2, not from 0
    seen = [(r["step"], r["test/steps_seen"]) for r in read_rows(tmp_path / "run") if "test/steps_seen" in r]
    assert seen == [(2, 2.0), (4, 4.0)]


def test_a_checkpoint_in_the_layout_before_states_resumes_bit_for_bit(tmp_path):
    """The layout pkmlm wrote before `states` (commit cc44d7e): the same files and tensor keys, and
    meta.json with `stale_slots` but no `states`. Built from a checkpoint of today, then resumed."""
    steps = ["train.max_steps=4", "eval.interval=2", "checkpoint.interval=100"]
    train_in_process(tmp_path / "straight", *steps)
    train_in_process(tmp_path / "split", *steps, "train.stop_at_step=2")
    ckpt = store.latest_valid(tmp_path / "split" / "checkpoints")
    files = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    assert files == {".metadata", "__0_0.distcp", "meta.json", "checksums.sha256"} | {
        "data/shard_00000.json",
        "rng/rank_00000.json",
    }
    assert {k for k in store.read(ckpt) if not k.endswith(".json") and k != "meta"} == {"model", "optim", "stale"}
    _reseal(ckpt, lambda meta: {**{k: v for k, v in meta.items() if k != "states"}, "stale_slots": [1]})
    train_in_process(tmp_path / "split", *steps)
    rows = {name: read_rows(tmp_path / name) for name in ("straight", "split")}
    losses = {name: [(r["step"], r["train/loss"]) for r in rs if "train/loss" in r] for name, rs in rows.items()}
    assert losses["straight"] == losses["split"] and len(losses["straight"]) == 4
    last = {name: [r for r in rs if "val/ppl" in r][-1] for name, rs in rows.items()}
    for key in ("val/ppl", "memory/layer1/usage", "memory/layer1/stale"):
        assert last["straight"][key] == last["split"][key], key
