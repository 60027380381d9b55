"""Transformer: causality, memory placement, config validation, tying, counts, loss and learning."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from pkmlm.errors import ConfigError
from pkmlm.model import MemoryConfig, ModelConfig, ProductKeyMemory, Transformer
from pkmlm.model.transformer import apply_rope, rope_cache

VOCAB, T = 48, 12


def tiny_config(**overrides) -> ModelConfig:
    memory = overrides.pop("memory", {})
    mem = dict(layers=[1], n_keys=16, heads=2, knn=4, k_dim=16)
    mem.update(memory)
    cfg = dict(vocab_size=VOCAB, n_layers=2, dim=32, n_heads=4, max_seq_len=16, memory=MemoryConfig(**mem))
    cfg.update(overrides)
    return ModelConfig(**cfg)


def build(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_config(**overrides))


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
@pytest.mark.parametrize("placement", ["replace", "parallel"])
@pytest.mark.parametrize(
    "query_norm,train", [("batchnorm", False), ("layernorm", True), ("layernorm", False), ("none", True)]
)
def test_changing_a_token_changes_no_earlier_logits(pos_emb, placement, query_norm, train):
    model = build(pos_emb=pos_emb, memory=dict(layers=[0, 1], placement=placement, query_norm=query_norm))
    model.train(train)  # dropout is 0: train mode differs only in the query norm
    idx = torch.randint(0, VOCAB, (3, T))
    with torch.no_grad():
        base, _ = model(idx)
        for t in (0, 5, T - 1):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1) % VOCAB
            logits, _ = model(changed)
            torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=1e-5)
            assert not torch.allclose(logits[:, t], base[:, t])  # the change is seen from t on


def test_train_mode_batchnorm_memory_is_not_causal():
    """Documented behaviour: training-time BatchNorm mixes the batch's tokens, future ones included."""
    model = build(memory=dict(layers=[0, 1], query_norm="batchnorm")).train()
    idx = torch.randint(0, VOCAB, (2, T))
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    with torch.no_grad():
        assert not torch.allclose(model(idx)[0][:, :-1], model(changed)[0][:, :-1])


@pytest.mark.parametrize("placement", ["replace", "parallel"])
def test_memory_placement(placement):
    model = build(n_layers=4, memory=dict(layers=[3, 1], placement=placement))
    assert list(model.memory_layers()) == [1, 3]
    for i, block in enumerate(model.blocks):
        if i in (1, 3):
            assert isinstance(block.memory, ProductKeyMemory)
            assert model.memory_layers()[i] is block.memory
            assert (block.ffn is None) == (placement == "replace")
        else:
            assert block.memory is None and block.ffn is not None
    idx = torch.randint(0, VOCAB, (2, T))
    assert model.eval()(idx)[0].shape == (2, T, VOCAB)


def test_parallel_block_sums_ffn_and_memory():
    model = build(memory=dict(layers=[0], placement="parallel")).eval()
    block = model.blocks[0]
    x = torch.randn(2, T, 32)
    with torch.no_grad():
        h = x + block.attn(block.ln1(x), (model.rope_cos[:T], model.rope_sin[:T]))
        expected = h + block.ffn(block.ln2(h)) + block.memory(block.ln2(h))
        torch.testing.assert_close(block(x, (model.rope_cos[:T], model.rope_sin[:T]))[0], expected)


def test_v_dim_other_than_dim_gets_a_projection():
    model = build(memory=dict(layers=[1], v_dim=24)).eval()
    assert model.blocks[1].memory_proj.weight.shape == (32, 24)
    assert model.blocks[0].memory_proj is None
    assert model(torch.randint(0, VOCAB, (2, T)))[0].shape == (2, T, VOCAB)


def test_bf16_values_with_a_projection_run_outside_autocast():
    model = build(memory=dict(layers=[1], v_dim=24, values_dtype="bfloat16")).eval()
    logits = model(torch.randint(0, VOCAB, (2, T)))[0]
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_dense_model_has_no_memory():
    model = build(memory=dict(layers=[]))
    assert model.memory_layers() == {}
    assert all(block.ffn is not None and block.memory is None for block in model.blocks)


