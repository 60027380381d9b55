"""How a product-key memory spreads its reads over its value slots (Lample et al. 2019, §4.4).

Over an evaluation set, for each memory layer and each value slot i of the N = n_keys² slots:

- ``count_i``  = times slot i was among the selected knn (summed over heads and tokens);
- ``weight_i`` = sum of the softmax weights slot i received.

From these (docs/architecture.md, "Memory usage metrics"):

- **usage**     = fraction of slots with count_i > 0 (the paper's "fraction of accessed values");
- **KL to uniform** = Σ p_i log(p_i · N) = log N + Σ p_i log p_i with p = weight / Σweight
  (``kl_weight``) or count / Σcount (``kl_count``): 0 when reads are perfectly spread, log N when
  one slot takes everything. Natural log (nats).

Extras reported beside the contract keys, to read the shape of the distribution at a glance:
``gini`` (Gini coefficient of the weights: 0 uniform, (N-1)/N one slot) and ``top50``/``top90``/
``top99`` (the fewest slots that together hold 50/90/99 % of the weight).

Accumulation happens on the memory's device with no host synchronisation per update (no
``.item()``, no branching on tensor values), so a tracker can sit in the forward pass of every
evaluation batch; :meth:`MemoryUsage.compute` does the one device->host copy at the end.

During training, :class:`StaleSlots` tracks **staleness** (``memory/layer{i}/stale``): the fraction
of slots not read in the last ``metrics.stale_window`` optimizer steps, the "dead"/"outdated" slots
of Kim & Jung 2020, from a last-read step per slot updated on device in the forward pass.
Training-time observers share a layer through :func:`add_observer`; an evaluation pass
(:func:`track_memory_usage`) sets them aside and restores them, so evaluation reads never count
as training reads.

Shape legend: N tokens (all leading dims flattened), H heads, K knn, S value slots (n_keys²).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from pkmlm.errors import require

__all__ = [
    "MemoryUsage",
    "MetricsConfig",
    "Observers",
    "StaleSlots",
    "add_observer",
    "advance_stale_trackers",
    "attach_stale_trackers",
    "attach_usage_trackers",
    "detach_usage_trackers",
    "gini",
    "kl_to_uniform",
    "memory_layers_of",
    "memory_metrics",
    "observers_set_aside",
    "remove_observer",
    "slots_for_mass",
    "stale_metrics",
    "track_memory_usage",
    "unwrap_model",
    "usage_fraction",
]

# Fractions of the weight mass reported as top50/top90/top99.
TOP_FRACTIONS = (0.5, 0.9, 0.99)


# --------------------------------------------------------------------------------------------
# Pure functions on a 1-D mass vector (counts or weights over the S slots)
# --------------------------------------------------------------------------------------------


def usage_fraction(count_S: Tensor) -> float:
    """Fraction of slots read at least once: ``(count > 0).mean()``; 0.0 for an empty vector."""
    if count_S.numel() == 0:
        return 0.0
    return float((count_S > 0).sum().item()) / count_S.numel()


def kl_to_uniform(mass_S: Tensor) -> float:
    """KL(p || uniform) in nats, p = mass / Σmass over the S slots (0·log 0 = 0).

    ``mass_S`` holds non-negative counts or weights; it is normalised here. Equals
    ``log S + Σ p log p``: 0 for a uniform mass, ``log S`` when one slot holds it all. Returns NaN
    when the total mass is 0 (no reads: the distribution is undefined).
    """
    mass_S = mass_S.detach().to(torch.float64).flatten()
    total = mass_S.sum()
    if mass_S.numel() == 0 or total.item() <= 0:
        return math.nan
    p_S = mass_S / total
    # xlogy(0, 0) = 0, which is the 0·log 0 = 0 convention.
    kl = math.log(mass_S.numel()) + torch.special.xlogy(p_S, p_S).sum().item()
    # Mathematically >= 0; rounding can leave about -1e-16 for a uniform mass.
    return max(kl, 0.0)


def gini(mass_S: Tensor) -> float:
    """Gini coefficient of the mass over the S slots: 0 uniform, (S-1)/S when one slot holds all.

    With x sorted ascending and i = 1..S: G = Σ (2i - S - 1) x_i / (S Σx). NaN for zero mass.
    """
    x_S = mass_S.detach().to(torch.float64).flatten().sort().values
    n = x_S.numel()
    total = x_S.sum().item()
    if n == 0 or total <= 0:
        return math.nan
    rank_S = torch.arange(1, n + 1, dtype=torch.float64, device=x_S.device)
    return ((2 * rank_S - n - 1) * x_S).sum().item() / (n * total)


def slots_for_mass(mass_S: Tensor, fraction: float) -> int:
    """Fewest slots that together hold at least ``fraction`` of the total mass.

    Slots are taken heaviest first. A relative tolerance of 1e-12 on the target absorbs float
    rounding in the running sum (4 equal slots hold 0.5 with exactly 2). Returns 0 for zero mass
    (the empty set already holds every fraction of nothing).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    x_S = mass_S.detach().to(torch.float64).flatten()
    total = x_S.sum().item()
    if x_S.numel() == 0 or total <= 0:
        return 0
    cumulative_S = x_S.sort(descending=True).values.cumsum(0)
    target = fraction * total * (1 - 1e-12)
    # First position whose running sum reaches the target; +1 turns the index into a count.
    k = int(torch.searchsorted(cumulative_S, torch.tensor([target], dtype=torch.float64, device=x_S.device)).item()) + 1
    return min(k, x_S.numel())


