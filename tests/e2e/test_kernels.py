"""The memory's triton kernels against their torch references: on CPU under triton's interpreter
(tests/conftest.py sets `TRITON_INTERPRET=1` when there is no GPU), on the GPU where there is one.

Sizes are deliberately not multiples of the block sizes (16 rows / entries, 256 fp32 or 512 bf16
columns) and bags hold repeated slots.
"""

from __future__ import annotations

import pytest
import torch

from pkmlm.errors import ConfigError
from pkmlm.model import MemoryConfig, ProductKeyMemory, kernels
from pkmlm.model.kernels import reference
from pkmlm.model.memory import eligible_rank_pairs

NO_TRITON = "no triton: a CUDA torch brings it, make setup adds it beside a CPU torch (TRITON_SPEC)"
pytest.importorskip("triton", reason=NO_TRITON)
from pkmlm.model.kernels import gather  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True, scope="module")
def _runnable():
    assert DEVICE.type == "cuda" or gather.is_interpreted(), (
        "no GPU and the triton kernels are not interpreted: TRITON_INTERPRET=1 must be set before triton "
        "is first imported (tests/conftest.py does it)"
    )


# (N tokens, R slots per token, M value rows, V width): 1s everywhere; R below / above BLOCK_ROWS;
# V above one fp32 (256) or bf16 (512) column block; M smaller than R (repeated slots in a bag).
SHAPES = [(1, 1, 1, 1), (7, 5, 13, 40), (33, 37, 300, 130), (4, 128, 64, 257), (3, 20, 5, 600)]
# ... and random ones (seeded, so a failure repeats): any size, mostly not multiples of the blocks.
_g = torch.Generator().manual_seed(7)
RANDOM_SHAPES = [tuple(int(torch.randint(1, hi, (), generator=_g)) for hi in (24, 70, 400, 700)) for _ in range(3)]


def _inputs(N, R, M, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(M, V, generator=g).to(dtype)
    indices = torch.randint(0, M, (N, R), generator=g)
    weights = torch.rand(N, R, generator=g)
    grad_out = torch.randn(N, V, generator=g).to(dtype)
    return tuple(t.to(DEVICE) for t in (values, indices, weights, grad_out))


def _tolerance(dtype):
    # bf16 outputs are rounded once to 8 mantissa bits (the interpreter truncates: up to 1 ulp)
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES + RANDOM_SHAPES)
def test_forward_matches_reference(shape, dtype):
    values, indices, weights, _ = _inputs(*shape, dtype)
    out = gather.read_forward(values, indices, weights)
    expected = reference.read_reference(values.double(), indices, weights.double())
    assert out.dtype == dtype and out.shape == (shape[0], shape[3])
    tol = _tolerance(dtype)
    torch.testing.assert_close(out.double(), expected, rtol=tol["rtol"], atol=tol["atol"] * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES + RANDOM_SHAPES)
def test_backward_matches_reference(shape, dtype):
    values, indices, weights, grad_out = _inputs(*shape, dtype, seed=1)
    grad_values, grad_weights = gather.read_backward(grad_out, values, indices, weights)
    ref_values, ref_weights = reference.read_backward_reference(
        grad_out.double(), values.double(), indices, weights.double()
    )
    assert grad_values.dtype == dtype and grad_values.shape == values.shape
    assert grad_weights.dtype == torch.float32 and grad_weights.shape == weights.shape
    tol = _tolerance(dtype)
    for got, want in ((grad_values, ref_values), (grad_weights, ref_weights)):
        torch.testing.assert_close(got.double(), want, rtol=tol["rtol"], atol=tol["atol"] * want.abs().max().item())
    unread = torch.ones(values.shape[0], dtype=torch.bool, device=DEVICE)
    unread[indices.flatten()] = False
    assert (grad_values[unread] == 0).all()  # rows nobody read: exact zeros


@pytest.mark.parametrize("shape", SHAPES[1:4])
def test_sparse_backward_holds_exactly_the_read_rows(shape):
    values, indices, weights, grad_out = _inputs(*shape, torch.float32, seed=2)
    dense_values, dense_weights = gather.read_backward(grad_out, values, indices, weights)
    sparse_values, sparse_weights = gather.read_backward(grad_out, values, indices, weights, sparse=True)
    assert sparse_values.is_sparse and sparse_values.is_coalesced()
    assert torch.equal(sparse_values.indices()[0], indices.flatten().unique())  # sorted, each read row once
    assert torch.equal(sparse_values.to_dense(), dense_values)  # same kernel: bitwise
    assert torch.equal(sparse_weights, dense_weights)


