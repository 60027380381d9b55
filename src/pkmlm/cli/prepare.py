"""`pkmlm-prepare data=PRESET out=DIR`: tokenize a corpus once into memory-mappable token shards.

Reads the sources of the `data` group exactly as training would (files, mixtures, Hub datasets,
cleaning, bad-input policy), trains or loads the tokenizer the same way (cached), and writes
`DIR/index.json`, `DIR/tokenizer.json`, `DIR/val_00000.bin` and `DIR/train_*.bin` (see
`pkmlm.data.prepared`). Train from them with `pkmlm-train data=prepared data.prepared=DIR`.
Prints one JSON object (tokens, documents, shards, skipped counts) when done.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

import hydra
from omegaconf import DictConfig, OmegaConf

from pkmlm.cli._common import precheck_overrides, user_errors_exit_2
from pkmlm.config import PathsConfig, config_dir, register_configs
from pkmlm.data.config import DataConfig
from pkmlm.errors import ConfigError


@dataclass
class PrepareAppConfig:
    out: str = "???"  # the directory to write (must not exist, or be empty)
    data: DataConfig = field(default_factory=DataConfig)
    # Tokens per training shard: 100M uint16 tokens = 200 MB files, few enough to keep open and
    # large enough that each shard's unused tail (< seq_len tokens) is negligible.
    shard_tokens: int = 100_000_000
    paths: PathsConfig = field(default_factory=PathsConfig)


def _register() -> None:
    from hydra.core.config_store import ConfigStore

    register_configs()
    ConfigStore.instance().store(name="prepare_config", node=PrepareAppConfig)


_register()


def run_prepare(cfg: PrepareAppConfig) -> dict:
    from pkmlm.data.loader import resolve_data
    from pkmlm.data.prepared import prepare
    from pkmlm.data.tokenizer import load_or_train_tokenizer

    if cfg.data.prepared:
        raise ConfigError("data.prepared", cfg.data.prepared, "null here: pkmlm-prepare reads text sources "
                          "(choose data=wiki, data=c4, data.files=[...] or data.sources=[...])")
    if cfg.shard_tokens < 1024:
        raise ConfigError("shard_tokens", cfg.shard_tokens, "an integer >= 1024 (tokens per training shard)")
    plan = resolve_data(cfg.data)  # globs and values checked before any work
    t0 = time.perf_counter()
    tokenizer, info = load_or_train_tokenizer(cfg.data, plan, cfg.paths.cache_dir)
    last = [0.0]

    def progress(split: str, tokens: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 10:
            last[0] = now
            print(f"pkmlm-prepare: {split} {tokens:,} tokens ({now - t0:.0f} s)", file=sys.stderr, flush=True)

    index = prepare(cfg.data, plan.sources, tokenizer, cfg.out, shard_tokens=cfg.shard_tokens,
                    tokenizer_hash=info.get("hash"), progress=progress)
    wall = time.perf_counter() - t0
    return {"out": cfg.out, "dtype": index["dtype"], "vocab_size": index["vocab_size"], "tokens": index["tokens"],
            "documents": index["documents"], "train_shards": len(index["splits"]["train"]),
            "skipped": index["skipped"], "tokenizer": info["source"], "wall_s": round(wall, 2),
            "tokens_per_s": round(sum(index["tokens"].values()) / wall) if wall > 0 else None}


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
