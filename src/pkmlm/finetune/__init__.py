"""Finetuning from another run: which parameters and which memory rows train (`train.finetune`).

`config`: `FinetuneConfig`, checks, and the `init_from` model comparison; `background`: slot
statistics of the pretraining data (cached in the run directory); `sparse`: TF-IDF row selection,
freezing, and the optimizer that moves only selected rows (Lin et al. 2025).
"""

from pkmlm.finetune.background import (
    BACKGROUND_FILE,
    BackgroundCounts,
    background_counts,
    count_background,
    load_background,
    save_background,
)
from pkmlm.finetune.config import (
    FINETUNE_MODES,
    FinetuneConfig,
    check_finetune_config,
    init_from_mismatch,
    model_config_diff,
)
from pkmlm.finetune.sparse import (
    RowSelection,
    apply_finetune_mode,
    finetune_optimizer,
    idf,
    row_selection,
    select_rows,
    selected_grad,
    tfidf,
)
from pkmlm.finetune.tables import SlotPool, slot_pools

__all__ = [
    "BACKGROUND_FILE",
    "FINETUNE_MODES",
    "BackgroundCounts",
    "FinetuneConfig",
    "RowSelection",
    "SlotPool",
    "apply_finetune_mode",
    "background_counts",
    "check_finetune_config",
    "count_background",
    "finetune_optimizer",
    "idf",
    "init_from_mismatch",
    "load_background",
    "model_config_diff",
    "row_selection",
    "save_background",
    "select_rows",
    "selected_grad",
    "slot_pools",
    "tfidf",
]