def test_backward_of_one_hot_row_and_unread_rows():
    """Every entry on one row: a segment of 5 * 37 entries (not a multiple of the 16-entry block)."""
    N, R, M, V = 5, 37, 9, 70
    values, _, weights, grad_out = _inputs(N, R, M, V, torch.float32, seed=3)
    indices = torch.full((N, R), 4, device=DEVICE)
    grad_values, grad_weights = gather.read_backward(grad_out, values, indices, weights)
    ref_values, ref_weights = reference.read_backward_reference(
        grad_out.double(), values.double(), indices, weights.double()
    )
    torch.testing.assert_close(grad_values.double(), ref_values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_weights.double(), ref_weights, rtol=1e-5, atol=1e-5)
    assert (grad_values[torch.arange(M, device=DEVICE) != 4] == 0).all()


def test_backward_is_deterministic():
    values, indices, weights, grad_out = _inputs(16, 24, 10, 33, torch.float32, seed=4)
    first = gather.read_backward(grad_out, values, indices, weights)
    second = gather.read_backward(grad_out, values, indices, weights)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_empty_batch():
    values = torch.randn(6, 10, device=DEVICE)
    indices, weights = torch.zeros(0, 4, dtype=torch.int64, device=DEVICE), torch.zeros(0, 4, device=DEVICE)
    out = gather.read_forward(values, indices, weights)
    assert out.shape == (0, 10)
    grad_values, grad_weights = gather.read_backward(torch.zeros(0, 10, device=DEVICE), values, indices, weights)
    assert torch.equal(grad_values, torch.zeros_like(values)) and grad_weights.shape == (0, 4)


def test_operator_registration_passes_opcheck():
    """Schema, fake tensor (what torch.compile traces with) and autograd registration of the op."""
    values, indices, weights, _ = _inputs(6, 9, 20, 12, torch.float32, seed=5)
    result = torch.library.opcheck(
        torch.ops.pkmlm.memory_read.default,
        (values.requires_grad_(), indices, weights.requires_grad_()),
    )
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_autograd_through_both_paths_matches_reference(sparse_grad):
    values, indices, weights, grad_out = _inputs(9, 11, 15, 21, torch.float32, seed=6)
    ref_values, ref_weights = reference.read_backward_reference(grad_out, values, indices, weights)
    for kernel in ("torch", "triton"):
        v, w = values.clone().requires_grad_(), weights.clone().requires_grad_()
        out = kernels.read(v, indices, w, kernel=kernel, sparse_grad=sparse_grad)
        torch.testing.assert_close(out, reference.read_reference(values, indices, weights), rtol=1e-5, atol=1e-5)
        out.backward(grad_out)
        assert v.grad.is_sparse == sparse_grad
        got = v.grad.to_dense() if sparse_grad else v.grad
        torch.testing.assert_close(got, ref_values, rtol=1e-5, atol=1e-5, msg=kernel)
        torch.testing.assert_close(w.grad, ref_weights, rtol=1e-5, atol=1e-5, msg=kernel)


def test_gather_matmul_fallback_matches_reference():
    """The torch path for non-fp32 tables on CUDA (embedding_bag cannot give bf16 weights a gradient there)."""
    values, indices, weights, grad_out = _inputs(8, 13, 17, 24, torch.float32, seed=7)
    v, w = values.clone().requires_grad_(), weights.clone().requires_grad_()
    out = reference.read_gather_matmul(v, indices, w)
    out.backward(grad_out)
    ref_values, ref_weights = reference.read_backward_reference(grad_out, values, indices, weights)
    torch.testing.assert_close(out, reference.read_reference(values, indices, weights), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v.grad, ref_values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, ref_weights, rtol=1e-5, atol=1e-5)


# --- the memory layer on each path --------------------------------------------------------------


def _memory_pair(seed, **kwargs):
    args = dict(n_keys=12, heads=3, knn=5, k_dim=8, query_norm="layernorm")
    args.update(kwargs)
    torch.manual_seed(seed)
    on_torch = ProductKeyMemory(24, kernel="torch", **args)
    on_triton = ProductKeyMemory(24, kernel="triton", **args)
    on_triton.load_state_dict(on_torch.state_dict())
    return on_torch.to(DEVICE), on_triton.to(DEVICE)


@pytest.mark.parametrize("values_dtype", ["float32", "bfloat16"])
def test_memory_layer_same_output_and_gradients_on_both_paths(values_dtype):
    on_torch, on_triton = _memory_pair(0, values_dtype=values_dtype)
    assert on_triton.values.weight.dtype == (torch.float32 if values_dtype == "float32" else torch.bfloat16)
    x = torch.randn(3, 7, 24, device=DEVICE)
    grad = torch.randn(3, 7, 24, device=DEVICE)
    outputs = []
    for memory in (on_torch, on_triton):
        out = memory(x)
        out.backward(grad.to(out.dtype))
        outputs.append(out)
    tol = dict(rtol=1e-5, atol=1e-5) if values_dtype == "float32" else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outputs[1].float(), outputs[0].float(), **tol)
    for (name, a), b in zip(on_torch.named_parameters(), on_triton.parameters()):
        scale = max(a.grad.abs().max().item(), 1e-6)
        torch.testing.assert_close(b.grad.float() / scale, a.grad.float() / scale, **tol, msg=name)


