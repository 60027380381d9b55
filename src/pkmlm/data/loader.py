"""Batches of token windows for training and validation, in one process or across DataLoader workers.

Readers: with `world_size` ranks and `data.num_workers` DataLoader workers per rank (0 = read in
the training process, which counts as one reader), reader `slot = rank * W + worker` of
`n_slots = world_size * W` (W = max(1, num_workers)) reads the training records whose index is
`slot` mod `n_slots` in every source (see `mixing.py`), so every document is read by exactly one
(rank, worker) per epoch.

One reader's pipeline (`TokenBatches`): documents (`MixedDocuments`: sources, cleaning, mixing)
-> `encode_documents` (`data.encode_batch_docs` per call, which the Rust tokenizer spreads over
the cores) -> `Packer` -> `ShuffleBuffer` (`data.shuffle_buffer` windows, seeded by `seed`, rank
and worker) -> `(batch_size, seq_len + 1)` int64 tensors. Inputs are `batch[:, :-1]`, targets
`batch[:, 1:]`. The packer and shuffle buffer carry over epoch boundaries (no partial window is
dropped, no buffer drained) and the shuffle RNG keeps advancing, so epoch 2 is ordered differently.

With workers (`WorkerBatches`), each worker runs one reader and builds whole batches; the
DataLoader hands them out round-robin in worker order (its `in_order` default), so the sequence is
deterministic. Each worker yields (batch, its reader's state after that batch); the main process
keeps, per worker, the state that came with the last batch it *consumed* (batches prefetched but
not consumed do not count). Restoring hands every worker its saved state and starts the
round-robin at the worker whose batch was next, so the batches continue bit-identically.

`state_dict()` holds the whole pipeline (source positions, epochs, dedup windows, packer
leftover, shuffle buffer and RNGs, per worker) as plain lists, ints and dicts: restoring it gives
batches bit-identical to an uninterrupted run. Windows packed but not yet shuffled are not stored:
the state keeps where their chunk of `encode_batch_docs` documents began and how many of its
windows were used, and a restore reads and encodes that chunk again (deterministic).
"""

from __future__ import annotations

import functools
import itertools
import os
import signal
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from tokenizers import Tokenizer

from pkmlm.data.batch_source import BatchSource, DataInput
from pkmlm.data.config import DataConfig, check_data_config
from pkmlm.data.mixing import (
    DataPlan,
    MixedDocuments,
    merge_counts,
    resolve_sources,
    sample_documents,
    validation_documents,
)
from pkmlm.data.packing import TOKEN_DTYPE, Packer, ShuffleBuffer, Window, to_plain
from pkmlm.data.prepared import PreparedInput, load_index
from pkmlm.data.sources import BAD_KINDS
from pkmlm.data.tokenizer import cached_bpe, check_special_tokens, encode_documents, eos_id, load_tokenizer
from pkmlm.errors import DataError, UserError

STATE_VERSION = 2
FIRST_CHUNK_DOCS = 4  # documents in the first encode chunk (then 8, 16, ... up to data.encode_batch_docs)


# Counters of documents changed but kept (the rest count documents skipped).
KEPT_KINDS = ("nfc_normalized", "split_docs")


def stats_row(stats: Dict[str, int]) -> Dict[str, int]:
    """Counters as metrics keys: `data/skipped/<kind>` for bad input and cleaning drops (every
    kind of BAD_KINDS always present), `data/nfc_normalized` and `data/split_docs` (documents
    longer than data.max_doc_chars, tokenized in pieces)."""
    row = {f"data/skipped/{k}": 0 for k in BAD_KINDS}
    for k, v in stats.items():
        row[f"data/{k}" if k in KEPT_KINDS else f"data/skipped/{k}"] = int(v)
    return row


