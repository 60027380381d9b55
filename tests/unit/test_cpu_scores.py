"""The sparse sub-key score backward (`model.memory.scores_backward=sparse`,
pkmlm/model/kernels/cpu_scores.cpp): the same scores, slots and sub-key ids as the dense path, bit for
bit; gradients to the queries and sub-keys equal to the dense path's to rounding (ties, both halves,
sub-keys shared by several winners), independent of the thread count; the memory layer the same."""

from __future__ import annotations

import pytest
import torch

from pkmlm.errors import ConfigError
from pkmlm.model import ProductKeyMemory, kernels
from pkmlm.model.kernels import cpu_scores, cpu_topk
from pkmlm.model.memory import MemoryConfig, eligible_rank_pairs

pytestmark = pytest.mark.skipif(not cpu_topk.load(), reason=f"no C++ build here: {cpu_topk.unavailable_reason()}")


def dense(q, keys, pair_a, pair_b, k):
    """The default path: the einsum's scores, the torch search, autograd's dense backward."""
    return kernels.product_search(cpu_scores.scores(q, keys), pair_a, pair_b, k, "torch")


def run(search, q0, keys0, upstream, *args):
    q, keys = q0.clone().requires_grad_(True), keys0.clone().requires_grad_(True)
    out = search(q, keys, *args)
    grad_q, grad_keys = torch.autograd.grad((out[0] * upstream).sum(), (q, keys))
    return [t.detach() for t in out], grad_q, grad_keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [False, True])
def test_sparse_search_equals_the_dense_path(dtype, ties):
    g = torch.Generator().manual_seed(7)
    for N, H, S, P, K in [(300, 3, 24, 8, 8), (64, 2, 9, 4, 4), (50, 1, 16, 6, 16)]:
        pair_a, pair_b = eligible_rank_pairs(K)
        if ties:  # small integers: tied sub-key scores, at the K-th too, and many winners sharing a sub-key
            q = torch.randint(-1, 2, (N, H, 2, P), generator=g).to(dtype)
            keys = torch.randint(-1, 2, (H, 2, S, P), generator=g).to(dtype)
        else:
            q, keys = torch.randn(N, H, 2, P, generator=g).to(dtype), torch.randn(H, 2, S, P, generator=g).to(dtype)
        upstream = torch.randn(N, H, K, generator=g)
        out, grad_q, grad_keys = run(kernels.sparse_search, q, keys, upstream, pair_a, pair_b, K)
        ref_out, ref_q, ref_keys = run(dense, q, keys, upstream, pair_a, pair_b, K)
        for got, want in zip(out, ref_out):  # scores, slots, both halves' ids: the same bits
            assert torch.equal(got, want)
        # The fp64 definition: grad_q[n, h, c] = sum_k g * keys[h, c, sub-key_c(k)]; grad_keys by scatter.
        exact_q, exact_keys = run(dense, q.double(), keys.double(), upstream.double(), pair_a, pair_b, K)[1:]
        tol = dict(rtol=1e-5, atol=1e-5)  # fp64 too: the scores and their gradient are fp32 on either path
        torch.testing.assert_close(grad_q.double(), exact_q, **tol)
        torch.testing.assert_close(grad_keys.double(), exact_keys, **tol)
        torch.testing.assert_close(grad_q, ref_q, **tol)
        torch.testing.assert_close(grad_keys, ref_keys, **tol)
        assert grad_keys[:, 1].abs().sum() > 0 and grad_q[:, :, 1].abs().sum() > 0  # both halves reached
        untouched = torch.ones(H, 2, S, dtype=torch.bool)  # sub-keys no winner used: exactly zero
        slot = out[1]
        for h in range(H):
            untouched[h, 0, (slot[:, h] // S).unique()] = False
            untouched[h, 1, (slot[:, h] % S).unique()] = False
        assert (grad_keys[untouched] == 0).all()


def test_sparse_backward_does_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(8)
    q, keys = torch.randn(257, 4, 2, 8, generator=g), torch.randn(4, 2, 32, 8, generator=g)
    pair_a, pair_b = eligible_rank_pairs(8)
    upstream = torch.randn(257, 4, 8, generator=g)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run(kernels.sparse_search, q, keys, upstream, pair_a, pair_b, 8)[1:])
    finally:
        torch.set_num_threads(before)
    for got, want in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.parametrize("options", [{}, dict(query_norm="layernorm"), dict(qk_norm=True, balance_loss=0.1)])
def test_memory_layer_with_the_sparse_backward(options):
    """The same outputs (bit for bit) and gradients (to rounding) as `scores_backward=dense`; with an
    auxiliary loss (UltraMemV2's, which reads every score) the layer keeps the dense path: bit for bit."""
    results = {}
    for scores_backward in ("dense", "sparse"):
        torch.manual_seed(3)
        memory = ProductKeyMemory(32, n_keys=24, heads=2, knn=8, k_dim=16, scores_backward=scores_backward, **options)
        x = torch.randn(96, 32, requires_grad=True)
        out, aux = memory(x, return_aux=True)
        ((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + aux).backward()
        results[scores_backward] = [out, aux, x.grad] + [p.grad for p in memory.parameters()]
    sparse, reference = results["sparse"], results["dense"]
    assert torch.equal(sparse[0], reference[0])  # the same slots and weights: the same output
    for got, want in zip(sparse[1:], reference[1:]):
        if "balance_loss" in options:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_scores_backward_is_checked_at_the_config_boundary():
    with pytest.raises(ConfigError, match=r"model\.memory\.scores_backward"):
        MemoryConfig(scores_backward="fast").validate()
    MemoryConfig(scores_backward="sparse").validate()
