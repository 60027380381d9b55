"""ProductKeyMemory: exact lookup against brute force, the weighted read, gradients, hooks, init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pkmlm.errors import ConfigError
from pkmlm.model import MemoryConfig, ProductKeyMemory

DIM = 32


def make_memory(seed: int = 0, **kwargs) -> ProductKeyMemory:
    torch.manual_seed(seed)
    args = dict(n_keys=16, heads=2, knn=4, k_dim=16)
    args.update(kwargs)
    return ProductKeyMemory(DIM, **args)


def brute_force(memory: ProductKeyMemory, x: torch.Tensor):
    """Score all n_keys**2 full keys explicitly and take the top-knn: (weights, indices) (N, H, knn)."""
    H, S, P = memory.heads, memory.n_keys, memory.k_dim // 2
    q = memory.query(x).reshape(-1, H, memory.k_dim)
    s1 = torch.einsum("nhp,hsp->nhs", q[..., :P], memory.keys[:, 0])
    s2 = torch.einsum("nhp,hsp->nhs", q[..., P:], memory.keys[:, 1])
    full = s1[:, :, :, None] + s2[:, :, None, :]  # (N, H, S, S): [i, j] = slot i * S + j
    scores, indices = full.reshape(full.shape[0], H, S * S).topk(memory.knn, dim=-1)
    return F.softmax(scores, dim=-1), indices


@pytest.mark.parametrize(
    "seed,n_keys,knn,heads,lead_shape",
    [
        (0, 16, 4, 2, (5, 7)),
        (1, 16, 16, 2, (3, 4)),  # knn == n_keys
        (2, 16, 1, 3, (11,)),  # knn == 1, 2-D input
        (3, 8, 8, 1, (2, 3, 4)),  # more leading dims
        (4, 32, 8, 4, (4, 6)),
        (5, 5, 3, 2, (9,)),  # n_keys not a power of two
    ],
)
@pytest.mark.parametrize("query_norm", ["batchnorm", "none"])
def test_lookup_is_exact_top_k_over_all_pairs(seed, n_keys, knn, heads, lead_shape, query_norm):
    memory = make_memory(seed, n_keys=n_keys, knn=knn, heads=heads, query_norm=query_norm).eval()
    with torch.no_grad():
        memory.keys.copy_(torch.randn_like(memory.keys))  # not only the uniform init
        x = torch.randn(*lead_shape, DIM)
        weights, indices = memory.lookup(x)
        assert weights.shape == indices.shape == (*lead_shape, heads, knn)
        assert indices.dtype == torch.int64 and weights.dtype == torch.float32
        ref_weights, ref_indices = brute_force(memory, x)
    indices, weights = indices.reshape(-1, heads, knn), weights.reshape(-1, heads, knn)
    # Random floats have no ties: the same slots in the same (descending) order.
    assert torch.equal(indices.sort(-1).values, ref_indices.sort(-1).values)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights[..., 0]))
    assert (weights[..., :-1] >= weights[..., 1:]).all()  # sorted by descending score


def test_lookup_slot_id_layout():
    """Slot id = i * n_keys + j, with i the sub-key of the first half, j of the second."""
    memory = make_memory(n_keys=8, heads=1, knn=1, k_dim=4, query_norm="none").eval()
    with torch.no_grad():
        memory.keys.zero_()
        memory.keys[0, 0, 5] = torch.tensor([10.0, 10.0])  # half 0: sub-key 5 wins for a (1, 1) half
        memory.keys[0, 1, 2] = torch.tensor([10.0, 10.0])  # half 1: sub-key 2 wins
        memory.query_proj.weight.zero_()
        memory.query_proj.bias.fill_(1.0)  # every query is (1, 1, 1, 1)
        _, indices = memory.lookup(torch.randn(3, DIM))
    assert indices.flatten().tolist() == [5 * 8 + 2] * 3


def test_forward_is_weighted_sum_of_values():
    memory = make_memory(1, heads=3, knn=5).eval()
    x = torch.randn(4, 6, DIM)
    with torch.no_grad():
        out = memory(x)
        weights, indices = memory.lookup(x)
    expected = (weights[..., None] * memory.values.weight[indices]).sum(dim=(-3, -2))  # over heads and knn
    assert out.shape == (4, 6, DIM)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_v_dim_sets_output_width():
    memory = make_memory(v_dim=12).eval()
    assert memory.values.weight.shape == (16**2, 12)
    assert memory(torch.randn(5, DIM)).shape == (5, 12)


@pytest.mark.parametrize("query_norm", ["batchnorm", "layernorm", "none"])
def test_gradients_reach_keys_query_and_only_selected_values(query_norm):
    memory = make_memory(2, query_norm=query_norm).train()
    x = torch.randn(3, 5, DIM)
    out = memory(x)
    with torch.no_grad():
        _, indices = memory.lookup(x)  # same selection: train-mode BatchNorm stats of the same batch
    (out * torch.randn_like(out)).sum().backward()
    assert memory.keys.grad is not None and memory.keys.grad.abs().sum() > 0
    assert memory.query_proj.weight.grad.abs().sum() > 0
    if memory.query_norm_layer is not None:
        assert all(p.grad.abs().sum() > 0 for p in memory.query_norm_layer.parameters())
    row_grad = memory.values.weight.grad.abs().sum(-1)  # (n_keys**2,)
    selected = torch.zeros_like(row_grad, dtype=torch.bool)
    selected[indices.flatten()] = True
    assert (row_grad[selected] > 0).all()
    assert (row_grad[~selected] == 0).all()
    assert 0 < selected.sum() < selected.numel()


def test_observer_receives_lookup_and_is_optional():
    memory = make_memory(3, heads=2, knn=4).eval()
    x = torch.randn(2, 3, DIM)
    calls = []
    memory(x)  # observer None: nothing to call, nothing breaks
    memory.observer = lambda indices, weights: calls.append((indices, weights))
    memory(x)
    assert len(calls) == 1
    indices, weights = calls[0]
    assert indices.shape == weights.shape == (6, 2, 4)
    assert not indices.requires_grad and not weights.requires_grad
    ref_weights, ref_indices = memory.lookup(x)
    assert torch.equal(indices, ref_indices.reshape(6, 2, 4))
    torch.testing.assert_close(weights, ref_weights.reshape(6, 2, 4))
    memory.observer = None
    memory(x)
    assert len(calls) == 1


@pytest.mark.parametrize("query_norm", ["batchnorm", "layernorm", "none"])
def test_query_norm_variants_run_in_both_modes(query_norm):
    memory = make_memory(query_norm=query_norm)
    x = torch.randn(4, 5, DIM)
    for train in (True, False):
        memory.train(train)
        q = memory.query(x)
        assert q.shape == (4, 5, 2, 16)
        assert memory(x).shape == (4, 5, DIM)
    if query_norm == "layernorm":  # per token and head: zero mean, unit variance at init
        q = memory.eval().query(x)
        torch.testing.assert_close(q.mean(-1), torch.zeros(4, 5, 2), atol=1e-5, rtol=0)
        torch.testing.assert_close(q.var(-1, unbiased=False), torch.ones(4, 5, 2), atol=1e-3, rtol=0)


def test_layernorm_query_is_per_token():
    """A token's output must not depend on the other tokens of the batch (unlike train-mode BatchNorm)."""
    x = torch.randn(6, DIM)
    for query_norm, independent in (("layernorm", True), ("batchnorm", False)):
        memory = make_memory(query_norm=query_norm).train()
        alone = memory(x[:3])
        together = memory(x)[:3]
        assert torch.allclose(alone, together, atol=1e-6) == independent


