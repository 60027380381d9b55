"""Memory variants (issue 14): Memory+ gate, qk norm, PEER experts, the sub-key balance loss and
shared pools, each against a naive formula written out with loops over heads and slots (their
sharded tables: tests/e2e/test_distributed.py, which spawns processes)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pkmlm.model import MemoryConfig, ModelConfig, ProductKeyMemory, Transformer, kernels
from pkmlm.model.memory import ValueTables
from pkmlm.model.variants.memory_plus import GATES
from pkmlm.model.variants.peer import PEER_ACTIVATIONS

DIM = 12
ROOT = Path(__file__).resolve().parents[2]

# name -> ProductKeyMemory arguments (beside the small sizes of `make`)
VARIANTS = {
    "pkm": dict(),
    "pkm_layernorm_v_dim": dict(query_norm="layernorm", v_dim=10),
    "memory_plus": dict(query_norm="none", qk_norm=True, gate="silu"),
    "gate_sigmoid_v_dim": dict(query_norm="layernorm", gate="sigmoid", v_dim=10),
    "peer": dict(values_kind="peer", peer_activation="gelu"),
    "peer_relu_v_dim": dict(values_kind="peer", peer_activation="relu", v_dim=10),
    "ultramem": dict(query_norm="none", qk_norm=True, values_kind="peer", balance_loss=0.1),
    "everything": dict(
        query_norm="layernorm", qk_norm=True, values_kind="peer", peer_activation="silu", gate="silu", v_dim=10
    ),
}


def make(seed: int = 0, **kwargs) -> ProductKeyMemory:
    torch.manual_seed(seed)
    args = dict(n_keys=8, heads=2, knn=5, k_dim=6, query_norm="none")
    args.update(kwargs)
    memory = ProductKeyMemory(DIM, **args)
    with torch.no_grad():  # away from the init, so that every parameter matters
        for p in memory.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return memory


def naive(memory: ProductKeyMemory, x_ND: torch.Tensor, tables: ValueTables) -> torch.Tensor:
    """The layer's output, written out: the query network, then per token, head and each of the
    n_keys**2 slots the full score, the top knn by sorting, and the weighted read (PEER: times
    act(x . u_slot)), summed over heads; then Memory+'s gate."""
    H, Q, S, K, P = memory.heads, memory.k_dim, memory.n_keys, memory.knn, memory.k_dim // 2
    q = x_ND @ memory.query_proj.weight.T + memory.query_proj.bias  # (N, H*Q)
    if memory.query_norm == "layernorm":  # per token and head, per-feature affine (GroupNorm(H))
        g = q.view(-1, H, Q)
        g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-5)
        q = g.reshape(-1, H * Q) * memory.query_norm_layer.weight + memory.query_norm_layer.bias
    q = q.view(-1, H, Q)
    keys = memory.keys

    def layer_norm(v, gain):  # LayerNorm over the last dim, gain only
        return (v - v.mean(-1, keepdim=True)) / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + 1e-5) * gain

    if memory.key_norm is not None:
        q = torch.cat(
            [
                layer_norm(q[..., :P], memory.query_half_norm.weight),
                layer_norm(q[..., P:], memory.query_half_norm.weight),
            ],
            dim=-1,
        )
        keys = layer_norm(keys, memory.key_norm.weight)
    values, down = tables.values.weight, None if tables.down is None else tables.down.weight
    outputs = []
    for n in range(x_ND.shape[0]):
        out = torch.zeros(values.shape[1])
        for h in range(H):
            scored = []
            for i in range(S):
                for j in range(S):
                    score = q[n, h, :P] @ keys[h, 0, i] + q[n, h, P:] @ keys[h, 1, j]
                    scored.append((score, i * S + j))
            best = sorted(scored, key=lambda pair: -pair[0].item())[:K]
            weights = torch.softmax(torch.stack([score for score, _ in best]), dim=0)
            for w, (_, slot) in zip(weights, best):
                if down is not None:
                    w = w * PEER_ACTIVATIONS[memory.peer_activation](x_ND[n] @ down[slot])
                out = out + w * values[slot]
        outputs.append(out)
    out_NV = torch.stack(outputs)
    if memory.gate_proj is not None:
        gate = GATES[memory.gate](x_ND @ memory.gate_proj.weight.T + memory.gate_proj.bias)
        out_NV = (out_NV * gate) @ memory.out_proj.weight.T
    return out_NV


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_forward_and_gradients_equal_the_naive_formula(name):
    memory = make(1, **VARIANTS[name])
    twin = copy.deepcopy(memory)
    x = torch.randn(6, DIM)
    grad = torch.randn(6, memory.out_dim)
    out = memory(x)
    expected = naive(twin, x, twin.own_tables())
    assert out.shape == expected.shape == (6, memory.out_dim)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    (out * grad).sum().backward()
    (expected * grad).sum().backward()
    named = dict(twin.named_parameters())
    for pname, p in memory.named_parameters():
        assert p.grad is not None, pname
        torch.testing.assert_close(p.grad, named[pname].grad, rtol=1e-4, atol=1e-5, msg=pname)
    if memory.values_kind == "peer":  # both PEER tables learn, only on the rows read
        for table in (memory.values, memory.down):
            touched = table.weight.grad.abs().sum(-1) > 0
            assert 0 < touched.sum() < touched.numel()


