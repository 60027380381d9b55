"""Reference step times for the knowledge sweep's equal-time comparison (issue 21).

A sweep runs for hours on a machine whose load changes (other jobs, other users), so a run's
wall-clock `train_time_s` measures the machine as much as the arm: a dense run trained during a busy
hour looks as slow as a memory run trained at night. The equal-time point therefore uses the arms'
*reference* step times, measured once per sweep directory with every arm's training step timed in
turns (A, B, C, A, B, C, ...; medians), so that a change of load hits every arm alike and the ratio
of two arms' step times holds whatever the load was. The step is the one `pkmlm-train` takes on the
CPU: forward, loss, backward, gradient clipping, the optimizer step and `zero_grad`, on random
tokens of the run's batch shape (data loading is not timed: the knowledge runs' batches come from a
small in-memory corpus). A run's reference training time is its step count x its arm's step time.

`DIR/step_times.json` keeps the measurement (with the threads, torch, machine, load and date it was
taken under); a resumed sweep reads it and measures only arms it lacks. An arm added to a sweep
directory later (a new arm on a sweep that has run for days) is timed in turns with an *anchor*,
an arm timed before (`dense` where it was), and scaled by the anchor's time then over its time now:
its ratio to every earlier arm is the ratio measured in turns, whatever the load of either day.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

from pkmlm.results import cpu_model

STEP_TIMES = "step_times.json"
WARMUP, REPEATS = 3, 15  # medians of 15 turns: within a few % between repeated measurements here


def training_step(cfg) -> Callable[[], None]:
    """One CPU training step of the composed config `cfg` (a `pkmlm.config.Config`) as a closure."""
    import dataclasses

    import torch

    from pkmlm.model import Transformer
    from pkmlm.optim import build_optimizer, clip_grad_norm_

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    # model.vocab_size 0 = the tokenizer's size: data.vocab_size for a trained BPE (as pkmlm-train)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or cfg.data.vocab_size)
    model = Transformer(model_cfg)
    optimizer = build_optimizer(model, cfg.optim, cpu)
    tokens_BT = torch.randint(0, model_cfg.vocab_size, (cfg.train.batch_size, cfg.data.seq_len + 1))
    inputs_BT, targets_BT = tokens_BT[:, :-1], tokens_BT[:, 1:]
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip else float("inf")

    def step() -> None:
        model.train()
        _, loss = model(inputs_BT, targets_BT)
        loss.backward()
        clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def interleaved_ms(steps: list[Callable[[], None]], warmup: int = WARMUP, repeats: int = REPEATS) -> list[float]:
    """Median milliseconds of each step, timed in turns so that load changes hit every step alike."""
    for step in steps:
        for _ in range(warmup):
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for step, t in zip(steps, times):
            t0 = time.perf_counter()
            step()
            t.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def load_step_times(out: Path) -> dict:
    path = Path(out) / STEP_TIMES
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        assert isinstance(data.get("step_ms"), dict)
    except (ValueError, AssertionError):
        raise SystemExit(f"sweep: {path} is not a step-times file: move it aside and run again to re-measure") from None
    return data


def anchor_arm(known: dict) -> str | None:
    """The arm new arms are timed against (see the module docstring): `dense` where it was timed,
    else the first timed arm by name; None for a directory with no step times yet."""
    return "dense" if "dense" in known else min(known, default=None)


def measure_step_times(
    out: Path,
    arm_configs: dict,
    threads: int,
    warmup: int = WARMUP,
    repeats: int = REPEATS,
    anchor_config=None,
) -> dict:
    """Reference step times (ms) of the arms in `arm_configs` (arm -> composed config) that
    `out/step_times.json` lacks, all timed in one interleaved run with `threads` threads; merged into
    that file (arms measured earlier keep their numbers and conditions) and returned. Where the file
    has arms already, `anchor_config` (the composed config of `anchor_arm`) is timed in the same
    turns and the new times are scaled to its earlier time (`measured[-1]["anchor"]` keeps the
    raw times)."""
    import torch

    data = load_step_times(out)
    known = data.get("step_ms", {})
    missing = {arm: cfg for arm, cfg in arm_configs.items() if arm not in known}
    if not missing:
        return data
    anchor = anchor_arm(known)
    if anchor is not None and anchor_config is None:
        raise ValueError(f"measure_step_times: {out} has step times: time the new arms against {anchor!r}")
    arms = sorted(missing)
    timed = [*arms, anchor] if anchor is not None else arms
    configs = {**missing, **({anchor: anchor_config} if anchor is not None else {})}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        raw = interleaved_ms([training_step(configs[arm]) for arm in timed], warmup, repeats)
    finally:
        torch.set_num_threads(previous)
    scale = known[anchor] / raw[-1] if anchor is not None else 1.0
    ms = [m * scale for m in raw[: len(arms)]]
    conditions = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": cpu_model(),
        "torch": torch.__version__,
        "threads": threads,
        "load": "load average %.2f, %.2f, %.2f" % os.getloadavg(),
        "repeats": repeats,
    }
    if anchor is not None:
        conditions["anchor"] = {"arm": anchor, "ms_before": known[anchor], "raw_ms": dict(zip(timed, raw))}
    data.setdefault("step_ms", {}).update({arm: round(m, 3) for arm, m in zip(arms, ms)})
    data.setdefault("measured", []).append({"arms": arms, **conditions})
    path = Path(out) / STEP_TIMES
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return data


def with_reference_times(results: list[dict], step_ms: dict[str, float]) -> list[dict]:
    """`results` rows with `ref_time_s` = step x the arm's reference step time (rows of arms without
    one are left without it)."""
    return [
        {**r, "ref_time_s": r["step"] * step_ms[r["arm"]] / 1e3} if r["arm"] in step_ms else dict(r) for r in results
    ]
