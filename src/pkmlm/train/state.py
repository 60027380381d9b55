"""`TrainState`: the loop's counters, saved in every checkpoint's `meta.json`.

Everything else a run carries across a resume is a stateful piece of its own (model and
optimizers, data pipeline, RNG: `pkmlm.checkpoint.pieces`); a new counter is one field here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed (the first update is step 1)
    tokens: int = 0  # training tokens of all ranks so far
    nonfinite_skipped: int = 0  # steps skipped for a non-finite loss or gradient, in all
    wall_time_s: float = 0.0  # time of the run's earlier segments (summed over resumes)
    train_time_s: float = 0.0  # of which training (evaluation and checkpoints excluded)
    wandb_run_id: str | None = None  # so that a resumed run continues its own wandb run

    def to_meta(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in meta.items() if k in names})
