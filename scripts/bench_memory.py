"""Benchmark the product-key memory layer against the FFN it replaces, on CPU or CUDA, in one run.

    .venv/bin/python scripts/bench_memory.py                 # paper sizes on CUDA, the tiny preset on CPU
    .venv/bin/python scripts/bench_memory.py --preset paper  # force a preset

Prints markdown tables (all measured in this run, medians over --repeats):

1. value read only: `out[n] = sum_r w[n, r] * values[idx[n, r]]`, N tokens x R = heads*knn rows,
   for each path and value dtype: forward, forward+backward, and the forward's read rate in GB/s
   (gathered row bytes / time) against a device-to-device copy of the table (bytes read + written);
2. retrieval only (query -> softmax weights and slot ids): the straightforward per-head formulation
   with all knn^2 candidates vs pkmlm's (K ln K eligible candidates), and the bytes of candidates;
3. whole layer (query network, retrieval, read), forward and forward+backward, against the FFN
   d -> 4d -> d it replaces and a faithful straightforward formulation (XLM's HashingMemory: per-head
   sub-key top-k, k^2 candidate sums, `nn.EmbeddingBag` with per-sample weights);
4. each memory variant's whole layer at the preset's sizes (configs/memory/*.yaml: pkm, Memory+,
   PEER, UltraMem-style), with its multiply-adds per token (`pkmlm.metrics.flops.memory_layer_costs`),
   forward and forward+backward (UltraMem-style: its balance loss included) against the FFN;
5. the value table's optimizer step: AdamW over the whole table (fused on CUDA) vs the lazy Adam of
   `optim.sparse_values` over the rows one step reads.

CUDA runs under bf16 autocast (as training does), CPU in fp32. The contenders of a table are timed
in turns (A, B, C, A, B, C, ...), so load from other processes hits them alike. Forward-only rows run under
`torch.no_grad()`; forward+backward rows take fresh gradients each time (as a training step).
Slot ids for the read-only and update rows are uniform random (a well-spread memory); the layer
rows use the layer's own lookup.
"""

from __future__ import annotations

import argparse
import datetime
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from benchlib import add_common_args, default, device_name, interleaved_ms, setup, sync  # first: finds src/
from torch import Tensor, nn

from pkmlm.metrics.flops import memory_layer_costs
from pkmlm.model import ProductKeyMemory, kernels
from pkmlm.model.kernels import reference
from pkmlm.model.memory import eligible_rank_pairs
from pkmlm.optim import LazyAdam


@dataclass
class Preset:
    tokens: int
    dim: int
    n_keys: int
    heads: int
    knn: int
    k_dim: int
    note: str


PRESETS = {
    # H100 reference (docs/benchmarks.md): 16,384 tokens (32 x 512), d=1024, 512^2 values, 4 heads, knn 32, k_dim 512
    "paper": Preset(16384, 1024, 512, 4, 32, 512, "the paper's layer (Lample et al. 2019, section 4.2)"),
    # the CPU default run's memory (configs/memory/tiny.yaml) on one batch of 16 x 128 tokens
    "tiny": Preset(2048, 256, 128, 4, 16, 128, "the default CPU run's layer (configs/memory/tiny.yaml)"),
}


# Each variant's layer as its preset configures it (configs/memory/<name>.yaml), at the bench's sizes.
VARIANTS = {
    "pkm (memory=tiny: the 2019 layer)": dict(query_norm="batchnorm"),
    "Memory+ (memory=memory_plus: silu gate, qk_norm)": dict(query_norm="none", qk_norm=True, gate="silu"),
    "PEER (memory=peer: gelu experts)": dict(query_norm="batchnorm", values_kind="peer"),
    "UltraMem-style (memory=ultramem: qk_norm, PEER values, balance loss)": dict(
        query_norm="none", qk_norm=True, values_kind="peer", balance_loss=0.01
    ),
}


# --- the straightforward formulation (XLM), for comparison -------------------------------------------


