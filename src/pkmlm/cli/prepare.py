"""`pkmlm-prepare data=PRESET out=DIR`: tokenize a corpus once into memory-mappable token shards.

Reads the sources of the `data` group exactly as training would (files, mixtures, Hub datasets
through `datasets` streaming, cleaning, bad-input policy), trains or loads the tokenizer the same
way (cached), and writes `DIR/index.json`, `DIR/tokenizer.json`, `DIR/val_00000.bin` and
`DIR/train_*.bin` (see `pkmlm.data.prepared`). Train from them with
`pkmlm-train data=prepared data.prepared=DIR`.

Before tokenizing it prints what it will read and an estimate of the training tokens and of the
shards' size on disk (and refuses when that clearly exceeds the free space); then a progress bar
(a plain line every 30 s when stderr is not a terminal). Interrupted (Ctrl-C, kill, a full disk),
the same command continues from the last complete shard. `max_tokens=N` stops after about N
training tokens. Prints one JSON object (tokens, documents, shards, skipped counts) when done.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pkmlm.cli._common import precheck_overrides, user_errors_exit_2
from pkmlm.config import PathsConfig, config_dir, register_configs
from pkmlm.data.config import DataConfig
from pkmlm.errors import ConfigError, DataError
from pkmlm.metrics.formatting import si as _si  # 12.3M: the console's token counts


@dataclass
class PrepareAppConfig:
    out: str = "???"  # the directory to write (must not exist, or be empty)
    data: DataConfig = field(default_factory=DataConfig)
    # Tokens per training shard: 100M uint16 tokens = 200 MB files, few enough to keep open and
    # large enough that each shard's unused tail (< seq_len tokens) is negligible. Also the unit
    # of resumption: an interrupted run continues from its last complete shard.
    shard_tokens: int = 100_000_000
    max_tokens: Optional[int] = None  # stop after about this many training tokens; None = every document
    paths: PathsConfig = field(default_factory=PathsConfig)


def _register() -> None:
    from hydra.core.config_store import ConfigStore

    register_configs()
    ConfigStore.instance().store(name="prepare_config", node=PrepareAppConfig)


_register()


def say(message: str, file=None) -> None:
    print(f"pkmlm-prepare: {message}", file=file or sys.stderr, flush=True)


def _bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


class PrepareProgress:
    """Training tokens written, against the estimate: a tqdm bar on a terminal, else a plain line
    at most every `interval_s` seconds (CI, `| tee`, SLURM logs)."""

    def __init__(self, total: Optional[int], file=None, tty: Optional[bool] = None, interval_s: float = 30.0):
        self.total, self.file, self.interval_s = total, file or sys.stderr, interval_s
        isatty = getattr(self.file, "isatty", None)
        self.tty = bool(isatty and isatty()) if tty is None else tty
        self.start = time.monotonic()
        self.last_line = self.start
        self.initial: Optional[int] = None
        self.shards = 0
        self.bar = None

    def __call__(self, split: str, tokens: int, shard: Optional[Dict[str, Any]]) -> None:
        if split != "train":
            return
        if self.initial is None:  # the first report: tokens already written by an interrupted run
            self.initial = tokens
            if tokens:
                say(f"continuing an interrupted run: {tokens:,} training tokens already written", self.file)
            if self.tty:
                self.bar = tqdm(
                    total=self.total,
                    initial=tokens,
                    unit="tok",
                    unit_scale=True,
                    file=self.file,
                    desc="pkmlm-prepare train",
                    dynamic_ncols=True,
                    smoothing=0.1,
                )
        self.shards += shard is not None
        if self.bar is not None:
            self.bar.update(tokens - self.bar.n)
            return
        now = time.monotonic()
        if now - self.last_line >= self.interval_s:
            self.last_line = now
            say(self.line(tokens, now - self.start), self.file)

    def line(self, tokens: int, elapsed: float) -> str:
        rate = (tokens - (self.initial or 0)) / elapsed if elapsed > 0 else 0.0
        parts = [f"train {_si(tokens)} tokens"]
        if self.total:
            parts[0] += f" (~{min(tokens / self.total, 1.0):.0%} of ~{_si(self.total)})"
        parts.append(f"{self.shards} shards closed")
        parts.append(f"{_si(rate)} tok/s")
        parts.append(f"{elapsed:.0f} s elapsed")
        if self.total and rate > 0 and tokens < self.total:
            parts.append(f"~{(self.total - tokens) / rate:.0f} s left")
        return ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _free_bytes(path: str) -> int:
    """Free space on the file system that will hold `path` (its nearest existing parent)."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return shutil.disk_usage(parent).free


