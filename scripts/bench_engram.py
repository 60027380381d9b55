"""The Engram layer's CPU cost (issue 23): its forward+backward against the FFN it sits beside.

    .venv/bin/python scripts/bench_engram.py                         # print the table
    .venv/bin/python scripts/bench_engram.py --results docs/results  # also write bench_engram.json

On the default run's shape (model/tiny: d=256, one batch of 16 x 128 tokens, vocabulary 8192), fp32,
the contenders timed in turns (A, B, C, A, B, C, ...; medians) at 1 and 2 threads:

- the FFN d -> 4d -> d (GELU) of a block, forward+backward;
- the Engram layer (pkmlm/model/variants/engram.py) sized like configs/memory/tiny.yaml's value table
  (4 heads x 2 orders of ~8,192 rows x 64 dims = 4.2M parameters, N = 3), forward+backward with a
  dense table gradient, and with the sparse row gradient of `optim.sparse_values`;
- the same layer at EngramConfig's defaults (8 heads x 2 orders of ~65,536 rows x 64 = 67M, the
  2019 paper's value-table size), sparse gradient (a dense one would zero and fill 268 MB a step);
- the hashing alone (canonical ids, document starts, suffix n-grams, the hash: what runs before
  the lookup), to show it is not where the time goes.

A real tokenizer's compression changes nothing in the cost: an identity mapping stands in, so the
script needs torch only. End-of-text tokens are sprinkled at random (about one per 100 tokens).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path
from typing import Callable, List, Optional

import torch
from benchlib import FFN, interleaved_ms, provenance  # first: finds src/
from torch import nn

from pkmlm.model.variants.engram import EngramConfig, EngramLayer, plan_table_sizes

CPU = torch.device("cpu")
DIM, VOCAB, EOT = 256, 8192, 0  # pkmlm's BPE puts the end-of-text token at id 0 (the layer's default)
BATCH, SEQ = 16, 128
TINY = EngramConfig(layers=[1], heads=4, embed_dim=256, table_size=8192)  # ~4.2M rows x dims, as tiny.yaml
DEFAULT = EngramConfig()  # ~67M


def engram(cfg: EngramConfig, sparse: bool) -> EngramLayer:
    torch.manual_seed(0)
    layer = EngramLayer(DIM, cfg, 1, VOCAB, plan_table_sizes(cfg)[1])
    with torch.no_grad():  # a trained layer's convolution is not zero: time the full path
        layer.conv_weight.normal_(0.0, 0.1)
    layer.sparse_grad = sparse
    return layer


def step(fn: Callable[[], torch.Tensor], module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    x.grad = None
    fn().backward(g)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions of each contender")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=BATCH, help="rows of 128 tokens")
    parser.add_argument("--no-default", action="store_true", help="skip the 67M-row layer (tests)")
    parser.add_argument("--results", default=None, help="a directory: write bench_engram.json there")
    args = parser.parse_args(argv)
    load_start = os.getloadavg()[0]
    tokens = args.batch * SEQ
    print(f"# bench_engram | {datetime.date.today()} | torch {torch.__version__} | load average {load_start:.1f}\n")

    torch.manual_seed(0)
    idx = torch.randint(1, VOCAB, (args.batch, SEQ))
    idx[torch.rand(idx.shape) < 0.01] = EOT
    x = torch.randn(args.batch, SEQ, DIM, requires_grad=True)
    g = torch.randn(args.batch, SEQ, DIM)
    ffn = FFN(DIM)
    tiny_dense, tiny_sparse = engram(TINY, False), engram(TINY, True)
    contenders = [
        ("FFN d -> 4d -> d (GELU)", lambda: step(lambda: ffn(x), ffn, x, g)),
        ("Engram, tiny tables (4.2M), dense grad", lambda: step(lambda: tiny_dense(x, idx), tiny_dense, x, g)),
        ("Engram, tiny tables (4.2M), sparse grad", lambda: step(lambda: tiny_sparse(x, idx), tiny_sparse, x, g)),
    ]
    if not args.no_default:
        default_sparse = engram(DEFAULT, True)
        contenders.append(
            (
                "Engram, default tables (67M), sparse grad",
                lambda: step(lambda: default_sparse(x, idx), default_sparse, x, g),
            )
        )
    contenders.append(("hashing alone (tiny layer, no grad)", lambda: tiny_dense.rows(idx)))
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        times = interleaved_ms([fn for _, fn in contenders], CPU, args.warmup, args.repeats)
        ffn_ms = times[0]
        rows += [[name, threads, ms, ms / ffn_ms] for (name, _), ms in zip(contenders, times)]
    load_end = os.getloadavg()[0]

    print(f"fwd+bwd on {tokens} tokens (d={DIM}), medians of {args.repeats}, contenders in turns\n")
    print("| contender | threads | ms | x FFN |")
    print("|---|---|---|---|")
    for name, threads, ms, ratio in rows:
        print(f"| {name} | {threads} | {ms:.1f} | {ratio:.2f} |")
    print(f"\nload average {load_start:.1f} at start, {load_end:.1f} at end, on {os.cpu_count()} cores")

    if args.results:
        out = Path(args.results)
        out.mkdir(parents=True, exist_ok=True)
        result = {
            **provenance("python scripts/bench_engram.py --results docs/results", load_start, load_end),
            "threads": "1 and 2 (per row)",
            "columns": ["contender", "threads", {"name": "ms", "format": ".1f"}, {"name": "x FFN", "format": ".2f"}],
            "rows": rows,
            "note": f"forward+backward on {tokens} tokens at d={DIM} (the default run's batch), fp32",
        }
        (out / "bench_engram.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out / 'bench_engram.json'}")


if __name__ == "__main__":
    main()