class StraightforwardPKM(nn.Module):
    """XLM's HashingMemory forward (facebookresearch/XLM `xlm/model/memory/memory.py`, product keys),
    written as the paper's code runs it, on the parameters of a `ProductKeyMemory` (shared, so the two
    compute the same function):

        query = BatchNorm(Linear(x))                                      (N, H*Q)
        per head h: s1, s2 = q1 . keys[h, 0], q2 . keys[h, 1]             (N, S) each
                    top-k of each; all k*k sums and their slot ids        (N, k*k)
                    top-k of the sums                                     (N, k)
        weights = softmax(scores.float()).type_as(scores)
        out = nn.EmbeddingBag(mode="sum")(ids (N, H*k), per_sample_weights=weights)
    """

    def __init__(self, pkm: ProductKeyMemory):
        super().__init__()
        self.pkm = pkm
        self.heads, self.knn, self.k_dim, self.n_keys = pkm.heads, pkm.knn, pkm.k_dim, pkm.n_keys

    def lookup(self, x: Tensor):
        pkm, H, K, half = self.pkm, self.heads, self.knn, self.k_dim // 2
        q = pkm.query_proj(x.reshape(-1, pkm.dim))
        if pkm.query_norm_layer is not None:
            q = pkm.query_norm_layer(q)
        q = q.view(-1, H, self.k_dim)
        N = q.shape[0]
        all_scores, all_ids = [], []
        for h in range(H):  # XLM's get_indices: one head at a time
            s1 = F.linear(q[:, h, :half], pkm.keys[h, 0])  # (N, S)
            s2 = F.linear(q[:, h, half:], pkm.keys[h, 1])
            s1, i1 = s1.topk(K, dim=1, largest=True, sorted=True)
            s2, i2 = s2.topk(K, dim=1, largest=True, sorted=True)
            cand = (s1.view(N, K, 1).expand(N, K, K) + s2.view(N, 1, K).expand(N, K, K)).reshape(N, -1)
            ids = (i1.view(N, K, 1).expand(N, K, K) * self.n_keys + i2.view(N, 1, K).expand(N, K, K)).reshape(N, -1)
            scores, best = cand.topk(K, dim=1, largest=True, sorted=True)
            all_scores.append(scores)
            all_ids.append(ids.gather(1, best))
        scores = torch.stack(all_scores, 1)  # (N, H, K)
        weights = F.softmax(scores.float(), dim=-1).type_as(scores)
        return weights, torch.stack(all_ids, 1)

    def forward(self, x: Tensor) -> Tensor:
        weights, ids = self.lookup(x)
        N = ids.shape[0]
        table = self.pkm.values
        out = table(ids.view(N, -1), per_sample_weights=weights.view(N, -1).to(table.weight.dtype))
        return out.view(*x.shape[:-1], -1)


class FFN(nn.Module):
    """What the memory replaces: d -> 4d -> d with GELU (pkmlm.model.transformer.FeedForward)."""

    def __init__(self, dim: int):
        super().__init__()
        self.up, self.down = nn.Linear(dim, 4 * dim, bias=False), nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


# --- the benchmark ------------------------------------------------------------------------------------


