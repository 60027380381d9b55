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
from pkmlm.data.loader import build_train_batches, resolve_data, stats_row, validation_batches
from pkmlm.data.tokenizer import load_or_train_tokenizer, tokenizer_from_str
from pkmlm.errors import ConfigError, UserError
from pkmlm.metrics.evaluate import evaluate
from pkmlm.metrics.flops import peak_flops
from pkmlm.metrics.sinks import ConsoleProgress, MetricsFile, Sinks, WandbSink, format_summary
from pkmlm.model.kernels import resolve_kernel
from pkmlm.model.transformer import ModelConfig, Transformer
from pkmlm.train.checkpoint import atomic_write, rng_state, save_checkpoint, seed_all, set_rng_state
from pkmlm.train.data_shards import build_batches, plan_data_shards, saved_data_shards
from pkmlm.train.dcp import checkpoint_format, load_dcp, resolve_resume_shared, save_dcp
from pkmlm.train.distributed import (DistInfo, NoMetrics, agree_on_stop, all_reduce_mean, any_rank, check_batch_split,
                                     check_parallel_config, check_same_run_dir, init_distributed, main_rank_holds,
                                     parallelize, rank_device, run_on_main, shared_tokenizer)
from pkmlm.train.distributed import clip_grad_norm_ as clip_all_grad_norms_
from pkmlm.train.optim import build_optimizer, lr_factor, set_lr
from pkmlm.train.throughput import RunClock, budget_reached, stop_reason
from pkmlm.train.rundir import (RunLock, check_input_paths, code_version, disk_full_error, fresh_start_conflicts,
                                resume_conflicts)

VOCAB_MULTIPLE = 64  # pad the embedding to a multiple of 64: tensor-core friendly (nanoGPT: 50257 -> 50304)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError("train.device", name, "auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", name, "cuda needs a CUDA build of torch and a GPU; use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError("train.device", name, f"cuda:N with N < {torch.cuda.device_count()} (the GPUs visible)")
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
    check_input_paths(cfg)
    files = resolve_data(cfg.data)  # every source checked (globs, values, prepared index) before any work
    run_dir.mkdir(parents=True, exist_ok=True)
    info = init_distributed()  # torchrun's processes join one group; a single process gets DistInfo()
    check_same_run_dir(run_dir, info)
    # One run directory for all ranks: rank 0 holds its lock (the others stop with its error).
    with main_rank_holds(lambda: RunLock(run_dir), info), StopSignals() as signals:
        try:
            return _train_locked(cfg, run_dir, resolved, files, signals, info)
        except OSError as e:  # a full disk is the user's to fix (one line); other OS errors are bugs
            raise disk_full_error(e, run_dir) or e


