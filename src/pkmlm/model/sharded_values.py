"""A memory value table split by columns across the ranks of a process group (`shard_values`).

Each of the W ranks of the group holds all M = n_keys**2 rows but only V/W of the V columns: rank r
owns columns [r * V/W, (r + 1) * V/W). The parameter is a DTensor with placement `Shard(1)` on a
1-D device mesh over the group, so `torch.distributed.checkpoint` saves its global shape and can
load it on any number of ranks (a plain `(M, V)` tensor in a single process included), and
`numel()` reports the whole table.

The read `out[n] = sum_r w[n, r] * values[idx[n, r]]` of one rank's N tokens (R = H*K slots each):

    1. all-gather the slot ids and weights of all ranks' tokens   (W*N, R) each
    2. read them from the local columns                           (W*N, V/W)   (`kernels.read`)
    3. all-to-all: every rank gets its own tokens' V/W columns
       from each rank and lays them side by side                  (N, V)

Backward, by autograd through two small collectives: the all-to-all runs in reverse (each rank
gets the output gradient of every token for its own columns), the local read's backward gives the
local columns' gradient (from every rank's tokens) and each rank's partial gradient of the weights
over its columns, which a reduce-scatter sums and returns to the weights' owner.

Communication per memory layer and training step, per rank (N tokens per rank, R = H*K, V = v_dim;
ids travel as int32 while M < 2**31):

    forward   all-gather     (W-1) * N * R    ids (int32) + weights (fp32) received
              all-to-all     (W-1)/W * N * V  output elements sent, as many received
    backward  all-to-all     (W-1)/W * N * V  gradient elements sent and received
              reduce-scatter (W-1) * N * R    weight-gradient elements (fp32)

With the paper's sizes (N = 16,384 tokens per rank, R = 128, V = 1024, fp32) on W = 8 ranks:
59 MB of ids + 59 MB of weights, 59 MB of outputs, 59 MB of output gradients and 59 MB of weight
gradients, about 0.3 GB per layer and step (under a millisecond at NVLink rates). Sharding rows
instead needs the same all-gather plus a reduce-scatter of every token's partial (N, V) output,
(W-1) * N * V elements (470 MB here, 8x the all-to-all), the same again for the gradient, and it
loads the ranks unevenly (popular rows live on one rank); by columns every rank reads every selected
row, V/W wide, so the work is balanced by construction. Keep V/W >= 64 elements (256 bytes in
fp32) per row so that the local read stays bandwidth-efficient.

PEER's down vectors (`values_kind=peer`) are a second table of the same layout, whose per-slot dot
products `h[n, r] = x[n] . down[idx[n, r]]` (`dot`) split over the columns as sums of partial dots:

    1. all-gather the slot ids of all ranks' tokens               (W*N, R)
    2. all-to-all the inputs: every rank gets all tokens' entries
       of its own columns                                         (W*N, D/W)
    3. partial dots over the local columns                        (W*N, R)
    4. reduce-scatter (sum) back to the tokens' owners            (N, R)

with the same traffic as the read (the all-to-all of (W-1)/W * N * D inputs, and (W-1) * N * R
partial dots), and the transposed collectives in the backward.

The rows a rank reads in (2) are every rank's selections, so the per-rank read costs what an
unsharded read of the local tokens costs (W*N tokens x V/W columns). Every rank of the group must
call the layer the same number of times with the same token count N (the training loop
guarantees it: equal per-rank batches, and evaluation runs the same batches on every rank).

The gradient of the local columns is the SUM over the ranks' losses; data-parallel training
averages gradients over ranks, so `pkmlm.parallel.parallelize` divides it by W with a
hook (this module does not know how the loss is defined).

Shape legend: N tokens of this rank, W ranks, R slots read per token, M value rows, V value dim,
C = V / W columns per rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pkmlm.model import kernels

# torch 2.13 renamed the tensor collectives; older releases (>= 2.4) have the first names only.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather_rows(x: Tensor, group) -> Tensor:
    """`(N, ...)` on each of W ranks -> `(W*N, ...)`, rank order; no gradient."""
    out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
    _all_gather_tensor(out, x.contiguous(), group=group)
    return out


class _AllGatherRows(torch.autograd.Function):
    """All-gather along rows; backward: reduce-scatter (sum) of the gradient back to the owners."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return _all_gather_rows(x, group)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        world = dist.get_world_size(ctx.group)
        grad = grad_out.new_empty((grad_out.shape[0] // world, *grad_out.shape[1:]))
        _reduce_scatter_tensor(grad, grad_out.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _ReduceScatterRows(torch.autograd.Function):
    """`(W*N, ...)` -> `(N, ...)`: block r summed over ranks lands on rank r; backward: all-gather."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = x.new_empty((x.shape[0] // dist.get_world_size(group), *x.shape[1:]))
        _reduce_scatter_tensor(out, x.contiguous(), op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return _all_gather_rows(grad_out, ctx.group), None


class _AllToAllRows(torch.autograd.Function):
    """`(W*N, ...)`: row block s goes to rank s, and block s of the output comes from rank s.
    Its own inverse, so the backward is the same exchange of the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad = torch.empty_like(grad_out)
        dist.all_to_all_single(grad, grad_out.contiguous(), group=ctx.group)
        return grad, None


class ShardedValues(nn.Module):
    """A `(num_embeddings, embedding_dim)` value table whose columns are split over `mesh`.

    Built from the full table (identical on every rank: the same seed built it), of which each
    rank keeps its columns; nothing is communicated to build it. `read` (`dot`) has the signature
    of `pkmlm.model.kernels.read` (`kernels.dot`) minus the table, so `ProductKeyMemory` calls it in
    place of the local read.
    """

    def __init__(self, full_MV: Tensor, mesh, device: torch.device | str | None = None):
        super().__init__()
        from torch.distributed.tensor import DTensor, Shard

        world, rank = mesh.size(), mesh.get_local_rank()
        M, V = full_MV.shape
        if V % world:
            raise ValueError(
                f"the table's width {V} must divide into the {world} ranks of the group "
                "(values: model.memory.v_dim, or model.dim when v_dim is null; PEER's down "
                "vectors: model.dim)"
            )
        C = V // world
        local_MC = full_MV.detach()[:, rank * C : (rank + 1) * C].to(device or full_MV.device).contiguous()
        self.weight = nn.Parameter(DTensor.from_local(local_MC, mesh, [Shard(1)], run_check=False))
        self.mesh = mesh
        self.num_embeddings, self.embedding_dim = M, V

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, columns split over {self.mesh.size()} ranks "
            f"({self.embedding_dim // self.mesh.size()} each)"
        )

    def _gather_indices(self, indices_NR: Tensor, sparse_grad: bool) -> tuple:
        """Every rank's slot ids, `(W*N, R)` (a collective), with the group, world size, this rank's
        token count N and column count C, as `read` and `dot` both need them."""
        if sparse_grad:
            raise ValueError(
                "sparse value gradients (optim.sparse_values) do not combine with sharded values "
                "(model.memory.shard_values); turn one of them off"
            )
        group = self.mesh.get_group()
        world = self.mesh.size()
        N, C = indices_NR.shape[0], self.embedding_dim // world
        # ids need no gradient; int32 halves their traffic (M < 2**31 rows)
        small = self.num_embeddings < 2**31
        idx_all_WNR = _all_gather_rows(indices_NR.to(torch.int32) if small else indices_NR, group).long()
        return group, world, N, C, idx_all_WNR

    def read(self, indices_NR: Tensor, weights_NR: Tensor, *, kernel: str, sparse_grad: bool = False) -> Tensor:
        """`(N, V)` in the table's dtype: the weighted read of this rank's tokens (a collective)."""
        group, world, N, C, idx_all_WNR = self._gather_indices(indices_NR, sparse_grad)
        w_all_WNR = _AllGatherRows.apply(weights_NR.float(), group)
        local_MC = self.weight.to_local()  # differentiable: the gradient comes back as a Shard(1) DTensor
        part_WNC = kernels.read(local_MC, idx_all_WNR, w_all_WNR, kernel=kernel)  # all tokens, my columns
        mine_WNC = _AllToAllRows.apply(part_WNC, group)  # block s: my tokens, rank s's columns
        # (W*N, C) -> (W, N, C) -> (N, W, C) -> (N, V): columns in rank order, as in the full table
        return mine_WNC.view(world, N, C).permute(1, 0, 2).reshape(N, world * C)

    def dot(self, indices_NR: Tensor, x_ND: Tensor, *, sparse_grad: bool = False) -> Tensor:
        """`(N, R)` fp32: `x[n] . table[indices[n, r]]` for this rank's tokens (a collective; PEER's
        down vectors). The signature of `pkmlm.model.kernels.dot` minus the table."""
        group, world, N, C, idx_all_WNR = self._gather_indices(indices_NR, sparse_grad)
        # (N, D) -> (N, W, C) -> (W, N, C): block s holds my tokens' entries of rank s's columns
        mine_WNC = x_ND.view(N, world, C).transpose(0, 1).reshape(world * N, C)
        x_all_WNC = _AllToAllRows.apply(mine_WNC, group)  # block s: rank s's tokens, my columns
        part_WNR = kernels.dot(self.weight.to_local(), idx_all_WNR, x_all_WNC)  # dots over my columns
        return _ReduceScatterRows.apply(part_WNR, group)  # summed over the ranks' columns, mine back

    def forward(self, indices_NR: Tensor, per_sample_weights: Tensor) -> Tensor:
        """`EmbeddingBag(mode="sum")`-style call: the weighted read with the torch kernel."""
        return self.read(indices_NR, per_sample_weights, kernel="torch")
