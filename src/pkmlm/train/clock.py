"""The training loop's clock: wall and training time (summed over resumes), per-row throughput
(tokens/s, step time split into data and compute, MFU, peak memory) and the token/time budgets.

Training time is wall time less the time spent in evaluation and checkpointing (`paused()`), so
`train/tokens_per_s` measures training alone, however often a run evaluates. Times are host
clock readings: on CUDA a step's kernels may still run when its clock stops, but each step waits
for the previous one (the loss check syncs), so sums over a logging window are right.

Row keys (docs/architecture.md `metrics.jsonl`, plus these):
  train/tokens_per_s     training tokens per second of training time over the row's window
  train/step_time_s      mean seconds per optimizer step = data_time_s + compute_time_s
  train/data_time_s      mean seconds per step spent waiting for the next batch
  train/compute_time_s   the rest: forward, backward, clipping, optimizer step
  train/data_wait_frac   data_time_s / step_time_s
  train/flops_per_s      achieved model FLOP/s: active FLOPs per token x tokens/s
  train/mfu              train/flops_per_s / the device's peak (null when the peak is unknown)
  train/peak_memory_gb   peak memory so far, 1e9 bytes (CUDA: tensors; CPU: process RSS)
  wall_time_s            seconds since the run began (all its resumed segments together)
  train_time_s           of which training (evaluation and checkpoints excluded)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from pkmlm.metrics.flops import mfu, peak_memory_bytes

__all__ = ["RunClock", "budget_reached", "stop_reason"]


class RunClock:
    def __init__(
        self,
        device: torch.device,
        flops_per_token: float,
        peak_flops: float | None,
        wall_before_s: float = 0.0,
        train_before_s: float = 0.0,
    ):
        self.device = device
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self._wall_before = float(wall_before_s)
        self._paused_before = float(wall_before_s) - float(train_before_s)
        self._start = time.perf_counter()
        self._paused = 0.0  # seconds paused in this process
        self._new_window()

    def _new_window(self) -> None:
        self._w_start, self._w_paused, self._w_data = time.perf_counter(), self._paused, 0.0
        self._w_tokens, self._w_steps = 0, 0

    # --- cumulative times -------------------------------------------------------------------
    def wall_s(self) -> float:
        return self._wall_before + time.perf_counter() - self._start

    def train_s(self) -> float:
        return self.wall_s() - self._paused_before - self._paused

    def times(self) -> dict:
        return {"wall_time_s": self.wall_s(), "train_time_s": self.train_s()}

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside is not training time (evaluation, checkpoints)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - t0

    # --- the logging window -----------------------------------------------------------------
    def add_data_time(self, seconds: float) -> None:
        self._w_data += seconds

    def step_done(self, tokens: int) -> int:
        """Count one optimizer step of `tokens` tokens; returns the steps in the window so far."""
        self._w_tokens += tokens
        self._w_steps += 1
        return self._w_steps

    def window_row(self) -> dict:
        """Throughput over the steps since the last row; starts a new window."""
        elapsed = time.perf_counter() - self._w_start - (self._paused - self._w_paused)
        elapsed = max(elapsed, 1e-9)
        steps = max(self._w_steps, 1)
        tokens_per_s = self._w_tokens / elapsed
        flops_per_s = self.flops_per_token * tokens_per_s
        row = {
            "train/tokens_per_s": tokens_per_s,
            "train/step_time_s": elapsed / steps,
            "train/data_time_s": self._w_data / steps,
            "train/compute_time_s": (elapsed - self._w_data) / steps,
            "train/data_wait_frac": self._w_data / elapsed,
            "train/flops_per_s": flops_per_s,
            "train/mfu": mfu(self.flops_per_token, tokens_per_s, self.peak_flops),
            "train/peak_memory_gb": peak_memory_bytes(self.device) / 1e9,
            **self.times(),
        }
        self._new_window()
        return row


def budget_reached(max_tokens: int | None, max_time: float | None, tokens: int, train_s: float) -> str | None:
    """`"max_tokens"` or `"max_time"` once a budget is used up, else None. The time budget counts
    training time (`train_time_s`): how often a run evaluates does not change where it stops."""
    if max_tokens is not None and tokens >= max_tokens:
        return "max_tokens"
    if max_time is not None and train_s >= max_time:
        return "max_time"
    return None


def stop_reason(
    step: int, max_steps: int, stop_at_step: int | None, budget: str | None, signal_name: str | None
) -> str:
    """Why the loop ended: a signal's name, a budget, `max_steps` or `stop_at_step`."""
    if signal_name is not None:
        return signal_name
    if budget is not None:
        return budget
    if step >= max_steps:
        return "max_steps"
    if stop_at_step is not None and step >= stop_at_step:
        return "stop_at_step"
    return "unknown"
