"""Where the memory's CPU time goes (issue 21): the memory step against the dense step it replaces.

    .venv/bin/python scripts/bench_step.py                         # print the three tables
    .venv/bin/python scripts/bench_step.py --results docs/results  # also write memory_step.json and
                                                                   # memory_step_parts.json there

Prints markdown tables, all measured in this run with the contenders timed in turns (A, B, A, B, ...;
medians), on the CPU in fp32:

1. ratios against their targets:
   - the knowledge family's training step (experiment=knowledge/dense vs the same model with
     layer 1's FFN replaced by a 128^2-slot memory, 4 heads, knn 16, k_dim 64): forward, backward,
     gradient clipping, AdamW, zero_grad, on 32 x 128 random tokens; target <= 1.15x, 1 thread;
   - the default run's memory layer (configs/memory/tiny.yaml at d=256, one batch of 16 x 128
     tokens) forward+backward against the FFN d -> 4d -> d it replaces; target <= 1.0x, 1 and 2
     threads;
   each memory contender four times, with the layer's top-k (`model.memory.topk_impl=auto`: the C++
   search where it builds), with torch.topk (`topk_impl=torch`, the retrieval before it), with
   the layer's top-k and the fused C++ read backward (`model.memory.read_impl=cpp`, opt-in), and
   with both CPU opt-ins (`read_impl=cpp` and the sparse score backward, `scores_backward=sparse`);
2. the knowledge memory step, part by part (1 thread): query network, sub-key scores, top-k (both
   halves' and the candidates', on the layer's path, `model.memory.topk_impl`, and with torch.topk),
   value read (forward), the layer's backward (its forward+backward minus its forward; and with
   `read_impl=cpp`, and with both opt-ins), and the optimizer step of the memory model minus the dense model's; next to
   the FFN's forward, backward and the dense model's optimizer step.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
from pathlib import Path
from typing import List, Optional

import torch
from benchlib import FFN, interleaved_ms, provenance  # first: finds src/
from torch import nn

from pkmlm.model import ModelConfig, ProductKeyMemory, Transformer
from pkmlm.model.kernels import cpu_topk
from pkmlm.model.memory import MemoryConfig
from pkmlm.optim import OptimConfig, build_optimizer, clip_grad_norm_

CPU = torch.device("cpu")
# configs/experiment/knowledge/common.yaml: 2 layers, d=64, 4 attention heads, vocab 1024, 32 x 128.
KNOWLEDGE = dict(vocab_size=1024, n_layers=2, dim=64, n_heads=4, max_seq_len=128)
KNOWLEDGE_MEMORY = MemoryConfig(layers=[1], n_keys=128, heads=4, knn=16, k_dim=64, query_norm="batchnorm")
KNOWLEDGE_BATCH, KNOWLEDGE_SEQ = 32, 128
# configs/memory/tiny.yaml on configs/model/tiny.yaml (d=256), one default batch of 16 x 128 tokens.
DEFAULT_LAYER = dict(dim=256, n_keys=128, heads=4, knn=16, k_dim=128, query_norm="batchnorm")
DEFAULT_TOKENS = 16 * 128
# The CPU opt-ins (gradients equal to rounding, not bit for bit): the fused read backward and the
# sparse sub-key score backward.
OPT_INS = dict(read_impl="cpp", scores_backward="sparse")
OPT_INS_NAME = ", ".join(f"{name}={value}" for name, value in OPT_INS.items())


class Step:
    """A knowledge-family model with its optimizer: one training step as pkmlm-train takes it."""

    def __init__(self, memory: MemoryConfig):
        torch.manual_seed(0)
        self.model = Transformer(ModelConfig(**KNOWLEDGE, memory=memory))
        self.optimizer = build_optimizer(self.model, OptimConfig(), CPU)
        data = torch.randint(0, KNOWLEDGE["vocab_size"], (KNOWLEDGE_BATCH, KNOWLEDGE_SEQ + 1))
        self.inputs, self.targets = data[:, :-1], data[:, 1:]

    def backward(self) -> None:
        self.model.train()
        _, loss = self.model(self.inputs, self.targets)
        loss.backward()
        clip_grad_norm_(self.model.parameters(), 1.0)

    def step(self) -> None:
        self.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self) -> None:  # gradients from the last backward stay in place
        self.optimizer.step()


def layer_step(module: nn.Module, x, g) -> None:
    module.zero_grad(set_to_none=True)
    x.grad = None
    module(x).backward(g)


def layer_forward(module: nn.Module, x) -> None:
    module(x)  # with autograd recording, as in training


def kernels_line() -> str:
    """Whether the C++ kernels' rows were split over the 2-thread rows' threads (an OpenMP build of
    the library, docs/benchmarks.md), so a 2-thread ratio says what it measured."""
    if not cpu_topk.load():
        return f"C++ kernels: not built ({cpu_topk.unavailable_reason()})"
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threads = cpu_topk.parallel_threads()
    finally:
        torch.set_num_threads(before)
    skipped = cpu_topk.openmp_skipped()
    build = (
        "OpenMP build" if cpu_topk.OPENMP and not skipped else f"built without OpenMP{f' ({skipped})' * bool(skipped)}"
    )
    return f"C++ kernels: {build}, rows split over {threads} thread{'s' * (threads != 1)} at 2 threads"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions of each contender")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--results", default=None, help="a directory: write memory_step.json and memory_step_parts.json"
    )
    args = parser.parse_args(argv)
    load_start = os.getloadavg()[0]
    reps, warm = args.repeats, args.warmup
    print(f"# bench_step | {datetime.date.today()} | torch {torch.__version__} | load average {load_start:.1f}\n")

    # 1a. the knowledge family's training step, 1 thread; the same memory model with torch.topk
    # (topk_impl=torch: the retrieval before the C++ top-k) timed in the same turns, for comparison
    torch.set_num_threads(1)
    dense, mem = Step(MemoryConfig(layers=[])), Step(KNOWLEDGE_MEMORY)
    mem_torch = Step(dataclasses.replace(KNOWLEDGE_MEMORY, topk_impl="torch"))
    mem_read = Step(dataclasses.replace(KNOWLEDGE_MEMORY, read_impl="cpp"))  # the fused read backward
    mem_opt = Step(dataclasses.replace(KNOWLEDGE_MEMORY, **OPT_INS))  # and the sparse score backward
    impl = mem.model.memory_layers()[1].topk_cpu
    contenders = [dense.step, mem.step, mem_torch.step, mem_read.step, mem_opt.step]
    dense_ms, mem_ms, mem_torch_ms, mem_read_ms, mem_opt_ms = interleaved_ms(contenders, CPU, warm, reps)
    name = "knowledge step (fwd, bwd, clip, AdamW), 128^2 memory vs dense"
    rows = [[f"{name}, topk_impl={impl}", 1, mem_ms, dense_ms, 1.15]]
    rows.append([f"{name}, topk_impl=torch", 1, mem_torch_ms, dense_ms, 1.15])
    rows.append([f"{name}, topk_impl={impl}, read_impl=cpp", 1, mem_read_ms, dense_ms, 1.15])
    rows.append([f"{name}, topk_impl={impl}, {OPT_INS_NAME}", 1, mem_opt_ms, dense_ms, 1.15])

    # 1b. the default run's layer vs its FFN, 1 and 2 threads (and the layer with torch.topk)
    torch.manual_seed(0)
    pkm = ProductKeyMemory(kernel="torch", **DEFAULT_LAYER)
    torch.manual_seed(0)
    pkm_torch = ProductKeyMemory(kernel="torch", topk_impl="torch", **DEFAULT_LAYER)
    torch.manual_seed(0)
    pkm_read = ProductKeyMemory(kernel="torch", read_impl="cpp", **DEFAULT_LAYER)
    torch.manual_seed(0)
    pkm_opt = ProductKeyMemory(kernel="torch", **OPT_INS, **DEFAULT_LAYER)
    ffn = FFN(DEFAULT_LAYER["dim"])
    x = torch.randn(DEFAULT_TOKENS, DEFAULT_LAYER["dim"], requires_grad=True)
    g = torch.randn(DEFAULT_TOKENS, DEFAULT_LAYER["dim"])
    name = f"default run's memory layer fwd+bwd vs FFN (d=256, {DEFAULT_TOKENS} tokens)"
    for threads in (1, 2):
        torch.set_num_threads(threads)
        contenders = [lambda m=m: layer_step(m, x, g) for m in (ffn, pkm, pkm_torch, pkm_read, pkm_opt)]
        ffn_ms, pkm_ms, pkm_torch_ms, pkm_read_ms, pkm_opt_ms = interleaved_ms(contenders, CPU, warm, reps)
        rows.append([f"{name}, topk_impl={pkm.topk_cpu}", threads, pkm_ms, ffn_ms, 1.0])
        rows.append([f"{name}, topk_impl=torch", threads, pkm_torch_ms, ffn_ms, 1.0])
        rows.append([f"{name}, topk_impl={pkm.topk_cpu}, read_impl=cpp", threads, pkm_read_ms, ffn_ms, 1.0])
        rows.append([f"{name}, topk_impl={pkm.topk_cpu}, {OPT_INS_NAME}", threads, pkm_opt_ms, ffn_ms, 1.0])
    table = [
        [name, t, m, d, m / d, f"<= {target:.2f}x", "met" if m / d <= target else "not met"]
        for name, t, m, d, target in rows
    ]

    # 2. the knowledge memory step, part by part (1 thread)
    torch.set_num_threads(1)
    layer = mem.model.memory_layers()[1]
    tables = mem.model.tables_of(1)
    ffn_k = FFN(KNOWLEDGE["dim"])
    N, D = KNOWLEDGE_BATCH * KNOWLEDGE_SEQ, KNOWLEDGE["dim"]
    xk = torch.randn(N, D, requires_grad=True)
    gk = torch.randn(N, D)
    P = layer.k_dim // 2
    with torch.no_grad():
        q = layer._project_query(xk).view(N, layer.heads, 2, P)
        keys = layer.sub_keys()
        s = torch.einsum("nhcp,hcsp->nhcs", q, keys)
        w, idx, _ = layer._lookup(xk, with_aux=False)
    mem.backward()
    dense.backward()

    # forward-only parts without autograd; layers and optimizers as in training
    def product_topk(impl: str):  # the layer's top-k on one path (`topk_impl`: cpp, its default here, or torch)
        def run():
            layer.topk_cpu = impl
            try:
                layer._product_topk(s)
            finally:
                layer.topk_cpu = default_topk

        return run

    default_topk = layer.topk_cpu

    def opt_in_step(**options):  # the layer's forward+backward with CPU opt-ins (`read_impl=cpp`, ...)
        def run():
            before = {name: getattr(layer, name) for name in options}
            for name, value in options.items():
                setattr(layer, name, value)
            try:
                layer_step(layer, xk, gk)
            finally:
                for name, value in before.items():
                    setattr(layer, name, value)

        return run

    retrieval = {
        "query": lambda: layer._project_query(xk),
        "scores": lambda: torch.einsum("nhcp,hcsp->nhcs", q, keys),
        "topk": product_topk(default_topk),
        "topk torch": product_topk("torch"),
        "read": lambda: layer._read(tables, xk, w, idx),
    }
    training = {
        "layer fwd": lambda: layer_forward(layer, xk),
        "layer fwd+bwd": lambda: layer_step(layer, xk, gk),
        "layer fwd+bwd read cpp": opt_in_step(read_impl="cpp"),
        "layer fwd+bwd opt-ins": opt_in_step(**OPT_INS),
        "ffn fwd": lambda: layer_forward(ffn_k, xk),
        "ffn fwd+bwd": lambda: layer_step(ffn_k, xk, gk),
        "opt mem": mem.optimizer_step,
        "opt dense": dense.optimizer_step,
    }
    with torch.no_grad():
        timed = dict(zip(retrieval, interleaved_ms(list(retrieval.values()), CPU, warm, reps)))
    timed.update(zip(training, interleaved_ms(list(training.values()), CPU, warm, reps)))
    breakdown = [
        ["query network", timed["query"]],
        ["sub-key scores", timed["scores"]],
        [f"top-k (halves + candidates), topk_impl={default_topk}", timed["topk"]],
        ["  the same with torch.topk (topk_impl=torch)", timed["topk torch"]],
        ["value read", timed["read"]],
        ["backward (layer fwd+bwd - fwd)", timed["layer fwd+bwd"] - timed["layer fwd"]],
        ["  the same with the fused C++ read (read_impl=cpp)", timed["layer fwd+bwd read cpp"] - timed["layer fwd"]],
        [f"  the same with {OPT_INS_NAME}", timed["layer fwd+bwd opt-ins"] - timed["layer fwd"]],
        ["optimizer (memory model - dense model)", timed["opt mem"] - timed["opt dense"]],
        ["= memory layer fwd+bwd", timed["layer fwd+bwd"]],
        ["FFN it replaces: fwd", timed["ffn fwd"]],
        ["FFN it replaces: backward", timed["ffn fwd+bwd"] - timed["ffn fwd"]],
        ["dense model's whole step", dense_ms],
        ["memory model's whole step", mem_ms],
    ]
    load_end = os.getloadavg()[0]
    kernel_threads = kernels_line()

    print("## memory step vs the dense step it replaces (CPU, fp32)\n")
    print("| measurement | threads | memory ms | dense ms | ratio | target | |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.2f}x | {r[5]} | {r[6]} |")
    print(
        f"\n## knowledge memory step ({KNOWLEDGE_MEMORY.n_keys}^2 slots, 4 heads, knn 16; {N} tokens), "
        "part by part, 1 thread\n"
    )
    print("| part | ms |")
    print("|---|---|")
    for name, ms in breakdown:
        print(f"| {name} | {ms:.1f} |")
    print(f"\nload average {load_start:.1f} at start, {load_end:.1f} at end, on {os.cpu_count()} cores")
    print(kernel_threads)

    if args.results:
        out = Path(args.results)
        out.mkdir(parents=True, exist_ok=True)
        common = provenance("python scripts/bench_step.py --results docs/results", load_start, load_end)
        step = {
            **common,
            "threads": "1 and 2 (per row)",
            "columns": [
                "measurement",
                "threads",
                {"name": "memory ms", "format": ".1f"},
                {"name": "dense ms", "format": ".1f"},
                {"name": "ratio", "format": ".2f"},
                "target",
                "",
            ],
            "rows": table,
            "note": kernel_threads,
        }
        parts_json = {
            **common,
            "threads": 1,
            "columns": ["part", {"name": "ms", "format": ".1f"}],
            "rows": breakdown,
            "note": "knowledge family's memory layer: 128^2 slots, 4 heads, knn 16, k_dim 64, 4,096 tokens",
        }
        (out / "memory_step.json").write_text(json.dumps(step, indent=1) + "\n")
        (out / "memory_step_parts.json").write_text(json.dumps(parts_json, indent=1) + "\n")
        print(f"wrote {out / 'memory_step.json'} and {out / 'memory_step_parts.json'}")


if __name__ == "__main__":
    main()
