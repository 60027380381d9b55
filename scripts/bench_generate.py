"""Generation speed with and without the KV cache: `pkmlm.generate` tokens/s (issue 24).

The model is the default experiment's size (configs/model/tiny.yaml with configs/memory/tiny.yaml:
d=256, 4 layers, a 128^2-slot memory at layer 2), random weights (speed does not depend on them), its
context widened to hold the prompt and the longest continuation (max_seq_len, a table size for
learned positions and the rotary table for rope: no cost per token). Each length is timed for both
paths in turns (cached, uncached, cached, ...), greedy, one prompt; tokens/s = new tokens / seconds.

    python scripts/bench_generate.py                        # 64, 256, 1024 new tokens on CPU
    python scripts/bench_generate.py --results docs/results/bench_generate.json

Without a cache every token re-runs the whole sequence so far (quadratic in the length); with it,
one token's forward reads the cached keys (linear).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import benchlib
import torch


def build_model(args: argparse.Namespace, device: torch.device):
    from pkmlm.model import MemoryConfig, ModelConfig, Transformer

    memory = MemoryConfig(layers=[args.layers // 2], n_keys=args.n_keys, heads=4, knn=min(16, args.n_keys), k_dim=128)
    if args.dense:
        memory = MemoryConfig(layers=[])
    cfg = ModelConfig(
        vocab_size=args.vocab,
        n_layers=args.layers,
        dim=args.dim,
        n_heads=args.heads,
        max_seq_len=args.prompt + max(args.new_tokens),
        memory=memory,
    )
    torch.manual_seed(0)
    return Transformer(cfg).to(device).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_generate", description=__doc__.split("\n\n")[0])
    benchlib.add_common_args(parser, "generation of 8 tokens per path")
    parser.add_argument("--new-tokens", default="64,256,1024", help="comma-separated continuation lengths")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--repeats", type=int, default=2, help="timed turns per path and length (median)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--n-keys", type=int, default=128)
    parser.add_argument("--dense", action="store_true", help="no memory layer")
    parser.add_argument("--results", help="write a results file (pkmlm.results format) here")
    args = parser.parse_args(argv)
    args.new_tokens = [int(n) for n in args.new_tokens.split(",")]
    device = benchlib.setup(args, "bench_generate")
    from pkmlm.run import generate

    model = build_model(args, device)
    prompt = torch.randint(1, args.vocab, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    load_start = os.getloadavg()[0]
    warmup = benchlib.default(args.warmup, device, cuda=5, cpu=2)
    rows = []
    print(
        f"model: d={args.dim}, {args.layers} layers, memory {'none' if args.dense else 'tiny'}; "
        f"{args.prompt}-token prompt"
    )
    print(f"device: {device} ({benchlib.device_name(device)})")
    print("| new tokens | cached tok/s | uncached tok/s | speed-up |\n|---|---|---|---|")
    for n in args.new_tokens:
        paths = [
            lambda n=n: generate(model, prompt, n, temperature=0),
            lambda n=n: generate(model, prompt, n, temperature=0, use_cache=False),
        ]
        for path in paths:  # warm-up: short runs of each path
            for _ in range(warmup):
                generate(model, prompt, 8, temperature=0, use_cache=path is paths[0])
        cached_ms, uncached_ms = benchlib.interleaved_ms(paths, device, warmup=0, repeats=args.repeats, events=False)
        cached, uncached = n / (cached_ms / 1e3), n / (uncached_ms / 1e3)
        rows.append([n, round(cached, 1), round(uncached, 1), round(cached / uncached, 2)])
        print(f"| {n} | {cached:,.1f} | {uncached:,.1f} | {cached / uncached:.1f}x |", flush=True)
    load_end = os.getloadavg()[0]
    if args.results:
        command = "python scripts/bench_generate.py " + " ".join(argv if argv is not None else sys.argv[1:])
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        result = {
            **benchlib.provenance(command, load_start, load_end, machine=gpu),
            "threads": torch.get_num_threads(),
            "columns": [
                "new tokens",
                {"name": "with KV cache (tok/s)", "format": ",.1f"},
                {"name": "without (tok/s)", "format": ",.1f"},
                {"name": "speed-up", "format": ".1f"},
            ],
            "rows": rows,
            "note": (
                f"`pkmlm.generate`, greedy, one {args.prompt}-token prompt, model d={args.dim}, {args.layers} layers, "
                f"{'no memory' if args.dense else f'memory {args.n_keys}^2 slots at layer {args.layers // 2}'}, "
                f"vocabulary {args.vocab}, random weights; median of {args.repeats} timed turn(s) per path, "
                "the paths in turns."
            ),
        }
        Path(args.results).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