def _distribution_stats(count_S: Tensor, weight_S: Tensor) -> dict[str, float]:
    """usage / kl_weight / kl_count, gini and top50/90/99 of one slot vector."""
    stats = {
        "usage": usage_fraction(count_S),
        "kl_weight": kl_to_uniform(weight_S),
        "kl_count": kl_to_uniform(count_S),
        "gini": gini(weight_S),
    }
    empty = weight_S.sum().item() <= 0
    for fraction in TOP_FRACTIONS:
        stats[f"top{round(fraction * 100)}"] = math.nan if empty else float(slots_for_mass(weight_S, fraction))
    return stats


# --------------------------------------------------------------------------------------------
# On-device accumulator
# --------------------------------------------------------------------------------------------


class MemoryUsage:
    """Accumulates per-slot read counts and weights of one memory layer, on its device.

    Use it directly as the memory's observer (``memory.observer = tracker``): the memory calls
    ``tracker(indices_NHK, weights_NHK)`` with detached tensors on every forward.

    State (all on ``device``; the totals are sums over heads, derived on access):

    - ``count_per_head``  (H, S) int64   times slot s was selected by head h;
    - ``weight_per_head`` (H, S) float64 sum of the softmax weights head h gave slot s (float64 so
      that millions of ~1e-2 additions stay exact to well below the reported precision);
    - ``count`` (S,) int64 and ``weight`` (S,) float64: the same summed over heads.

    :meth:`compute` with no update returns usage 0.0 and NaN for every KL, gini and top-k value
    (the distribution of zero reads is undefined).
    """

    def __init__(self, n_slots: int, heads: int, device: torch.device | str | None = None):
        if n_slots <= 0 or heads <= 0:
            raise ValueError(f"n_slots and heads must be positive, got {n_slots}, {heads}")
        self.n_slots = int(n_slots)
        self.heads = int(heads)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.count_per_head = torch.zeros(heads, n_slots, dtype=torch.int64, device=self.device)
        self.weight_per_head = torch.zeros(heads, n_slots, dtype=torch.float64, device=self.device)
        # Offset of head h's row in the flattened (H*S,) view: lets one index_add_ cover all heads.
        self._head_offset_H1 = (torch.arange(heads, device=self.device) * n_slots).view(heads, 1)

    @property
    def count(self) -> Tensor:
        """(S,) int64: times each slot was selected, summed over heads."""
        return self.count_per_head.sum(0)

    @property
    def weight(self) -> Tensor:
        """(S,) float64: softmax weight each slot received, summed over heads."""
        return self.weight_per_head.sum(0)

    def reset(self) -> None:
        self.count_per_head.zero_()
        self.weight_per_head.zero_()

    @torch.no_grad()
    def update(self, indices_NHK: Tensor, weights_NHK: Tensor) -> None:
        """Add one batch of reads: slot ids and their softmax weights, both (N, heads, knn).

        Leading dims beyond one are accepted and flattened into N. Only shapes are checked, so
        this never waits for the device (ids out of [0, S) fail inside index_add_ instead).
        """
        if indices_NHK.shape != weights_NHK.shape:
            raise ValueError(
                f"indices {tuple(indices_NHK.shape)} and weights {tuple(weights_NHK.shape)} differ in shape"
            )
        if indices_NHK.dim() < 2 or indices_NHK.shape[-2] != self.heads:
            raise ValueError(f"expected (..., heads={self.heads}, knn), got {tuple(indices_NHK.shape)}")
        knn = indices_NHK.shape[-1]
        indices_NHK = indices_NHK.reshape(-1, self.heads, knn).to(self.device, torch.int64)
        weights_NHK = weights_NHK.reshape(-1, self.heads, knn).to(self.device, torch.float64)
        # (N, H, K) -> (H, N*K): head-major, then offset each head into its row of (H*S,).
        flat_ids = (indices_NHK.permute(1, 0, 2).reshape(self.heads, -1) + self._head_offset_H1).reshape(-1)
        flat_weights = weights_NHK.permute(1, 0, 2).reshape(-1)
        # index_add_ rather than bincount: bincount sizes its output from max(ids), a host sync.
        self.count_per_head.view(-1).index_add_(0, flat_ids, torch.ones_like(flat_ids))
        self.weight_per_head.view(-1).index_add_(0, flat_ids, flat_weights)

    __call__ = update

    def all_reduce_(self, group=None) -> None:
        """Sum the counts and weights over the ranks of ``group`` (no-op outside torch.distributed).

        For a validation set split across ranks: call on every rank before :meth:`compute`.
        """
        import torch.distributed as dist  # only needed by distributed callers

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.count_per_head, group=group)
            dist.all_reduce(self.weight_per_head, group=group)

    def compute(self) -> dict[str, float]:
        """Statistics as plain floats (one device->host copy).

        Keys: ``usage``, ``kl_weight``, ``kl_count``, ``gini``, ``top50``, ``top90``, ``top99``
        for all heads together, and the same seven as ``head{h}/...`` per head (each head reads
        the same S slots, so its KL is also against uniform over S).
        """
        # One transfer: counts fit float64 exactly up to 2**53.
        both_2HS = torch.stack([self.count_per_head.to(torch.float64), self.weight_per_head]).cpu()
        count_HS, weight_HS = both_2HS[0], both_2HS[1]
        stats = _distribution_stats(count_HS.sum(0), weight_HS.sum(0))
        for h in range(self.heads):
            head_stats = _distribution_stats(count_HS[h], weight_HS[h])
            stats.update({f"head{h}/{key}": value for key, value in head_stats.items()})
        return stats

    def __repr__(self) -> str:
        return f"MemoryUsage(n_slots={self.n_slots}, heads={self.heads}, device={self.device})"


