"""Memory finetuning: train only value rows, the ones a batch reads (`memory`) or its top-t by
TF-IDF against the pretraining data (`sparse_memory`; Lin et al. 2025, arXiv 2510.15103, section 3).

Per optimizer step, for each slot pool (`tables.py`: a value table, with PEER's down vectors) with
c(i) the reads of slot i in this step's batch (all layers reading the pool, all heads, all
micro-batches), |B| the background batches and df(i) the background batches that read slot i
(`background.py`):

    TF-IDF(i) = c(i) / sum_j c(j)  *  log((|B| + 1) / (df(i) + 1))

and the `top_t` slots of the batch by that score (only slots the batch read) are the rows that may
change; `memory` mode takes every slot the batch read. Everything else is frozen:

1. `apply_finetune_mode` turns off gradients of every parameter but the value tables, and pins the
   frozen BatchNorm query norms in eval mode (their running statistics are buffers the training
   forward would otherwise update);
2. `RowSelection.restrict_grads_` (after backward, before clipping) replaces each value table's gradient
   by a sparse COO gradient of the selected rows only;
3. `finetune_optimizer` updates exactly the rows of that gradient: SGD without momentum or weight
   decay, or a lazy Adam (`pkmlm.optim.LazyAdam`, as `torch.optim.SparseAdam`: a row's value and
   moments change only in the steps that select it). AdamW would move unselected rows through its moments and decay.

Shape legend: S slots of a pool, R reads, V value dim.
"""

from __future__ import annotations

import math
import types

import torch
from torch import Tensor, nn

from pkmlm.finetune.background import BackgroundCounts
from pkmlm.finetune.config import FinetuneConfig
from pkmlm.finetune.tables import SlotPool, slot_ids, slot_pools
from pkmlm.metrics.memory_usage import add_observer, remove_observer, unwrap_model
from pkmlm.optim import VALUES_GROUP, LazyAdam

# --- ranking --------------------------------------------------------------------------------------


def idf(batches_with_slot_S: Tensor, num_batches: int) -> Tensor:
    """log((|B| + 1) / (df + 1)) per slot, float32 (Lin et al.'s smoothed IDF: 0 for a slot every
    background batch reads, log(|B| + 1) for one none reads)."""
    return torch.log((num_batches + 1) / (batches_with_slot_S.double() + 1)).float()


def tfidf(count_S: Tensor, idf_S: Tensor) -> Tensor:
    """c(i) / sum_j c(j) * idf(i), float32; all zeros for a batch with no reads."""
    total = count_S.sum().clamp_min(1)
    return (count_S.double() / total).float() * idf_S


def select_rows(count_S: Tensor, score_S: Tensor | None, top_t: int | None) -> Tensor:
    """Bool mask (S,) of the rows to train: the `top_t` highest-scoring slots among those read
    (`count > 0`), or every slot read when `score_S` is None. Ties at the cut are broken by
    `torch.topk`. No host sync."""
    read_S = count_S > 0
    if score_S is None:
        return read_S
    k = min(top_t, count_S.numel())
    ranked_S = torch.where(read_S, score_S, torch.full_like(score_S, -math.inf))
    top_k = ranked_S.topk(k).indices
    mask_S = torch.zeros_like(read_S)
    mask_S[top_k] = read_S[top_k]  # fewer than k slots read: the unread ones stay out
    return mask_S


def selected_grad(grad: Tensor, mask_S: Tensor) -> Tensor:
    """A sparse COO gradient holding only the masked rows of `grad` (dense `(S, V)` or sparse COO).

    One host sync (the row count), as any sparse update needs."""
    if grad.is_sparse:
        grad = grad.coalesce()
        rows_R = grad.indices()[0]
        keep_R = mask_S[rows_R]
        return torch.sparse_coo_tensor(
            grad.indices()[:, keep_R], grad.values()[keep_R], grad.shape, is_coalesced=True, check_invariants=False
        )
    rows_R = mask_S.nonzero().squeeze(1)
    # Valid by construction (sorted, distinct, in range): no invariant check needed.
    return torch.sparse_coo_tensor(
        rows_R.unsqueeze(0), grad.index_select(0, rows_R), grad.shape, is_coalesced=True, check_invariants=False
    )


# --- per-step selection ---------------------------------------------------------------------------


class _StepCounts:
    """Observer: reads of one pool's slots in the current optimizer step."""

    def __init__(self, n_slots: int, device: torch.device):
        self.count = torch.zeros(n_slots, dtype=torch.int64, device=device)

    def __call__(self, indices_NHK: Tensor, weights_NHK: Tensor) -> None:
        ids_R = slot_ids(indices_NHK)
        self.count.index_add_(0, ids_R, torch.ones_like(ids_R))


