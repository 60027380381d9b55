"""The training loop: `train`, from a validated config to a finished run directory.

    train()       checks, run-directory lock, stop signals; then `setup()` (train/setup.py)
    train_step()  one optimizer step: forward/backward over the micro-batches, clip, update
    after_step()  bookkeeping of a completed step: counters, log row, evaluation, checkpoint
    finish()      the last evaluation or stop-signal checkpoint, the summary row

A research change to the step touches `train_step` (and `loss_terms` for a new loss term); a new
periodic evaluation touches `evaluate_all`; a new piece of saved state is one registration in
train/states.py (saved, restored and logged through `Trainer.states`). docs/architecture.md lists
these extension points.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pkmlm.checkpoint.files import atomic_write
from pkmlm.config import Config
from pkmlm.data.batch_source import BatchSource
from pkmlm.data.loader import stats_row
from pkmlm.errors import UserError
from pkmlm.metrics.evaluate import evaluate
from pkmlm.metrics.memory_usage import observers_set_aside
from pkmlm.metrics.recall import evaluate_recall, read_questions
from pkmlm.metrics.sinks import format_summary
from pkmlm.metrics.table_usage import side_observers_set_aside
from pkmlm.optim import clip_gradients_, set_lr
from pkmlm.parallel.agree import (
    agree_on_stop,
    all_reduce_mean,
    any_rank,
    check_same_run_dir,
    main_rank_holds,
)
from pkmlm.parallel.env import init_distributed
from pkmlm.train.checks import check_run
from pkmlm.train.clock import budget_reached, stop_reason
from pkmlm.train.rundir import RunLock, disk_full_error
from pkmlm.train.setup import Trainer, setup


class StopSignals:
    """SIGTERM, SIGINT and SIGUSR1 ask the loop to finish its step, checkpoint and exit.

    SLURM sends SIGUSR1/SIGTERM some time before killing a job; Ctrl-C is SIGINT. A second SIGINT
    falls through to Python's default (KeyboardInterrupt) for a user who really wants out, except
    during a checkpoint write (`writing`): interrupting that left a temporary directory and an I/O
    error; now the write finishes (seconds), then the run stops with one line saying so.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}
        # While the first batch is read (a shuffle buffer filling: data.shuffle_buffer windows
        # tokenized) nothing can be checkpointed yet, and waiting could take minutes: a stop signal
        # then ends the run at once (`first_batch`).
        self.interrupt_now = False
        self.writing_step: int | None = None  # the step whose checkpoint is being written
        self.deferred = False  # a second SIGINT came during that write

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            if self.writing_step is not None:
                if not self.deferred:
                    print(
                        f"second Ctrl-C during the checkpoint write of step {self.writing_step}: finishing "
                        "the write first (it cannot be resumed half-written), then stopping",
                        file=sys.stderr,
                        flush=True,
                    )
                self.deferred = True
                return
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        if self.interrupt_now:
            self.interrupt_now = False
            raise UserError(
                f"{self.received} received while the first batch was being read (the shuffle buffer "
                "filling): stopped before step 1, nothing to checkpoint; run again to start"
            )

    @contextlib.contextmanager
    def writing(self, step: int) -> Iterator[None]:
        """A checkpoint write that a second Ctrl-C does not cut: it finishes, then the run stops."""
        self.writing_step = step
        try:
            yield
        finally:
            self.writing_step = None
        if self.deferred:
            raise UserError(
                f"second Ctrl-C: stopped after the checkpoint of step {step} was written completely; "
                "resume with resume=auto"
            )

    def first_batch(self, batches: BatchSource) -> Any:
        """`next(batches)`, interrupted by a stop signal (see `interrupt_now`)."""
        self.interrupt_now = self.received is None
        try:
            return next(batches)
        finally:
            self.interrupt_now = False

    def __enter__(self) -> StopSignals:
        for s in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: no handlers, no harm
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def train(
    cfg: Config, run_dir: Path, resolved: dict[str, Any], run_files: Mapping[str, bytes] | None = None
) -> dict[str, Any]:
    """Train per `cfg` (typed) into `run_dir`; `resolved` is the same config as plain data.
    `run_files` (relative path: bytes) are written into `run_dir` once the run is accepted (locked,
    set up, resume checked), never by a refused run: pkmlm-train's `.hydra/` files."""
    files = check_run(cfg)  # every value, data path and the memory estimate, before any work (once per process)
    run_dir.mkdir(parents=True, exist_ok=True)
    info = init_distributed()  # torchrun's processes join one group; a single process gets DistInfo()
    check_same_run_dir(run_dir, info)
    # One run directory for all ranks: rank 0 holds its lock (the others stop with its error).
    with main_rank_holds(lambda: RunLock(run_dir), info), StopSignals() as signals:
        try:
            t = setup(cfg, run_dir, resolved, files, info)
            for name, data in (run_files or {}).items() if info.is_main else ():
                (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
                atomic_write(run_dir / name, data)
            with t.sinks:  # closed on every exit; a failed run is marked failed in wandb
                return run_loop(t, signals)
        except OSError as e:  # a full disk is the user's to fix (one line); other OS errors are bugs
            raise disk_full_error(e, run_dir) or e


@dataclass
class Window:
    """Sums over the steps since the last training row."""

    terms: dict[str, Tensor]
    steps: int = 0
    nonfinite_run: int = 0  # consecutive skipped steps (not a window sum: reset by a good step)
    last_skipped: dict | None = None  # data records skipped, as last shown on the console


def run_loop(t: Trainer, signals: StopSignals) -> dict:
    # A resumed run may have spent its budget already (then it only evaluates and accounts).
    budget = budget_reached(t.cfg.train.max_tokens, t.cfg.train.max_time, t.state.tokens, t.state.train_time_s)
    # Signals and budgets as all ranks agree on them (the same values with one process): every
    # rank leaves the loop after the same step.
    stop_signal, budget = agree_on_stop(signals.received, budget, t.info)
    window, last_val = Window(terms={}), {}
    t.model.train()
    while t.state.step < t.stop_at and stop_signal is None and budget is None:
        t_data = time.perf_counter()
        batch = next(t.batches) if t.state.step > 0 else signals.first_batch(t.batches)
        t.clock.add_data_time(time.perf_counter() - t_data)
        out = train_step(t, batch)
        if out is None:  # skipped: non-finite loss or gradient
            on_skipped_step(t, window)
        else:
            budget = after_step(t, out, batch, window, last_val, signals)
        stop_signal, budget = agree_on_stop(signals.received, budget, t.info)
    stop_signal, _ = agree_on_stop(signals.received, None, t.info)  # one that came during the last step too
    return finish(t, stop_signal, budget, last_val, signals)


def loss_terms(t: Trainer, inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """The micro-batch's loss terms; `loss` is the one minimised, each term is logged as
    `train/<name>` (averaged over the row's steps). An auxiliary term goes here: add it to `loss`
    and return it under its own name.

    The memory variants' auxiliary loss, under the name `Transformer.aux_loss_name` gives (e.g.
    `balance_loss`: UltraMemV2's sub-key balance loss, already weighted by `model.memory.balance_loss`
    inside the model), asked for only when a memory layer computes one (a run without it keeps its
    forward unchanged). `loss` is then cross entropy + balance loss;
    the cross entropy alone is `train/loss - train/balance_loss` (validation reports it alone).
    Like Switch Transformer's and UltraMem's, the balance loss is computed per micro-batch (per
    rank under DDP): its token counts are those of the batch the forward sees."""
    aux_name = t.model.aux_loss_name()  # the memory variants' (`Transformer.aux_loss_name`), or None
    if aux_name is not None:
        _, loss, aux = t.step_fn(inputs, targets, return_aux=True)
        return {"loss": loss + aux, aux_name: aux}
    _, loss = t.step_fn(inputs, targets)
    return {"loss": loss}


@dataclass
class StepOutput:
    terms: dict[str, Tensor]  # each term summed over the micro-batches (the batch's mean)
    grad_norm: Tensor  # before clipping; without the values when they are clipped apart
    values_grad_norm: Tensor | None  # the values' norm when optim.values_grad_clip > 0


def train_step(t: Trainer, batch: Tensor) -> StepOutput | None:
    """One optimizer step on `batch`, this rank's `(b, T+1)` share of the global batch. Returns
    None (and leaves the weights alone) when the loss or a gradient norm is not finite on any rank."""
    set_lr(t.optimizer, t.state.step, t.cfg.train.max_steps, t.cfg.optim)
    terms: dict[str, Tensor] = {}
    micro_batches = batch.to(t.device, non_blocking=True).split(t.micro_batch_size)
    for i, micro_batch in enumerate(micro_batches):
        inputs, targets = micro_batch[:, :-1], micro_batch[:, 1:]
        share = micro_batch.shape[0] / batch.shape[0]  # each micro-batch's part of the batch mean
        # Gradients are reduced over ranks once per step, with the last micro-batch.
        with t.par.gradient_sync(i == len(micro_batches) - 1):
            with torch.autocast(t.device.type, dtype=t.amp_dtype, enabled=t.amp_dtype is not None):
                micro_terms = loss_terms(t, inputs, targets)
            scaled = {name: value * share for name, value in micro_terms.items()}
            scaled["loss"].backward()
        for name, value in scaled.items():
            terms[name] = terms[name] + value.detach() if name in terms else value.detach()
    # torch's, or with sparse value grads, or over shards (FSDP, sharded values) on every rank
    if t.selection is not None:  # train.finetune=memory|sparse_memory: only the selected value rows keep a gradient
        t.selection.restrict_grads_()
    grad_norm, values_norm = clip_gradients_(list(t.model.parameters()), t.value_params, t.cfg.optim)
    # One host sync per step: a non-finite loss or gradient must not reach the weights. The norm is
    # over all ranks' gradients, the loss is this rank's: the ranks agree on skipping (a no-op with
    # one process), so that all of them run the same collectives next.
    finite = torch.isfinite(grad_norm) & torch.isfinite(terms["loss"])
    if values_norm is not None:
        finite &= torch.isfinite(values_norm)
    if any_rank(not bool(finite.item()), t.info):
        t.optimizer.zero_grad(set_to_none=True)
        return None
    t.optimizer.step()
    t.states.step_done()  # e.g. memory/layer{i}/stale: one step done (on device, no sync)
    t.optimizer.zero_grad(set_to_none=True)
    return StepOutput(terms=terms, grad_norm=grad_norm, values_grad_norm=values_norm)


def on_skipped_step(t: Trainer, window: Window) -> None:
    window.nonfinite_run += 1
    t.state.nonfinite_skipped += 1
    t.sinks.console.write(
        f"step {t.state.step + 1}: non-finite loss or gradient, step skipped "
        f"({window.nonfinite_run} in a row, {t.state.nonfinite_skipped} in all)"
    )
    limit = t.cfg.train.max_consecutive_nonfinite
    if window.nonfinite_run >= limit:
        raise UserError(
            f"{window.nonfinite_run} non-finite steps in a row (train.max_consecutive_nonfinite={limit}); the last "
            f"good checkpoint is in {t.run_dir / 'checkpoints'}; lower optim.lr or raise optim.warmup_steps"
        )


def after_step(
    t: Trainer, out: StepOutput, batch: Tensor, window: Window, last_val: dict, signals: StopSignals | None = None
) -> str | None:
    """Count the completed step; log, evaluate and checkpoint when due. Returns the budget used up
    (None while there is budget left)."""
    cfg, state = t.cfg, t.state
    window.nonfinite_run = 0
    state.step += 1
    step_tokens = batch.shape[0] * cfg.data.seq_len * t.info.world_size  # every rank's share of the global batch
    state.tokens += step_tokens
    for name, value in out.terms.items():
        window.terms[name] = window.terms[name] + value if name in window.terms else value
    window.steps = t.clock.step_done(step_tokens)
    budget = budget_reached(cfg.train.max_tokens, cfg.train.max_time, state.tokens, t.clock.train_s())
    final = state.step == t.stop_at or budget is not None
    if state.step % cfg.logging.interval == 0 or final:
        log_training_row(t, out, window)
    else:
        t.sinks.console.update(state.step)
    if state.step % cfg.eval.interval == 0 or state.step == cfg.train.max_steps or budget is not None:
        last_val.clear()
        last_val.update(evaluate_all(t))
    if state.step % cfg.checkpoint.interval == 0 or final:
        save_checkpoint(t, signals)
    return budget


def log_training_row(t: Trainer, out: StepOutput, window: Window) -> None:
    row = {"step": t.state.step, "tokens": t.state.tokens}
    for name, value in window.terms.items():  # over ranks, then over the window's steps
        row[f"train/{name}"] = all_reduce_mean(value / window.steps, t.info).item()
    row.update(
        {
            "train/lr": t.optimizer.param_groups[0]["lr"],
            "train/grad_norm": out.grad_norm.item(),
            **({"train/values_grad_norm": out.values_grad_norm.item()} if out.values_grad_norm is not None else {}),
            **t.clock.window_row(),  # tokens/s, step time (data, compute), MFU, peak memory, times
            "train/nonfinite_skipped": t.state.nonfinite_skipped,
            **stats_row(t.batches.stats),  # data/skipped/<kind>: bad records and cleaning drops so far
            **(t.side_usage.row() if t.side_usage else {}),  # train/memory/layer{i}/<side>/...: this window's reads
        }
    )
    t.sinks.log(row)
    skipped = {k[len("data/skipped/") :]: v for k, v in row.items() if k.startswith("data/skipped/") and v}
    if skipped != (window.last_skipped or {}):  # the console hears of bad input when its counts change
        t.sinks.console.write(
            f"step {t.state.step}: data records skipped so far: " + ", ".join(f"{v} {k}" for k, v in skipped.items())
        )
        window.last_skipped = skipped
    t.sinks.console.update(
        t.state.step, loss=row["train/loss"], lr=row["train/lr"], tokens_per_s=row["train/tokens_per_s"]
    )
    window.terms = {}


def evaluate_all(t: Trainer) -> dict:
    """The periodic evaluation, logged as one row: validation loss and perplexity with the memory
    statistics, and fact recall (`recall/*`, pkmlm.metrics.recall) when `eval.recall` is set. A
    further evaluation adds its keys to this row.

    Every rank runs every part, because a forward may be a collective (FSDP2, sharded values): the
    validation batches shared out or in lockstep (`eval_batches`), the recall questions in lockstep
    (the same batches on every rank, so every rank computes the same numbers); rank 0's row is the
    one logged. Without a validation split (`data.val_docs=0`) the val/* values are null and there
    are no usage statistics of validation reads (`memory/layer{i}/usage`, `kl_*`)."""
    ecfg = t.cfg.eval
    row: dict = {"step": t.state.step, "tokens": t.state.tokens}
    # evaluation reads are not training reads
    with t.clock.paused(), observers_set_aside(t.model), side_observers_set_aside(t.model):
        t.par.sync_buffers()  # rank 0's BatchNorm statistics on every rank
        shares, summed = t.par.eval_batches(t.val)  # this rank's batches, or all of them in lockstep
        result = evaluate(t.model, shares, t.device, autocast_dtype=t.amp_dtype, reduce_across_ranks=summed)
        row.update({"val/loss": result["loss"], "val/ppl": result["ppl"], "val/tokens": result["tokens"]})
        row.update({k: v for k, v in result.items() if k.startswith("memory/")})
        row.update(t.states.metrics())  # e.g. memory/layer{i}/stale: slots unread in metrics.stale_window steps
        if ecfg.recall is not None:  # the file was checked before training (check_input_paths)
            with torch.autocast(
                t.device.type, dtype=t.amp_dtype, enabled=t.amp_dtype is not None and t.device.type == "cuda"
            ):  # as `evaluate`
                row.update(
                    evaluate_recall(
                        t.model,
                        t.tokenizer,
                        read_questions(Path(ecfg.recall).expanduser()),
                        device=t.device,
                        max_questions=ecfg.recall_max_questions,
                    )
                )
    row.update(t.clock.times())
    t.sinks.log(row)
    line = (
        f"step {t.state.step}: val loss {row['val/loss']:.4f} | val ppl {row['val/ppl']:.2f}"
        if row["val/tokens"]
        else f"step {t.state.step}: no validation batches"
    )
    line += "".join(
        f" | layer {i} usage {row[f'memory/layer{i}/usage']:.1%} kl {row[f'memory/layer{i}/kl_weight']:.2f}"
        for i in t.model.memory_layers()
        if f"memory/layer{i}/usage" in row
    )
    if "recall/bits" in row:
        line += (
            f" | recall exact {row['recall/exact_match']:.1%} bits {row['recall/bits']:,.0f}"
            f"/{row['recall/bits_available']:,.0f}"
        )
    t.sinks.console.write(line)
    return row


def save_checkpoint(t: Trainer, signals: StopSignals | None = None) -> Path:
    """Every rank writes its part of the checkpoint of the current step (a collective), a second
    Ctrl-C deferred until it is written (`StopSignals.writing`)."""
    with t.clock.paused(), signals.writing(t.state.step) if signals is not None else contextlib.nullcontext():
        t.par.sync_buffers()  # rank 0's BatchNorm statistics are the ones saved
        t.state.wall_time_s, t.state.train_time_s = t.clock.wall_s(), t.clock.train_s()
        return t.states.save(t.run_dir / "checkpoints", t.state.step, t.meta, t.info, t.cfg.checkpoint.keep_last)


def finish(
    t: Trainer, stop_signal: str | None, budget: str | None, last_val: dict, signals: StopSignals | None = None
) -> dict:
    """After the loop: a stop signal's checkpoint, or the final evaluation; the summary row."""
    cfg, state = t.cfg, t.state
    if stop_signal is not None:
        save_checkpoint(t, signals)
        t.sinks.notice(
            f"{stop_signal} received: checkpoint written at step {state.step}; "
            f"resume with resume=auto (same hydra.run.dir={t.run_dir})"
        )
    elif not last_val and (state.step == cfg.train.max_steps or budget is not None):
        last_val = evaluate_all(t)
    counts = t.model.count_parameters()
    # The run's account in one row: tokens, steps and time, and why it stopped (fair comparisons).
    final = {
        "step": state.step,
        "tokens": state.tokens,
        **t.clock.times(),
        "stopped_by": stop_reason(state.step, cfg.train.max_steps, cfg.train.stop_at_step, budget, stop_signal),
        "params_total": counts["total"],
        "params_active": counts["active"],
        "flops_per_token": t.clock.flops_per_token,
    }
    t.sinks.write_row(final)
    summary = {**last_val, **final, "run_dir": str(t.run_dir)}
    t.sinks.summary(summary)
    if t.info.is_main:
        print(format_summary(summary, str(t.run_dir)), flush=True)
    return summary
