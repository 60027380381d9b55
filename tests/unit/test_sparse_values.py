"""Row-sparse value updates (`optim.sparse_values=true`): lazy Adam against AdamW where the two must
agree, untouched rows left alone, clipping of sparse gradients, one optimizer state for checkpoints,
and bitwise resume through the loop. (The triton row kernel against the torch formulation is in
tests/e2e/test_kernels.py, which imports torch and triton only and so runs on a bare GPU machine.)"""

from __future__ import annotations

import pytest
import torch

from pkmlm.config import OptimConfig, register_configs
from pkmlm.model import ModelConfig, Transformer
from pkmlm.model.memory import MemoryConfig
from pkmlm.optim import LazyAdam, SparseValuesAdamW, clip_grad_norm_, use_sparse_value_grads
from pkmlm.optim import build_optimizer as _build_optimizer

register_configs()
BETAS, EPS = (0.9, 0.95), 1e-8


def _sparse_rows(rows: list[int], grads: torch.Tensor, shape) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor([rows]), grads, shape, check_invariants=True).coalesce()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lazy_adam_equals_adamw_when_every_row_is_read_every_step(weight_decay):
    torch.manual_seed(0)
    dense = torch.nn.Parameter(torch.randn(6, 5))
    lazy = torch.nn.Parameter(dense.detach().clone())
    adamw = torch.optim.AdamW([dense], lr=1e-2, betas=BETAS, eps=EPS, weight_decay=weight_decay)
    lazy_adam = LazyAdam([lazy], lr=1e-2, betas=BETAS, eps=EPS, weight_decay=weight_decay, use_triton=False)
    for step in range(5):
        grad = torch.randn(6, 5)
        for opt in (adamw, lazy_adam):
            opt.param_groups[0]["lr"] = 1e-2 * (step + 1) / 5  # a schedule changes lr between steps
        dense.grad = grad.clone()
        # every row, listed out of order and one row split in two duplicate entries (uncoalesced)
        rows = [3, 0, 5, 1, 2, 4, 2]
        values = torch.cat([grad[[3, 0, 5, 1]], grad[2:3] * 0.25, grad[4:5], grad[2:3] * 0.75])
        lazy.grad = torch.sparse_coo_tensor(torch.tensor([rows]), values, (6, 5), check_invariants=True)
        adamw.step()
        lazy_adam.step()
        torch.testing.assert_close(lazy, dense, rtol=1e-6, atol=1e-7)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(lazy_adam.state[lazy][key], adamw.state[dense][key], rtol=1e-6, atol=1e-9)


def test_lazy_adam_leaves_unread_rows_and_their_moments_alone():
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(8, 4))
    opt = LazyAdam([p], lr=0.1, betas=BETAS, use_triton=False)
    p.grad = _sparse_rows([0, 1, 2, 3, 4, 5, 6, 7], torch.randn(8, 4), (8, 4))
    opt.step()  # every row gets moments
    before = p.detach().clone()
    moments = {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    p.grad = _sparse_rows([1, 6], torch.randn(2, 4), (8, 4))
    opt.step()
    untouched = torch.tensor([0, 2, 3, 4, 5, 7])
    assert torch.equal(p.detach()[untouched], before[untouched])
    for k, m in moments.items():
        assert torch.equal(opt.state[p][k][untouched], m[untouched])
        assert not torch.equal(opt.state[p][k][[1, 6]], m[[1, 6]])
    assert not torch.equal(p.detach()[[1, 6]], before[[1, 6]])
    assert opt.state[p]["step"].item() == 2


def test_lazy_adam_refuses_dense_gradients():
    p = torch.nn.Parameter(torch.randn(3, 2))
    p.grad = torch.randn(3, 2)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        LazyAdam([p]).step()


def test_clip_grad_norm_with_sparse_gradients_equals_dense_clipping():
    torch.manual_seed(3)
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(10, 3))
    a_dense, b_dense = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
    grad_a, rows = torch.randn(4, 3), torch.tensor([[7, 2, 7, 0]])  # row 7 twice: uncoalesced
    grad_rows = torch.randn(4, 3)
    a.grad, a_dense.grad = grad_a.clone(), grad_a.clone()
    b.grad = torch.sparse_coo_tensor(rows, grad_rows, (10, 3), check_invariants=True)
    b_dense.grad = b.grad.to_dense()
    norm = clip_grad_norm_([a, b], 0.5)
    ref_norm = torch.nn.utils.clip_grad_norm_([a_dense, b_dense], 0.5)
    torch.testing.assert_close(norm, ref_norm)
    assert ref_norm > 0.5  # so it really clipped
    torch.testing.assert_close(a.grad, a_dense.grad)
    torch.testing.assert_close(b.grad.to_dense(), b_dense.grad)
    assert b.grad.is_sparse and b.grad.is_coalesced()