class RowSelection:
    """Counts each step's reads per slot pool and restricts the value tables' gradients to the selected rows.

    `background` and `top_t` given: `sparse_memory` (TF-IDF top-t); both None: `memory` (every row read).
    Attach before the step's forwards (`attach`, once), call `restrict_grads_` after the step's last
    backward: it selects, rewrites the gradients, resets the counts and returns {pool: mask (S,)}.
    With several processes the counts are summed over ranks first, so all ranks select alike.
    """

    def __init__(self, model: nn.Module, background: BackgroundCounts | None = None, top_t: int | None = None):
        if (background is None) != (top_t is None):
            raise ValueError("give both background and top_t (sparse_memory) or neither (memory)")
        self.pools: dict[str, SlotPool] = slot_pools(model)
        self.top_t = top_t
        self.counts = {n: _StepCounts(pool.n_slots, pool.device) for n, pool in self.pools.items()}
        self.background = background
        self.idf: dict[str, Tensor] | None = None
        if background is not None:
            missing = set(self.pools) - set(background.batches_with_slot)
            if missing:
                raise ValueError(f"background counts have no slot pool {sorted(missing)}")
            self._set_idf()

    def _set_idf(self) -> None:
        background = self.background
        self.idf = {
            n: idf(background.batches_with_slot[n].to(pool.device), background.num_batches)
            for n, pool in self.pools.items()
        }

    # sparse_memory's saved state: the background counts (the IDF follows from them).
    def state_dict(self) -> dict:
        return self.background.state_dict() if self.background is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.background is not None:
            self.background.load_state_dict(state)
            self._set_idf()

    def attach(self) -> None:
        for name, pool in self.pools.items():
            for memory in pool.layers.values():
                add_observer(memory, self.counts[name])

    def detach(self) -> None:
        for name, pool in self.pools.items():
            for memory in pool.layers.values():
                remove_observer(memory, self.counts[name])

    def select(self) -> dict[str, Tensor]:
        """{pool: bool mask (S,)} of this step's rows (counts summed over ranks first)."""
        import torch.distributed as dist

        masks = {}
        for name, counts in self.counts.items():
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(counts.count)
            score = None if self.idf is None else tfidf(counts.count, self.idf[name])
            masks[name] = select_rows(counts.count, score, self.top_t)
        return masks

    @torch.no_grad()
    def restrict_grads_(self) -> dict[str, Tensor]:
        """Select, keep only the selected rows in each table's gradient, reset the counts."""
        masks = self.select()
        for name, pool in self.pools.items():
            for weight in pool.weights:  # values, and PEER's down vectors: the same slot rows
                if weight.grad is not None:
                    weight.grad = selected_grad(weight.grad, masks[name])
            self.counts[name].count.zero_()
        return masks


# --- what trains, and how -------------------------------------------------------------------------


def _eval_only_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """`train()` of a frozen BatchNorm: stays in eval mode whatever the model's mode."""
    return nn.Module.train(self, False)


def apply_finetune_mode(model: nn.Module, mode: str) -> list[nn.Parameter]:
    """Freeze what `mode` does not train; returns the parameters that still train.

    `full`: nothing changes. `memory` / `sparse_memory`: `requires_grad=False` on every parameter
    but the value tables; BatchNorm layers (the memory's query norm) are put in eval mode for good
    (their `train` keeps eval), so that their running statistics stay those of the pretrained run
    and the finetuned memory retrieves as the pretrained one does at inference.
    """
    inner = unwrap_model(model)
    if mode == "full":
        return [p for p in inner.parameters() if p.requires_grad]
    if mode not in ("memory", "sparse_memory"):
        raise ValueError(f"unknown finetune mode {mode!r}")
    values = {id(w) for pool in slot_pools(inner).values() for w in pool.weights}
    for p in inner.parameters():
        p.requires_grad_(id(p) in values)
    for module in inner.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train = types.MethodType(_eval_only_train, module)
            module.eval()
    return [p for p in inner.parameters() if p.requires_grad]


def finetune_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """The value tables' optimizer in the memory modes: one group named `memory_values` with its
    `peak_lr` (for the loop's schedule). Expects sparse gradients of the selected rows
    (`RowSelection.restrict_grads_`)."""
    params = [w for pool in slot_pools(model).values() for w in pool.weights]
    group = {"name": VALUES_GROUP, "params": params, "lr": cfg.lr, "peak_lr": cfg.lr}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD([group], lr=cfg.lr, momentum=0.0, weight_decay=0.0)
    # pkmlm's lazy Adam (as torch.optim.SparseAdam: unselected rows keep value and moments), whose
    # state exists from the start, so that checkpoints save and load it (SparseAdam's empty state
    # would be initialised by torch.distributed.checkpoint with a dense step, which it refuses).
    return LazyAdam([group], lr=cfg.lr)


def row_selection(
    model: nn.Module, mode: str, cfg: FinetuneConfig, background: BackgroundCounts | None = None
) -> RowSelection:
    """The attached `RowSelection` of a memory mode (`background` required for `sparse_memory`)."""
    if mode == "sparse_memory":
        if background is None:
            raise ValueError("sparse_memory needs the background counts (finetune.background.background_counts)")
        selection = RowSelection(model, background, cfg.top_t)
    elif mode == "memory":
        selection = RowSelection(model)
    else:
        raise ValueError(f"no row selection in finetune mode {mode!r}")
    selection.attach()
    return selection
