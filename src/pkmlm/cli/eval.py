"""`pkmlm-eval checkpoint=RUN_DIR [data.files=[PATH,...]]`: perplexity, bits per byte and memory
usage of a trained run on any text, printed as one JSON object. Writes nothing into RUN_DIR.

With `data.files` (any format training reads: JSON lines, Parquet, WET, plain text, each file
whole) or `data.sources` (a mixture or Hub datasets: every document of every source, in order, the
weights unused) that text is evaluated; with `data.prepared=DIR`, the validation split of a
pkmlm-prepare directory tokenized with the run's tokenizer; without any, the run's own held-out
validation split (the same documents its training never saw).

With `eval.recall=DIR/qa.jsonl` (written by pkmlm-facts) it adds fact recall: `recall/exact_match`,
`recall/answer_nll` (nats per answer), `recall/bits` (knowledge stored, a lower bound) and
`recall/bits_per_param/{total,active,memory_values}` (`pkmlm.metrics.recall`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from pkmlm.cli._common import precheck_overrides, user_errors_exit_2
from pkmlm.config import PathsConfig, Precision, check_device, config_dir, register_configs
from pkmlm.data.config import SourceConfig
from pkmlm.errors import ConfigError, DataError, require_one_of


@dataclass
class EvalDataConfig:
    files: list[str] = field(default_factory=list)  # [] = the run's validation split
    sources: list[SourceConfig] = field(default_factory=list)  # or a mixture / Hub datasets, as data.sources
    prepared: str | None = None  # or a pkmlm-prepare directory: its validation split
    text_field: str | None = None  # None = the run's
    seq_len: int | None = None  # None = the run's
    strict: bool = False


@dataclass
class EvalExtrasConfig:
    recall: str | None = None  # a qa.jsonl (pkmlm-facts): add the recall/* metrics
    recall_max_questions: int | None = None  # score only the first questions; None = all


@dataclass
class EvalAppConfig:
    checkpoint: str = "???"  # a run directory (newest valid checkpoint), checkpoint or export directory
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    eval: EvalExtrasConfig = field(default_factory=EvalExtrasConfig)
    batch_size: int = 16
    max_batches: int | None = None
    device: str = "auto"  # pkmlm.config.DEVICES, as train.device
    precision: str = "auto"  # pkmlm.config.Precision, as train.precision
    paths: PathsConfig = field(default_factory=PathsConfig)


def _register() -> None:
    from hydra.core.config_store import ConfigStore

    register_configs()
    ConfigStore.instance().store(name="eval_config", node=EvalAppConfig)


_register()


def token_byte_lengths(tokenizer) -> list[int]:
    """UTF-8 bytes of each token id. Byte-level BPE tokens are strings over a 256-symbol alphabet,
    one symbol per byte (GPT-2's bytes_to_unicode), so a token's length is its byte count; special
    tokens (end-of-text) count as one byte, the separator they stand for."""
    lengths = [1] * tokenizer.get_vocab_size()
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    for token, idx in tokenizer.get_vocab().items():
        lengths[idx] = 1 if token in specials else len(token)
    return lengths


def check_eval_config(cfg: EvalAppConfig) -> None:
    """Range checks of pkmlm-eval's own values, before the run is loaded."""
    if cfg.batch_size < 1:
        raise ConfigError("batch_size", cfg.batch_size, "an integer >= 1 (validation windows per batch)")
    if cfg.max_batches is not None and cfg.max_batches < 1:
        raise ConfigError("max_batches", cfg.max_batches, "null (every batch) or an integer >= 1")
    check_device("device", cfg.device)
    require_one_of("precision", cfg.precision, Precision)
    if cfg.eval.recall_max_questions is not None and cfg.eval.recall_max_questions < 1:
        raise ConfigError("eval.recall_max_questions", cfg.eval.recall_max_questions, "null (all) or an integer >= 1")
    if cfg.data.seq_len is not None and cfg.data.seq_len < 1:
        raise ConfigError("data.seq_len", cfg.data.seq_len, "null (the run's) or an integer >= 1")
    given = [k for k in ("files", "sources", "prepared") if getattr(cfg.data, k)]
    if len(given) > 1:
        value = getattr(cfg.data, given[1])
        raise ConfigError(
            f"data.{given[1]}",
            f"{len(value)} sources" if given[1] == "sources" else value,
            f"unset when data.{given[0]} is given: evaluate files, sources or a prepared directory",
        )


def _check_same_tokenizer(directory: str, tokenizer) -> None:
    """Prepared token ids mean something only under the tokenizer that wrote them."""
    from pkmlm.data.prepared import load_prepared_tokenizer

    theirs, _ = load_prepared_tokenizer(directory)
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise DataError(
            f"data.prepared={directory!r} was tokenized with another tokenizer than the run's; "
            "prepare it with the run's (pkmlm-prepare data.tokenizer=RUN_DIR/tokenizer.json out=DIR)"
        )


def evaluate_run(cfg: EvalAppConfig) -> dict:
    import torch

    from pkmlm.metrics.evaluate import bits_per_byte, evaluate
    from pkmlm.run import load_run
    from pkmlm.train.setup import autocast_dtype, pick_device

    check_eval_config(cfg)
    questions = None
    if cfg.eval.recall is not None:  # read (and checked) before the run is loaded
        from pkmlm.metrics.recall import evaluate_recall, read_questions

        questions = read_questions(Path(cfg.eval.recall).expanduser())
    try:
        device = pick_device(cfg.device)
    except ConfigError as e:  # the same checks as train.device, under this tool's own key
        raise ConfigError("device", cfg.device, e.allowed) from None
    run = load_run(cfg.checkpoint, device=device)
    if questions is not None:  # every answer fits the window: refused before evaluating anything
        from pkmlm.metrics.recall import check_recall_fits

        check_recall_fits(questions, run.tokenizer, run.model.cfg.max_seq_len, cfg.eval.recall)
    files, batches = evaluation_batches(cfg, run)
    result = evaluate(run.model, batches, device, autocast_dtype=autocast_dtype(cfg.precision, device))
    byte_len = torch.tensor(token_byte_lengths(run.tokenizer), dtype=torch.float64)
    n_bytes = sum(float(byte_len[b[:, 1:].reshape(-1)].sum()) for b in batches)
    out = {
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "files": files,
        "tokens": result["tokens"],
        "loss": result["loss"],
        "ppl": result["ppl"],
        "bpb": bits_per_byte(result["loss"] * result["tokens"], n_bytes) if n_bytes else float("nan"),
    }
    out.update({k: v for k, v in result.items() if k.startswith("memory/")})
    if questions is not None:
        out.update(
            evaluate_recall(
                run.model,
                run.tokenizer,
                questions,
                batch_size=cfg.batch_size,
                device=device,
                max_questions=cfg.eval.recall_max_questions,
            )
        )
    return out


def evaluation_batches(cfg: EvalAppConfig, run) -> tuple[list[str], list]:
    """The `(B, T+1)` batches pkmlm-eval reads for `cfg.data` under `run`'s config and tokenizer
    (files, sources, a prepared directory, or the run's validation split), and what they came
    from. Shared with pkmlm-inspect, so that both read the same data the same way."""
    from pkmlm.data.config import DataConfig
    from pkmlm.data.loader import resolve_data, validation_batches

    saved = run.config["data"]
    data_fields = {f.name for f in dataclasses.fields(DataConfig)}
    data_cfg = DataConfig(**{k: v for k, v in saved.items() if k in data_fields})
    if cfg.data.files or cfg.data.sources:
        # All of every given file or source: no held-out split, nothing skipped.
        data_cfg = dataclasses.replace(
            data_cfg, files=list(cfg.data.files), sources=list(cfg.data.sources), prepared=None, val_docs=10**18
        )
    elif cfg.data.prepared:
        data_cfg = dataclasses.replace(data_cfg, files=[], sources=[], prepared=cfg.data.prepared)
    if cfg.data.text_field is not None:
        data_cfg = dataclasses.replace(data_cfg, text_field=cfg.data.text_field)
    if cfg.data.seq_len is not None:
        data_cfg = dataclasses.replace(data_cfg, seq_len=cfg.data.seq_len)
    data_cfg = dataclasses.replace(data_cfg, strict=cfg.data.strict)
    if data_cfg.seq_len > run.model.cfg.max_seq_len:
        raise ConfigError(
            "data.seq_len",
            data_cfg.seq_len,
            f"at most the run's model.max_seq_len={run.model.cfg.max_seq_len} (null: the run's data.seq_len)",
        )
    plan = resolve_data(data_cfg)  # the same sources as training: files, mixtures, Hub, prepared shards
    if plan.prepared:
        _check_same_tokenizer(plan.prepared, run.tokenizer)
    files = [plan.prepared] if plan.prepared else [f for s in plan.sources for f in (s.files or [s.name])]

    batches = validation_batches(data_cfg, plan, run.tokenizer, batch_size=cfg.batch_size, max_batches=cfg.max_batches)
    if not batches:  # nothing to score: no perplexity, rather than "tokens": 0 and exit 0
        raise DataError(
            f"no document to evaluate in {', '.join(files)} (every record empty, skipped or held "
            "out); give files with text, or check data.text_field"
        )
    return files, batches


@user_errors_exit_2
def _run(cfg: DictConfig) -> None:
    typed: EvalAppConfig = OmegaConf.to_object(cfg)
    result = evaluate_run(typed)
    # Strict JSON: a non-finite value (e.g. NaN loss from a diverged model) is written as null.
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
    print(json.dumps(clean, allow_nan=False), flush=True)


@hydra.main(config_path=config_dir(), config_name="eval", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    _run(cfg)


def main() -> None:
    precheck_overrides(config_dir(), "eval")
    _hydra_main()


if __name__ == "__main__":
    main()