# --------------------------------------------------------------------------------------------
# Wiring trackers into a model
# --------------------------------------------------------------------------------------------


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module with ``memory_layers()``, looking through DDP (``.module``) and compile
    (``._orig_mod``); TypeError when there is none."""
    inner = model
    for _ in range(4):  # DDP(compile(model)) and the like nest a few levels at most
        if hasattr(inner, "memory_layers"):
            return inner
        wrapped = getattr(inner, "module", None)
        if wrapped is None:
            wrapped = getattr(inner, "_orig_mod", None)
        if wrapped is None:
            break
        inner = wrapped
    raise TypeError(f"{type(model).__name__} has no memory_layers() method")


def memory_layers_of(model: torch.nn.Module) -> dict:
    """``model.memory_layers()`` as a dict {layer index: memory}, through DDP and compile wrappers."""
    return dict(unwrap_model(model).memory_layers())


def _module_device(module: torch.nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def attach_usage_trackers(model: torch.nn.Module) -> dict[int, MemoryUsage]:
    """Give every memory layer a fresh tracker as its observer; returns {layer index: tracker}.

    Raises RuntimeError if a layer already has an observer (a tracker left attached, or nesting),
    rather than silently replacing it.
    """
    layers = memory_layers_of(model)
    busy = [i for i, memory in layers.items() if getattr(memory, "observer", None) is not None]
    if busy:
        raise RuntimeError(f"memory layers {busy} already have an observer; detach it first")
    trackers = {}
    for i, memory in sorted(layers.items()):
        trackers[i] = MemoryUsage(memory.n_keys**2, memory.heads, _module_device(memory))
        memory.observer = trackers[i]
    return trackers


def detach_usage_trackers(model: torch.nn.Module) -> None:
    """Set every memory layer's observer back to None."""
    for memory in memory_layers_of(model).values():
        memory.observer = None


