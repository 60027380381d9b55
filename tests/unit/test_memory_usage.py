"""Memory-usage statistics: the paper's definitions on hand-made counts, and the on-device tracker.

Shape legend: N tokens, H heads, K knn, S value slots.
"""

import math
from collections import Counter, defaultdict

import pytest
import torch
from torch import nn

from pkmlm.metrics.memory_usage import (
    NEVER_READ,
    MemoryUsage,
    StaleSlots,
    add_observer,
    advance_stale_trackers,
    attach_stale_trackers,
    attach_usage_trackers,
    detach_usage_trackers,
    gini,
    kl_to_uniform,
    memory_metrics,
    remove_observer,
    slots_for_mass,
    stale_metrics,
    track_memory_usage,
    usage_fraction,
)

# ---------------------------------------------------------------- pure functions


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 512 * 512])
def test_uniform_mass_has_zero_kl_and_gini_and_full_usage(n):
    counts = torch.full((n,), 3, dtype=torch.int64)
    weights = torch.full((n,), 0.37, dtype=torch.float64)
    assert abs(kl_to_uniform(counts)) < 1e-9
    assert abs(kl_to_uniform(weights)) < 1e-9
    assert abs(gini(weights)) < 1e-9
    assert usage_fraction(counts) == 1.0


@pytest.mark.parametrize("n", [2, 10, 4096])
def test_one_slot_taking_everything(n):
    mass = torch.zeros(n, dtype=torch.float64)
    mass[n // 3] = 5.0
    assert kl_to_uniform(mass) == pytest.approx(math.log(n), abs=1e-12)
    assert gini(mass) == pytest.approx((n - 1) / n, abs=1e-12)
    assert usage_fraction(mass) == 1 / n
    assert slots_for_mass(mass, 0.99) == 1


def test_usage_is_accessed_over_total_exactly():
    count = torch.tensor([0, 4, 0, 0, 1, 0, 9, 0], dtype=torch.int64)
    assert usage_fraction(count) == 3 / 8
    assert usage_fraction(torch.zeros(5, dtype=torch.int64)) == 0.0


def test_two_slot_kl_by_hand():
    # p = (3/4, 1/4): KL = log 2 + 3/4 log 3/4 + 1/4 log 1/4 = 0.130812035941...
    assert kl_to_uniform(torch.tensor([3.0, 1.0])) == pytest.approx(0.13081203594113694, abs=1e-12)
    # normalised inside: the scale of the mass does not matter
    assert kl_to_uniform(torch.tensor([300, 100])) == pytest.approx(0.13081203594113694, abs=1e-12)
    # a zero slot contributes 0 log 0 = 0: p = (1/2, 1/2, 0) -> log 3 - log 2
    assert kl_to_uniform(torch.tensor([1.0, 1.0, 0.0])) == pytest.approx(math.log(1.5), abs=1e-12)


def test_gini_by_hand():
    # sorted (1, 3): (-1*1 + 1*3) / (2 * 4) = 0.25 (= mean |xi - xj| / (2 mean))
    assert gini(torch.tensor([3.0, 1.0])) == pytest.approx(0.25, abs=1e-12)


def test_zero_mass_is_undefined():
    zeros = torch.zeros(6)
    assert math.isnan(kl_to_uniform(zeros))
    assert math.isnan(gini(zeros))
    assert slots_for_mass(zeros, 0.5) == 0


def test_slots_for_mass_known_distribution():
    mass = torch.tensor([1.0, 1.0, 5.0, 1.0, 1.0, 1.0])  # total 10, heaviest first: 5,1,1,1,1,1
    assert slots_for_mass(mass, 0.5) == 1
    assert slots_for_mass(mass, 0.51) == 2
    assert slots_for_mass(mass, 0.9) == 5
    assert slots_for_mass(mass, 0.99) == 6
    assert slots_for_mass(mass, 1.0) == 6
    assert slots_for_mass(mass, 0.0) == 1
    # exact boundaries despite float rounding: 10 slots of 0.1 hold 0.7 with exactly 7
    assert slots_for_mass(torch.full((10,), 0.1, dtype=torch.float64), 0.7) == 7
    assert slots_for_mass(torch.ones(4), 0.5) == 2
    with pytest.raises(ValueError):
        slots_for_mass(mass, 1.5)


# ---------------------------------------------------------------- the tracker


def _reference(batches, n_slots, heads):
    """Python-dict accumulation of the same reads: {(h, slot): count}, {(h, slot): weight}."""
    counts, weights = Counter(), defaultdict(float)
    for indices_NHK, weights_NHK in batches:
        for n, h, k in torch.cartesian_prod(*(torch.arange(s) for s in indices_NHK.shape)).tolist():
            slot = int(indices_NHK[n, h, k])
            counts[h, slot] += 1
            weights[h, slot] += float(weights_NHK[n, h, k])
    return counts, weights


def _random_reads(generator, n, heads, knn, n_slots):
    indices_NHK = torch.stack(
        [torch.stack([torch.randperm(n_slots, generator=generator)[:knn] for _ in range(heads)]) for _ in range(n)]
    )
    weights_NHK = torch.randn(n, heads, knn, generator=generator).softmax(-1)
    return indices_NHK, weights_NHK


def test_update_matches_python_reference_per_head_and_accumulates():
    generator = torch.Generator().manual_seed(0)
    n_slots, heads, knn = 16, 3, 4
    batches = [_random_reads(generator, n, heads, knn, n_slots) for n in (5, 1, 7)]
    tracker = MemoryUsage(n_slots, heads, device="cpu")
    for indices_NHK, weights_NHK in batches:
        tracker(indices_NHK, weights_NHK)  # usable directly as an observer
    counts, weights = _reference(batches, n_slots, heads)

    expected_count_HS = torch.zeros(heads, n_slots, dtype=torch.int64)
    expected_weight_HS = torch.zeros(heads, n_slots, dtype=torch.float64)
    for (h, slot), c in counts.items():
        expected_count_HS[h, slot] = c
        expected_weight_HS[h, slot] = weights[h, slot]
    assert tracker.count_per_head.dtype == torch.int64
    assert tracker.weight_per_head.dtype == torch.float64
    assert torch.equal(tracker.count_per_head, expected_count_HS)
    torch.testing.assert_close(tracker.weight_per_head, expected_weight_HS, rtol=0, atol=1e-12)
    assert torch.equal(tracker.count, expected_count_HS.sum(0))
    torch.testing.assert_close(tracker.weight, expected_weight_HS.sum(0), rtol=0, atol=1e-12)
    assert tracker.count.sum() == 13 * heads * knn
    # fp32 softmax rows sum to 1 (to ~1e-7), so the total weight is the number of (n, h) pairs
    assert tracker.weight.sum().item() == pytest.approx(13 * heads, abs=1e-5)

    stats = tracker.compute()
    assert stats["usage"] == (expected_count_HS.sum(0) > 0).sum().item() / n_slots
    assert stats["kl_count"] == pytest.approx(kl_to_uniform(expected_count_HS.sum(0)), abs=1e-12)
    assert stats["kl_weight"] == pytest.approx(kl_to_uniform(expected_weight_HS.sum(0)), abs=1e-12)
    assert stats["gini"] == pytest.approx(gini(expected_weight_HS.sum(0)), abs=1e-12)
    for h in range(heads):
        assert stats[f"head{h}/usage"] == (expected_count_HS[h] > 0).sum().item() / n_slots
        assert stats[f"head{h}/kl_count"] == pytest.approx(kl_to_uniform(expected_count_HS[h]))
        assert stats[f"head{h}/kl_weight"] == pytest.approx(kl_to_uniform(expected_weight_HS[h]))
    assert set(stats) == {
        "usage",
        "kl_weight",
        "kl_count",
        "gini",
        "top50",
        "top90",
        "top99",
        *(
            f"head{h}/{k}"
            for h in range(heads)
            for k in ("usage", "kl_weight", "kl_count", "gini", "top50", "top90", "top99")
        ),
    }


def test_heads_are_kept_apart():
    # head 0 always reads slot 2, head 1 always slot 5 (knn=1, weight 1)
    tracker = MemoryUsage(n_slots=8, heads=2)
    indices_NHK = torch.tensor([[[2], [5]]] * 3)
    tracker.update(indices_NHK, torch.ones(3, 2, 1))
    assert tracker.count_per_head[0].tolist() == [0, 0, 3, 0, 0, 0, 0, 0]
    assert tracker.count_per_head[1].tolist() == [0, 0, 0, 0, 0, 3, 0, 0]
    stats = tracker.compute()
    assert stats["usage"] == 2 / 8
    assert stats["head0/usage"] == 1 / 8 and stats["head1/usage"] == 1 / 8
    assert stats["head0/kl_weight"] == pytest.approx(math.log(8))
    assert stats["kl_weight"] == pytest.approx(math.log(8) - math.log(2))
    assert stats["top50"] == 1 and stats["top90"] == 2 and stats["top99"] == 2


def test_update_flattens_leading_dims_and_reduced_precision_weights():
    tracker = MemoryUsage(n_slots=4, heads=1)
    indices_BTHK = torch.tensor([[[[0, 1]], [[1, 2]]]])  # (B=1, T=2, H=1, K=2)
    tracker.update(indices_BTHK, torch.full((1, 2, 1, 2), 0.5, dtype=torch.bfloat16))
    assert tracker.count.tolist() == [1, 2, 1, 0]
    assert tracker.weight.tolist() == [0.5, 1.0, 0.5, 0.0]


def test_update_rejects_bad_shapes():
    tracker = MemoryUsage(n_slots=4, heads=2)
    with pytest.raises(ValueError):
        tracker.update(torch.zeros(3, 2, 2, dtype=torch.int64), torch.zeros(3, 2, 3))
    with pytest.raises(ValueError):
        tracker.update(torch.zeros(3, 4, 2, dtype=torch.int64), torch.zeros(3, 4, 2))


def test_empty_tracker_documented_values_and_reset():
    tracker = MemoryUsage(n_slots=9, heads=2)
    stats = tracker.compute()
    assert stats["usage"] == 0.0 and stats["head1/usage"] == 0.0
    for key in ("kl_weight", "kl_count", "gini", "top50", "top90", "top99", "head0/kl_weight", "head0/kl_count"):
        assert math.isnan(stats[key]), key
    tracker.update(torch.tensor([[[1], [2]]]), torch.ones(1, 2, 1))
    assert tracker.compute()["usage"] == 2 / 9
    tracker.reset()
    assert tracker.compute()["usage"] == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_update_on_cuda_never_waits_for_the_device():
    n_slots, heads = 512 * 512, 4
    tracker = MemoryUsage(n_slots, heads, device="cuda")
    indices_NHK = torch.randint(0, n_slots, (2048, heads, 32), device="cuda")
    weights_NHK = torch.rand(2048, heads, 32, device="cuda").softmax(-1)
    tracker.update(indices_NHK, weights_NHK)  # warm-up outside the check (allocator, kernels)
    torch.cuda.set_sync_debug_mode("error")  # any host sync now raises
    try:
        tracker.update(indices_NHK, weights_NHK)
        tracker.update(indices_NHK.int(), weights_NHK.bfloat16())  # converted on device
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected_HS = torch.stack(
        [torch.bincount(indices_NHK[:, h].flatten().cpu(), minlength=n_slots) for h in range(heads)]
    )
    assert torch.equal(tracker.count_per_head.cpu(), 3 * expected_HS)
    assert tracker.compute()["usage"] > 0


# ---------------------------------------------------------------- wiring into a model


class FakeMemory(nn.Module):
    """Stands in for ProductKeyMemory: n_keys, heads, knn and an observer attribute."""

    def __init__(self, n_keys=4, heads=2, knn=3):
        super().__init__()
        self.n_keys, self.heads, self.knn = n_keys, heads, knn
        self.observer = None
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x_ND):
        n = x_ND.shape[0]
        indices_NHK = torch.arange(n * self.heads * self.knn).view(n, self.heads, self.knn)
        indices_NHK = indices_NHK % self.n_keys**2
        weights_NHK = torch.full((n, self.heads, self.knn), 1 / self.knn)
        if self.observer is not None:
            self.observer(indices_NHK, weights_NHK)
        return x_ND * self.scale


class FakeModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.Identity(), FakeMemory(n_keys=4), nn.Identity(), FakeMemory(n_keys=3, heads=1, knn=2)]
        )

    def memory_layers(self):
        return {i: layer for i, layer in enumerate(self.layers) if isinstance(layer, FakeMemory)}

    def forward(self, x_ND):
        for layer in self.layers:
            x_ND = layer(x_ND)
        return x_ND


class Wrapper(nn.Module):
    """Like DDP: the real model sits in .module."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_attach_detach_and_metric_keys():
    model = FakeModel()
    trackers = attach_usage_trackers(Wrapper(model))
    assert set(trackers) == {1, 3}
    assert trackers[1].n_slots == 16 and trackers[1].heads == 2
    assert trackers[3].n_slots == 9 and trackers[3].heads == 1
    assert model.layers[1].observer is trackers[1]
    with pytest.raises(RuntimeError, match="already have an observer"):
        attach_usage_trackers(model)
    model(torch.zeros(2, 5))
    metrics = memory_metrics(trackers)
    # layer 1: 2 tokens * 2 heads * 3 knn = 12 distinct ids of 16; layer 3: ids 0..3 of 9
    assert metrics["memory/layer1/usage"] == 12 / 16
    assert metrics["memory/layer3/usage"] == 4 / 9
    for i in (1, 3):
        for key in (
            "usage",
            "kl_weight",
            "kl_count",
            "gini",
            "top50",
            "top90",
            "top99",
            "head0/usage",
            "head0/kl_weight",
            "head0/kl_count",
        ):
            assert f"memory/layer{i}/{key}" in metrics
    assert "memory/layer1/head1/usage" in metrics and "memory/layer3/head1/usage" not in metrics
    detach_usage_trackers(model)
    assert all(m.observer is None for m in model.memory_layers().values())


def test_track_memory_usage_detaches_on_exception():
    model = FakeModel()
    with pytest.raises(KeyError), track_memory_usage(model) as trackers:
        model(torch.zeros(1, 5))
        raise KeyError("boom")
    assert all(m.observer is None for m in model.memory_layers().values())
    assert trackers[1].count.sum() == 6


def test_model_without_memory_layers_is_refused():
    with pytest.raises(TypeError, match="memory_layers"):
        attach_usage_trackers(nn.Linear(2, 2))


# ---------------------------------------------------------------- staleness during training


def brute_stale(reads_by_step: list[list[int]], n_slots: int, window: int) -> float:
    """Stale fraction after len(reads_by_step) steps, from the definition: not read in the last
    `window` steps (or never)."""
    done = len(reads_by_step)
    recent = {s for step in range(max(0, done - window), done) for s in reads_by_step[step]}
    return sum(1 for s in range(n_slots) if s not in recent) / n_slots


def test_stale_fraction_on_a_hand_built_sequence():
    # 10 slots, window 3; each step's reads, several forwards (micro-batches) per step.
    steps = [[[0, 1], [1, 2]], [[3]], [[0]], [[4, 4, 4]], [], [[9], [8]], [[0, 9]]]
    # By hand, after each step (stale = not read in the last 3 steps, or never):
    # 1: read {0,1,2}        -> 7/10     2: {0,1,2,3} -> 6/10    3: {0,1,2,3} -> 6/10
    # 4: steps 2-4 {3,0,4}   -> 7/10     5: steps 3-5 {0,4} -> 8/10
    # 6: steps 4-6 {4,9,8}   -> 7/10     7: steps 5-7 {9,8,0} -> 7/10
    by_hand = [0.7, 0.6, 0.6, 0.7, 0.8, 0.7, 0.7]
    tracker = StaleSlots(10, window=3)
    flat = []
    for step, forwards in enumerate(steps):
        for ids in forwards:
            indices_NHK = torch.tensor(ids, dtype=torch.int64).view(-1, 1, 1)
            tracker(indices_NHK, torch.ones(indices_NHK.shape))
        tracker.advance()
        flat.append([i for ids in forwards for i in ids])
        assert tracker.stale_fraction().item() == pytest.approx(by_hand[step], abs=1e-7)
        assert by_hand[step] == pytest.approx(brute_stale(flat, 10, 3))
    assert tracker.last_read.tolist() == [6, 0, 0, 1, 3, NEVER_READ, NEVER_READ, NEVER_READ, 5, 6]


def test_stale_matches_brute_force_on_random_reads():
    gen = torch.Generator().manual_seed(3)
    n_slots, window = 50, 4
    tracker = StaleSlots(n_slots, window)
    reads = []
    for _ in range(20):
        ids_NHK = torch.randint(0, n_slots, (int(torch.randint(0, 6, (), generator=gen)), 2, 3), generator=gen)
        tracker(ids_NHK)
        tracker.advance()
        reads.append(ids_NHK.flatten().tolist())
        assert tracker.stale_fraction().item() == pytest.approx(brute_stale(reads, n_slots, window), abs=1e-6)


def test_stale_update_has_no_host_sync_by_construction():
    """fullgraph=True refuses anything that needs a value on the host (.item(), branching on a
    tensor, data-dependent output shapes): the update and the fraction trace into one graph."""
    tracker = StaleSlots(16, window=2)

    def one_step(indices_NHK):
        tracker.update(indices_NHK)
        tracker.advance()
        return tracker.stale_fraction()

    compiled = torch.compile(one_step, fullgraph=True, backend="eager")
    ids = torch.tensor([[[1, 2]], [[2, 5]]])
    assert compiled(ids).item() == pytest.approx(13 / 16)
    assert compiled(torch.tensor([[[7, 1]]])).item() == pytest.approx(12 / 16)  # 1, 7 read; 2, 5 still recent
    assert compiled(torch.tensor([[[7, 7]]])).item() == pytest.approx(14 / 16)  # 2, 5 out of the window


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for the sync detector")
def test_stale_update_on_cuda_never_waits_for_the_device():
    tracker = StaleSlots(1024, window=3, device="cuda")
    ids = torch.randint(0, 1024, (64, 4, 8), device="cuda")
    tracker(ids)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        tracker(ids)
        tracker.advance()
        fraction = tracker.stale_fraction()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert 0 <= fraction.item() < 1


def test_stale_trackers_sit_beside_other_observers_and_evaluation_sets_them_aside():
    model = FakeModel()
    seen = []
    add_observer(model.layers[1], lambda indices, weights: seen.append(indices.shape))
    stale = attach_stale_trackers(Wrapper(model), window=2)
    model(torch.zeros(2, 5))  # a training forward: both observers of layer 1 see it
    assert len(seen) == 1 and stale[1].last_read.max().item() == 0
    advance_stale_trackers(stale)
    with track_memory_usage(model) as trackers:
        model(torch.zeros(3, 5))  # evaluation reads: only the usage trackers count them
    assert len(seen) == 1 and trackers[1].count.sum() == 3 * 2 * 3
    assert stale[1].last_read.max().item() == 0  # not refreshed by evaluation
    model(torch.zeros(1, 5))  # training again: the set-aside observers are back
    assert len(seen) == 2 and stale[1].last_read.max().item() == 1
    advance_stale_trackers(stale)
    # layer 1: 16 slots, reads of a forward with n tokens are ids 0..(n*6-1) % 16; layer 3: 9 slots
    metrics = stale_metrics(stale)
    assert set(metrics) == {"memory/layer1/stale", "memory/layer3/stale"}
    assert metrics["memory/layer1/stale"] == pytest.approx(4 / 16)  # ids 0..11 read at step 0 or 1
    assert metrics["memory/layer3/stale"] == pytest.approx(5 / 9)  # ids 0..3
    remove_observer(model.layers[1], stale[1])
    remove_observer(model.layers[3], stale[3])
    assert model.layers[3].observer is None and callable(model.layers[1].observer)


def test_stale_state_round_trips():
    a = StaleSlots(8, window=2)
    a(torch.tensor([1, 3]))
    a.advance()
    b = StaleSlots(8, window=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.last_read, b.last_read) and b.step.item() == 1


def test_stale_window_is_checked_at_the_config_boundary():
    from pkmlm.config import Config, validate
    from pkmlm.errors import ConfigError

    cfg = Config()
    cfg.data.files = ["data/c4/c4_en_train_first1000.jsonl.gz"]
    cfg.metrics.stale_window = 0
    with pytest.raises(ConfigError, match=r"metrics\.stale_window=0") as info:
        validate(cfg)
    assert "\n" not in str(info.value)
