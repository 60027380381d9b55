"""Looking inside a trained model's memory (`pkmlm-inspect`): which slots are read, how often, by
which contexts, and how that changed over the run's checkpoints.

`slots`: the two streaming passes over evaluation batches (counts on device; bounded top-weight
contexts for the slots reported); `report`: the markdown report and its PNGs.

Named `analysis` rather than `inspect`: it analyses a model, and a package named like the standard
library's `inspect` module is a trap for anyone who runs a file from inside it.
"""

from pkmlm.analysis.slots import (
    Context,
    LayerCounts,
    SlotContexts,
    collect_contexts,
    count_reads,
    pick_slots,
)

__all__ = ["Context", "LayerCounts", "SlotContexts", "collect_contexts", "count_reads", "pick_slots"]