@contextlib.contextmanager
def observers_set_aside(model: torch.nn.Module) -> Iterator[None]:
    """``with observers_set_aside(model):`` every memory layer without its observer (training-time
    ones: :class:`StaleSlots`, sparse finetuning's batch counts), put back on the way out, also on
    an exception: evaluation reads (validation, recall) are not training reads. A model without
    memory layers passes through."""
    try:
        layers = memory_layers_of(model)
    except TypeError:  # no memory_layers(): nothing observed
        layers = {}
    saved = {i: memory.observer for i, memory in layers.items()}
    for memory in layers.values():
        memory.observer = None
    try:
        yield
    finally:
        for i, memory in layers.items():
            memory.observer = saved[i]


@contextlib.contextmanager
def track_memory_usage(model: torch.nn.Module) -> Iterator[dict[int, MemoryUsage]]:
    """``with track_memory_usage(model) as trackers:`` attach, and always detach on the way out.

    Observers already attached are set aside for the pass (:func:`observers_set_aside`).
    """
    with observers_set_aside(model):
        trackers = attach_usage_trackers(model)
        try:
            yield trackers
        finally:
            detach_usage_trackers(model)


def memory_metrics(trackers: Mapping[int, MemoryUsage]) -> dict[str, float]:
    """Flatten the trackers' statistics into ``memory/layer{i}/{stat}`` keys.

    Contract keys (docs/architecture.md): ``memory/layer{i}/usage``, ``.../kl_weight``,
    ``.../kl_count`` with i the transformer layer index; extras: ``.../gini``, ``.../top50``,
    ``.../top90``, ``.../top99``, and all seven per head as ``.../head{h}/{stat}``.
    """
    metrics: dict[str, float] = {}
    for i in sorted(trackers):
        for key, value in trackers[i].compute().items():
            metrics[f"memory/layer{i}/{key}"] = value
    return metrics


# --------------------------------------------------------------------------------------------
# Several observers on one layer
# --------------------------------------------------------------------------------------------

Observer = Callable[[Tensor, Tensor], None]


class Observers:
    """Several observers of one memory layer, called in the order they were added.

    A memory layer has one ``observer`` slot; training can need more than one (staleness and
    sparse finetuning's batch counts), so :func:`add_observer` puts them in one of these.
    """

    def __init__(self, observers: list[Observer]):
        self.observers = list(observers)

    def __call__(self, indices_NHK: Tensor, weights_NHK: Tensor) -> None:
        for observer in self.observers:
            observer(indices_NHK, weights_NHK)


def add_observer(memory: torch.nn.Module, observer: Observer) -> None:
    """Make ``observer`` see every forward of ``memory``, beside any observer already there."""
    current = getattr(memory, "observer", None)
    if current is None:
        memory.observer = observer
    elif isinstance(current, Observers):
        current.observers.append(observer)
    else:
        memory.observer = Observers([current, observer])


def remove_observer(memory: torch.nn.Module, observer: Observer) -> None:
    """Undo :func:`add_observer` for ``observer`` (no-op when it is not attached)."""
    current = getattr(memory, "observer", None)
    if current is observer:
        memory.observer = None
    elif isinstance(current, Observers):
        current.observers = [o for o in current.observers if o is not observer]
        if len(current.observers) == 1:
            memory.observer = current.observers[0]
        elif not current.observers:
            memory.observer = None


# --------------------------------------------------------------------------------------------
# Staleness during training
# --------------------------------------------------------------------------------------------


@dataclass
class MetricsConfig:
    """`metrics.*` of the root config: training-time metrics."""

    # memory/layer{i}/stale: fraction of slots not read in this many most recent optimizer steps.
    # 100 steps of the default run (16 x 128 tokens, 4 heads x knn 16 reads each) are ~13M reads into
    # 16,384 slots (800 per slot): a slot unread for that long is not being used (Kim & Jung 2020's dead keys).
    stale_window: int = 100

    def validate(self) -> None:
        require(
            self.stale_window >= 1,
            "metrics.stale_window",
            self.stale_window,
            ">= 1 (optimizer steps without a read before a slot counts as stale)",
        )


# Last-read step of a slot never read: far below any step minus any window, and no overflow when
# a window is subtracted from a step.
NEVER_READ = -(2**62)


