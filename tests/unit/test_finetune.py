"""Finetuning pieces: TF-IDF ranking by hand, background counts vs a brute count, the cache file,
and the proof that a sparse_memory step moves only the selected value rows (SGD and Adam).

Shape legend: B sequences, T positions, S slots.
"""

import dataclasses
import math

import pytest
import torch

from pkmlm.errors import ConfigError
from pkmlm.finetune import (
    BackgroundCounts,
    FinetuneConfig,
    RowSelection,
    apply_finetune_mode,
    background_counts,
    check_finetune_config,
    count_background,
    finetune_optimizer,
    idf,
    init_from_mismatch,
    load_background,
    model_config_diff,
    row_selection,
    select_rows,
    selected_grad,
    slot_pools,
    tfidf,
)
from pkmlm.model import MemoryConfig, ModelConfig, Transformer

VOCAB = 40


def tiny_model(share_values=False, layers=(1,), seed=0, query_norm="batchnorm", values_kind="embedding"):
    torch.manual_seed(seed)
    memory = MemoryConfig(
        layers=list(layers),
        n_keys=8,
        heads=2,
        knn=4,
        k_dim=16,
        query_norm=query_norm,
        share_values=share_values,
        values_kind=values_kind,
    )
    return Transformer(ModelConfig(vocab_size=VOCAB, n_layers=2, dim=32, n_heads=2, max_seq_len=16, memory=memory))


def batches(n, seed=1, b=3, t=9):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (b, t), generator=gen) for _ in range(n)]


# ---------------------------------------------------------------- ranking by hand


def test_idf_and_tfidf_by_hand():
    df_S = torch.tensor([0, 4, 1, 2])
    expected_idf = [math.log(5 / 1), math.log(5 / 5), math.log(5 / 2), math.log(5 / 3)]
    assert idf(df_S, num_batches=4).tolist() == pytest.approx(expected_idf, rel=1e-6)
    count_S = torch.tensor([2, 6, 0, 2])
    expected = [0.2 * math.log(5), 0.6 * 0.0, 0.0, 0.2 * math.log(5 / 3)]
    assert tfidf(count_S, idf(df_S, 4)).tolist() == pytest.approx(expected, rel=1e-6)
    assert tfidf(torch.zeros(4, dtype=torch.int64), idf(df_S, 4)).tolist() == [0.0] * 4


def test_select_rows_takes_top_t_of_the_read_slots_only():
    count_S = torch.tensor([5, 0, 1, 3, 0, 2])
    score_S = torch.tensor([0.1, 9.0, 0.7, 0.5, 8.0, 0.0])  # unread slots score high: never chosen
    assert select_rows(count_S, score_S, top_t=2).tolist() == [False, False, True, True, False, False]
    assert select_rows(count_S, score_S, top_t=10).tolist() == [True, False, True, True, False, True]
    assert select_rows(count_S, None, None).tolist() == [True, False, True, True, False, True]


def test_selected_grad_keeps_only_masked_rows_of_dense_and_sparse_grads():
    grad_SV = torch.arange(12.0).view(6, 2)
    mask_S = torch.tensor([False, True, False, True, False, False])
    kept = selected_grad(grad_SV, mask_S).to_dense()
    assert torch.equal(kept, grad_SV * mask_S[:, None])
    sparse = torch.sparse_coo_tensor(
        torch.tensor([[3, 0, 3, 5]]), torch.ones(4, 2), (6, 2), check_invariants=True
    )  # row 3 twice
    kept = selected_grad(sparse, mask_S).to_dense()
    assert kept[3].tolist() == [2.0, 2.0] and kept.abs().sum() == 4.0


# ---------------------------------------------------------------- config and init_from


def test_check_finetune_config_one_line_errors():
    ok = {"init_from": "runs/a", "memory_layers": [1], "shard_values": False}
    check_finetune_config("sparse_memory", FinetuneConfig(), **ok)
    check_finetune_config("full", FinetuneConfig(), init_from=None, memory_layers=[], shard_values=False)
    cases = [
        (("partial", FinetuneConfig(), ok), "train.finetune"),
        (("memory", FinetuneConfig(top_t=0), ok), "finetune.top_t"),
        (("memory", FinetuneConfig(background_batches=0), ok), "finetune.background_batches"),
        (("memory", FinetuneConfig(optimizer="adamw"), ok), "finetune.optimizer"),
        (("memory", FinetuneConfig(lr=float("nan")), ok), "finetune.lr"),
        (("memory", FinetuneConfig(), {**ok, "init_from": None}), "init_from"),
        (("sparse_memory", FinetuneConfig(), {**ok, "memory_layers": []}), "without memory layers"),
        (("sparse_memory", FinetuneConfig(), {**ok, "shard_values": True}), "model.memory.shard_values"),
    ]
    for (mode, cfg, kwargs), needle in cases:
        with pytest.raises(ConfigError, match=needle) as info:
            check_finetune_config(mode, cfg, **kwargs)
        assert "\n" not in str(info.value)