@pytest.mark.parametrize("gate", ["silu", "sigmoid"])
def test_gate_at_unit_activation_is_the_output_projection_of_the_read(gate):
    """With gate_proj's weight 0 and a bias where act = 1, out = out_proj(read)."""
    gated = make(2, gate=gate, v_dim=10)
    plain = make(2, v_dim=10)  # the same draws up to the gate: the same retrieval and values
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if "_proj" not in k or "query" in k})
    z = 40.0  # sigmoid(40) rounds to 1 in fp32
    if gate == "silu":  # z * sigmoid(z) = 1: Newton from 1
        z = 1.0
        for _ in range(30):
            s = 1 / (1 + math.exp(-z))
            z -= (z * s - 1) / (s + z * s * (1 - s))
    with torch.no_grad():
        gated.gate_proj.weight.zero_()
        gated.gate_proj.bias.fill_(z)
        assert torch.equal(GATES[gate](gated.gate_proj.bias), torch.ones(10))
        x = torch.randn(3, 4, DIM)
        torch.testing.assert_close(gated(x), gated.out_proj(plain(x)), rtol=1e-6, atol=1e-6)


def test_input_dropout_feeds_the_query_the_gate_and_the_down_vectors():
    """One dropout mask on x, as in facebookresearch/memory: zeroing every input gives the output
    of a zero input."""
    memory = make(3, values_kind="peer", gate="silu", input_dropout=0.999999).train()
    torch.manual_seed(0)
    out = memory(torch.randn(5, DIM))
    torch.testing.assert_close(out, memory.eval()(torch.zeros(5, DIM)))


# --- the balance loss -------------------------------------------------------------------------------


def test_balance_loss_equals_a_hand_computation():
    """One head, 3 sub-keys per half of 1 dim, knn 2, two tokens: f and p by hand."""
    memory = ProductKeyMemory(2, n_keys=3, heads=1, knn=2, k_dim=2, query_norm="none", balance_loss=0.5)
    q = [[1.0, -1.0], [2.0, 0.5]]  # the two tokens' queries (half 0, half 1): x itself
    k0, k1 = [1.0, 0.0, -1.0], [0.5, -2.0, 1.0]  # sub-key values of half 0 and half 1
    with torch.no_grad():
        memory.query_proj.weight.copy_(torch.eye(2))
        memory.query_proj.bias.zero_()
        memory.keys.copy_(torch.tensor([[k0, k1]]).unsqueeze(-1))
    _, aux = memory(torch.tensor(q), return_aux=True)

    def half_loss(c: int, keys: list) -> float:
        p, counts = [0.0] * 3, [0] * 3
        for token in q:
            scores = [token[c] * k for k in keys]
            z = sum(math.exp(s) for s in scores)
            p = [p[s] + math.exp(scores[s]) / z / len(q) for s in range(3)]
            for s in sorted(range(3), key=lambda s: -scores[s])[:2]:  # the half's top-2 sub-keys
                counts[s] += 1
        f = [c / (2 * len(q)) for c in counts]
        return 3 * sum(f[s] * p[s] for s in range(3))

    expected = 0.5 * (half_loss(0, k0) + half_loss(1, k1))
    assert aux.dtype == torch.float32 and aux.shape == ()
    assert abs(aux.item() - expected) < 1e-6, (aux.item(), expected)