class StaleSlots:
    """Fraction of one memory layer's slots not read in the last ``window`` optimizer steps.

    State, on ``device``: ``last_read`` (S,) int64, the step in which each slot was last read
    (``NEVER_READ`` before its first read), and ``step``, a 0-dim int64 counter of the steps done.
    Use it as an observer (``add_observer(memory, tracker)``): each forward writes the current step
    into ``last_read`` at the slots it read (``index_put_``, so no host sync, and re-running a
    forward, e.g. under activation checkpointing, changes nothing); call :meth:`advance` after each
    optimizer step. After k steps, a slot is stale when it was not read in steps k-window .. k-1:
    ``last_read < k - window``. Before ``window`` steps have passed that is "never read so far".
    """

    def __init__(self, n_slots: int, window: int, device: torch.device | str | None = None):
        if n_slots <= 0 or window <= 0:
            raise ValueError(f"n_slots and window must be positive, got {n_slots}, {window}")
        self.n_slots, self.window = int(n_slots), int(window)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.last_read = torch.full((n_slots,), NEVER_READ, dtype=torch.int64, device=self.device)
        self.step = torch.zeros((), dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def update(self, indices_NHK: Tensor, weights_NHK: Tensor | None = None) -> None:
        """Mark the slots in ``indices_NHK`` (any shape) as read in the current step."""
        ids_R = indices_NHK.reshape(-1).to(self.device, torch.int64)
        # Duplicate ids write the same value, so the order of the writes does not matter.
        self.last_read.index_put_((ids_R,), self.step.expand(ids_R.shape))

    __call__ = update

    @torch.no_grad()
    def advance(self) -> None:
        """One optimizer step done (an in-place add on the device: no sync)."""
        self.step.add_(1)

    def stale_fraction(self) -> Tensor:
        """0-dim float32 tensor on the device: the stale fraction, not yet copied to the host."""
        return (self.last_read < self.step - self.window).float().mean()

    def all_reduce_(self, group=None) -> None:
        """Latest read over the ranks of ``group`` (no-op outside torch.distributed): each rank
        reads other slots, and a slot is fresh when any rank read it."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.last_read, op=dist.ReduceOp.MAX, group=group)

    def state_dict(self) -> dict[str, Tensor]:
        return {"last_read": self.last_read.clone(), "step": self.step.clone()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.last_read.copy_(state["last_read"])
        self.step.copy_(state["step"])

    def __repr__(self) -> str:
        return f"StaleSlots(n_slots={self.n_slots}, window={self.window}, device={self.device})"


def attach_stale_trackers(model: torch.nn.Module, window: int) -> dict[int, StaleSlots]:
    """A :class:`StaleSlots` on every memory layer (beside other observers); {layer index: tracker}."""
    trackers = {}
    for i, memory in sorted(memory_layers_of(model).items()):
        trackers[i] = StaleSlots(memory.n_keys**2, window, _module_device(memory))
        add_observer(memory, trackers[i])
    return trackers


def advance_stale_trackers(trackers: Mapping[int, StaleSlots]) -> None:
    """Call after every optimizer step (no host sync)."""
    for tracker in trackers.values():
        tracker.advance()


def stale_metrics(trackers: Mapping[int, StaleSlots]) -> dict[str, float]:
    """``{"memory/layer{i}/stale": fraction}``: one device->host copy for all layers."""
    if not trackers:
        return {}
    layers = sorted(trackers)
    values = torch.stack([trackers[i].stale_fraction() for i in layers]).tolist()
    return {f"memory/layer{i}/stale": value for i, value in zip(layers, values)}


class StaleTrackers:
    """Staleness of every memory layer as one Stateful piece of a training run (train/states.py
    registers it): a :class:`StaleSlots` observer on each layer; :meth:`step_done` after each
    optimizer step; :meth:`metrics` (``memory/layer{i}/stale``) and :meth:`state_dict`
    (``{"layer{i}": ...}``) merge the ranks' last reads first (collectives with several processes:
    a slot is fresh when any rank read it, and every rank saves and resumes the same state)."""

    def __init__(self, model: torch.nn.Module, window: int):
        self.trackers = attach_stale_trackers(model, window)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def step_done(self) -> None:
        advance_stale_trackers(self.trackers)

    def _merge_ranks(self) -> None:
        for tracker in self.trackers.values():
            tracker.all_reduce_()

    def metrics(self) -> dict[str, float]:
        self._merge_ranks()
        return stale_metrics(self.trackers)

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        self._merge_ranks()
        return {f"layer{i}": tracker.state_dict() for i, tracker in self.trackers.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, Tensor]]) -> None:
        for i, tracker in self.trackers.items():
            tracker.load_state_dict(state[f"layer{i}"])
