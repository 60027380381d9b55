"""The training loop: one function, `train`, from a validated config to a finished run directory.

Order of work (cheap checks first, so a bad config fails in a second, never after an hour):
validate config -> expand data files -> lock the run dir -> find a checkpoint to resume ->
tokenizer -> model, optimizer, data -> steps (accumulate, clip, step) with periodic evaluation,
logging and checkpoints -> final evaluation, checkpoint and summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from pkmlm.config import Config, validate
from pkmlm.data.loader import TokenBatches, validation_batches
from pkmlm.data.sources import expand_files
from pkmlm.data.tokenizer import load_or_train_tokenizer, tokenizer_from_str
from pkmlm.errors import ConfigError, UserError
from pkmlm.metrics.evaluate import evaluate
from pkmlm.metrics.sinks import ConsoleProgress, MetricsFile, WandbSink, format_summary
from pkmlm.model.transformer import ModelConfig, Transformer
from pkmlm.train.checkpoint import resolve_resume, rng_state, save_checkpoint, set_rng_state
from pkmlm.train.optim import build_optimizer, lr_factor, set_lr
from pkmlm.train.rundir import RunLock, code_version, config_differences

VOCAB_MULTIPLE = 64  # pad the embedding to a multiple of 64: tensor-core friendly (nanoGPT: 50257 -> 50304)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", name, "cuda needs a CUDA build of torch and a GPU; use cpu or auto")
    return device


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """bf16 autocast on CUDA by default; fp32 (no autocast) on CPU unless bf16 is asked for."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def model_config_for(cfg: ModelConfig, tokenizer_vocab: int) -> ModelConfig:
    if cfg.vocab_size == 0:
        size = math.ceil(tokenizer_vocab / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        return dataclasses.replace(cfg, vocab_size=size)
    if cfg.vocab_size < tokenizer_vocab:
        raise ConfigError("model.vocab_size", cfg.vocab_size,
                          f"at least the tokenizer's vocabulary ({tokenizer_vocab}), or 0 to take it from the tokenizer")
    return cfg


class StopSignals:
    """SIGTERM, SIGINT and SIGUSR1 ask the loop to finish its step, checkpoint and exit.

    SLURM sends SIGUSR1/SIGTERM some time before killing a job; Ctrl-C is SIGINT. A second SIGINT
    falls through to Python's default (KeyboardInterrupt) for a user who really wants out.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        for s in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: no handlers, no harm
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def train(cfg: Config, run_dir: Path, resolved: dict[str, Any]) -> dict[str, Any]:
    """Train per `cfg` (typed) into `run_dir`; `resolved` is the same config as plain data."""
    validate(cfg)
    files = expand_files(cfg.data.files)
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir), StopSignals() as signals:
        return _train_locked(cfg, run_dir, resolved, files, signals)


def _train_locked(cfg: Config, run_dir: Path, resolved: dict, files: list[str], signals: StopSignals) -> dict:
    device = pick_device(cfg.train.device)
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    resumed = resolve_resume(cfg.resume, run_dir)
    if resumed is not None:
        diffs = config_differences(resumed[1]["config"], resolved)
        if diffs:
            raise UserError(
                f"cannot resume from {resumed[0]}: the run was made with another config ({'; '.join(diffs[:3])}"
                f"{'; ...' if len(diffs) > 3 else ''}); use a new run directory or resume=never"
            )

    # Tokenizer: a resumed run keeps its own, whatever the cache holds now.
    if resumed is not None:
        tokenizer = tokenizer_from_str(resumed[1]["tokenizer"])
        tok_info = {"source": "checkpoint"}
    else:
        tokenizer, tok_info = load_or_train_tokenizer(cfg.data, files, cfg.paths.cache_dir)
    tokenizer.save(str(run_dir / "tokenizer.json"))
    model_cfg = model_config_for(cfg.model, tokenizer.get_vocab_size())
    # config.yaml shows the vocabulary actually built; checkpoints keep the config as given.
    written = {**resolved, "model": {**resolved["model"], "vocab_size": model_cfg.vocab_size}}
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(written)))

    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg).to(device)
    optimizer = build_optimizer(model, cfg.optim, device)
    micro = cfg.train.micro_batch_size or cfg.train.batch_size
    batches = TokenBatches(cfg.data, files, tokenizer, batch_size=cfg.train.batch_size, seed=cfg.seed)
    val = validation_batches(cfg.data, files, tokenizer, batch_size=cfg.eval.batch_size or micro)
    if cfg.eval.max_batches is not None:
        val = val[: cfg.eval.max_batches]

    step, tokens, nonfinite_total = 0, 0, 0
    if resumed is not None:
        state = resumed[1]
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        step, tokens, nonfinite_total = state["step"], state["tokens"], state.get("nonfinite_skipped", 0)
    step_fn = torch.compile(model) if cfg.train.compile else model

    counts = model.count_parameters()
    stop_at = min(cfg.train.stop_at_step or cfg.train.max_steps, cfg.train.max_steps)
    progress = ConsoleProgress(total_steps=stop_at, initial_step=step, enabled=cfg.logging.progress)
    progress.write(
        f"pkmlm | run dir {run_dir} | device {device}{' bf16' if amp_dtype else ' fp32'} | params "
        f"{counts['total'] / 1e6:.2f}M total, {counts['active'] / 1e6:.2f}M active | memory layers "
        f"{list(model.memory_layers()) or 'none'} | tokenizer {tok_info['source']} "
        f"(vocab {tokenizer.get_vocab_size()}) | {len(val)} validation batches"
        + (f" | resumed from {resumed[0].name} at step {step}" if resumed is not None else "")
    )
    metrics = MetricsFile(run_dir / "metrics.jsonl")
    wandb = WandbSink(
        mode=cfg.logging.wandb.mode, project=cfg.logging.wandb.project, entity=cfg.logging.wandb.entity,
        name=cfg.logging.wandb.name or f"{cfg.name}/{run_dir.name}", group=cfg.logging.wandb.group or cfg.name,
        tags=list(cfg.logging.wandb.tags), config=resolved, dir=str(run_dir),
    )

    def log(row: dict) -> None:
        metrics.write(row)
        wandb.log(row, step=row["step"])

    def run_eval() -> dict:
        result = evaluate(model, val, device, autocast_dtype=amp_dtype)
        row = {"step": step, "tokens": tokens, "val/loss": result["loss"], "val/ppl": result["ppl"],
               "val/tokens": result["tokens"]}
        row.update({k: v for k, v in result.items() if k.startswith("memory/")})
        log(row)
        progress.write(f"step {step}: val loss {result['loss']:.4f} | val ppl {result['ppl']:.2f}" + "".join(
            f" | layer {i} usage {row[f'memory/layer{i}/usage']:.1%} kl {row[f'memory/layer{i}/kl_weight']:.2f}"
            for i in model.memory_layers()))
        return row

    def checkpoint() -> None:
        save_checkpoint(run_dir / "checkpoints", step, {
            "step": step, "tokens": tokens, "nonfinite_skipped": nonfinite_total,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "data": batches.state_dict(),
            "rng": rng_state(), "config": resolved, "model_config": dataclasses.asdict(model_cfg),
            "tokenizer": tokenizer.to_str(), "code_version": code_version(),
        }, keep_last=cfg.checkpoint.keep_last)

    last_val: dict = {}
    start_time = time.perf_counter()
    window = {"t0": time.perf_counter(), "data_s": 0.0, "tokens": 0, "steps": 0}
    loss_sum = torch.zeros((), device=device)
    nonfinite_run = 0
    seq_tokens = cfg.data.seq_len
    model.train()
    try:
        while step < stop_at and signals.received is None:
            t_data = time.perf_counter()
            batch = next(batches)
            window["data_s"] += time.perf_counter() - t_data
            set_lr(optimizer, lr_factor(step, cfg.train.max_steps, cfg.optim))
            step_loss = torch.zeros((), device=device)
            for micro_batch in batch.to(device, non_blocking=True).split(micro):
                inputs, targets = micro_batch[:, :-1], micro_batch[:, 1:]
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    _, loss = step_fn(inputs, targets)
                loss = loss * (micro_batch.shape[0] / batch.shape[0])  # mean over the whole batch
                loss.backward()
                step_loss += loss.detach()
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            # One host sync per step: a non-finite loss or gradient must not reach the weights.
            if not (torch.isfinite(grad_norm) & torch.isfinite(step_loss)).item():
                optimizer.zero_grad(set_to_none=True)
                nonfinite_run += 1
                nonfinite_total += 1
                progress.write(f"step {step + 1}: non-finite loss or gradient, step skipped "
                               f"({nonfinite_run} in a row, {nonfinite_total} in all)")
                if nonfinite_run >= cfg.train.max_consecutive_nonfinite:
                    raise UserError(
                        f"{nonfinite_run} non-finite steps in a row (train.max_consecutive_nonfinite="
                        f"{cfg.train.max_consecutive_nonfinite}); the last good checkpoint is in "
                        f"{run_dir / 'checkpoints'}; lower optim.lr or raise optim.warmup_steps")
                continue
            nonfinite_run = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_tokens = batch.shape[0] * seq_tokens
            tokens += step_tokens
            loss_sum += step_loss
            window["tokens"] += step_tokens
            window["steps"] += 1

            if step % cfg.logging.interval == 0 or step == stop_at:
                elapsed = time.perf_counter() - window["t0"]
                row = {
                    "step": step, "tokens": tokens, "train/loss": (loss_sum / window["steps"]).item(),
                    "train/lr": optimizer.param_groups[0]["lr"], "train/grad_norm": grad_norm.item(),
                    "train/tokens_per_s": window["tokens"] / elapsed,
                    "train/data_wait_frac": window["data_s"] / elapsed,
                    "train/nonfinite_skipped": nonfinite_total,
                }
                log(row)
                progress.update(step, loss=row["train/loss"], lr=row["train/lr"],
                                tokens_per_s=row["train/tokens_per_s"])
                loss_sum.zero_()
                window = {"t0": time.perf_counter(), "data_s": 0.0, "tokens": 0, "steps": 0}
            else:
                progress.update(step)
            if step % cfg.eval.interval == 0 or step == cfg.train.max_steps:
                last_val = run_eval()
            if step % cfg.checkpoint.interval == 0 or step == stop_at:
                checkpoint()
        if signals.received is not None:
            checkpoint()
            progress.write(f"{signals.received} received: checkpoint written at step {step}; "
                           f"resume with resume=auto (same hydra.run.dir={run_dir})")
        elif not last_val and step == cfg.train.max_steps:
            last_val = run_eval()
    finally:
        progress.close()
        metrics.close()

    wall = time.perf_counter() - start_time
    summary = {"step": step, "tokens": tokens, "wall_time_s": wall, "run_dir": str(run_dir),
               "params_total": counts["total"], "params_active": counts["active"],
               "stopped_by": signals.received, **last_val}
    wandb.summary(summary)
    wandb.close()
    print(format_summary(summary, str(run_dir)), flush=True)
    return summary