@pytest.mark.parametrize(
    "overrides,key,text",
    [
        (dict(memory=dict(layers=[2])), "model.memory.layers", "must be in [0, 1] for model.n_layers=2"),
        (dict(memory=dict(layers=[-1])), "model.memory.layers", "[0, 1]"),
        (dict(memory=dict(layers=[1, 1])), "model.memory.layers", "distinct"),
        (dict(memory=dict(knn=17)), "model.memory.knn", "[1, 16]"),
        (dict(memory=dict(k_dim=15)), "model.memory.k_dim", "even"),
        (dict(memory=dict(placement="serial")), "model.memory.placement", "replace, parallel"),
        (dict(memory=dict(query_norm="rms")), "model.memory.query_norm", "batchnorm, layernorm, none"),
        (dict(dim=30), "model.n_heads", "divide"),
        (dict(dim=24, n_heads=8), "model.n_heads", "even head dim"),  # head dim 3 with rope
        (dict(pos_emb="alibi"), "model.pos_emb", "rope, learned"),
        (dict(vocab_size=0), "model.vocab_size", "positive"),
        (dict(n_layers=0), "model.n_layers", "positive"),
        (dict(dropout=1.0), "model.dropout", "[0, 1)"),
        (dict(memory=dict(query_dropout=-0.1)), "model.memory.query_dropout", "[0, 1)"),
    ],
)
def test_invalid_config_raises_before_any_parameter(overrides, key, text):
    cfg = tiny_config(**overrides)
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert info.value.key == key and key in str(info.value) and text in str(info.value)
    with mock.patch.object(torch.nn.Parameter, "__new__", side_effect=AssertionError("allocated")):
        with pytest.raises(ConfigError):
            Transformer(cfg)


def test_odd_head_dim_is_fine_with_learned_positions():
    build(dim=24, n_heads=8, pos_emb="learned")


def test_accepts_an_omegaconf_structured_config():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.structured(ModelConfig)
    memory = {"layers": [1], "n_keys": 8, "k_dim": 8, "knn": 4}
    cfg.merge_with({"vocab_size": VOCAB, "dim": 32, "n_layers": 2, "memory": memory})
    model = Transformer(cfg)
    assert list(model.memory_layers()) == [1]
    cfg.memory.layers = [1, 1]
    with pytest.raises(ConfigError, match="model.memory.layers"):
        Transformer(cfg)


def test_weight_tying_and_parameter_counts():
    tied = build(memory=dict(layers=[], n_keys=64))
    assert tied.lm_head.weight is tied.tok_emb.weight
    counts = tied.count_parameters()
    unique = {id(p): p.numel() for p in tied.parameters()}
    assert counts["total"] == sum(unique.values())
    assert counts["total"] == sum(p.numel() for n, p in tied.named_parameters() if n != "lm_head.weight")
    assert counts["active"] == counts["total"] and counts["memory_values"] == 0
    assert counts["embedding"] == VOCAB * 32

    untied = build(tie_embeddings=False, memory=dict(layers=[]))
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.count_parameters()["total"] == counts["total"] + VOCAB * 32

    learned = build(pos_emb="learned", memory=dict(layers=[]))
    assert learned.count_parameters()["embedding"] == VOCAB * 32 + 16 * 32