def test_dropouts_apply_in_training_only():
    memory = make_memory(input_dropout=0.5, query_dropout=0.5, value_dropout=0.5, query_norm="layernorm")
    x = torch.randn(8, DIM)
    memory.eval()
    torch.testing.assert_close(memory(x), memory(x))
    memory.train()
    torch.manual_seed(0)
    a = memory(x)
    torch.manual_seed(1)
    b = memory(x)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(knn=17), "model.memory.knn"),
        (dict(knn=0), "model.memory.knn"),
        (dict(k_dim=15), "model.memory.k_dim"),
        (dict(k_dim=0), "model.memory.k_dim"),
        (dict(query_norm="rmsnorm"), "model.memory.query_norm"),
        (dict(heads=0), "model.memory.heads"),
        (dict(n_keys=0), "model.memory.n_keys"),
        (dict(v_dim=0), "model.memory.v_dim"),
        (dict(value_dropout=1.0), "model.memory.value_dropout"),
        (dict(kernel="cuda"), "model.memory.kernel"),
        (dict(retrieval_precision="bf16"), "model.memory.retrieval_precision"),
        (dict(gate="relu"), "model.memory.gate"),
        (dict(qk_norm="yes"), "model.memory.qk_norm"),
        (dict(values_kind="experts"), "model.memory.values_kind"),
        (dict(peer_activation="tanh"), "model.memory.peer_activation"),
        (dict(balance_loss=-0.1), "model.memory.balance_loss"),
        (dict(balance_loss=float("nan")), "model.memory.balance_loss"),
        (dict(balance_loss=True), "model.memory.balance_loss"),
    ],
)
def test_invalid_arguments_raise_config_error_naming_the_key(kwargs, key):
    """Checked once, at the config boundary (`MemoryConfig.validate`): the layer trusts its arguments."""
    args = dict(n_keys=16, heads=2, knn=4, k_dim=16)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        MemoryConfig(**args).validate()
    assert info.value.key == key


