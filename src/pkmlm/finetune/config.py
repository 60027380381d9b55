"""Typed config of finetuning (`train.finetune`, `finetune.*`) and the `init_from` model check.

Three modes, all started from another run's weights (`init_from=RUN_OR_CHECKPOINT`):

- `full`: every parameter trains, with the run's own `optim.*` (ordinary training from those weights);
- `memory`: only the memory value tables train, every row a batch reads (`finetune.optimizer`);
- `sparse_memory`: only the `finetune.top_t` value rows that the batch reads most relative to a
  background sample of the pretraining data (TF-IDF), Lin et al. 2025, "Continual Learning via
  Sparse Memory Finetuning" (arXiv 2510.15103).

Checks follow the project's one style (`pkmlm.errors.require`, at the config boundary).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Optional

from pkmlm.errors import ConfigError, choices, require, require_one_of
from pkmlm.model import ModelConfig

FinetuneMode = Literal["full", "memory", "sparse_memory"]  # train.finetune
FINETUNE_MODES = choices(FinetuneMode)
FinetuneOptimizer = Literal["sgd", "adam"]  # finetune.optimizer


@dataclass
class FinetuneConfig:
    """`finetune.*`: the memory modes' settings (ignored by `train.finetune=full`).

    Defaults are Lin et al. 2025's TriviaQA setting: IDF from 1,000 background batches of the
    pretraining data, the top 500 slots per batch, plain SGD at learning rate 2 on the values
    (their finding: sparse updates need no adaptive optimizer; Adam is offered for comparison, as a
    lazy Adam that never touches an unselected row). The IDF depends on what a "batch" is: count
    the background with the finetuning batch size.
    """

    # The default run of 1,500 steps gets 150 (counting is a forward pass per batch, a fraction of
    # the source's training time; 1,000 took 12 CPU-minutes before the first step).
    background_batches: Optional[int] = None  # init_from data batches counted once; null: a tenth of its steps, <= 1000
    top_t: int = 500  # value rows trained per batch and table (sparse_memory)
    optimizer: str = "sgd"  # sgd (no momentum, no weight decay) | adam (lazy: pkmlm.optim.LazyAdam)
    lr: float = 2.0  # the values' learning rate (the paper's for SGD; for adam, ~1e-3)

    def validate(self) -> None:
        """`finetune.*` on their own (`check_finetune_config` adds the rules that involve the model)."""
        b = self.background_batches
        require(
            b is None or (isinstance(b, int) and not isinstance(b, bool) and b >= 1),
            "finetune.background_batches",
            b,
            "null (a tenth of the source run's steps, at most 1000) or an integer >= 1 (batches of pretraining "
            "data for the slots' document frequencies)",
        )
        require(
            isinstance(self.top_t, int) and self.top_t >= 1,
            "finetune.top_t",
            self.top_t,
            ">= 1 (value rows trained per batch)",
        )
        require_one_of("finetune.optimizer", self.optimizer, FinetuneOptimizer)
        require(
            self.lr > 0 and math.isfinite(self.lr),
            "finetune.lr",
            self.lr,
            "a positive finite number",
        )


BACKGROUND_MAX = 1000  # Lin et al. 2025's count of background batches


def background_batch_count(configured: Optional[int], source_steps: int) -> int:
    """`finetune.background_batches`, or (null) the default proportionate to the source run: a tenth
    of the batches it trained on, at least 1 and at most `BACKGROUND_MAX`."""
    if configured is not None:
        return configured
    return max(1, min(BACKGROUND_MAX, source_steps // 10))


def check_finetune_config(
    mode: str, cfg: FinetuneConfig, *, init_from: str | None, memory_layers: list, shard_values: bool
) -> None:
    """`train.finetune` and `finetune.*` against each other and the model (`model.memory.*`)."""
    require_one_of("train.finetune", mode, FinetuneMode)
    FinetuneConfig.validate(cfg)
    if mode == "full":
        return
    require(
        init_from is not None,
        "train.finetune",
        mode,
        "full, or set init_from=RUN_OR_CHECKPOINT: the memory modes finetune a trained model",
    )
    require(
        len(memory_layers) > 0,
        "train.finetune",
        mode,
        "full for a model without memory layers (model.memory.layers=[])",
    )
    require(
        not shard_values,
        "model.memory.shard_values",
        shard_values,
        f"false with train.finetune={mode} (row-selected updates need whole rows on each process)",
    )


# --- init_from: the same model --------------------------------------------------------------------

# Keys that may differ between the run a finetune starts from and the finetune: they change how the
# forward is computed or regularised (or trained: a loss coefficient), never what the weights mean.
MAY_DIFFER = frozenset(
    {
        "dropout",
        "memory.input_dropout",
        "memory.query_dropout",
        "memory.value_dropout",
        "memory.kernel",
        "memory.retrieval_precision",
        "memory.topk_impl",
        "memory.read_impl",
        "memory.scores_backward",
        "memory.shard_values",
        "memory.balance_loss",
        # Only names the variant the options describe (checked against them); absent from runs
        # saved before the variant registry (issue 22), which must stay valid init_from sources.
        "memory.kind",
    }
)

_MISSING = object()


def _flat(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dataclasses / mappings as {dotted key: leaf value}."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def model_config_diff(a: Any, b: Any) -> list[str]:
    """Keys (dotted, relative to `model.`) whose values differ between two model configs, sorted.

    `a` and `b` are `ModelConfig`s or their dicts (a checkpoint's `model_config`); a key present in
    one only counts as different unless it is at the schema's default (a key added after that run
    was saved, e.g. a new variant's option: the older code ran with its default); keys in
    `MAY_DIFFER` are ignored. Compare resolved configs (the vocabulary size from the tokenizer, not
    `model.vocab_size=0`).
    """
    flat_a, flat_b = _flat(a), _flat(b)
    defaults = _flat(ModelConfig())
    keys = (set(flat_a) | set(flat_b)) - MAY_DIFFER
    return sorted(
        k for k in keys if flat_a.get(k, defaults.get(k, _MISSING)) != flat_b.get(k, defaults.get(k, _MISSING))
    )


def init_from_mismatch(init_from: str, ours: Any, theirs: Any) -> ConfigError | None:
    """The one-line error for a model that differs from the `init_from` run's, or None.

    `ours`: this run's resolved model config; `theirs`: the checkpoint's `model_config`.
    """
    diff = model_config_diff(ours, theirs)
    if not diff:
        return None
    flat_ours, flat_theirs = _flat(ours), _flat(theirs)

    def shown(flat: dict, key: str) -> str:
        return repr(flat[key]) if key in flat else "absent"

    parts = ", ".join(f"model.{k} ({shown(flat_ours, k)} here, {shown(flat_theirs, k)} there)" for k in diff)
    return ConfigError(
        "init_from",
        init_from,
        f"its model differs from this run's in {parts}; "
        "finetune with that run's model.* settings (or start without init_from)",
    )