def test_balance_loss_is_two_at_uniform_scores_and_trains_the_retrieval_only():
    memory = make(4, balance_loss=1.0, heads=3)
    with torch.no_grad():
        memory.keys.zero_()  # every score 0: p uniform, so S * sum f p = 1 per head and half
        _, aux = memory(torch.randn(7, DIM), return_aux=True)
    assert abs(aux.item() - 2.0) < 1e-6
    memory = make(4, balance_loss=1.0)
    _, aux = memory(torch.randn(7, DIM), return_aux=True)
    aux.backward()
    assert memory.keys.grad.abs().sum() > 0 and memory.query_proj.weight.grad.abs().sum() > 0
    assert memory.values.weight.grad is None  # the loss does not reach the read
    off = make(4)
    out, zero = off(torch.randn(3, DIM), return_aux=True)
    assert zero.item() == 0.0 and out.shape == (3, DIM)


def model_config(**memory) -> ModelConfig:
    mem = dict(layers=[0, 2], n_keys=8, heads=2, knn=4, k_dim=8, query_norm="layernorm")
    mem.update(memory)
    return ModelConfig(vocab_size=64, n_layers=3, dim=16, n_heads=2, max_seq_len=16, memory=MemoryConfig(**mem))


def test_model_returns_the_sum_of_its_layers_weighted_balance_losses():
    torch.manual_seed(0)
    model = Transformer(model_config(balance_loss=0.25, qk_norm=True, query_norm="none"))
    idx = torch.randint(0, 64, (2, 9))
    seen = []
    for memory in model.memory_layers().values():
        memory.register_forward_hook(lambda m, args, kwargs, out: seen.append(out[1]), with_kwargs=True)
    logits, loss, aux = model(idx, idx, return_aux=True)
    assert len(seen) == 2 and aux.shape == () and aux.item() > 0
    torch.testing.assert_close(aux, seen[0] + seen[1])
    logits2, loss2 = model(idx, idx)  # without return_aux: the same cross entropy, no third value
    assert torch.equal(logits, logits2) and torch.equal(loss, loss2)
    assert model(idx, idx, return_aux=True)[2].item() == aux.item()
    _, _, zero = Transformer(model_config())(idx, idx, return_aux=True)
    assert zero.item() == 0.0


# --- shared pools, tables, counts, checkpoints, sparse updates ---------------------------------------


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("values_kind", ["embedding", "peer"])
def test_value_tables_are_named_counted_and_passed_explicitly(share, values_kind):
    torch.manual_seed(1)
    model = Transformer(model_config(share_values=share, values_kind=values_kind, gate="silu"))
    kinds = ["values", "down"] if values_kind == "peer" else ["values"]
    names = [f"shared_{k}" for k in kinds] if share else [f"blocks.{i}.memory.{k}" for i in (0, 2) for k in kinds]
    tables = model.value_tables()
    assert sorted(tables) == sorted(names)
    assert sorted(
        k for k in model.state_dict() if k.endswith(("values.weight", "down.weight")) and "ffn" not in k
    ) == sorted(f"{n}.weight" for n in names)
    for i in (0, 2):  # what each layer reads: its own tables or the model's one pool
        read = model.tables_of(i)
        assert (read.values is model.shared_values) == share and (read.down is not None) == (values_kind == "peer")
        assert model.memory_layers()[i].owns_values != share
    counts = model.count_parameters()
    assert counts["memory_values"] == sum(t.weight.numel() for t in tables.values())
    per_layer_rows = 2 * 4 * (16 + (16 if values_kind == "peer" else 0))  # H * K * (v_dim [+ dim])
    assert counts["active"] == counts["total"] - counts["memory_values"] + 2 * per_layer_rows
    # A layer that does not own its tables refuses to run without them, and the reverse.
    memory = model.memory_layers()[0]
    with pytest.raises(ValueError, match="owns_values=False" if share else "owns its value tables"):
        memory(torch.randn(2, 16), None if share else model.tables_of(2))
    # Checkpoints round-trip under the tables' names; the outputs follow.
    idx = torch.randint(0, 64, (2, 7))
    torch.manual_seed(2)
    other = Transformer(model_config(share_values=share, values_kind=values_kind, gate="silu"))
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other.eval()(idx)[0], model.eval()(idx)[0], rtol=0, atol=0)