def fmt(value: Optional[float], digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def copy_gbps(device: torch.device, nbytes: int, warmup: int, repeats: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = interleaved_ms([lambda: dst.copy_(src)], device, warmup, repeats)[0]
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9  # bytes read + written


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, "repetitions")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: paper on CUDA, tiny on CPU")
    parser.add_argument("--tokens", type=int, default=None, help="override the preset's token count")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 20 CUDA, 7 CPU)")
    args = parser.parse_args(argv)
    device = setup(args, "bench_memory")
    preset = PRESETS[args.preset or ("paper" if device.type == "cuda" else "tiny")]
    N = args.tokens or preset.tokens
    repeats = default(args.repeats, device, 20, 7)
    warmup = default(args.warmup, device, 5, 2)
    amp = torch.bfloat16 if device.type == "cuda" else None
    triton_ok = device.type == "cuda" and kernels.triton_available()
    H, K, V, M = preset.heads, preset.knn, preset.dim, preset.n_keys**2
    R = H * K
    torch.manual_seed(0)

    print(
        f"# bench_memory | {datetime.date.today()} | device {device.type}: {device_name(device)} | "
        f"torch {torch.__version__}"
        + (f" | triton {__import__('triton').__version__}" if triton_ok else " | triton path: needs CUDA")
    )
    print(
        f"preset {args.preset or ('paper' if device.type == 'cuda' else 'tiny')} ({preset.note}): {N:,} tokens, "
        f"d={V}, {preset.n_keys}^2 = {M:,} values, {H} heads, knn {K}, k_dim {preset.k_dim} -> {R} rows per token; "
        f"{'bf16 autocast' if amp else 'fp32'}; median of {repeats} after {warmup} warm-up\n"
    )

    def autocast():
        return torch.autocast(device.type, dtype=amp, enabled=amp is not None)

    copy_rate = copy_gbps(device, M * V * 4, warmup, repeats)

    # 1. value read only -------------------------------------------------------------------------
    print("## value read only (gather + weighted sum)\n")
    print(f"| path | values | fwd ms | fwd+bwd ms | fwd read GB/s | of copy ({copy_rate:,.0f} GB/s) |")
    print("|---|---|---|---|---|---|")
    indices = torch.randint(0, M, (N, R), device=device)
    weights = torch.softmax(torch.randn(N, H, K, device=device), -1).view(N, R)
    grad_out = torch.randn(N, V, device=device)
    read_rows = []
    read_rows.append(("torch: embedding_bag", torch.float32, reference.read_torch))
    if device.type == "cuda":
        read_rows.append(("torch: gather + bmm (bf16 fallback)", torch.bfloat16, reference.read_gather_matmul))
    if triton_ok:
        for dtype in (torch.float32, torch.bfloat16):
            read_rows.append(("triton", dtype, lambda v, i, w: kernels.read(v, i, w, kernel="triton")))
    fwd_fns, step_fns, sizes = [], [], []
    for label, dtype, fn in read_rows:
        table = (torch.randn(M, V, device=device) * V**-0.5).to(dtype).requires_grad_()
        w = weights.clone().requires_grad_()
        g = grad_out.to(dtype)

        def forward(fn=fn, table=table, w=w):
            with torch.no_grad():
                fn(table, indices, w)

        def step(fn=fn, table=table, w=w, g=g):
            table.grad = w.grad = None
            fn(table, indices, w).backward(g)

        fwd_fns.append(forward)
        step_fns.append(step)
        sizes.append(table.element_size())
    fwd_ms = interleaved_ms(fwd_fns, device, warmup, repeats)
    both_ms = interleaved_ms(step_fns, device, warmup, repeats)
    for (label, dtype, _), fwd, both, size in zip(read_rows, fwd_ms, both_ms, sizes):
        gbps = N * R * V * size / (fwd * 1e-3) / 1e9
        print(
            f"| {label} | {str(dtype).replace('torch.', '')} | {fwd:.2f} | {both:.2f} | {gbps:,.0f} | "
            f"{gbps / copy_rate:.0%} |"
        )
    del fwd_fns, step_fns
    if not triton_ok:
        print("| triton | float32, bfloat16 | needs CUDA | | | |")

    # 2. retrieval only ---------------------------------------------------------------------------
    pkm = ProductKeyMemory(V, n_keys=preset.n_keys, heads=H, knn=K, k_dim=preset.k_dim, kernel="torch").to(device)
    straight = StraightforwardPKM(pkm)
    x = torch.randn(N, V, device=device)
    pkm.eval()
    with torch.no_grad():  # both formulations compute the same function (eval: running BatchNorm stats)
        w_a, i_a = pkm.lookup(x[:256])
        w_b, i_b = straight.lookup(x[:256])
        assert torch.equal(i_a.sort(-1).values, i_b.sort(-1).values), "formulations disagree on the slots"
        torch.testing.assert_close(w_a.float(), w_b.float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pkm(x[:256]), straight(x[:256]), rtol=1e-4, atol=1e-5)
    pkm.train()
    x.requires_grad_(True)
    C = len(eligible_rank_pairs(K)[0])
    print("\n## retrieval only (query network, product-key top-k, softmax)\n")
    print("| formulation | candidates per head | candidate bytes | fwd ms | fwd+bwd ms | fwd+bwd peak extra MB |")
    print("|---|---|---|---|---|---|")
    lookups = (
        ("straightforward (XLM, per head, all k^2)", straight.lookup, K * K, 2 if amp else 4),
        ("pkmlm (batched heads, eligible pairs)", pkm.lookup, C, 4),
    )  # pkmlm ranks in fp32

    def lookup_forward(fn):
        with torch.no_grad(), autocast():
            fn(x)

    def lookup_step(fn):
        pkm.zero_grad(set_to_none=True)
        x.grad = None
        with autocast():
            w, _ = fn(x)
        w.float().sum().backward()

    fwd_ms = interleaved_ms([lambda fn=fn: lookup_forward(fn) for _, fn, _, _ in lookups], device, warmup, repeats)
    both_ms = interleaved_ms([lambda fn=fn: lookup_step(fn) for _, fn, _, _ in lookups], device, warmup, repeats)
    for (label, fn, cands, size), fwd, both in zip(lookups, fwd_ms, both_ms):
        peak = None  # allocator high-water mark above what is resident before the step (CUDA only)
        if device.type == "cuda":
            sync(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            lookup_step(fn)
            sync(device)
            peak = (torch.cuda.max_memory_allocated(device) - base) / 1e6
        print(
            f"| {label} | {cands} | {N * H * cands * size / 1e6:,.1f} MB | {fwd:.2f} | {both:.2f} | "
            f"{fmt(peak, 0) if peak is not None else 'n/a (CUDA only)'} |"
        )

    # 3. whole layer -----------------------------------------------------------------------------
    print("\n## whole layer (fwd+bwd includes the gradients of the input and of every parameter)\n")
    print("| layer | values | fwd ms | fwd+bwd ms | fwd+bwd / FFN |")
    print("|---|---|---|---|---|")
    layers = [
        ("FFN d->4d->d (what the memory replaces)", None, FFN(V).to(device)),
        ("straightforward (XLM: per-head top-k, EmbeddingBag)", torch.float32, straight),
        ("pkmlm, kernel=torch", torch.float32, pkm),
    ]
    if device.type == "cuda":
        layers.append(("pkmlm, kernel=torch", torch.bfloat16, None))
    if triton_ok:
        layers += [("pkmlm, kernel=triton", torch.float32, None), ("pkmlm, kernel=triton", torch.bfloat16, None)]
    modules = []
    for label, dtype, module in layers:
        if module is None:
            module = ProductKeyMemory(
                V,
                n_keys=preset.n_keys,
                heads=H,
                knn=K,
                k_dim=preset.k_dim,
                kernel="triton" if "triton" in label else "torch",
                values_dtype=str(dtype).replace("torch.", ""),
            ).to(device)
        modules.append(module)
    g = torch.randn(N, V, device=device)

    def layer_forward(module):
        with torch.no_grad(), autocast():
            module(x)

    def layer_step(module):
        module.zero_grad(set_to_none=True)
        x.grad = None
        with autocast():
            out = module(x)
        out.backward(g.to(out.dtype))

    fwd_ms = interleaved_ms([lambda m=m: layer_forward(m) for m in modules], device, warmup, repeats)
    both_ms = interleaved_ms([lambda m=m: layer_step(m) for m in modules], device, warmup, repeats)
    for (label, dtype, _), fwd, both in zip(layers, fwd_ms, both_ms):
        values = "" if dtype is None else str(dtype).replace("torch.", "")
        print(f"| {label} | {values} | {fwd:.2f} | {both:.2f} | {both / both_ms[0]:.1f}x |")
    del modules

    # 4. the variants' layers ---------------------------------------------------------------------
    print(
        "\n## memory variants, whole layer (options as in configs/memory/<name>.yaml, sizes as above; kernel=torch; "
        "fwd+bwd includes the balance loss where on)\n"
    )
    print("| variant | MFLOP/token fwd | params | fwd ms | fwd+bwd ms | fwd+bwd / FFN |")
    print("|---|---|---|---|---|---|")
    ffn = FFN(V).to(device)
    variants = [ffn] + [
        ProductKeyMemory(V, n_keys=preset.n_keys, heads=H, knn=K, k_dim=preset.k_dim, kernel="torch", **kwargs).to(
            device
        )
        for kwargs in VARIANTS.values()
    ]

    def variant_step(module):
        module.zero_grad(set_to_none=True)
        x.grad = None
        with autocast():
            if isinstance(module, ProductKeyMemory):
                out, aux = module(x, return_aux=True)
            else:
                out, aux = module(x), 0.0
        ((out * g.to(out.dtype)).sum() + aux).backward()

    fwd_ms = interleaved_ms([lambda m=m: layer_forward(m) for m in variants], device, warmup, repeats)
    both_ms = interleaved_ms([lambda m=m: variant_step(m) for m in variants], device, warmup, repeats)
    labels = ["FFN d->4d->d", *VARIANTS]
    for label, module, fwd, both in zip(labels, variants, fwd_ms, both_ms):
        if isinstance(module, ProductKeyMemory):
            macs, params = memory_layer_costs(module)["macs"], sum(p.numel() for p in module.parameters())
        else:
            macs = params = sum(p.numel() for p in module.parameters())  # a dense layer: one MAC per weight
        print(f"| {label} | {2 * macs / 1e6:.2f} | {params:,} | {fwd:.2f} | {both:.2f} | {both / both_ms[0]:.1f}x |")
    del variants

    # 5. the value table's update ------------------------------------------------------------------
    print("\n## value table update (one optimizer step)\n")
    print("| optimizer | values | rows updated | ms |")
    print("|---|---|---|---|")
    touched = indices.flatten().unique()
    updates = [("AdamW" + (" (fused)" if device.type == "cuda" else ""), torch.float32, None)]
    updates.append(("lazy Adam (optim.sparse_values), torch", torch.float32, False))
    if triton_ok:
        updates += [
            ("lazy Adam (optim.sparse_values), triton", torch.float32, True),
            ("AdamW (fused)", torch.bfloat16, None),
            ("lazy Adam (optim.sparse_values), triton", torch.bfloat16, True),
        ]
    steps, rows_updated = [], []
    for label, dtype, use_triton in updates:
        table = nn.Parameter((torch.randn(M, V, device=device) * V**-0.5).to(dtype))
        if use_triton is None:
            opt = torch.optim.AdamW([table], lr=1e-3, weight_decay=0.0, fused=device.type == "cuda")
            table.grad = torch.randn_like(table)
            rows_updated.append(M)
        else:
            opt = LazyAdam([table], lr=1e-3, use_triton=use_triton)
            table.grad = torch.sparse_coo_tensor(
                touched[None],
                torch.randn(len(touched), V, device=device, dtype=dtype),
                (M, V),
                is_coalesced=True,
                check_invariants=False,
            )
            rows_updated.append(len(touched))
        steps.append(opt.step)
    for (label, dtype, _), rows, ms in zip(updates, rows_updated, interleaved_ms(steps, device, warmup, repeats)):
        print(f"| {label} | {str(dtype).replace('torch.', '')} | {rows:,} of {M:,} | {ms:.2f} |")
    del steps
    print(f"\nrows read by one step of {N:,} tokens: {len(touched):,} of {M:,} ({len(touched) / M:.0%})")


if __name__ == "__main__":
    main()