def test_from_config_matches_the_config():
    cfg = MemoryConfig(n_keys=8, heads=3, knn=2, k_dim=6, v_dim=10, query_norm="layernorm", value_dropout=0.1)
    memory = ProductKeyMemory.from_config(DIM, cfg)
    assert (memory.n_keys, memory.heads, memory.knn, memory.k_dim, memory.v_dim) == (8, 3, 2, 6, 10)
    assert memory.keys.shape == (3, 2, 8, 3)
    assert memory.values.weight.shape == (64, 10)
    assert memory.value_dropout == 0.1 and memory.query_norm == "layernorm"


def test_instances_never_share_values():
    a, b = make_memory(0), make_memory(0)  # same seed sequence: equal, but separate, tensors
    assert torch.equal(a.values.weight, b.values.weight)
    assert a.values.weight.data_ptr() != b.values.weight.data_ptr()
    with torch.no_grad():
        a.values.weight.add_(1.0)
    assert not torch.equal(a.values.weight, b.values.weight)
    assert a.keys.data_ptr() != b.keys.data_ptr()


def test_init_statistics():
    memory = make_memory(0, n_keys=64, heads=2, k_dim=32, v_dim=48)
    bound = 1 / math.sqrt(32 / 2)
    assert memory.keys.abs().max() <= bound
    assert memory.keys.abs().max() > 0.9 * bound  # uniform over the whole range
    assert memory.keys.shape == (2, 2, 64, 16)
    assert not torch.equal(memory.keys[0, 0], memory.keys[0, 1])  # independent halves
    assert not torch.equal(memory.keys[0], memory.keys[1])  # independent heads
    std = memory.values.weight.std().item()
    assert abs(std - 48**-0.5) < 0.05 * 48**-0.5
    assert abs(memory.values.weight.mean().item()) < 0.01