def test_model_config_diff_names_the_differing_keys():
    a = ModelConfig(vocab_size=100, memory=MemoryConfig(layers=[1], n_keys=64))
    b = ModelConfig(
        vocab_size=100, dim=128, memory=MemoryConfig(layers=[1], n_keys=32, kernel="torch", value_dropout=0.1)
    )
    assert model_config_diff(a, a) == []
    assert model_config_diff(a, b) == ["dim", "memory.n_keys"]  # kernel and dropout may differ

    saved = dataclasses.asdict(b)  # a checkpoint's model_config, as a dict
    saved["memory"]["layers"] = [0, 1]
    del saved["norm_eps"]
    # A key absent from a saved config counts at the schema's default (a key added after that run was
    # saved, e.g. a new variant's option): equal to a's default norm_eps, different from another one.
    assert model_config_diff(a, saved) == ["dim", "memory.layers", "memory.n_keys"]
    a_eps = dataclasses.replace(a, norm_eps=1e-6)
    assert model_config_diff(a_eps, saved) == ["dim", "memory.layers", "memory.n_keys", "norm_eps"]
    assert init_from_mismatch("runs/x", a, dataclasses.asdict(a)) is None
    error = init_from_mismatch("runs/x", a_eps, saved)
    assert isinstance(error, ConfigError) and "\n" not in str(error)
    assert "model.dim (256 here, 128 there)" in str(error) and "model.norm_eps (1e-06 here, absent there)" in str(error)
    assert str(error).startswith("config error: init_from='runs/x'")


# ---------------------------------------------------------------- background counts


def brute_background(model, data, table_layers):
    """df and reads per slot by recording every read index in Python."""
    seen = []
    for i in table_layers:
        model.memory_layers()[i].observer = lambda ids, w: seen.append(ids.flatten().tolist())
    model.eval()
    df, reads = {}, {}
    with torch.no_grad():
        for batch in data:
            seen.clear()
            model(batch[:, :-1])
            slots = [s for ids in seen for s in ids]
            for s in set(slots):
                df[s] = df.get(s, 0) + 1
            for s in slots:
                reads[s] = reads.get(s, 0) + 1
    for i in table_layers:
        model.memory_layers()[i].observer = None
    return df, reads


@pytest.mark.parametrize("share_values", [False, True])
def test_background_counts_match_a_brute_count(share_values):
    model = tiny_model(share_values=share_values, layers=(0, 1))
    data = batches(5)
    counts = count_background(model, iter(data), num_batches=4)
    assert all(m.observer is None for m in model.memory_layers().values()) and model.training
    pools = slot_pools(model)
    assert len(pools) == (1 if share_values else 2)
    assert counts.num_batches == 4
    for name, pool in pools.items():
        df, reads = brute_background(model, data[:4], pool.layers)
        assert counts.batches_with_slot[name].tolist() == [df.get(s, 0) for s in range(64)]
        assert counts.reads[name].tolist() == [reads.get(s, 0) for s in range(64)]


def test_background_cache_round_trip_fingerprint_and_damage(tmp_path):
    model = tiny_model()
    path = tmp_path / "bg.safetensors"
    calls = []

    def data():
        calls.append(1)
        return iter(batches(3))

    fingerprint = {"init_from": "runs/a", "step": 10, "batch_size": 3}
    first = background_counts(model, path, data, 3, fingerprint)
    again = background_counts(model, path, data, 3, fingerprint)
    assert len(calls) == 1 and again.num_batches == 3
    for name in first.batches_with_slot:
        assert torch.equal(first.batches_with_slot[name], again.batches_with_slot[name])
        assert torch.equal(first.reads[name], again.reads[name])
    n_slots = {n: t.n_slots for n, t in slot_pools(model).items()}
    assert load_background(path, {**fingerprint, "step": 11}, n_slots) is None  # made for another checkpoint
    assert load_background(path, fingerprint, {"other.weight": 64}) is None  # for another model
    path.write_bytes(path.read_bytes()[:40])  # damaged: recounted
    background_counts(model, path, data, 3, fingerprint)
    assert len(calls) == 2 and load_background(path, fingerprint, n_slots) is not None
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------- only the selected rows move


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def finetune_step(model, selection, optimizer, batch):
    model.train()
    _, loss = model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    masks = selection.restrict_grads_()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return masks


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_sparse_memory_step_moves_only_the_selected_rows(optimizer):
    model = tiny_model(layers=(0, 1))
    cfg = FinetuneConfig(top_t=5, optimizer=optimizer, lr=0.5)
    background = count_background(model, iter(batches(6, seed=2)), num_batches=6)
    trainable = apply_finetune_mode(model, "sparse_memory")
    pools = slot_pools(model)
    assert {id(p) for p in trainable} == {id(w) for pool in pools.values() for w in pool.weights}
    selection = row_selection(model, "sparse_memory", cfg, background)
    opt = finetune_optimizer(model, cfg)
    step1, step2 = batches(2, seed=7)

    before = snapshot(model)
    masks = finetune_step(model, selection, opt, step1)
    after = snapshot(model)
    table_keys = {f"{name}.weight": name for name in pools}
    assert set(table_keys) == {"blocks.0.memory.values.weight", "blocks.1.memory.values.weight"}
    for key in before:
        name = table_keys.get(key)
        if name is None:  # every other parameter and buffer (BatchNorm statistics too): bit-identical
            assert torch.equal(before[key], after[key]), key
            continue
        changed_S = (before[key] != after[key]).any(1)
        assert 0 < int(masks[name].sum()) <= 5
        assert torch.equal(changed_S, masks[name]), name  # exactly the selected rows moved
    # A second step selects other rows: the first step's rows that are not selected again keep
    # their values (a lazy Adam does not move them with its moments; AdamW would).
    masks2 = finetune_step(model, selection, opt, step2)
    after2 = snapshot(model)
    for key, name in table_keys.items():
        changed_S = (after[key] != after2[key]).any(1)
        assert torch.equal(changed_S, masks2[name]), name
        assert bool((masks[name] & ~masks2[name]).any()), "the two steps should select different rows"
    for key in before:
        if key not in table_keys:
            assert torch.equal(before[key], after2[key]), key


