"""The C++ CPU top-k (pkmlm/model/kernels/cpu_topk.cpp): bit for bit `torch.topk(x, k, dim=-1)`, values,
indices (ties and NaNs in ATen's order) and gradients; the memory layer's outputs and gradients the
same with either path; a failed build falls back to torch.topk with the reason."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pkmlm.errors import ConfigError
from pkmlm.model import ProductKeyMemory, kernels
from pkmlm.model.kernels import cpu_topk
from pkmlm.model.memory import eligible_rank_pairs

pytestmark = pytest.mark.skipif(not cpu_topk.load(), reason=f"no C++ build here: {cpu_topk.unavailable_reason()}")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits (NaN == NaN, -0.0 != 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(width), b.contiguous().view(width))
    return torch.equal(a, b)


def assert_like_torch(x: torch.Tensor, k: int) -> None:
    values, indices = cpu_topk.topk(x, k)
    ref_values, ref_indices = torch.topk(x, k, dim=-1)
    assert torch.equal(indices, ref_indices), (x.dtype, x.shape, k)
    assert same_bits(values, ref_values), (x.dtype, x.shape, k)


def tie_rows(rows: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """Rows of few distinct values (many ties, at the k-th too), -inf, +-0.0, NaN, and whole rows of one value."""
    kind = torch.randint(0, 4, (rows, 1), generator=generator)
    levels = torch.randint(0, 6, (rows, n), generator=generator).float()
    x = torch.where(kind == 0, levels, levels / 2 - 1)  # {0..5} or {-1, -0.5, .., 1.5}
    x = torch.where((kind == 2) & (levels == 5), torch.tensor(float("-inf")), x)
    x = torch.where((kind == 3) & (levels == 0), torch.tensor(float("nan")), x)
    x = torch.where((kind == 1) & (levels == 2), torch.tensor(-0.0), x)  # -0.0 ties 0.0
    x[0] = 7.0  # a row of one value
    x[1] = float("-inf")
    x[2] = float("nan")
    return x


def test_the_kernels_split_their_rows_over_torchs_threads():
    """With torch's OpenMP threads (Linux builds) the library is built with OpenMP, so its
    at::parallel_for runs on torch.set_num_threads threads; without the flag it ran every row on
    the calling thread whatever the thread count (the 2-thread rows of docs/benchmarks.md)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cpu_topk.parallel_threads() == 1
        torch.set_num_threads(2)
        openmp = cpu_topk.OPENMP and cpu_topk.openmp_skipped() is None  # the OpenMP build loaded
        assert cpu_topk.parallel_threads() == (2 if openmp else 1)
        assert cpu_topk.parallel_threads(rows=1) == 1  # a single row is not split
    finally:
        torch.set_num_threads(before)