class TokenBatches:
    """One reader's endless training batches (a `BatchSource`): `next()` gives `(batch_size, seq_len + 1)` int64.

    Counters: `epoch` (completed passes over the training split; for a mixture, of the source
    with the fewest), `documents` (training documents this reader has read), `tokens` (target
    tokens yielded: batch_size * seq_len per batch), `batches`; `stats` counts skipped records by
    kind and the cleaning hooks' work, over the whole run.
    """

    def __init__(
        self,
        cfg: DataConfig,
        plan: DataPlan,
        tokenizer: Tokenizer,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        worker: int = 0,
        num_workers: int = 1,
    ):
        self.cfg = cfg
        self.sources = plan.sources
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.worker, self.num_workers = worker, num_workers
        self.slot, self.n_slots = rank * num_workers + worker, world_size * num_workers
        self._docs = MixedDocuments(self.sources, cfg, seed, self.slot, self.n_slots)
        self._packer = Packer(cfg.seq_len, eos_id(tokenizer))
        where = f"rank={rank}" + (f"/worker={worker}" if num_workers > 1 else "")
        self._shuffle = ShuffleBuffer(cfg.shuffle_buffer, seed=f"pkmlm-shuffle/seed={seed}/{where}")
        self._pending = np.empty((0, cfg.seq_len + 1), dtype=TOKEN_DTYPE)  # packed, not yet shuffled
        self._pending_pos = 0
        # Where the chunk behind _pending began (documents' and packer's state): the state records
        # this and _pending_pos rather than the pending windows themselves, which would be up to
        # encode_batch_docs documents of tokens to copy with every batch a worker sends.
        self._chunk_start: Optional[Dict[str, Any]] = None
        # Chunks start small and double up to encode_batch_docs: the first batch (and the shuffle
        # buffer's fill) then waits for a few documents, not for a whole chunk of long ones.
        self._chunk_docs = min(FIRST_CHUNK_DOCS, cfg.encode_batch_docs)
        self.tokens = 0
        self.batches = 0

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> "TokenBatches":
        return self

    def __next__(self) -> torch.Tensor:
        rows: List[np.ndarray] = []
        shuffle = self._shuffle
        while len(rows) < self.batch_size:
            if self._pending_pos >= len(self._pending):
                self._pack_more()
                continue
            out = shuffle.push(self._pending[self._pending_pos].copy())  # a copy: the buffer keeps no parent
            self._pending_pos += 1
            if out is not None:
                rows.append(out)
        batch_BT = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, seq_len + 1)
        self.batches += 1
        self.tokens += self.batch_size * self.cfg.seq_len
        return batch_BT

    def _pack_more(self, n_docs: Optional[int] = None) -> None:
        if n_docs is None:
            n_docs = self._chunk_docs
            self._chunk_docs = min(2 * self._chunk_docs, self.cfg.encode_batch_docs)
        self._chunk_start = {"docs": self._docs.state_dict(), "packer": self._packer.state_dict(), "n_docs": n_docs}
        texts = [self._docs.next_document() for _ in range(n_docs)]
        self._pending = self._packer.push_many(encode_documents(self.tokenizer, texts, self.cfg.max_doc_chars))
        self._pending_pos = 0

    @property
    def epoch(self) -> int:
        return self._docs.epoch

    @property
    def documents(self) -> int:
        return self._docs.documents

    @property
    def stats(self) -> Dict[str, int]:
        return self._docs.stats

    # -- state -------------------------------------------------------------------------------

    def _layout(self) -> Dict[str, Any]:
        """What must match for a saved position to mean the same thing on resume."""
        cfg = self.cfg
        return {
            "seq_len": cfg.seq_len,
            "val_docs": cfg.val_docs,
            "shuffle_buffer": cfg.shuffle_buffer,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "n_files": sum(len(s.files) for s in self.sources),
            "sources": [s.name for s in self.sources],
            "seed": self.seed,
        }

    def raw_state(self) -> Dict[str, Any]:
        """The state with numpy arrays (cheap to copy and pickle): `to_plain` makes it JSON."""
        return {
            "version": STATE_VERSION,
            "layout": self._layout(),
            "chunk_start": self._chunk_start,  # not copied: never changed once taken
            "pending_pos": self._pending_pos,
            "chunk_docs": self._chunk_docs,
            "shuffle": self._shuffle.raw_state(),
            "tokens": self.tokens,
            "batches": self.batches,
            "worker": self.worker,
            # Read-only summaries for the main process (WorkerBatches): not used by a restore.
            "epoch": self.epoch,
            "documents": self.documents,
            "stats": self.stats,
        }

    def state_dict(self) -> Dict[str, Any]:
        return to_plain(self.raw_state())

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        check_state_version(state)
        check_layout(state["layout"], self._layout())
        chunk = state["chunk_start"]
        if chunk is not None:  # re-read and re-encode the current chunk, then skip its windows used
            self._docs.load_state_dict(chunk["docs"])
            self._packer.load_state_dict(chunk["packer"])
            self._pack_more(int(chunk["n_docs"]))
        self._chunk_docs = int(state["chunk_docs"])
        self._pending_pos = int(state["pending_pos"])
        self._shuffle.load_state_dict(state["shuffle"], as_array=True)
        self.tokens = int(state["tokens"])
        self.batches = int(state["batches"])


