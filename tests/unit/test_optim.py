"""Value-table optimisation options (`optim.values_schedule`, `optim.values_grad_clip`): a constant
values LR through warmup and decay, and a separate clip that bounds the values' gradient norm,
for dense and sparse value gradients, and both through the training loop."""

from __future__ import annotations

import pytest
import torch

from pkmlm.config import register_configs
from pkmlm.model import ModelConfig, Transformer
from pkmlm.model.memory import MemoryConfig
from pkmlm.optim import (
    OptimConfig,
    build_optimizer,
    clip_gradients_,
    lr_factor,
    set_lr,
    use_sparse_value_grads,
    value_parameters,
)

register_configs()


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    memory = MemoryConfig(layers=[1], n_keys=8, heads=2, knn=4, k_dim=8, query_norm="layernorm")
    return Transformer(ModelConfig(vocab_size=64, n_layers=2, dim=16, n_heads=2, max_seq_len=16, memory=memory))


@pytest.mark.parametrize("values_schedule", ["follow", "constant"])
def test_values_lr_is_constant_through_warmup_and_decay_or_follows_the_schedule(values_schedule):
    cfg = OptimConfig(
        lr=3e-3, values_lr=1e-3, warmup_steps=5, schedule="cosine", min_lr_ratio=0.1, values_schedule=values_schedule
    )
    optimizer = build_optimizer(_model(), cfg, torch.device("cpu"))
    for step in range(40):  # warmup (0..4), cosine decay (5..29), the floor after max_steps=30
        set_lr(optimizer, step, 30, cfg)
        groups = {g["name"]: g["lr"] for g in optimizer.param_groups}
        factor = lr_factor(step, 30, cfg)
        assert groups["decay"] == groups["no_decay"] == pytest.approx(3e-3 * factor)
        expected = 1e-3 if values_schedule == "constant" else 1e-3 * factor
        assert groups["memory_values"] == pytest.approx(expected, rel=1e-12)
    assert lr_factor(0, 30, cfg) == pytest.approx(0.2) and lr_factor(29, 30, cfg) < 0.2  # the schedule moved


@pytest.mark.parametrize("sparse", [False, True])
def test_values_grad_clip_bounds_the_values_norm_apart_from_the_rest(sparse):
    model = _model(1)
    if sparse:
        use_sparse_value_grads(model)
    ids = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(0))
    _, loss = model(ids[:, :-1], ids[:, 1:])
    (loss * 1000).backward()  # large gradients, so that both clips act
    values = value_parameters(model)
    rest = [p for p in model.parameters() if all(p is not v for v in values)]

    def norm(params):
        grads = [p.grad.coalesce().values() if p.grad.is_sparse else p.grad for p in params]
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()

    values_before, rest_before = norm(values), norm(rest)
    cfg = OptimConfig(grad_clip=1.0, values_grad_clip=0.05)
    grad_norm, values_norm = clip_gradients_(list(model.parameters()), values, cfg)
    assert values_norm.item() == pytest.approx(values_before, rel=1e-5) and values_before > 0.05
    assert grad_norm.item() == pytest.approx(rest_before, rel=1e-5) and rest_before > 1.0
    assert norm(values) == pytest.approx(0.05, rel=1e-4)  # bounded by its own clip
    assert norm(rest) == pytest.approx(1.0, rel=1e-4)  # the rest by optim.grad_clip, values not counted
    # values_grad_clip=0: one clip over everything, as before
    model.zero_grad()
    _, loss = model(ids[:, :-1], ids[:, 1:])
    (loss * 1000).backward()
    together, none = clip_gradients_(list(model.parameters()), values, OptimConfig(grad_clip=1.0))
    assert none is None and norm(list(model.parameters())) == pytest.approx(1.0, rel=1e-4)