def test_kernel_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert kernels.resolve_kernel("auto", cpu) == "torch"
    assert kernels.resolve_kernel("auto", cuda) == "triton"  # triton imports here
    assert kernels.resolve_kernel("torch", cuda) == "torch"
    if gather.is_interpreted():
        assert kernels.resolve_kernel("triton", cpu) == "triton"  # only because the kernels are interpreted
    with pytest.raises(ConfigError, match=r"model\.memory\.kernel.*cuda.*one of auto, torch, triton"):
        kernels.check_kernel("cuda")  # at the config boundary; resolution trusts the checked value


def test_memory_config_checks_kernel_and_values_dtype():
    MemoryConfig(kernel="triton", values_dtype="bfloat16").validate()
    with pytest.raises(ConfigError, match=r"model\.memory\.values_dtype.*float16.*float32, bfloat16"):
        MemoryConfig(values_dtype="float16").validate()
    with pytest.raises(ConfigError, match=r"model\.memory\.kernel.*cuda"):
        MemoryConfig(kernel="cuda").validate()


# --- the lazy Adam row kernel (optim.sparse_values) --------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_row_kernel_matches_torch_formulation(dtype):
    """The lazy Adam of `optim.sparse_values` (pkmlm/optim/lazy_adam.py): the triton row kernel
    against the torch formulation, values and both moments."""
    from pkmlm.optim.lazy_adam import LazyAdam

    device = DEVICE
    torch.manual_seed(2)
    M, V = 37, 1100  # V above the kernel's 1024-column block; 20 of the 37 rows read per step
    init = torch.randn(M, V).to(dtype)
    params = [torch.nn.Parameter(init.clone().to(device)) for _ in range(2)]
    opts = [
        LazyAdam([p], lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05, use_triton=flag)
        for p, flag in zip(params, (False, True))
    ]
    for _ in range(3):
        rows = torch.randperm(M)[:20].sort().values
        grad = torch.randn(20, V).to(dtype)
        for p, opt in zip(params, opts):
            p.grad = torch.sparse_coo_tensor(
                rows[None].to(device), grad.to(device), (M, V), check_invariants=True
            ).coalesce()
            opt.step()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(params[1].float(), params[0].float(), **tol)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opts[1].state[params[1]][key].float(), opts[0].state[params[0]][key].float(), **tol)


# --- retrieval: the eligible candidate pairs ---------------------------------------------------------


@pytest.mark.parametrize("knn", [1, 2, 5, 16, 32])
def test_eligible_rank_pairs(knn):
    pair_a, pair_b = eligible_rank_pairs(knn)
    assert len(pair_a) == sum(knn // a for a in range(1, knn + 1))  # K ln K, not K*K
    assert ((pair_a + 1) * (pair_b + 1) <= knn).all()
    assert len(set(zip(pair_a.tolist(), pair_b.tolist()))) == len(pair_a)


def test_lookup_scores_exact_with_ties():
    """Integer sub-key scores tie massively; the K scores must still be the true top-K."""
    torch.manual_seed(0)
    memory = ProductKeyMemory(16, n_keys=10, heads=2, knn=6, k_dim=4, query_norm="none").eval()
    with torch.no_grad():
        memory.keys.copy_(torch.randint(-2, 3, memory.keys.shape).float())
        memory.query_proj.weight.copy_(torch.randint(-1, 2, memory.query_proj.weight.shape).float())
        memory.query_proj.bias.zero_()
        x = torch.randint(-2, 3, (40, 16)).float()
        q = memory.query(x)
        weights, indices = memory.lookup(x)
        s1 = torch.einsum("nhp,hsp->nhs", q[..., :2], memory.keys[:, 0])
        s2 = torch.einsum("nhp,hsp->nhs", q[..., 2:], memory.keys[:, 1])
        full = (s1[..., :, None] + s2[..., None, :]).flatten(-2)  # (N, H, S*S)
        best = full.topk(6, dim=-1).values
        chosen = full.gather(-1, indices)  # the true scores of the chosen slots
    assert torch.equal(chosen, best)
    assert all(len(set(row.tolist())) == 6 for row in indices.reshape(-1, 6))  # distinct slots


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_triton_kernel_in_a_cpu_run_is_refused_before_training(tmp_path):
    """Without TRITON_INTERPRET the CLI refuses kernel=triton on CPU in one line (exit 2), before the
    tokenizer or the model is built."""
    import os
    import subprocess
    import sys

    from helpers import overrides

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pkmlm.cli.train",
            *overrides("model.memory.kernel=triton", "train.device=cpu", f"hydra.run.dir={tmp_path / 'run'}"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.memory.kernel='triton'" in lines[0] and "TRITON_INTERPRET=1" in lines[0]
    assert not (tmp_path / "run" / "tokenizer.json").exists()
