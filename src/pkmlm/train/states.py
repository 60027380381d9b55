"""The pieces of a training run's saved state, registered once each (`PIECES`).

`setup()` builds the run's `States` (`build_states`) from its parts; `save_checkpoint` saves it,
`setup` restores it, the loop calls its `step_done()` after each optimizer step and logs its
`metrics()` with each evaluation (pkmlm.checkpoint.states). Adding a piece of saved state is one
registration here: a function from the run's `StateParts` to a `Piece` (or None when the run has no
such state), decorated with `@register_piece`; nothing else changes (docs/architecture.md).

The learning-rate schedule has no piece: it is a function of `TrainState.step` (optim/schedule.py),
whose value the `train` piece saves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from pkmlm.checkpoint.pieces import ModelState, OptimizerState, RngStreams
from pkmlm.checkpoint.states import Piece, States
from pkmlm.config import Config
from pkmlm.data.batch_source import BatchSource
from pkmlm.finetune import RowSelection
from pkmlm.metrics.memory_usage import StaleTrackers
from pkmlm.optim import torch_optimizers
from pkmlm.optim.groups import Optimizer
from pkmlm.parallel.data_shards import load_shard_states, shard_states
from pkmlm.parallel.env import DistInfo
from pkmlm.train.state import TrainState


@dataclass
class StateParts:
    """What `setup` has built by the time the run's state is gathered (before it is restored)."""

    cfg: Config
    info: DistInfo
    model: nn.Module  # the plain model (state dicts name its parameters)
    optimizer: Optimizer
    batches: BatchSource  # this rank's training batches (a pipeline, or DataShards)
    progress: TrainState
    selection: RowSelection | None = None  # train.finetune=memory|sparse_memory


PieceFactory = Callable[[StateParts], "Piece | None"]
PIECES: list[PieceFactory] = []  # in the order the pieces are saved and restored


def register_piece(factory: PieceFactory) -> PieceFactory:
    """Add `factory` to the pieces every run gathers (a decorator)."""
    PIECES.append(factory)
    return factory


def build_states(parts: StateParts) -> States:
    return States([piece for factory in PIECES if (piece := factory(parts)) is not None])


class DataPosition:
    """Where each of this rank's data shards is: `{"shard_XXXXX": its pipeline's state_dict()}`
    (one file per shard, written by the rank running it: pkmlm.parallel.data_shards)."""

    def __init__(self, batches: BatchSource):
        self.batches = batches

    def state_dict(self) -> dict[str, Any]:
        return {f"shard_{s:05d}": state for s, state in shard_states(self.batches).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_shard_states(self.batches, {int(key.removeprefix("shard_")): value for key, value in state.items()})


@register_piece
def model_piece(parts: StateParts) -> Piece:
    return Piece("model", ModelState(parts.model), "tensors", "the model weights")


@register_piece
def optim_piece(parts: StateParts) -> Piece:
    optimizers = OptimizerState(parts.model, torch_optimizers(parts.optimizer))
    return Piece("optim", optimizers, "tensors", "the optimizer state")


@register_piece
def data_piece(parts: StateParts) -> Piece:
    return Piece("data", DataPosition(parts.batches), "rank_files", "the data pipeline state")


@register_piece
def rng_piece(parts: StateParts) -> Piece:
    # Dropout masks continue exactly; with another rank count each rank keeps its fresh seed.
    same_ranks = lambda meta: meta.get("world_size") == parts.info.world_size  # noqa: E731
    return Piece("rng", RngStreams(parts.info.rank), "rank_files", "the RNG states", restore_if=same_ranks)


@register_piece
def train_piece(parts: StateParts) -> Piece:
    return Piece("train", parts.progress, "meta", "the loop's counters")


@register_piece
def stale_piece(parts: StateParts) -> Piece | None:
    """`memory/layer{i}/stale` of every memory layer (none without memory layers); a checkpoint
    written before the trackers existed leaves them fresh."""
    stale = StaleTrackers(parts.model, parts.cfg.metrics.stale_window)
    return Piece("stale", stale, "tensors", "the staleness trackers", optional=True) if stale else None


@register_piece
def background_piece(parts: StateParts) -> Piece | None:
    """`sparse_memory`'s background slot counts (finetune/background.py), so that a resume needs
    neither the `init_from` checkpoint nor the run directory's cache; a checkpoint written before
    they were saved keeps the counts `setup` read from that cache (or recounted)."""
    selection = parts.selection
    if selection is None or selection.background is None:
        return None
    return Piece("background", selection, "tensors", "the finetuning background counts", optional=True)