def test_bf16_autocast_runs_and_matches_fp32_closely():
    """Under bf16 autocast (CPU here; CUDA takes the same path) the softmax stays fp32."""
    memory = make_memory(4, query_norm="layernorm").eval()
    x = torch.randn(4, 8, DIM)
    calls = []
    memory.observer = lambda indices, weights: calls.append(weights.dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = memory(x)
        weights, indices = memory.lookup(x)
    assert weights.dtype == torch.float32 and indices.dtype == torch.int64
    assert calls == [torch.float32]
    assert torch.isfinite(out).all() and out.shape == (4, 8, DIM)
    ref = memory(x)
    assert (out.float() - ref).norm() < 0.2 * ref.norm()


@pytest.mark.parametrize("query_norm,qk_norm", [("batchnorm", False), ("layernorm", False), ("none", True)])
def test_bf16_autocast_selects_exactly_the_fp32_slots(query_norm, qk_norm):
    """Issue 11: with `retrieval_precision=fp32` (the default) the query network and the half scores
    run in fp32 under autocast, so bf16 and fp32 runs choose the same slots with the same weights,
    on every (token, head) row; `autocast` lets them follow autocast, and then rows do differ."""
    torch.manual_seed(0)
    x = torch.randn(2048, DIM)
    results = {}
    for precision in ("fp32", "autocast"):
        memory = make_memory(
            5,
            n_keys=64,
            heads=4,
            knn=16,
            k_dim=32,
            query_norm=query_norm,
            qk_norm=qk_norm,
            retrieval_precision=precision,
        ).eval()
        with torch.no_grad():
            exact_w, exact_i = memory.lookup(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16_w, bf16_i = memory.lookup(x)
        results[precision] = (exact_i, bf16_i)
        if precision == "fp32":
            assert torch.equal(bf16_i, exact_i)
            assert torch.equal(bf16_w, exact_w)
    exact_i, bf16_i = results["autocast"]
    differ = (exact_i.sort(-1).values != bf16_i.sort(-1).values).any(-1).float().mean().item()
    assert differ > 0.01, differ  # the option matters: bf16 scores change the slot sets of some rows


@pytest.mark.parametrize(
    "n_keys,knn,heads,levels",
    [
        (10, 6, 2, 5),  # integer sub-key scores: many ties, also at the K-th score
        (8, 8, 1, 3),  # knn == n_keys, sub-key entries in {-1, 0, 1}
        (7, 1, 3, 3),  # knn == 1
        (12, 5, 2, 1),  # every key zero: all n_keys**2 slots tie
        (16, 16, 2, 3),  # knn == n_keys with ties across the two halves
    ],
)
def test_lookup_with_ties_matches_brute_force(n_keys, knn, heads, levels):
    """Ties (at the K-th score too) against the search over all n_keys**2 slots: the same K scores in
    the same descending order, K distinct valid slots whose true scores are those, and the same
    weights. Which of several slots tied at the K-th score is taken may differ (as in XLM's search
    over all K*K candidate pairs); that is the one freedom."""
    torch.manual_seed(n_keys * 100 + knn)
    memory = make_memory(n_keys=n_keys, knn=knn, heads=heads, k_dim=4, query_norm="none").eval()
    with torch.no_grad():
        half = (levels - 1) // 2  # sub-key entries in {-half, ..., half}: exact integer dot products
        memory.keys.copy_(torch.randint(-half, half + 1, memory.keys.shape).float())
        memory.query_proj.weight.copy_(torch.randint(-1, 2, memory.query_proj.weight.shape).float())
        memory.query_proj.bias.zero_()
        x = torch.randint(-2, 3, (64, DIM)).float()
        weights, indices = memory.lookup(x)
        ref_weights, ref_indices = brute_force(memory, x)
        q = memory.query(x)
        s1 = torch.einsum("nhp,hsp->nhs", q[..., :2], memory.keys[:, 0])
        s2 = torch.einsum("nhp,hsp->nhs", q[..., 2:], memory.keys[:, 1])
        full = (s1[..., :, None] + s2[..., None, :]).flatten(-2)  # (N, H, S*S): every slot's true score
    assert ((indices >= 0) & (indices < n_keys**2)).all()
    distinct = indices.sort(-1).values
    assert (distinct[..., 1:] != distinct[..., :-1]).all()  # K distinct slots per token and head
    ref_scores = full.gather(-1, ref_indices)
    assert torch.equal(full.gather(-1, indices), ref_scores)  # the true top-K scores, descending
    ties = (full.unsqueeze(-1) == ref_scores[..., -1:].unsqueeze(-2)).sum(-2).squeeze(-1)
    assert (ties > 1).any(), "the case must tie at the K-th score somewhere"
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-7)
    # Slots scoring strictly above the K-th score are the same set in both.
    kth = ref_scores[..., -1:]
    above_ours = torch.where(full.gather(-1, indices) > kth, indices, -1).sort(-1).values
    above_ref = torch.where(ref_scores > kth, ref_indices, -1).sort(-1).values
    assert torch.equal(above_ours, above_ref)
