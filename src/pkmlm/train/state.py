"""`TrainState`: the loop's counters, saved in every checkpoint's `meta.json`.

A Stateful piece of the run's `states` (train/states.py) like the model, optimizers, data position
and RNG streams; a new counter is one field here.
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

    def state_dict(self) -> dict[str, Any]:
        """meta.json's fields (JSON values)."""
        return dataclasses.asdict(self)

    def load_state_dict(self, meta: dict[str, Any]) -> None:
        """This state's fields of `meta` (a meta.json: other fields are ignored), in place."""
        for field in dataclasses.fields(self):
            if field.name in meta:
                setattr(self, field.name, meta[field.name])
