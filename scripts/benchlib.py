"""What the benchmarks (scripts/bench_*.py) share: the common command-line options, device
selection, the CPU load note, synchronisation, timing in turns, the dense FFN contender and the
provenance of a results file.

Imports torch alone (no Hydra, omegaconf, datasets or wandb along the way), so the benchmarks run
on a bare PyTorch (+ triton) machine. When pkmlm is not installed there, importing this module puts
the checkout's `src/` on `sys.path`, so `python3 scripts/bench_memory.py` works from a plain copy of
the repository.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
if importlib.util.find_spec("pkmlm") is None and (SRC / "pkmlm").is_dir():
    sys.path.insert(0, str(SRC))


class FFN(torch.nn.Module):
    """The dense contender: a block's FFN d -> 4d -> d with GELU (pkmlm.model.transformer.FeedForward),
    which a memory layer replaces or an Engram layer sits beside."""

    def __init__(self, dim: int):
        super().__init__()
        self.up = torch.nn.Linear(dim, 4 * dim, bias=False)
        self.down = torch.nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def add_common_args(parser: argparse.ArgumentParser, unit: str) -> None:
    """--device, --threads and --warmup (`unit`: what one warm-up repetition is, for the help)."""
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (auto: cuda when available)")
    parser.add_argument("--warmup", type=int, default=None, help=f"untimed {unit} first (default 5 CUDA, 2 CPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")


def setup(args: argparse.Namespace, prog: str) -> torch.device:
    """Apply --threads, pick the device (exit with one line when CUDA is asked for and absent) and
    warn on stderr when a CPU run competes with other processes. Returns the device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{prog}: --device cuda needs a CUDA build of torch and a GPU")
    if device.type == "cpu" and os.getloadavg()[0] > (os.cpu_count() or 1):
        print(
            f"note: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: other processes compete, "
            "and multi-threaded CPU timings suffer most; --threads 1 gives steadier comparisons",
            file=sys.stderr,
        )
    return device


def default(value, device: torch.device, cuda: int, cpu: int) -> int:
    """`value` when given on the command line, else the device's default."""
    return value if value is not None else (cuda if device.type == "cuda" else cpu)


def cpu_name() -> str:
    """The CPU model (pkmlm.results.cpu_model) and the core count."""
    from pkmlm.results import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores"


def provenance(command: str, load_start: float, load_end: float, machine: str | None = None) -> dict:
    """What a results file (docs/results/*.json, `pkmlm.results`) says about its measurement: the
    command, the git commit, the date, the machine (default: this CPU), torch and the load average
    at start and end. The caller adds threads, columns, rows and a note."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=SRC.parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = ""
    return {
        "command": command,
        "commit": commit or "unknown",
        "date": str(datetime.date.today()),
        "machine": machine or f"{platform.machine()} CPU ({cpu_name()})",
        "torch": torch.__version__,
        "load": f"load average {load_start:.1f} at start, {load_end:.1f} at end (shared machine)",
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at start"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once_ms(fn: Callable[[], object], device: torch.device, events: bool = True) -> float:
    """Milliseconds of one call: CUDA events around it on CUDA when `events` (GPU time of the work
    queued), else wall-clock time up to the device's synchronisation (host overhead included)."""
    if device.type == "cuda" and events:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def interleaved_ms(
    fns: List[Callable[[], object]], device: torch.device, warmup: int, repeats: int, events: bool = True
) -> List[float]:
    """Median milliseconds of each function, timed in turns (A, B, C, A, B, C, ...) so that a change
    in what else the machine runs hits every contender alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    sync(device)
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t.append(time_once_ms(fn, device, events))
    return [statistics.median(t) for t in times]