def test_shared_peer_pool_equals_the_naive_formula_in_every_layer():
    torch.manual_seed(3)
    model = Transformer(model_config(share_values=True, values_kind="peer", query_norm="none", qk_norm=True))
    x = torch.randn(4, 16)
    for i, memory in model.memory_layers().items():
        torch.testing.assert_close(
            memory(x, model.shared_tables()), naive(memory, x, model.tables_of(i)), rtol=1e-5, atol=1e-5
        )


def test_sparse_gradients_of_both_peer_tables_equal_the_dense_ones():
    """optim.sparse_values: the layer gives both PEER tables row-sparse COO gradients."""
    dense, sparse = make(5, values_kind="peer"), make(5, values_kind="peer")
    sparse.sparse_grad = True
    x = torch.randn(6, DIM)
    grad = torch.randn(6, DIM)
    for memory in (dense, sparse):
        (memory(x) * grad).sum().backward()
    for name in ("values", "down"):
        g = getattr(sparse, name).weight.grad
        assert g.is_sparse
        torch.testing.assert_close(g.to_dense(), getattr(dense, name).weight.grad, rtol=1e-5, atol=1e-6)


def test_the_kernel_is_resolved_once_when_the_layer_is_built(monkeypatch):
    memory = make(6)
    assert (memory.kernel_cuda, memory.kernel_other) == kernels.resolve_kernels("auto")

    def refuse(*args, **kwargs):
        raise AssertionError("resolved again in forward")

    monkeypatch.setattr(kernels, "resolve_kernel", refuse)
    monkeypatch.setattr(kernels, "resolve_kernels", refuse)
    assert memory(torch.randn(3, DIM)).shape == (3, DIM)


@pytest.mark.parametrize("preset", ["memory_plus", "peer", "ultramem", "pkm_parallel"])
def test_presets_validate_and_build_the_tiny_model(preset):

    preset_yaml = OmegaConf.load(ROOT / "configs/memory" / f"{preset}.yaml")
    mem = OmegaConf.merge(OmegaConf.structured(MemoryConfig), preset_yaml)
    cfg = OmegaConf.to_object(
        OmegaConf.merge(
            OmegaConf.structured(ModelConfig), OmegaConf.load(ROOT / "configs/model/tiny.yaml"), {"vocab_size": 64}
        )
    )
    cfg.memory = OmegaConf.to_object(mem)
    cfg.validate()
    with torch.device("meta"):
        model = Transformer(cfg)
    assert list(model.memory_layers()) == cfg.memory.layers


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_memory_layer_costs_agree_with_the_models_flops_per_token(name):
    """metrics/flops.py's per-part count of a layer is what the model's 6 * N accounting charges:
    two models differing only in the memory layer differ by 6 * its multiply-adds per token."""
    from pkmlm.metrics.flops import memory_layer_costs

    args = {k: v for k, v in VARIANTS[name].items() if k != "v_dim"}
    memory = dict(layers=[1], n_keys=8, heads=2, knn=5, k_dim=6, **args)
    with_memory = Transformer(model_config(**memory))
    costs = memory_layer_costs(with_memory.memory_layers()[1])
    assert costs["macs"] == sum(costs[k] for k in ("query", "keys", "down", "read", "gate"))
    assert (costs["down"] > 0) == (args.get("values_kind") == "peer") and (costs["gate"] > 0) == ("gate" in args)
    dense = Transformer(model_config(layers=[], n_keys=8, heads=2, knn=5, k_dim=6))
    ffn = 2 * 16 * 64  # the FFN the memory replaces: D * 4D up and 4D * D down
    diff = with_memory.flops_per_token(8) - dense.flops_per_token(8)
    query_bias = 2 * 6  # biases and norm gains are in N but not in the layer's multiply-adds
    extra = (
        query_bias
        + (16 if "gate" in args else 0)
        + sum(p.numel() for n, p in with_memory.memory_layers()[1].named_parameters() if "norm" in n)
    )
    assert diff == 6 * (costs["macs"] + extra - ffn)
    assert costs["active_params"] - costs["params"] + costs["value_params"] == 2 * 5 * (
        16 + (16 if args.get("values_kind") == "peer" else 0)
    )
