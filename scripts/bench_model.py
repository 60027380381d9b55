"""Benchmark whole models: training and inference tokens/s and MFU, dense vs memory, in one run.

    .venv/bin/python scripts/bench_model.py                     # paper sizes on CUDA, the tiny family on CPU
    .venv/bin/python scripts/bench_model.py --compile both      # eager and torch.compile side by side

Models (the experiment families of configs/experiment/):
  paper (CUDA default): dense12, dense24 and mem12 (12 layers, the 512^2-value memory replacing the
      FFN of layer 6): d=1024, 16 heads, vocabulary 32,000, 32 x 512 tokens per step;
  tiny (CPU default): dense4, dense8 and mem4 (a 128^2-value memory at layer 2): d=256, 4 heads,
      vocabulary 8,192, 16 x 128 tokens per step (the default run's model and batch).

A training step is what `pkmlm-train` does per step on random tokens: forward under the loop's
precision (bf16 autocast on CUDA, fp32 on CPU), backward, gradient clipping, the optimizer from
`build_optimizer` (fused AdamW on CUDA; `--sparse-values` for lazy Adam on the values), zero_grad.
Inference is a forward of the same batch in eval mode under `torch.inference_mode()`. All models
of a table are resident together and timed in turns (one step each, round after round; medians), so
load from other processes hits them alike.
MFU = active FLOPs per token (`Transformer.flops_per_token`, training: 6N + attention; inference:
a third of it) x tokens/s / peak FLOP/s: the datasheet peak for the GPU at the matmul precision
(`pkmlm.metrics.flops`), or on CPU an fp32 matmul rate measured in this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import time
from typing import List, Optional

import torch
from benchlib import add_common_args, default, device_name, interleaved_ms, setup, sync  # first: finds src/

from pkmlm.metrics.flops import peak_flops
from pkmlm.model import ModelConfig, Transformer
from pkmlm.model.memory import MemoryConfig
from pkmlm.optim import OptimConfig, build_optimizer, clip_grad_norm_, use_sparse_value_grads

FAMILIES = {
    # configs/model/base12.yaml + configs/memory/paper.yaml + configs/experiment/paper/common.yaml
    "paper": dict(
        model=ModelConfig(vocab_size=32000, dim=1024, n_heads=16, max_seq_len=1024),
        memory=MemoryConfig(layers=[6], n_keys=512, heads=4, knn=32, k_dim=512, query_norm="batchnorm"),
        depths=(12, 24),
        batch=32,
        seq=512,
    ),
    # configs/model/tiny.yaml + configs/memory/tiny.yaml + the default data / batch
    "tiny": dict(
        model=ModelConfig(vocab_size=8192, dim=256, n_heads=4, max_seq_len=512),
        memory=MemoryConfig(layers=[2], n_keys=128, heads=4, knn=16, k_dim=128, query_norm="batchnorm"),
        depths=(4, 8),
        batch=16,
        seq=128,
    ),
}


def measured_matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The best of several timed square matmuls: a CPU's practical peak at this thread count."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


class Contender:
    """One model with its optimizer, ready to take training steps and inference forwards."""

    def __init__(self, cfg: ModelConfig, device, amp, batch, seq, compile_model, sparse_values):
        torch.manual_seed(0)
        self.device, self.amp = device, amp
        self.model = Transformer(cfg).to(device)
        if sparse_values:
            use_sparse_value_grads(self.model)
        self.optimizer = build_optimizer(self.model, OptimConfig(sparse_values=sparse_values), device)
        self.step_fn = torch.compile(self.model) if compile_model else self.model
        data = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
        self.inputs, self.targets = data[:, :-1], data[:, 1:]
        self.tokens = batch * seq
        self.flops = self.model.flops_per_token(seq)
        self.params = self.model.count_parameters()

    def train_step(self) -> None:
        self.model.train()
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            _, loss = self.step_fn(self.inputs, self.targets)
        loss.backward()
        clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def infer(self) -> None:
        self.model.eval()
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            self.step_fn(self.inputs)


def interleaved_s(fns, device, warmup: int, steps: int) -> List[float]:
    """Median seconds per call of each function, timed in turns (wall clock up to the device's
    synchronisation: a step's host overhead counts, as it does in training)."""
    return [ms / 1e3 for ms in interleaved_ms(fns, device, warmup, steps, events=False)]


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, "steps")
    parser.add_argument("--family", default=None, choices=sorted(FAMILIES), help="default: paper on CUDA, tiny on CPU")
    parser.add_argument(
        "--compile",
        default=None,
        choices=["off", "on", "both"],
        help="torch.compile the models (default: both on CUDA, off on CPU)",
    )
    parser.add_argument(
        "--kernels",
        default=None,
        help="memory variants, comma-separated kernel:values_dtype (default CUDA: "
        "torch:float32,triton:float32,triton:bfloat16; CPU: torch:float32)",
    )
    parser.add_argument("--sparse-values", action="store_true", help="optim.sparse_values=true for the memory models")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: the family's)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 CUDA, 5 CPU)")
    args = parser.parse_args(argv)
    device = setup(args, "bench_model")
    cuda = device.type == "cuda"
    family_name = args.family or ("paper" if cuda else "tiny")
    family = FAMILIES[family_name]
    batch, seq = args.batch or family["batch"], family["seq"]
    steps = default(args.steps, device, 20, 5)
    warmup = default(args.warmup, device, 5, 2)
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile or ("both" if cuda else "off")]
    variants = [
        v.split(":")
        for v in (args.kernels or ("torch:float32,triton:float32,triton:bfloat16" if cuda else "torch:float32")).split(
            ","
        )
    ]
    amp = torch.bfloat16 if cuda else None
    peak = peak_flops(device, amp)
    peak_note = "datasheet peak, bf16" if peak else None
    if peak is None:
        peak = measured_matmul_flops(device, torch.float32)
        peak_note = f"fp32 matmul measured in this run, {peak / 1e9:,.0f} GFLOP/s"

    print(
        f"# bench_model | {datetime.date.today()} | device {device.type}: {device_name(device)} | "
        f"torch {torch.__version__}"
    )
    print(
        f"family {family_name}: d={family['model'].dim}, {family['model'].n_heads} heads, vocab "
        f"{family['model'].vocab_size:,}, {batch} x {seq} tokens per step; {'bf16 autocast' if amp else 'fp32'}; "
        f"{warmup} warm-up + {steps} timed steps; MFU against {peak_note}\n"
    )
    print(
        "| model | compile | memory kernel | values | params (active) | train tok/s | train MFU | "
        "inference tok/s | inference MFU |"
    )
    print("|---|---|---|---|---|---|---|---|---|")

    shallow, deep = family["depths"]
    runs = [(f"dense{shallow}", shallow, None), (f"dense{deep}", deep, None)]
    runs += [(f"mem{shallow}", shallow, (k, d)) for k, d in variants]
    results = {}
    for compile_model in compiles:
        contenders = []
        for label, depth, variant in runs:
            memory = (
                MemoryConfig(layers=[])
                if variant is None
                else dataclasses.replace(family["memory"], kernel=variant[0], values_dtype=variant[1])
            )
            cfg = dataclasses.replace(family["model"], n_layers=depth, memory=memory)
            contenders.append(
                Contender(cfg, device, amp, batch, seq, compile_model, args.sparse_values and variant is not None)
            )
        train_s = interleaved_s([c.train_step for c in contenders], device, warmup, steps)
        infer_s = interleaved_s([c.infer for c in contenders], device, warmup, steps)
        peak_mem = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None
        for (label, _, variant), c, t_train, t_infer in zip(runs, contenders, train_s, infer_s):
            r = dict(train=c.tokens / t_train, infer=c.tokens / t_infer)
            results[(label, compile_model, tuple(variant or ()))] = r
            train_mfu = c.flops * r["train"] / peak
            infer_mfu = c.flops / 3 * r["infer"] / peak
            kernel, values = variant or ("", "")
            print(
                f"| {label} | {'yes' if compile_model else 'no'} | {kernel} | {values} | "
                f"{c.params['total'] / 1e6:,.0f}M ({c.params['active'] / 1e6:,.0f}M) | {r['train']:,.0f} | "
                f"{train_mfu:.2f} | {r['infer']:,.0f} | {infer_mfu:.2f} |",
                flush=True,
            )
        if cuda:
            print(
                f"\n(peak GPU memory with these {len(contenders)} models and their optimizers resident: "
                f"{peak_mem:.1f} GB)\n"
            )
        del contenders
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    print(f"\nmemory model vs dense{deep} (the paper's claim: as good, about twice as fast):\n")
    print("| compile | memory kernel | values | train speed-up | inference speed-up |")
    print("|---|---|---|---|---|")
    for compile_model in compiles:
        base = results[(f"dense{deep}", compile_model, ())]
        for k, d in variants:
            r = results[(f"mem{shallow}", compile_model, (k, d))]
            print(
                f"| {'yes' if compile_model else 'no'} | {k} | {d} | {r['train'] / base['train']:.2f}x | "
                f"{r['infer'] / base['infer']:.2f}x |"
            )


if __name__ == "__main__":
    main()