def _check_args(cfg: PrepareAppConfig) -> None:
    """pkmlm-prepare's own values, before any work."""
    if cfg.data.prepared:
        raise ConfigError(
            "data.prepared",
            cfg.data.prepared,
            "null here: pkmlm-prepare reads text sources "
            "(choose data=wiki, data=c4, data.files=[...] or data.sources=[...])",
        )
    if cfg.shard_tokens < 1024:
        raise ConfigError("shard_tokens", cfg.shard_tokens, "an integer >= 1024 (tokens per training shard)")
    if cfg.max_tokens is not None and cfg.max_tokens < 1:
        raise ConfigError("max_tokens", cfg.max_tokens, "an integer >= 1 (training tokens to write), or null for all")


def _say_estimate(cfg: PrepareAppConfig, plan_est: dict, out: str) -> None:
    """The estimate of what will be written, and a refusal when the disk cannot hold it."""
    free = _free_bytes(out)
    dtype = f"uint{8 * plan_est['itemsize']}"
    if plan_est["train_tokens"] is None:
        unknown = [s["name"] for s in plan_est["sources"] if s["tokens"] is None]
        say(
            f"estimate: the size of {', '.join(unknown)} is not stated up front, so tokens are counted as they "
            f"come ({dtype}, {plan_est['itemsize']} bytes per token; {_bytes(free)} free at {out}); set "
            "max_tokens=N to bound the run"
        )
    else:
        say(
            f"estimate: ~{_si(plan_est['train_tokens'])} training tokens"
            + (f" (max_tokens={cfg.max_tokens:,})" if cfg.max_tokens is not None else "")
            + f" -> ~{_bytes(plan_est['disk_bytes'])} of {dtype} shards in {out} ({_bytes(free)} free there)"
        )
        if plan_est["disk_bytes"] * 0.75 > free:  # the estimate is within about 20%
            raise DataError(
                f"out={cfg.out!r}: the shards need about {_bytes(plan_est['disk_bytes'])} and "
                f"{_bytes(free)} is free there; free space, choose another out, or set max_tokens=N"
            )


def run_prepare(cfg: PrepareAppConfig) -> dict:
    from pkmlm.data.loader import load_or_train_tokenizer, resolve_data
    from pkmlm.data.prepared import check_out, estimate, partial_dir, partial_tokenizer, prepare
    from pkmlm.data.sources import open_hub_dataset

    _check_args(cfg)
    out = os.path.abspath(os.path.expanduser(cfg.out))
    check_out(out)
    plan = resolve_data(cfg.data)  # globs and values checked before any work
    for s in plan.sources:
        if s.hub is not None:
            open_hub_dataset(s.hub)  # no Hub (offline, a wrong name): one line now, before anything else
    for s in plan.sources:
        what = str(s.hub) if s.hub else f"{len(s.files)} files, {_bytes(sum(os.path.getsize(p) for p in s.files))}"
        say(
            f"source {s.name}"
            + ("" if what == s.name else f": {what}")
            + (f", weight {s.weight:g}" if len(plan.sources) > 1 else "")
        )
    t0 = time.perf_counter()
    tokenizer = partial_tokenizer(out)
    if tokenizer is not None:
        info: Dict[str, Any] = {"source": "interrupted run", "hash": None}
    else:
        tokenizer, info = load_or_train_tokenizer(cfg.data, plan, cfg.paths.cache_dir)
    say(f"tokenizer: {tokenizer.get_vocab_size():,} tokens ({info['source']})")

    plan_est = estimate(cfg.data, plan.sources, tokenizer, cfg.max_tokens)
    _say_estimate(cfg, plan_est, out)
    progress = PrepareProgress(plan_est["train_tokens"])
    try:
        index = prepare(
            cfg.data,
            plan.sources,
            tokenizer,
            out,
            shard_tokens=cfg.shard_tokens,
            tokenizer_hash=info.get("hash"),
            progress=progress,
            max_tokens=cfg.max_tokens,
        )
    except KeyboardInterrupt:
        progress.close()
        print(
            f"pkmlm-prepare: interrupted; the complete shards are kept in {partial_dir(out)}: rerun the same "
            "command to continue",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(130)
    progress.close()
    wall = time.perf_counter() - t0
    return {
        "out": cfg.out,
        "dtype": index["dtype"],
        "vocab_size": index["vocab_size"],
        "tokens": index["tokens"],
        "documents": index["documents"],
        "train_shards": len(index["splits"]["train"]),
        "resumed_shards": index["resumed_shards"],
        "stopped_by": index["stopped_by"],
        "estimated_train_tokens": plan_est["train_tokens"],
        "skipped": index["skipped"],
        "tokenizer": info["source"],
        "wall_s": round(wall, 2),
        "tokens_per_s": round(sum(index["tokens"].values()) / wall) if wall > 0 else None,
    }


@user_errors_exit_2
def _run(cfg: DictConfig) -> None:
    typed: PrepareAppConfig = OmegaConf.to_object(cfg)
    print(json.dumps(run_prepare(typed)), flush=True)


@hydra.main(config_path=config_dir(), config_name="prepare", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    _run(cfg)


def main() -> None:
    precheck_overrides(config_dir(), "prepare")
    _hydra_main()


if __name__ == "__main__":
    main()