def _train_locked(cfg: Config, run_dir: Path, resolved: dict, files: Any, signals: StopSignals,
                  info: DistInfo = DistInfo()) -> dict:
    device = rank_device(pick_device(cfg.train.device), info)  # several processes: cuda:LOCAL_RANK each
    check_parallel_config(cfg.train.parallel, cfg.model.memory.shard_values, cfg.model.memory.v_dim or cfg.model.dim,
                          info)
    check_batch_split(cfg.train.batch_size, cfg.train.micro_batch_size, info)
    if cfg.model.memory.layers:  # e.g. kernel=triton in a CPU run: refused now, not at the first step
        resolve_kernel(cfg.model.memory.kernel, device)
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    resumed = resolve_resume_shared(cfg.resume, run_dir, info)  # either format; rank 0 picks, all read it
    if resumed is not None:
        diffs = resume_conflicts(resumed[1]["config"], resumed[1]["step"], resolved)
        if diffs:
            raise UserError(
                f"cannot resume from {resumed[0]}: the run was made with another config ({'; '.join(diffs[:3])}"
                f"{'; ...' if len(diffs) > 3 else ''}); use a new run directory or resume=never"
            )
    elif cfg.resume == "auto":  # no checkpoint: a fresh start, unless the directory is another run's
        diffs = run_on_main(lambda: fresh_start_conflicts(run_dir, resolved), info)
        if diffs:
            raise UserError(
                f"run directory {run_dir} holds a run made with another config ({'; '.join(diffs[:3])}"
                f"{'; ...' if len(diffs) > 3 else ''}) and no checkpoint of it; use a new run directory, "
                "or resume=never to start over in this one"
            )

    # Tokenizer: a resumed run keeps its own, whatever the cache holds now.
    if resumed is not None:
        tokenizer = tokenizer_from_str(resumed[1]["tokenizer"])
        tok_info = {"source": "checkpoint"}
    else:  # with several processes rank 0 loads or trains it and sends it to the others
        tokenizer, tok_info = shared_tokenizer(lambda: load_or_train_tokenizer(cfg.data, files, cfg.paths.cache_dir),
                                               info)
    if info.is_main:  # rank 0 writes the shared run directory's files
        atomic_write(run_dir / "tokenizer.json", tokenizer.to_str().encode())  # atomic: a kill leaves old or new
    model_cfg = model_config_for(cfg.model, tokenizer.get_vocab_size())
    # config.yaml shows the vocabulary actually built; checkpoints keep the config as given.
    written = {**resolved, "model": {**resolved["model"], "vocab_size": model_cfg.vocab_size}}
    if info.is_main:
        atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(written)).encode())

    seed_all(cfg.seed)  # python, numpy and torch: a fresh run's every RNG starts from the seed
    model = Transformer(model_cfg)
    # Shard value tables, move to the device, wrap in DDP or FSDP2 (train/distributed.py); with one
    # process only the move. `model` stays the unwrapped model (state dicts, evaluation).
    par = parallelize(model, cfg.train.parallel, info, device, seed=cfg.seed)
    optimizer = build_optimizer(model, cfg.optim, device)
    micro = cfg.train.micro_batch_size or cfg.train.batch_size
    # The global batch is `n_shards` data streams; each rank runs its share (train/data_shards.py).
    n_shards = plan_data_shards(cfg.train.data_shards, cfg.train.batch_size, info,
                                saved_data_shards(resumed[1]) if resumed is not None else None)
    batches = build_batches(lambda shard, n, size: build_train_batches(
        cfg.data, files, tokenizer, batch_size=size, seed=cfg.seed, rank=shard, world_size=n),
        cfg.train.batch_size, n_shards, info)
    ckpt_format = checkpoint_format(cfg.checkpoint.format, info, n_shards)  # torch | dcp (train/dcp.py)
    val = validation_batches(cfg.data, files, tokenizer, batch_size=cfg.eval.batch_size or micro,
                             max_batches=cfg.eval.max_batches)

    step, tokens, nonfinite_total = 0, 0, 0
    if resumed is not None:
        state = resumed[1]
        if state.get("format") == "dcp":  # saved on any number of ranks
            load_dcp(resumed[0], state, model=model, optimizer=optimizer, batches=batches, info=info)
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            batches.load_state_dict(state["data"])
            set_rng_state(state["rng"])
        step, tokens, nonfinite_total = state["step"], state["tokens"], state.get("nonfinite_skipped", 0)
    step_fn = torch.compile(par.module) if cfg.train.compile else par.module

    counts = model.count_parameters()
    stop_at = min(cfg.train.stop_at_step or cfg.train.max_steps, cfg.train.max_steps)
    progress = ConsoleProgress(total_steps=stop_at, initial_step=step, enabled=cfg.logging.progress and info.is_main)
    progress.write(
        f"pkmlm | run dir {run_dir} | device {device}{' bf16' if amp_dtype else ' fp32'} | params "
        f"{counts['total'] / 1e6:.2f}M total, {counts['active'] / 1e6:.2f}M active | memory layers "
        f"{list(model.memory_layers()) or 'none'} | tokenizer {tok_info['source']} "
        f"(vocab {tokenizer.get_vocab_size()}) | {len(val)} validation batches"
        + (f" | resumed from {resumed[0].name} at step {step}" if resumed is not None else "")
        + (f" | {info.world_size} processes ({par.mode}, {n_shards} data shards"
           f"{', values sharded' if par.sharded_params else ''})" if info.distributed else "")
    )
    # Rank 0 alone writes metrics and wandb; rows hold values averaged (or summed) over ranks.
    metrics = MetricsFile(run_dir / "metrics.jsonl") if info.is_main else NoMetrics()
    wandb = WandbSink(
        mode=cfg.logging.wandb.mode if info.is_main else "disabled",
        project=cfg.logging.wandb.project, entity=cfg.logging.wandb.entity,
        name=cfg.logging.wandb.name or f"{cfg.name}/{run_dir.name}", group=cfg.logging.wandb.group or cfg.name,
        tags=list(cfg.logging.wandb.tags), config=resolved, dir=str(run_dir),
    )
    log = Sinks(metrics, progress, wandb).log  # metrics.jsonl and wandb, each row plotted at its step

    def run_eval() -> dict:
        with clock.paused():
            par.sync_buffers()  # rank 0's BatchNorm statistics on every rank
            shares, summed = par.eval_batches(val)  # this rank's batches, or all of them in lockstep
            result = evaluate(model, shares, device, autocast_dtype=amp_dtype, reduce_across_ranks=summed)
        row = {"step": step, "tokens": tokens, "val/loss": result["loss"], "val/ppl": result["ppl"],
               "val/tokens": result["tokens"], **clock.times()}
        row.update({k: v for k, v in result.items() if k.startswith("memory/")})
        log(row)
        progress.write(f"step {step}: val loss {result['loss']:.4f} | val ppl {result['ppl']:.2f}" + "".join(
            f" | layer {i} usage {row[f'memory/layer{i}/usage']:.1%} kl {row[f'memory/layer{i}/kl_weight']:.2f}"
            for i in model.memory_layers()))
        return row

    def checkpoint() -> None:
        with clock.paused():
            _save_checkpoint()

    def _save_checkpoint() -> None:
        par.sync_buffers()  # rank 0's BatchNorm statistics are the ones saved
        payload = {
            "step": step, "tokens": tokens, "nonfinite_skipped": nonfinite_total, **clock.times(),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "data": batches.state_dict(),
            "rng": rng_state(), "config": resolved, "model_config": dataclasses.asdict(model_cfg),
            "tokenizer": tokenizer.to_str(), "code_version": code_version(),
        }
        if ckpt_format == "dcp":  # every rank writes its part; loads on any process count
            save_dcp(run_dir / "checkpoints", step, payload, model=model, optimizer=optimizer, batches=batches,
                     info=info, keep_last=cfg.checkpoint.keep_last)
        else:
            save_checkpoint(run_dir / "checkpoints", step, payload, keep_last=cfg.checkpoint.keep_last)

    last_val: dict = {}
    last_skipped: dict = {}
    previous = resumed[1] if resumed is not None else {}  # time spent by the run's earlier segments
    device_peak = peak_flops(device, amp_dtype, cfg.train.peak_flops)
    clock = RunClock(device, model.flops_per_token(cfg.data.seq_len),
                     # tokens/s counts all ranks' tokens, so MFU is against all devices' peak
                     device_peak * info.world_size if device_peak is not None else None,
                     wall_before_s=previous.get("wall_time_s", 0.0), train_before_s=previous.get("train_time_s", 0.0))
    # A resumed run may have spent its budget already (then it only evaluates and accounts).
    budget = budget_reached(cfg.train.max_tokens, cfg.train.max_time, tokens, previous.get("train_time_s", 0.0))
    # Signals and budgets as all ranks agree on them (the same values with one process): every
    # rank leaves the loop after the same step.
    stop_signal, budget = agree_on_stop(signals.received, budget, info)
    loss_sum = torch.zeros((), device=device)
    nonfinite_run = 0
    seq_tokens = cfg.data.seq_len
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")  # 0: no clipping
    model.train()
    try:
        while step < stop_at and stop_signal is None and budget is None:
            t_data = time.perf_counter()
            batch = next(batches)
            clock.add_data_time(time.perf_counter() - t_data)
            set_lr(optimizer, lr_factor(step, cfg.train.max_steps, cfg.optim))
            step_loss = torch.zeros((), device=device)
            micro_batches = batch.to(device, non_blocking=True).split(micro)
            for i, micro_batch in enumerate(micro_batches):
                inputs, targets = micro_batch[:, :-1], micro_batch[:, 1:]
                # Gradients are reduced over ranks once per step, with the last micro-batch.
                with par.gradient_sync(i == len(micro_batches) - 1):
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        _, loss = step_fn(inputs, targets)
                    loss = loss * (micro_batch.shape[0] / batch.shape[0])  # mean over the whole batch
                    loss.backward()
                step_loss += loss.detach()
            # torch's, or with sparse value grads, or over shards (FSDP, sharded values) on every rank
            grad_norm = clip_all_grad_norms_(model.parameters(), clip)
            # One host sync per step: a non-finite loss or gradient must not reach the weights. The
            # norm is over all ranks' gradients, the loss is this rank's: the ranks agree on skipping
            # (a no-op with one process), so that all of them run the same collectives next.
            finite = bool((torch.isfinite(grad_norm) & torch.isfinite(step_loss)).item())
            if any_rank(not finite, info):
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
                # A stop signal during a run of skipped steps is answered now, not after a good step.
                stop_signal, budget = agree_on_stop(signals.received, budget, info)
                continue
            nonfinite_run = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_tokens = batch.shape[0] * seq_tokens * info.world_size  # every rank's share of the global batch
            tokens += step_tokens
            loss_sum += step_loss
            window_steps = clock.step_done(step_tokens)
            budget = budget_reached(cfg.train.max_tokens, cfg.train.max_time, tokens, clock.train_s())
            stop_signal, budget = agree_on_stop(signals.received, budget, info)

            if step % cfg.logging.interval == 0 or step == stop_at or budget is not None:
                row = {
                    "step": step, "tokens": tokens,
                    "train/loss": all_reduce_mean(loss_sum / window_steps, info).item(),  # over ranks
                    "train/lr": optimizer.param_groups[0]["lr"], "train/grad_norm": grad_norm.item(),
                    **clock.window_row(),  # tokens/s, step time (data, compute), MFU, peak memory, times
                    "train/nonfinite_skipped": nonfinite_total,
                    **stats_row(batches.stats),  # data/skipped/<kind>: bad records and cleaning drops so far
                }
                log(row)
                skipped = {k[len("data/skipped/"):]: v for k, v in row.items() if k.startswith("data/skipped/") and v}
                if skipped != last_skipped:  # the console hears of bad input when its counts change
                    progress.write(f"step {step}: data records skipped so far: "
                                   + ", ".join(f"{v} {k}" for k, v in skipped.items()))
                    last_skipped = skipped
                progress.update(step, loss=row["train/loss"], lr=row["train/lr"],
                                tokens_per_s=row["train/tokens_per_s"])
                loss_sum.zero_()
            else:
                progress.update(step)
            if step % cfg.eval.interval == 0 or step == cfg.train.max_steps or budget is not None:
                last_val = run_eval()
            if step % cfg.checkpoint.interval == 0 or step == stop_at or budget is not None:
                checkpoint()
        stop_signal, _ = agree_on_stop(signals.received, None, info)  # one that came during the last step too
        if stop_signal is not None:
            checkpoint()
            progress.write(f"{stop_signal} received: checkpoint written at step {step}; "
                           f"resume with resume=auto (same hydra.run.dir={run_dir})")
        elif not last_val and (step == cfg.train.max_steps or budget is not None):
            last_val = run_eval()
        # The run's account in one row: tokens, steps and time, and why it stopped (fair comparisons).
        final = {"step": step, "tokens": tokens, **clock.times(),
                 "stopped_by": stop_reason(step, cfg.train.max_steps, cfg.train.stop_at_step, budget,
                                           stop_signal),
                 "params_total": counts["total"], "params_active": counts["active"],
                 "flops_per_token": clock.flops_per_token}
        metrics.write(final)
    except BaseException:  # a failed or killed run is marked failed in wandb, never left open
        with contextlib.suppress(Exception):  # the run's own error is the one to report
            wandb.close(exit_code=1)
        raise
    finally:
        progress.close()
        metrics.close()

    summary = {**last_val, **final, "run_dir": str(run_dir)}
    wandb.summary(summary)
    wandb.close()
    if info.is_main:
        print(format_summary(summary, str(run_dir)), flush=True)
    return summary
