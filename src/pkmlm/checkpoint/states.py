"""`States`: a run's saved state as one mapping of named Stateful pieces, saved and restored together.

A piece is any object with `state_dict()` / `load_state_dict(state)` (the protocol of
`torch.distributed.checkpoint.stateful.Stateful`; torchtitan's checkpointer iterates one such dict
too). Each piece says where its state lives in a checkpoint (`store.py`'s layout, unchanged):

    "tensors"     a nested dict of tensors, saved by DCP under the piece's name (`model`, `optim`,
                  `stale`); restored in place: the live `state_dict()` is the template DCP fills
                  (sharded as this rank holds it), then handed to `load_state_dict`
    "rank_files"  this rank's JSON values, one file `<name>/<key>.json` per key of `state_dict()`
                  (`data/shard_00000.json`, `rng/rank_00000.json`)
    "meta"        JSON fields merged into rank 0's `meta.json` (the loop's counters: `TrainState`)

`save` writes every piece (a collective) and lists their names in `meta.json` (`states`);
`restore` reads back each piece the checkpoint holds. A piece the checkpoint lacks (one saved
before the piece existed) is left as built when it is `optional`, else refused with one line
naming it. Checkpoints written before `states` was recorded hold `LEGACY_STATES` (and `stale`
when their meta.json lists `stale_slots`). Pieces may also take part in the loop: `step_done()`
after each optimizer step, `metrics()` with each evaluation row (`States.step_done`, `.metrics`).
"""

from __future__ import annotations

import binascii
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from pkmlm.checkpoint import store
from pkmlm.errors import UserError
from pkmlm.parallel.env import DistInfo

Where = Literal["tensors", "rank_files", "meta"]
# What every checkpoint written before meta.json listed its `states` holds.
LEGACY_STATES = ("model", "optim", "data", "rng", "train")


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Piece:
    """One registered piece: `obj` is the Stateful; `what` names it in error messages."""

    name: str
    obj: Stateful
    where: Where
    what: str = ""
    optional: bool = False  # absent from a checkpoint (an older one): kept as built, not refused
    restore_if: Callable[[dict], bool] | None = None  # e.g. RNG streams: only on the same number of ranks

    def __post_init__(self) -> None:
        self.what = self.what or f"the {self.name} state"


def saved_names(meta: Mapping[str, Any]) -> set[str]:
    """The pieces checkpoint `meta` holds: its `states`, or the fixed set of older checkpoints."""
    if "states" in meta:
        return set(meta["states"])
    return set(LEGACY_STATES) | ({"stale"} if meta.get("stale_slots") else set())


class States(Mapping[str, Piece]):
    """The run's pieces by name, in registration order (the order they are saved and restored)."""

    def __init__(self, pieces: list[Piece] | None = None):
        self._pieces: dict[str, Piece] = {}
        for piece in pieces or []:
            self.register(piece)

    def register(self, piece: Piece) -> None:
        if piece.name in self._pieces:
            raise ValueError(f"a piece named {piece.name!r} is registered already")
        if not isinstance(piece.obj, Stateful):
            raise TypeError(f"piece {piece.name!r}: {type(piece.obj).__name__} has no state_dict/load_state_dict")
        self._pieces[piece.name] = piece

    def __getitem__(self, name: str) -> Piece:
        return self._pieces[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._pieces)

    def __len__(self) -> int:
        return len(self._pieces)

    def _of(self, where: Where) -> list[Piece]:
        return [p for p in self._pieces.values() if p.where == where]

    # -- taking part in the loop ---------------------------------------------------------------

    def step_done(self) -> None:
        """One optimizer step done: each piece with a `step_done()` hears of it."""
        for piece in self._pieces.values():
            hook = getattr(piece.obj, "step_done", None)
            if hook is not None:
                hook()

    def metrics(self) -> dict[str, float]:
        """The pieces' `metrics()` (a collective where a piece merges ranks), for the evaluation row."""
        row: dict[str, float] = {}
        for piece in self._pieces.values():
            hook = getattr(piece.obj, "metrics", None)
            if hook is not None:
                row.update(hook())
        return row

    # -- save and restore ----------------------------------------------------------------------

    def save(self, directory: Path, step: int, meta: dict, info: DistInfo, keep_last: int) -> Path:
        """Write every piece into the checkpoint of `step` (a collective: every rank calls it);
        `meta`: the run's constant fields of meta.json (config, tokenizer, ...)."""
        rank_files = {
            f"{p.name}/{key}.json": value for p in self._of("rank_files") for key, value in p.obj.state_dict().items()
        }
        tensors = {p.name: p.obj.state_dict() for p in self._of("tensors")}
        fields = {k: v for p in self._of("meta") for k, v in p.obj.state_dict().items()}
        return store.save(
            directory,
            step,
            tensors=tensors,
            meta={**meta, **fields, "states": list(self._pieces)},
            rank_files=rank_files,
            info=info,
            keep_last=keep_last,
        )

    def restore(self, path: Path, meta: dict, info: DistInfo) -> list[str]:
        """Every piece the checkpoint `path` (with meta.json `meta`) holds, read back: JSON files
        first (their schema: one line naming the file), then the tensors in one read (a
        collective), then meta.json's fields. Returns the names of the pieces left as built."""
        saved = saved_names(meta)
        missing = [p for p in self._pieces.values() if p.name not in saved and not p.optional]
        if missing:
            p = missing[0]
            raise UserError(
                f"{path}: has no saved {p.name!r} piece ({p.what}): it was written before that piece was "
                "saved; resume it with the pkmlm that wrote it, or start a new run"
            )
        todo = [p for p in self._pieces.values() if p.name in saved and (p.restore_if is None or p.restore_if(meta))]
        for piece in (p for p in todo if p.where == "rank_files"):
            _restore_files(path, piece)
        templates = {p.name: p.obj.state_dict() for p in todo if p.where == "tensors"}
        if templates:
            store.load_tensors(path, templates, info)
        for piece in todo:
            if piece.where == "tensors":
                piece.obj.load_state_dict(templates[piece.name])
            elif piece.where == "meta":
                piece.obj.load_state_dict(meta)
        return [name for name in self._pieces if name not in {p.name for p in todo}]


def _restore_files(path: Path, piece: Piece) -> None:
    files = {key: f"{piece.name}/{key}.json" for key in piece.obj.state_dict()}
    values = {key: store.read_json(path, f) for key, f in files.items()}
    try:
        piece.obj.load_state_dict(values)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, binascii.Error, UserError) as e:
        why = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {str(e)[:80]}"
        raise UserError(
            f"{path / next(iter(files.values()))}: not {piece.what} of this run ({why}); the file was edited or "
            "belongs to another run: give another checkpoint with resume=PATH"
        ) from None