def check_state_version(state: Dict[str, Any]) -> None:
    if state.get("version") != STATE_VERSION:
        raise DataError(
            f"cannot resume the data pipeline: state version {state.get('version')!r}, "
            f"this code reads version {STATE_VERSION}; start a new run (resume=never)"
        )


def check_layout(saved: Dict[str, Any], now: Dict[str, Any]) -> None:
    changed = [f"{k} was {saved[k]!r}, now {now[k]!r}" for k in now if k in saved and saved[k] != now[k]]
    if changed:
        raise DataError(
            "cannot resume the data pipeline with a different layout: "
            + "; ".join(changed)
            + "; resume with the run's saved data settings"
        )


# ----------------------------------------------------------------------------------------------
# DataLoader workers
# ----------------------------------------------------------------------------------------------


class _ReaderDataset(torch.utils.data.IterableDataset):
    """The IterableDataset each DataLoader worker runs: one reader's TokenBatches, yielding
    (batch, reader's worker index, raw state after the batch)."""

    def __init__(
        self,
        cfg: DataConfig,
        plan: DataPlan,
        tokenizer: Tokenizer,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        states: List[Optional[Dict[str, Any]]],
        first_worker: int,
    ):
        super().__init__()
        self.args = (cfg, plan, tokenizer, batch_size, seed, rank, world_size)
        self.num_workers = num_workers
        self.states = states
        self.first_worker = first_worker

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, int, Dict[str, Any]]]:
        info = torch.utils.data.get_worker_info()
        if info is None or info.num_workers != self.num_workers:
            raise RuntimeError("_ReaderDataset runs inside a DataLoader with data.num_workers workers")
        # The DataLoader's worker i runs reader (first_worker + i) mod W, so that its round-robin,
        # which always starts at worker 0, starts at the reader whose batch is next.
        worker = (self.first_worker + info.id) % self.num_workers
        cfg, plan, tokenizer, batch_size, seed, rank, world_size = self.args
        try:
            batches = TokenBatches(
                cfg,
                plan,
                tokenizer,
                batch_size,
                seed,
                rank=rank,
                world_size=world_size,
                worker=worker,
                num_workers=self.num_workers,
            )
            if self.states[worker] is not None:
                batches.load_state_dict(self.states[worker])
            while True:
                batch = next(batches)
                yield batch, worker, batches.raw_state()
        except UserError as e:
            # Sent as data: raised here, the DataLoader would re-raise it in the training process
            # with this worker's traceback in its message, and a user error is one line.
            yield None, worker, {"user_error": str(e)}


def _as_is(item: Any) -> Any:
    """The DataLoader's collate function: keep the worker's (batch, worker, state) as it is (the
    default would turn the state's numpy arrays into tensors)."""
    return item


