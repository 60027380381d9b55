"""The fused CPU read (`model.memory.read_impl=cpp`, pkmlm/model/kernels/cpu_read.cpp): the same output
bits as `embedding_bag`, gradients equal to it to rounding (fp32, bf16 tables), for rows read many
times, with 1 and 2 threads; the memory layer the same with either read."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pkmlm.errors import ConfigError
from pkmlm.model import ProductKeyMemory, kernels
from pkmlm.model.kernels import cpu_read
from pkmlm.model.kernels.reference import read_backward_reference, read_torch
from pkmlm.model.memory import MemoryConfig

pytestmark = pytest.mark.skipif(not cpu_read.load(), reason="no C++ build here")


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def grads(read, values, indices, weights, grad_out):
    values = values.detach().clone().requires_grad_(True)
    weights = weights.detach().clone().requires_grad_(True)
    out = read(values, indices, weights)
    out.backward(grad_out)
    return out, values.grad, weights.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,R", [(50, 300, 32), (4096, 64, 8), (3, 17, 5)])  # many reads per row; most rows unread
def test_read_equals_embedding_bag(dtype, M, N, R, threads):
    g = torch.Generator().manual_seed(M + N + R)
    V = 24
    values = torch.randn(M, V, generator=g).to(dtype)
    indices = torch.randint(0, M, (N, R), generator=g)
    weights = torch.rand(N, R, generator=g)  # fp32, as the layer's (the read casts them to the values' dtype)
    grad_out = torch.randn(N, V, generator=g).to(dtype)
    out, gv, gw = grads(cpu_read.read, values, indices, weights, grad_out)
    ref_out, ref_gv, ref_gw = grads(read_torch, values, indices, weights, grad_out)
    assert torch.equal(out, ref_out)
    assert gv.dtype == ref_gv.dtype and gw.dtype == ref_gw.dtype == torch.float32
    # Against the fp64 definition (the rounding of the C++ sums is the fp32 / bf16 one of its output).
    exact_gv, exact_gw = read_backward_reference(
        grad_out.double(), values.double(), indices, weights.to(dtype).double()
    )
    rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-2, 1e-2)
    torch.testing.assert_close(gv.double(), exact_gv, rtol=rtol, atol=atol * (1 + exact_gv.abs().max().item()))
    torch.testing.assert_close(gw.double(), exact_gw, rtol=rtol, atol=atol * (1 + exact_gw.abs().max().item()))
    if dtype == torch.float32:
        torch.testing.assert_close(gv, ref_gv, rtol=rtol, atol=atol * (1 + ref_gv.abs().max().item()))
    else:  # embedding_bag sums a bf16 table's gradient in bf16; the C++ pass in fp32: never further from exact
        assert (gv.double() - exact_gv).abs().max() <= (ref_gv.double() - exact_gv).abs().max()
    unread = torch.ones(M, dtype=torch.bool)
    unread[indices.flatten()] = False
    assert torch.equal(gv[unread], torch.zeros_like(gv[unread]))  # not just close: rows nobody read are zero


def test_the_gradient_does_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(0)
    values, indices = torch.randn(700, 16, generator=g), torch.randint(0, 700, (512, 12), generator=g)
    weights, grad_out = torch.rand(512, 12, generator=g), torch.randn(512, 16, generator=g)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(grads(cpu_read.read, values, indices, weights, grad_out))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_kernels_read_takes_the_fused_path_only_where_asked():
    values = torch.randn(10, 4, requires_grad=True)
    indices, weights = torch.randint(0, 10, (6, 3)), torch.rand(6, 3)
    fused = kernels.read(values, indices, weights, kernel="torch", read_impl="cpp")
    plain = kernels.read(values, indices, weights, kernel="torch")
    sparse = kernels.read(values, indices, weights, kernel="torch", sparse_grad=True, read_impl="cpp")
    assert "_FusedRead" in type(fused.grad_fn).__name__
    assert "EmbeddingBag" in type(plain.grad_fn).__name__ and "EmbeddingBag" in type(sparse.grad_fn).__name__
    assert torch.equal(fused, plain) and torch.equal(
        fused, F.embedding_bag(indices, values, None, per_sample_weights=weights, mode="sum")
    )


@pytest.mark.parametrize("values_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("heads,options", [(1, {}), (4, dict(query_norm="layernorm", value_dropout=0.0))])
def test_memory_layer_is_the_same_with_either_read(values_dtype, heads, options, threads):
    """Outputs bit for bit; every gradient close, those upstream of the weights included."""
    results = []
    for impl in ("cpp", "torch"):
        torch.manual_seed(5)
        memory = ProductKeyMemory(
            32, n_keys=12, heads=heads, knn=8, k_dim=16, values_dtype=values_dtype, read_impl=impl, **options
        )
        x = torch.randn(96, 32, requires_grad=True)  # 96 * heads * 8 reads of 144 slots: every row many times
        out = memory(x)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out, x.grad] + [p.grad for p in memory.parameters()])
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1:], results[1][1:]):
        if values_dtype == "float32":  # (a floor for gradients that cancel to ~0: the query bias under BatchNorm)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item() + 1e-6)
        else:  # embedding_bag sums a bf16 table's gradient in bf16 (the C++ pass in fp32): close as a whole
            assert (a.double() - b.double()).norm() <= 2e-2 * b.double().norm() + 1e-6


def test_read_impl_is_checked_at_the_config_boundary():
    with pytest.raises(ConfigError, match=r"model\.memory\.read_impl"):
        MemoryConfig(read_impl="fast").validate()
    MemoryConfig(read_impl="cpp").validate()
