"""The C++ CPU top-k: `torch.ops.pkmlm_cpu.topk(x, k)`, the same values and indices as
`torch.topk(x, k, dim=-1, largest=True, sorted=True)`, bit for bit, ties and NaNs included; ~2x
faster on the memory's top-16 of 128 sub-key scores (issue 21, docs/benchmarks.md). How it stays
exact is written in cpu_topk.cpp, beside the code.

Built from cpu_topk.cpp by `torch.utils.cpp_extension.load` the first time a machine asks for it
(`load()`; one file, -O3: ~15-25 s on a 2-core machine) into `build_dir()`, under
`$TORCH_EXTENSIONS_DIR` (default ~/.cache/torch_extensions), keyed by a hash of the source, the
flags, torch and python; every later process loads the built library directly (milliseconds).
Where it cannot be built (no C++ compiler, no ninja, a failed build) `load()` returns False and
`unavailable_reason()` says why in one line; `model.memory.topk_impl=auto` then keeps `torch.topk`
(train/setup.py prints that line).

The operator is registered by the C++ file (`TORCH_LIBRARY(pkmlm_cpu, ...)`, CPU only); this module
adds its fake implementation (so that `torch.compile` traces around it) and its autograd formula:
ATen's for topk (`value_selecting_reduction_backward`: zeros, then the values' gradient scattered to
their indices), so gradients are bit for bit those of `torch.topk` too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("cpu_topk.cpp")
# Built into the same library: the fused read backward of `model.memory.read_impl=cpp` (cpu_read.py)
# and the sparse sub-key score backward of `model.memory.scores_backward=sparse` (cpu_scores.py).
SOURCES = (SOURCE, Path(__file__).with_name("cpu_read.cpp"), Path(__file__).with_name("cpu_scores.cpp"))
HEADERS = (Path(__file__).with_name("cpu_slots.h"),)  # included by the sources: part of the build's key
NAME = "pkmlm_cpu_topk"
# -fopenmp where ATen's threads are OpenMP's (torch's Linux builds): at::parallel_for in the kernels
# is a header template that splits rows over OpenMP threads only when the including file is compiled
# with OpenMP (_OPENMP defined), and otherwise runs every row on the calling thread, so without the
# flag the kernels ran on one thread at any torch.set_num_threads (issue 21: the 2-thread rows of
# docs/benchmarks.md). The library links the libgomp.so.1 torch has already loaded (one OpenMP
# runtime, one thread pool). Elsewhere (macOS's clang has no -fopenmp) the flag is left out: serial
# kernels, the same results; so too where the OpenMP build fails (a compiler without OpenMP, e.g. a
# clang without libomp): `load()` then builds the serial library and `openmp_skipped()` says why.
# `parallel_threads()` says which build a process got.
OPENMP = sys.platform.startswith("linux") and "parallel backend: OpenMP" in torch.__config__.parallel_info()
SERIAL_BUILD = (("-O3",), ())  # (compile flags, link flags)
OPENMP_BUILD = (("-O3", "-fopenmp"), ("-fopenmp",))
BUILDS = (OPENMP_BUILD, SERIAL_BUILD) if OPENMP else (SERIAL_BUILD,)  # tried in turn
# The dtypes the kernel dispatches on (AT_DISPATCH_FLOATING_TYPES_AND2(BFloat16, Half)).
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Found once per process (the first `load()`); under torch.compile the traced forward only reads it.
_loaded: Optional[bool] = None
_reason: Optional[str] = None
_openmp_skipped: Optional[str] = None  # why the OpenMP build was not used where it was tried first


def load() -> bool:
    """Build (first time on this machine) or load (cached) the kernel; False where it cannot be."""
    global _loaded, _reason, _openmp_skipped
    if _loaded is None:
        try:
            _, _openmp_skipped = build_first(BUILDS, _build)
            _register_python_parts()
            _loaded, _reason = True, None
        except Exception as e:  # no compiler, no ninja, a failed build: torch.topk it is
            _loaded, _reason = False, _one_line(e)
    return _loaded


def _one_line(e: Exception) -> str:
    first_line = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first_line}" if first_line else type(e).__name__


def build_first(builds, build) -> Tuple[Tuple[Tuple[str, ...], Tuple[str, ...]], Optional[str]]:
    """`build(flags)` for each (compile flags, link flags) of `builds` in turn until one builds and
    loads; returns those flags and why the ones before failed (one line; None where the first
    built). Raises the last one's error where none does."""
    skipped = None
    for i, flags in enumerate(builds):
        try:
            build(flags)
            return flags, skipped
        except Exception as e:
            if i == len(builds) - 1:
                raise
            skipped = f"the {' '.join(flags[0])} build failed ({_one_line(e)})"
    raise ValueError("no build to try")


def openmp_skipped() -> Optional[str]:
    """Why the kernels were built without OpenMP although torch's threads are OpenMP's (one line),
    or None (the OpenMP build loaded, OpenMP was not tried, or nothing was loaded yet)."""
    return _openmp_skipped


def unavailable_reason() -> Optional[str]:
    """Why the kernel could not be built or loaded (one line), or None (it loaded, or was not tried)."""
    return _reason


def parallel_threads(rows: int = 64) -> int:
    """How many threads the built library's kernels split `rows` rows over at torch's current thread
    count (1 where it was built without OpenMP: see BUILDS). Call after `load()` returned True."""
    return torch.ops.pkmlm_cpu.parallel_threads(rows)