def test_top_t_follows_tfidf_not_raw_counts():
    """A slot read by every background batch (idf 0) loses to a rarer slot read less often."""
    model = tiny_model()
    (name,) = slot_pools(model)
    df_S = torch.zeros(64, dtype=torch.int64)
    df_S[3] = 10  # common in pretraining
    background = BackgroundCounts(10, {name: df_S}, {name: df_S.clone()})
    selection = RowSelection(model, background, top_t=1)
    selection.counts[name].count[3] = 100
    selection.counts[name].count[7] = 1
    assert selection.select()[name].nonzero().flatten().tolist() == [7]


def test_memory_mode_trains_every_read_row_and_nothing_else():
    model = tiny_model()
    apply_finetune_mode(model, "memory")
    cfg = FinetuneConfig(optimizer="sgd", lr=1.0)
    selection = row_selection(model, "memory", cfg)
    reads = []
    from pkmlm.metrics.memory_usage import add_observer

    add_observer(model.memory_layers()[1], lambda ids, w: reads.extend(ids.flatten().tolist()))
    opt = finetune_optimizer(model, cfg)
    before = snapshot(model)
    masks = finetune_step(model, selection, opt, batches(1, seed=4)[0])
    after = snapshot(model)
    (name,) = masks
    key = f"{name}.weight"
    assert masks[name].nonzero().flatten().tolist() == sorted(set(reads))
    changed = (before[key] != after[key]).any(1).nonzero().flatten().tolist()
    assert set(changed) <= set(reads) and len(changed) > 0
    assert all(torch.equal(before[k], after[k]) for k in before if k != key)


def test_frozen_batchnorm_stays_in_eval_mode():
    model = tiny_model()
    apply_finetune_mode(model, "memory")
    model.train()
    norm = model.memory_layers()[1].query_norm_layer
    assert isinstance(norm, torch.nn.BatchNorm1d) and not norm.training and model.blocks[0].training
    assert apply_finetune_mode(tiny_model(), "full")  # full: everything trains


def test_peer_down_vectors_move_with_their_value_rows():
    """PEER's down vectors are indexed by the same slots: the same rows of both tables move."""
    model = tiny_model(values_kind="peer")
    cfg = FinetuneConfig(top_t=3, optimizer="sgd", lr=1.0)
    background = count_background(model, iter(batches(3, seed=2)), num_batches=3)
    apply_finetune_mode(model, "sparse_memory")
    selection = row_selection(model, "sparse_memory", cfg, background)
    before = snapshot(model)
    masks = finetune_step(model, selection, finetune_optimizer(model, cfg), batches(1, seed=5)[0])
    after = snapshot(model)
    (name,) = masks
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"blocks.1.memory.values.weight", "blocks.1.memory.down.weight"}
    for key in moved:
        assert torch.equal((before[key] != after[key]).any(1), masks[name]), key


def test_default_background_count_is_proportionate_to_the_source_run():
    from pkmlm.finetune.config import BACKGROUND_MAX, background_batch_count

    assert background_batch_count(None, 1500) == 150  # the default run
    assert background_batch_count(None, 3) == 1
    assert background_batch_count(None, 10**7) == BACKGROUND_MAX
    assert background_batch_count(64, 1500) == 64  # given: taken as is
    ok = {"init_from": "runs/a", "memory_layers": [1], "shard_values": False}
    check_finetune_config("sparse_memory", FinetuneConfig(background_batches=None), **ok)
