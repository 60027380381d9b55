"""`torch.compile` (what `train.compile=true` applies in the loop) on CPU: the memory layer on the
torch path (inductor) and on the triton path (the registered operator, run by triton's interpreter
here), each one graph (fullgraph) and equal to eager in output and every gradient. (The rest of
the model is plain torch; `scripts/bench_model.py --compile on` compiles whole models.)

Inductor compiles C++ for the CPU (gcc): 20-40 s cold on 2 shared cores, seconds when cached. The
triton-path test traces with the `aot_eager` backend: dynamo and AOT autograd see the operator
only through its fake implementation and autograd registration (what inductor sees too, where it
calls the operator as an opaque kernel), without paying for a second C++ build.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from pkmlm.model import ProductKeyMemory

NO_TRITON = "no triton: a CUDA torch brings it, make setup adds it beside a CPU torch (TRITON_SPEC)"


def _assert_same_grads(eager: torch.nn.Module, compiled_owner: torch.nn.Module, rtol=1e-4, atol=1e-5):
    for (name, a), b in zip(eager.named_parameters(), compiled_owner.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None, reason="inductor needs a C compiler on CPU"
)
def test_compiled_memory_layer_on_the_torch_path_equals_eager():
    """The memory layer (query network, BatchNorm, product-key top-k, embedding_bag read) compiles
    into one inductor graph, forward and backward."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    args = dict(n_keys=8, heads=2, knn=4, k_dim=16, query_norm="batchnorm", kernel="torch")
    eager, twin = ProductKeyMemory(32, **args), ProductKeyMemory(32, **args)
    twin.load_state_dict(eager.state_dict())
    x = torch.randn(3, 5, 32)
    out = eager(x)
    (out * out).sum().backward()
    compiled_out = torch.compile(twin, fullgraph=True)(x)
    (compiled_out * compiled_out).sum().backward()
    torch.testing.assert_close(compiled_out, out, rtol=1e-5, atol=1e-6)
    _assert_same_grads(eager, twin)


def test_compiled_memory_on_the_triton_operator_equals_eager():
    pytest.importorskip("triton", reason=NO_TRITON)
    from pkmlm.model.kernels import gather

    if not (torch.cuda.is_available() or gather.is_interpreted()):
        pytest.fail("no GPU and triton is not interpreted: TRITON_INTERPRET=1 must be set first (tests/conftest.py)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch._dynamo.reset()
    torch.manual_seed(1)
    args = dict(n_keys=8, heads=2, knn=4, k_dim=16, query_norm="layernorm", kernel="triton")
    eager, twin = ProductKeyMemory(32, **args).to(device), ProductKeyMemory(32, **args).to(device)
    twin.load_state_dict(eager.state_dict())
    x = torch.randn(3, 5, 32, device=device)
    out = eager(x)
    (out * out).sum().backward()
    compiled_out = torch.compile(twin, backend="aot_eager", fullgraph=True)(x)
    (compiled_out * compiled_out).sum().backward()
    torch.testing.assert_close(compiled_out, out, rtol=1e-5, atol=1e-6)
    _assert_same_grads(eager, twin)