def build_dir(flags: Tuple[Tuple[str, ...], Tuple[str, ...]] = BUILDS[0]) -> Path:
    """Where the kernel is built: `$TORCH_EXTENSIONS_DIR` (default ~/.cache/torch_extensions)/pkmlm/
    <name>, the name keyed by a hash of the sources, the flags, torch and python, so that a change of
    any of them builds afresh beside the old build, and a build is never loaded by another torch."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions"
    )
    key = hashlib.sha256(
        b"".join(source.read_bytes() for source in SOURCES + HEADERS)
        + repr((*flags, torch.__version__, sys.version_info[:2], sys.platform)).encode()
    ).hexdigest()[:16]
    return Path(root) / "pkmlm" / f"{NAME}_{key}"


def _build(flags: Tuple[Tuple[str, ...], Tuple[str, ...]]) -> None:
    """Load the library built with `flags` (compile, link); build it first where it is not there (or
    another process is building it: cpp_extension's lock file, which `load` waits on). Loading a
    built library takes milliseconds; `cpp_extension.load` (importing it, checking the build with
    ninja) about a second of CPU."""
    directory = build_dir(flags)
    library = directory / f"{directory.name}.so"
    if library.is_file() and not (directory / "lock").exists():
        torch.ops.load_library(str(library))
        return
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    path = os.environ.get("PATH", "")
    venv_bin = str(Path(sys.executable).parent)
    # The ninja the builder runs is found on PATH; a venv that is not activated still has the one
    # pip installed with pkmlm (the `ninja` dependency) next to its python.
    if shutil.which("ninja") is None and shutil.which("ninja", path=venv_bin) is not None:
        os.environ["PATH"] = venv_bin + os.pathsep + path
    try:
        cpp_extension.load(
            name=directory.name,
            sources=[str(source) for source in SOURCES],
            extra_cflags=list(flags[0]),
            extra_ldflags=list(flags[1]),
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    finally:
        os.environ["PATH"] = path


def _register_python_parts() -> None:
    torch.library.register_autograd("pkmlm_cpu::topk", _backward, setup_context=_setup_context)
    torch.library.register_autograd("pkmlm_cpu::product_search", _search_backward, setup_context=_search_setup_context)
    _register_fakes()


def _register_fakes() -> None:
    """Fake implementations (output shapes and dtypes), so that `torch.compile` traces around the ops."""

    @torch.library.register_fake("pkmlm_cpu::topk")
    def _fake_topk(x: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        shape = (*x.shape[:-1], k)
        return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)

    @torch.library.register_fake("pkmlm_cpu::read_backward")  # cpu_read.cpp, in the same library
    def _fake_read_backward(grad_out: Tensor, values: Tensor, indices: Tensor, weights: Tensor):
        return values.new_empty(values.shape), weights.new_empty(weights.shape)

    @torch.library.register_fake("pkmlm_cpu::product_search")
    def _fake_product_search(s: Tensor, pair_a: Tensor, pair_b: Tensor, k: int):
        shape = (*s.shape[:-2], k)
        return (s.new_empty(shape, dtype=torch.float32), *(s.new_empty(shape, dtype=torch.int64) for _ in range(3)))

    @torch.library.register_fake("pkmlm_cpu::product_search_backward")
    def _fake_product_search_backward(grad: Tensor, slot: Tensor, S: int, dtype: torch.dtype):
        return grad.new_empty((*grad.shape[:-1], 2, S), dtype=dtype)

    @torch.library.register_fake("pkmlm_cpu::scores_backward_sparse")  # cpu_scores.cpp
    def _fake_scores_backward_sparse(grad: Tensor, slot: Tensor, q: Tensor, keys: Tensor):
        return q.new_empty(q.shape), keys.new_empty(keys.shape)


def _setup_context(ctx, inputs, output) -> None:
    """The first output is the top-k values of the input along its last dim, at the indices of the
    second output (an integer tensor: no gradient)."""
    ctx.x_shape = inputs[0].shape
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_values: Tensor, *grad_rest):
    (indices,) = ctx.saved_tensors
    # ATen's topk backward (value_selecting_reduction_backward): zeros, then scatter_.
    grad_x = grad_values.new_zeros(ctx.x_shape).scatter_(-1, indices, grad_values)
    return grad_x, None


def _search_setup_context(ctx, inputs, output) -> None:
    s = inputs[0]
    ctx.S, ctx.dtype = s.shape[-1], s.dtype
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero tensors made for the integer outputs' gradients
    ctx.save_for_backward(output[1])  # the slot ids: the winners' sub-keys are slot // S and slot % S


def _search_backward(ctx, grad_scores: Tensor, *grad_rest):
    """The scores' gradient to `s` in one C++ pass, bit for bit the torch path's (cpu_topk.cpp says how)."""
    (slot,) = ctx.saved_tensors
    if grad_scores is None:
        return None, None, None, None
    grad_s = torch.ops.pkmlm_cpu.product_search_backward(grad_scores, slot, ctx.S, ctx.dtype)
    return grad_s, None, None, None


def topk(x: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """`(values, indices)` of the k largest entries along the last dim, sorted (the kernel must be
    loaded and `x` a CPU tensor of one of `DTYPES`; `kernels.topk` checks and falls back)."""
    return torch.ops.pkmlm_cpu.topk(x, k)


def product_search(s_N2S: Tensor, pair_a_C: Tensor, pair_b_C: Tensor, k: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The memory's whole product-key search in one pass (`kernels.product_search` documents it; the
    kernel must be loaded and `s` a CPU tensor of one of `DTYPES`, any strides but the last dim's)."""
    return torch.ops.pkmlm_cpu.product_search(s_N2S, pair_a_C, pair_b_C, k)