def _leave_stop_signals_to(parent_pid: int) -> None:
    """In a worker: ignore SIGINT and SIGUSR1, and SIGTERM unless `parent_pid` sent it (above)."""
    import threading

    for stop in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(stop, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # not POSIX: torch's own handling stays
        return
    # Blocked here, in the worker's only thread, so in every thread started later too: a SIGTERM
    # stays pending until the waiting thread takes it, with the sender's pid.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent_pid:
                os._exit(0)

    threading.Thread(target=wait, name="pkmlm-sigterm", daemon=True).start()


def _die_with_parent(parent_pid: int, worker_id: int) -> None:
    """DataLoader `worker_init_fn`: the kernel kills this worker when the training process dies.

    Without it, a trainer killed by SIGKILL (OOM killer, scheduler, kill -9) leaves its workers
    blocked for ever on a full result pipe, each holding its memory (found by
    scripts/fault_inject.py). Linux only (prctl PR_SET_PDEATHSIG); elsewhere a no-op.

    It also leaves the stop signals to the trainer (train/loop.py, StopSignals): SLURM at its time
    limit signals every process of the job and a terminal's Ctrl-C the whole process group, and a
    worker killed by SIGTERM (torch's worker handler dies of any SIGTERM its parent did not send)
    crashed the trainer before it could finish its step and checkpoint. So SIGINT and SIGUSR1 are
    ignored, and SIGTERM is taken by a thread (`sigwaitinfo`) that ends the worker only when the
    trainer sent it (`Process.terminate()` when the DataLoader or the interpreter shuts down), as
    torch's handler does, and ignores it otherwise. The trainer finishes its step, checkpoints and
    shuts its workers down; those that outlive it die with it (above).
    """
    _leave_stop_signals_to(parent_pid)
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


class WorkerBatches:
    """Training batches from `num_workers` DataLoader worker processes: a `BatchSource`, as TokenBatches."""

    def __init__(
        self,
        cfg: DataConfig,
        plan: DataPlan,
        tokenizer: Tokenizer,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        prefetch_factor: int = 2,
    ):
        self.cfg = cfg
        self.plan = plan
        self.tokenizer = tokenizer
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.num_workers = cfg.num_workers
        self.prefetch_factor = prefetch_factor
        self._states: List[Optional[Dict[str, Any]]] = [None] * self.num_workers
        self._next_worker = 0
        self._loader_iter: Optional[Iterator] = None
        self.tokens = 0
        self.batches = 0

    def _start(self) -> Iterator:
        dataset = _ReaderDataset(
            self.cfg,
            self.plan,
            self.tokenizer,
            self.batch_size,
            self.seed,
            self.rank,
            self.world_size,
            self.num_workers,
            list(self._states),
            self._next_worker,
        )
        # generator: without one, each iter(loader) draws the workers' base seed from the global
        # torch RNG, so a resumed run (which starts its loader at another step) would shift every
        # later dropout mask; a private generator leaves the global RNG to the model.
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_as_is,
            prefetch_factor=self.prefetch_factor,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=functools.partial(_die_with_parent, os.getpid()),
        )
        # Each worker is a reader of its own: the Rust tokenizer's threads would only oversubscribe
        # the cores. Setting the variable before the fork also keeps tokenizers from warning that
        # it disables them after a fork.
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            return iter(loader)  # forks the workers
        finally:
            if previous is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous

    def __iter__(self) -> "WorkerBatches":
        return self

    def __next__(self) -> torch.Tensor:
        if self._loader_iter is None:
            self._loader_iter = self._start()
        batch, worker, state = next(self._loader_iter)
        if batch is None:  # a bad file or record met by the worker (see _ReaderDataset)
            raise UserError(state["user_error"])
        if worker != self._next_worker:  # the DataLoader's in-order round-robin is what makes resume exact
            raise RuntimeError(f"expected a batch of worker {self._next_worker}, got worker {worker}")
        self._states[worker] = state
        self._next_worker = (worker + 1) % self.num_workers
        self.batches += 1
        self.tokens += self.batch_size * self.cfg.seq_len
        return batch

    def close(self) -> None:
        """Stop the worker processes (they also stop when this object is garbage-collected)."""
        self._loader_iter = None

    @property
    def stats(self) -> Dict[str, int]:
        return merge_counts(*(s["stats"] for s in self._states if s is not None))

    @property
    def epoch(self) -> int:
        epochs = [s["epoch"] for s in self._states if s is not None]
        return min(epochs) if len(epochs) == self.num_workers else 0

    @property
    def documents(self) -> int:
        return sum(s["documents"] for s in self._states if s is not None)

    def _layout(self) -> Dict[str, Any]:
        return {
            "seq_len": self.cfg.seq_len,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "seed": self.seed,
        }

    def state_dict(self) -> Dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "layout": self._layout(),
            "kind": "workers",
            "workers": to_plain(self._states),
            "next_worker": self._next_worker,
            "tokens": self.tokens,
            "batches": self.batches,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        check_state_version(state)
        if state.get("kind") != "workers":
            raise DataError(
                "cannot resume the data pipeline: the checkpoint was read without DataLoader workers "
                f"(data.num_workers=0), the config asks for {self.num_workers}; resume with the same "
                "data.num_workers"
            )
        check_layout(state["layout"], self._layout())
        self._states = list(state["workers"])
        self._next_worker = int(state["next_worker"])
        self.tokens, self.batches = int(state["tokens"]), int(state["batches"])
        self._loader_iter = None  # restart the workers from the restored states