def test_memory_parameter_counts_and_active_flops():
    model = build(memory=dict(layers=[0, 1], n_keys=64, heads=2, knn=4))
    counts = model.count_parameters()
    assert counts["memory_values"] == 2 * 64**2 * 32
    assert counts["active"] == counts["total"] - counts["memory_values"] + 2 * (2 * 4 * 32)
    assert counts["active"] < counts["total"]

    # Dense: the nanoGPT estimate, 6 * non-embedding params (lm_head counted once) + 12 L D T.
    dense = build(memory=dict(layers=[]))
    n_dense = sum(p.numel() for p in dense.parameters())  # tied: the table counts as the lm_head
    assert dense.flops_per_token(16) == 6 * n_dense + 12 * 2 * 32 * 16
    # Memory model, term by term: the table itself never enters, only the rows a token reads.
    big = build(memory=dict(layers=[0, 1], n_keys=64, heads=2, knn=4, k_dim=16, query_norm="none"))
    per_memory = 32 * (2 * 16) + 2 * 16 + 2 * 64 * 16 + 2 * 4 * 32  # query net (+ bias), keys, read rows
    block0 = big.blocks[0]
    attn_norms = sum(p.numel() for m in (block0.ln1, block0.attn, block0.ln2) for p in m.parameters())
    n_active = 2 * (per_memory + attn_norms) + 2 * 32 + VOCAB * 32  # + final norm + lm_head
    assert big.flops_per_token(16) == 6 * n_active + 12 * 2 * 32 * 16
    # Growing the table 16x (n_keys 16 -> 64) only adds the extra key scores.
    small = build(memory=dict(layers=[0, 1], n_keys=16, heads=2, knn=4, k_dim=16, query_norm="none"))
    assert big.flops_per_token(16) - small.flops_per_token(16) == 6 * 2 * (2 * (64 - 16) * 16)


def test_memory_keeps_its_own_init():
    model = build(n_layers=2, memory=dict(layers=[0, 1], n_keys=32, k_dim=32))
    for memory in model.memory_layers().values():
        assert memory.keys.abs().max() <= 1 / math.sqrt(16)
        assert abs(memory.values.weight.std().item() - 32**-0.5) < 0.05 * 32**-0.5
    residual_std = 0.02 / math.sqrt(2 * 2)
    assert abs(model.blocks[0].attn.out.weight.std().item() - residual_std) < 0.2 * residual_std
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.1 * 0.02


def test_loss_is_cross_entropy_of_the_logits():
    model = build().eval()
    idx = torch.randint(0, VOCAB, (2, T))
    targets = torch.randint(0, VOCAB, (2, T))
    targets[0, :3] = -100
    logits, loss = model(idx, targets)
    assert logits.shape == (2, T, VOCAB) and loss.dtype == torch.float32
    keep = targets != -100
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], targets[keep]))
    assert model(idx)[1] is None


@pytest.mark.parametrize("layers,query_norm", [([], "batchnorm"), ([1], "batchnorm"), ([0, 1], "layernorm")])
def test_a_few_adamw_steps_fit_a_repeated_batch(layers, query_norm):
    model = build(memory=dict(layers=layers, query_norm=query_norm)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, VOCAB, (4, T + 1), generator=gen)
    idx, targets = data[:, :-1], data[:, 1:]
    losses = []
    for _ in range(30):
        _, loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.8 * math.log(VOCAB)
    assert losses[-1] < 0.5 * losses[0]
    if layers:  # the memory learns too: its values moved
        assert all(m.values.weight.grad.abs().sum() > 0 for m in model.memory_layers().values())


def test_sequence_longer_than_max_seq_len_raises():
    model = build()
    model(torch.randint(0, VOCAB, (1, 16)))  # exactly max_seq_len is fine
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.randint(0, VOCAB, (1, 17)))


def test_rope_scores_depend_on_relative_position_only():
    cos, sin = rope_cache(8, 32, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(m: int, n: int) -> torch.Tensor:
        seq = torch.zeros(1, 1, 32, 8)
        seq_q, seq_k = seq.clone(), seq.clone()
        seq_q[0, 0, m], seq_k[0, 0, n] = q, k
        return apply_rope(seq_q, cos, sin)[0, 0, m] @ apply_rope(seq_k, cos, sin)[0, 0, n]

    torch.testing.assert_close(score(3, 1), score(20, 18))
    torch.testing.assert_close(score(0, 0), q @ k)  # position 0 is the identity
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_rope_buffers_are_not_in_the_state_dict():
    model = build()
    assert "rope_cos" not in model.state_dict() and model.rope_cos.shape == (16, 4)
    clone = Transformer(tiny_config())
    clone.load_state_dict(model.state_dict())
    idx = torch.randint(0, VOCAB, (2, T))
    torch.testing.assert_close(clone.eval()(idx)[0], model.eval()(idx)[0])
