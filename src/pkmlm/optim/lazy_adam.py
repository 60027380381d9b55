"""Lazy row-sparse Adam for memory value tables (`optim.sparse_values=true`).

With `optim.sparse_values=true` every memory layer's value table gets a sparse COO gradient (the
rows read this step and nothing else, `ProductKeyMemory.sparse_grad`), and `LazyAdam` updates those
rows only. Semantics ("lazy Adam", as torch.optim.SparseAdam and TensorFlow's LazyAdamOptimizer;
the paper trains its values with a sparse Adam, section 4.2):

- a row read in this step gets exactly AdamW's update (same formula, bias corrections by the
  number of steps taken so far, decoupled weight decay if its group has any);
- a row not read is left alone entirely: its value and both its moments. AdamW would instead
  decay its moments and keep moving it with its old momentum. So the two coincide when every row is
  read in every step (tested), and differ for rows read intermittently.

Costs: a step reads and writes only the touched rows (U of the M = n_keys**2), and the dense
(M, V) gradient is never formed. At the paper's batch size (16k tokens x 128 reads into 262k rows)
most rows are read every step, so the saving there is the gradient's memory and pass, not the
update; it grows as batches shrink or tables grow.

`SparseValuesAdamW` is the one optimizer object the loop sees: torch AdamW over the dense groups,
`LazyAdam` over the values, with one `param_groups` list and one `state_dict`; `parts()` gives the
two torch optimizers (checkpoints save them through torch.distributed.checkpoint). `clip.py`
clips dense and sparse gradients together.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LazyAdam(torch.optim.Optimizer):
    """Adam(W) for parameters with sparse COO gradients of whole rows, updating only those rows.

    `use_triton`: None picks the fused triton kernel (`pkmlm.optim.row_adam`) for CUDA
    parameters when triton imports, the torch formulation otherwise; True/False force it (the
    tests run the kernel on CPU under TRITON_INTERPRET=1).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        use_triton: bool | None = None,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"LazyAdam: invalid lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.use_triton = use_triton
        # State from the start (the moments would be allocated at the first step anyway): a
        # checkpoint then loads into it directly, where torch.distributed.checkpoint would first
        # initialise an empty state by a step with dense zero gradients, which this optimizer refuses.
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p)

    def _init_state(self, p: Tensor) -> None:
        # As torch AdamW's non-fused state: a host step counter (no sync for the bias corrections)
        # and moments shaped and typed like the parameter.
        state = self.state[p]
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _triton_for(self, p: Tensor) -> bool:
        if self.use_triton is not None:
            return self.use_triton
        from pkmlm.model.kernels import triton_available

        return p.is_cuda and triton_available()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError(
                        f"LazyAdam updates parameters with sparse gradients; a {tuple(p.shape)} parameter got a "
                        "dense one (is ProductKeyMemory.sparse_grad set? build the optimizer with "
                        "pkmlm.optim.use_sparse_value_grads)"
                    )
                grad = p.grad if p.grad.is_coalesced() else p.grad.coalesce()
                rows_U, grad_UV = grad.indices()[0], grad.values()
                state = self.state[p]
                if not state:
                    self._init_state(p)
                state["step"] += 1
                step = state["step"].item()
                bias_correction1 = 1 - beta1**step
                bias_correction2_sqrt = (1 - beta2**step) ** 0.5
                step_size = lr / bias_correction1
                if self._triton_for(p):
                    from pkmlm.optim.row_adam import row_adam_step

                    row_adam_step(
                        p,
                        state["exp_avg"],
                        state["exp_avg_sq"],
                        rows_U,
                        grad_UV,
                        beta1=beta1,
                        beta2=beta2,
                        eps=eps,
                        decay_factor=1 - lr * wd,
                        step_size=step_size,
                        bias_correction2_sqrt=bias_correction2_sqrt,
                    )
                    continue
                # The reference: torch AdamW's single-tensor arithmetic on the gathered rows.
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                param_UV = p.index_select(0, rows_U)
                m_UV = exp_avg.index_select(0, rows_U)
                v_UV = exp_avg_sq.index_select(0, rows_U)
                if wd != 0:
                    param_UV.mul_(1 - lr * wd)
                m_UV.lerp_(grad_UV, 1 - beta1)
                v_UV.mul_(beta2).addcmul_(grad_UV, grad_UV, value=1 - beta2)
                denom_UV = (v_UV.sqrt() / bias_correction2_sqrt).add_(eps)
                param_UV.addcdiv_(m_UV, denom_UV, value=-step_size)
                p.index_copy_(0, rows_U, param_UV)
                exp_avg.index_copy_(0, rows_U, m_UV)
                exp_avg_sq.index_copy_(0, rows_U, v_UV)
        return loss


# The optimizer groups of tables that take row-sparse gradients: memory value tables
# (pkmlm.optim.groups) and side layers' tables (`SideLayer.table_parameters`).
VALUES_GROUP = "memory_values"
SIDE_TABLES_GROUP = "side_tables"
SPARSE_GROUPS = (VALUES_GROUP, SIDE_TABLES_GROUP)


class SparseValuesAdamW:
    """torch AdamW over the dense groups and `LazyAdam` over the `memory_values` and `side_tables`
    groups (`SPARSE_GROUPS`), as one optimizer: `param_groups` (the same dicts, so `set_lr` reaches
    both), `step`, `zero_grad`, `state_dict` / `load_state_dict` (`{"dense": ..., "values": ...}`)."""

    def __init__(self, groups: list[dict], betas, eps: float, fused: bool):
        dense = [g for g in groups if g["name"] not in SPARSE_GROUPS]
        values = [g for g in groups if g["name"] in SPARSE_GROUPS]
        self.dense = torch.optim.AdamW(dense, betas=betas, eps=eps, fused=fused) if dense else None
        self.values = LazyAdam(values, betas=betas, eps=eps) if values else None

    def parts(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.dense, self.values) if o is not None]

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.parts() for g in o.param_groups]

    def step(self) -> None:
        for o in self.parts():
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts():
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {
            "dense": self.dense.state_dict() if self.dense else None,
            "values": self.values.state_dict() if self.values else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"dense", "values"}:
            raise ValueError("not a sparse-values optimizer state (was the run made with optim.sparse_values=false?)")
        for name, o in (("dense", self.dense), ("values", self.values)):
            if (o is None) != (state[name] is None):
                raise ValueError(
                    f"optimizer state has {'no' if state[name] is None else 'a'} {name} part; "
                    "this model has the opposite"
                )
            if o is not None:
                o.load_state_dict(state[name])