# ----------------------------------------------------------------------------------------------
# Factories and validation
# ----------------------------------------------------------------------------------------------


def resolve_data(cfg: DataConfig) -> DataPlan:
    """The data plan, built once: check the data config and find its inputs (expand globs, stat
    every file, open the prepared index) before anything expensive, so a bad path or value fails
    here, in a second. Everything that reads the data takes this plan."""
    check_data_config(cfg)
    if cfg.prepared:
        load_index(cfg.prepared)
        return DataPlan(sources=[], prepared=cfg.prepared)
    return DataPlan(sources=resolve_sources(cfg))


def data_input(plan: DataPlan) -> DataInput:
    """How the plan's data is read: pre-tokenized shards (`data.prepared`) or text sources. The
    one place that picks a kind of input (and so a kind of `BatchSource`); docs/architecture.md,
    "How to add a batch source"."""
    if plan.prepared:
        return PreparedInput(plan.prepared)
    return TextInput(plan)


class TextInput:
    """Text sources (files, mixtures, Hub datasets) as a `DataInput`: tokenized as they are read."""

    def __init__(self, plan: DataPlan):
        self.plan = plan

    @property
    def inputs(self) -> List[str]:
        return [f for s in self.plan.sources for f in (s.files or [s.name])]

    def tokenizer(self, cfg: DataConfig, cache_dir: str) -> Tuple[Tokenizer, Dict[str, Any]]:
        if cfg.tokenizer:
            tok = load_tokenizer(cfg.tokenizer)
            check_special_tokens(tok, cfg)
            path = os.path.abspath(os.path.expanduser(cfg.tokenizer))
            return tok, {"source": "file", "path": path, "hash": None, "vocab_size": tok.get_vocab_size()}
        sources = self.plan.sources
        return cached_bpe(
            lambda: sample_documents(sources, cfg, cfg.tokenizer_docs),
            cfg,
            cache_dir,
            f"the data sources {[s.name for s in sources]} hold no document to train the tokenizer on; check "
            "data.text_field and the cleaning settings (data.min_chars)",
        )

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Any tokenizer reads text."""

    def train_batches(
        self, cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, seed: int, rank: int, world_size: int
    ) -> BatchSource:
        if cfg.num_workers > 0:
            return WorkerBatches(cfg, self.plan, tokenizer, batch_size, seed, rank=rank, world_size=world_size)
        return TokenBatches(cfg, self.plan, tokenizer, batch_size, seed, rank=rank, world_size=world_size)

    def validation_windows(self, cfg: DataConfig, tokenizer: Tokenizer, max_windows: Optional[int]) -> List[Window]:
        if cfg.val_docs == 0:
            return []
        packer = Packer(cfg.seq_len, eos_id(tokenizer))
        texts = itertools.chain.from_iterable(validation_documents(s, cfg) for s in self.plan.sources)
        windows: List[Window] = []
        while chunk := list(itertools.islice(texts, cfg.encode_batch_docs)):
            for ids in encode_documents(tokenizer, chunk, cfg.max_doc_chars):
                windows.extend(packer.push(ids))
            if max_windows is not None and len(windows) >= max_windows:
                return windows[:max_windows]
        tail = packer.flush()
        if tail is not None:
            windows.append(tail)
        return windows


def load_or_train_tokenizer(cfg: DataConfig, plan: DataPlan, cache_dir: str) -> Tuple[Tokenizer, Dict[str, Any]]:
    """The tokenizer of the prepared shards (`plan.prepared`), else `cfg.tokenizer` when set (it
    must define `cfg.special_tokens`), else a BPE trained on a sample of the stream: its first
    `cfg.tokenizer_docs` documents (after cleaning; from a mixture, interleaved by weight), cached
    by a hash of that text, the vocab size and the special tokens (`tokenizer.cached_bpe`).

    Returns the tokenizer and {"source": "prepared"|"file"|"cache"|"trained", "path", "hash",
    "vocab_size"} (`hash` is None for a given file). The vocab size is the tokenizer's own, which
    for a given file or a small corpus may differ from `cfg.vocab_size`: size the model from this
    one (the loop pads it to a multiple of 64).
    """
    return data_input(plan).tokenizer(cfg, cache_dir)


def build_train_batches(
    cfg: DataConfig,
    plan: DataPlan,
    tokenizer: Tokenizer,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> BatchSource:
    """The training batches for this rank: pre-tokenized shards (`data.prepared`), DataLoader
    workers (`data.num_workers > 0`) or in-process reading, from the plan of `resolve_data`."""
    return data_input(plan).train_batches(cfg, tokenizer, batch_size, seed, rank, world_size)


def validation_windows(
    cfg: DataConfig, plan: DataPlan, tokenizer: Tokenizer, max_windows: Optional[int] = None
) -> List[Window]:
    """All windows of the validation split (the first `cfg.val_docs` documents of each source, the
    sources in order; or the prepared directory's val shards), packed as one stream; the last may
    be shorter than `seq_len + 1` (at least 2 tokens). `max_windows` stops reading once that many
    full windows are packed."""
    return data_input(plan).validation_windows(cfg, tokenizer, max_windows)


def validation_batches(
    cfg: DataConfig, plan: DataPlan, tokenizer: Tokenizer, batch_size: int, max_batches: Optional[int] = None
) -> List[torch.Tensor]:
    """The validation split as int64 tensors `(b, seq_len + 1)`, b <= batch_size, in stream order,
    unshuffled, every window kept. The final partial window, when there is one, is a batch of its
    own of shape `(1, L)` with 2 <= L <= seq_len (tensors cannot be ragged, and padding would need
    the loss to know about it). `[]` when `cfg.val_docs == 0` (text sources). `max_batches` reads
    only as many documents as that many batches need."""
    limit = None if max_batches is None else max_batches * batch_size
    windows = validation_windows(cfg, plan, tokenizer, max_windows=limit)
    width = cfg.seq_len + 1
    full = [w for w in windows if len(w) == width]
    batches = [torch.tensor(full[i : i + batch_size], dtype=torch.long) for i in range(0, len(full), batch_size)]
    if len(full) < len(windows):
        batches.append(torch.tensor([windows[-1]], dtype=torch.long))  # (1, L)
    return batches if max_batches is None else batches[:max_batches]