def test_a_failed_openmp_build_falls_back_to_the_serial_build_and_says_why():
    """The builds are tried in turn (the OpenMP one first where torch's threads are OpenMP's): one
    that fails hands over to the next with its reason kept; where the last fails too its error is
    raised (load() then reports it and auto keeps torch.topk)."""
    tried = []

    def build(flags):
        tried.append(flags)
        if "-fopenmp" in flags[0]:
            raise RuntimeError("Error building extension\nclang: error: unsupported option '-fopenmp'")

    assert cpu_topk.build_first((cpu_topk.OPENMP_BUILD, cpu_topk.SERIAL_BUILD), build) == (
        cpu_topk.SERIAL_BUILD,
        "the -O3 -fopenmp build failed (RuntimeError: Error building extension)",
    )
    assert tried == [cpu_topk.OPENMP_BUILD, cpu_topk.SERIAL_BUILD]
    assert cpu_topk.build_first((cpu_topk.SERIAL_BUILD,), build) == (cpu_topk.SERIAL_BUILD, None)

    def no_compiler(flags):
        raise RuntimeError(f"no compiler for {flags[0]}")

    with pytest.raises(RuntimeError, match="no compiler for .'-O3',."):  # the last one's error
        cpu_topk.build_first((cpu_topk.OPENMP_BUILD, cpu_topk.SERIAL_BUILD), no_compiler)
    assert cpu_topk.build_dir(cpu_topk.OPENMP_BUILD) != cpu_topk.build_dir(cpu_topk.SERIAL_BUILD)  # side by side


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
@pytest.mark.parametrize("threads", [1, 2])
def test_same_values_and_indices_as_torch_topk(dtype, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        for n, k in [(128, 16), (50, 16), (128, 1), (16, 16), (7, 3), (1, 1), (300, 32), (1024, 16)]:
            assert_like_torch(torch.randn(3000 if n <= 128 else 200, n, generator=g).to(dtype), k)
            assert_like_torch(tie_rows(400, n, g).to(dtype), k)
        # leading dims, a non-contiguous input
        x = torch.randn(5, 4, 2, 64, generator=g).to(dtype)
        assert_like_torch(x, 9)
        assert_like_torch(x.transpose(0, 1), 9)
        assert_like_torch(tie_rows(64, 128, g).to(dtype).view(8, 8, 128)[:, ::2], 16)
    finally:
        torch.set_num_threads(old)


def test_every_k_of_a_tie_heavy_row():
    g = torch.Generator().manual_seed(1)
    x = tie_rows(64, 40, g)
    for k in range(1, 41):  # k = row width included
        assert_like_torch(x, k)


def test_gradient_is_torch_topks():
    g = torch.Generator().manual_seed(2)
    for x0 in (torch.randn(64, 4, 128, generator=g), tie_rows(256, 50, g)):
        upstream = torch.randn(*x0.shape[:-1], 16, generator=g)
        upstream[0, 0] = -0.0  # a signed zero reaches the input as it is
        grads = []
        for fn in (cpu_topk.topk, lambda t, k: torch.topk(t, k, dim=-1)):
            x = x0.clone().requires_grad_(True)
            values, indices = fn(x, 16)
            assert not indices.requires_grad
            (values * upstream).sum().backward()
            grads.append(x.grad)
        assert same_bits(grads[0], grads[1])


def test_dispatch_and_config():
    x = torch.randn(6, 20)
    assert same_bits(kernels.topk(x, 5, "cpp")[0], torch.topk(x, 5).values)
    ints = torch.randint(0, 9, (6, 20))  # not a kernel dtype: torch.topk
    assert torch.equal(kernels.topk(ints, 5, "cpp")[1], torch.topk(ints, 5).indices)
    assert kernels.resolve_topk("torch") == "torch"
    assert kernels.resolve_topk("auto") == "cpp" == kernels.resolve_topk("cpp")
    with pytest.raises(ConfigError, match=r"model\.memory\.topk_impl"):
        kernels.check_topk_impl("fast")


@pytest.mark.parametrize(
    "levels,options",
    [
        (0, {}),  # random sub-key scores
        (3, {}),  # integer ones: ties, at the K-th too
        (0, dict(qk_norm=True, balance_loss=0.1, query_norm="none")),  # UltraMem: the aux loss reads the halves too
    ],
)
def test_memory_layer_is_bitwise_the_same_with_either_top_k(levels, options):
    """Outputs and every gradient of a training-mode forward+backward, with the C++ and the torch top-k."""
    results = []
    for impl in ("cpp", "torch"):
        torch.manual_seed(3)
        args = {"query_norm": "none" if levels else "batchnorm", **options}
        memory = ProductKeyMemory(32, n_keys=24, heads=2, knn=8, k_dim=16, topk_impl=impl, **args)
        assert memory.topk_cpu == impl
        x = torch.randn(96, 32)
        if levels:
            with torch.no_grad():
                memory.keys.copy_(torch.randint(-1, levels - 1, memory.keys.shape).float())
                memory.query_proj.weight.copy_(torch.randint(-1, 2, memory.query_proj.weight.shape).float())
                memory.query_proj.bias.zero_()
            x = torch.randint(-2, 3, (96, 32)).float()
        x.requires_grad_(True)
        out, aux = memory(x, return_aux=True)
        ((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + aux).backward()
        results.append([out, aux, x.grad] + [p.grad for p in memory.parameters()])
    for a, b in zip(*results):
        assert same_bits(a, b)


def test_a_failed_build_falls_back_to_torch_with_the_reason(tmp_path):
    """A real failed build (the compiler is `false`) in a fresh cache: auto keeps torch.topk and
    says why; cpp is refused with that reason."""
    code = (
        "from pkmlm.model import kernels\n"
        "from pkmlm.model.kernels import cpu_topk\n"
        "from pkmlm.errors import ConfigError\n"
        "assert kernels.resolve_topk('auto') == 'torch'\n"
        "print(cpu_topk.unavailable_reason())\n"
        "try:\n"
        "    kernels.check_topk_impl('cpp')\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, "CXX": "false", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    reason, refusal = done.stdout.strip().splitlines()[-2:]
    assert reason and "\n" not in reason
    assert "model.memory.topk_impl" in refusal and "could not be built" in refusal


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_product_search_is_the_torch_ops_bit_for_bit(dtype, threads):
    """The whole search (`kernels.product_search`: scores, slot ids, both halves' top-k ids, and the
    scores' gradient to `s`), C++ against the torch ops; on random and tie-heavy scores, on the
    einsum's (head, half, token) layout read in place and on a contiguous copy, the upstream gradient
    with repeated ranks in both halves (several winners share a sub-key) and a signed zero."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(5)
        for knn, n_keys in [(16, 128), (4, 9), (8, 8)]:
            pair_a, pair_b = eligible_rank_pairs(knn)
            random = torch.randn(3, 2, 100, n_keys, generator=g).permute(2, 0, 1, 3)  # (N, H, 2, S), strided
            ties = torch.randint(-2, 3, (100, 2, 2, n_keys), generator=g).float()
            for s0 in (random, random.contiguous(), ties):
                results = []
                for impl in ("cpp", "torch"):
                    s = s0.to(dtype).requires_grad_(True)
                    scores, slot, i, j = kernels.product_search(s, pair_a, pair_b, knn, impl)
                    assert scores.dtype == torch.float32 and not slot.requires_grad
                    upstream = torch.linspace(-1, 1, scores.numel()).view_as(scores)
                    upstream[0, 0, -1] = -0.0
                    (grad,) = torch.autograd.grad((scores * upstream).sum(), s)
                    results.append((scores.detach(), slot, i, j, grad))
                for got, want in zip(*results):
                    assert same_bits(got, want)
                scores, slot, i, j, _ = results[0]
                halves = s0.to(dtype).float()  # each score is the fp32 sum of its slot's two sub-key scores
                sums = halves[..., 0, :].gather(-1, slot // n_keys) + halves[..., 1, :].gather(-1, slot % n_keys)
                assert same_bits(scores, sums)
    finally:
        torch.set_num_threads(old)


def test_rows_far_from_normal_are_exact_too():
    """The kernel first tries mean + z * std of a row as its bound (tight on the memory's near-normal
    rows) and keeps it only when k entries reach it: rows where it is too high (a few outliers), far
    too low (one huge negative entry), heavy-tailed or nearly constant, each against torch.topk."""
    g = torch.Generator().manual_seed(6)
    for n, k in [(128, 16), (50, 16), (300, 32)]:
        rows = torch.randn(6, 200, n, generator=g)
        rows[0, :, :3] *= 1e4  # 3 outliers: the bound above all but them, fewer than k
        rows[1, :, 0] = -1e30  # the mean and std dominated by one entry: the bound far too low
        rows[2] = torch.empty(200, n).exponential_(generator=g) ** 3  # heavy right tail
        rows[3] = 1.0 + 1e-6 * rows[3]  # nearly constant
        rows[4, :, : k - 1] += 50.0  # k - 1 clear winners, the k-th among the normal rest
        rows[5] = -rows[5].abs()  # all negative
        assert_like_torch(rows, k)
        assert_like_torch(rows.double(), k)