def build_optimizer(model, cfg: OptimConfig, device):
    """As the training set-up does: sparse value gradients switched on beside the sparse optimizer."""
    if cfg.sparse_values:
        use_sparse_value_grads(model)
    return _build_optimizer(model, cfg, device)


def set_lr(optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor


def _tiny_model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    memory = MemoryConfig(layers=[1], n_keys=4, heads=2, knn=3, k_dim=8, query_norm="layernorm")
    return Transformer(ModelConfig(vocab_size=50, n_layers=2, dim=16, n_heads=2, max_seq_len=16, memory=memory))


def _steps(model, optimizer, batches):
    for factor, batch in batches:
        set_lr(optimizer, factor)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_sparse_values_optimizer_state_round_trips():
    torch.manual_seed(4)
    batches = [(f, torch.randint(0, 50, (3, 9))) for f in (0.5, 1.0, 0.8, 0.6, 0.3)]
    cfg = OptimConfig(sparse_values=True, lr=1e-2, values_lr=1e-2)
    straight = _tiny_model(0)
    opt = build_optimizer(straight, cfg, torch.device("cpu"))
    assert isinstance(opt, SparseValuesAdamW)
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay", "memory_values"]
    assert all(m.sparse_grad for m in straight.memory_layers().values())
    _steps(straight, opt, batches)

    first = _tiny_model(0)
    opt_first = build_optimizer(first, cfg, torch.device("cpu"))
    _steps(first, opt_first, batches[:2])
    state = {"model": first.state_dict(), "optimizer": opt_first.state_dict()}
    resumed = _tiny_model(1)  # other init: everything must come from the state
    opt_resumed = build_optimizer(resumed, cfg, torch.device("cpu"))
    resumed.load_state_dict(state["model"])
    opt_resumed.load_state_dict(state["optimizer"])
    _steps(resumed, opt_resumed, batches[2:])
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="sparse-values"):
        opt_resumed.load_state_dict(torch.optim.AdamW(straight.parameters()).state_dict())


def test_sparse_and_dense_value_updates_agree_on_a_first_step():
    """Through the model: on the first step the moments start at zero, so a row nobody read has a
    zero update under AdamW too, and every parameter must agree (the values' gradients come from
    the sparse and the dense embedding_bag backward)."""
    model_dense, model_sparse = _tiny_model(5), _tiny_model(5)
    batch = [(1.0, torch.randint(0, 50, (3, 9)))]
    cfg = dict(lr=1e-2, values_lr=1e-2, weight_decay=0.0)
    _steps(model_dense, build_optimizer(model_dense, OptimConfig(**cfg), torch.device("cpu")), batch)
    _steps(
        model_sparse, build_optimizer(model_sparse, OptimConfig(sparse_values=True, **cfg), torch.device("cpu")), batch
    )
    for (name, p), q in zip(model_dense.named_parameters(), model_sparse.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("sparse_values", [False, True])
def test_optimizer_is_fused_adamw_on_cuda_only(sparse_values):
    """The training optimizer (`build_optimizer`, also bench_model's) is torch's fused AdamW on CUDA,
    the default implementation elsewhere; with sparse values, for the dense groups."""
    memory = MemoryConfig(layers=[0], n_keys=8, heads=2, knn=4, k_dim=8)
    model = Transformer(ModelConfig(vocab_size=64, n_layers=2, dim=32, n_heads=2, memory=memory))
    cfg = OptimConfig(sparse_values=sparse_values)
    for device, fused in ((torch.device("cuda"), True), (torch.device("cpu"), False)):
        opt = build_optimizer(model, cfg, device)  # the model stays on the CPU: only the choice is checked
        adamw = opt.dense if sparse_values else opt
        assert isinstance(adamw, torch.optim.AdamW) and bool(adamw.defaults["fused"]) is fused, device
        assert {g["name"] for g in opt.param_groups} == {"decay", "no_decay", "memory_values"}
