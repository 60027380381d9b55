"""Data pipeline throughput on this machine: bare `encode_batch` vs the streaming pipeline vs
prepared shards, all measured in the same run on the same text.

    .venv/bin/python scripts/bench_data.py            # or: make bench-data
    .venv/bin/python scripts/bench_data.py --docs 300 --vocab 8192 --json out.json

1. bare: `Tokenizer.encode_batch_fast` over the first --docs Wikipedia articles, held in memory
   (64 per call, as the pipeline does): the ceiling, with nothing read, parsed, packed or shuffled.
2. stream (in process): `TokenBatches` over the same articles from the .jsonl.gz file: gunzip,
   JSON lines, encode, pack, shuffle buffer, int64 tensors (`data.num_workers=0`).
3. stream (2 workers): the same through `WorkerBatches`, 2 DataLoader worker processes.
4. prepared: `pkmlm-prepare`'s shards of the same articles read by `PreparedBatches`, random and
   sequential windows, at two batch shapes.

Targets (issue 3): stream >= 80% of bare; prepared >= 50M tokens/s.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pkmlm.data.config import DataConfig  # noqa: E402
from pkmlm.data.loader import TokenBatches, WorkerBatches, load_or_train_tokenizer, resolve_data  # noqa: E402
from pkmlm.data.prepared import PreparedBatches, prepare  # noqa: E402
from pkmlm.data.sources import DocumentStream, expand_files  # noqa: E402
from pkmlm.data.tokenizer import default_cache_dir  # noqa: E402


def sample_dir() -> str:
    return os.environ.get("PKMLM_SAMPLE_DIR") or str(ROOT / "data")


def timed(fn, min_seconds: float = 0.0):
    """(result, seconds) of fn(), repeated until min_seconds have passed (result of the last call)."""
    t0 = time.perf_counter()
    n = 0
    while True:
        out = fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return out, dt / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=800, help="Wikipedia articles to stream (about 3.5k tokens each)")
    ap.add_argument(
        "--vocab", type=int, default=16384, help="BPE vocabulary (trained on up to 2,000 sample articles, cached)"
    )
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of bare / stream / workers")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    wiki = os.path.join(sample_dir(), "wiki", "enwiki2015_first800.jsonl.gz")
    files = expand_files([wiki])
    base = DataConfig(
        files=files,
        vocab_size=args.vocab,
        tokenizer_docs=2000,
        seq_len=128,
        val_docs=0,
        shuffle_buffer=256,
        encode_batch_docs=64,
    )
    plan = resolve_data(base)
    tok, info = load_or_train_tokenizer(base, plan, default_cache_dir())
    print(f"tokenizer: vocab {tok.get_vocab_size()} ({info['source']}), cores {os.cpu_count()}", flush=True)
    texts = list(itertools.islice(DocumentStream(files), args.docs))
    results = {"docs": len(texts), "vocab": tok.get_vocab_size(), "cpu_count": os.cpu_count()}

    # 1.-3., alternated for --rounds rounds: the 2 cores are shared, so other work on the machine
    # slows whichever runs at that moment; alternating and taking medians keeps the comparison fair.
    encode = getattr(tok, "encode_batch_fast", None) or tok.encode_batch
    batch_size = 16
    workers_cfg = DataConfig(**{**base.__dict__, "num_workers": 2})

    def bare():
        return sum(
            len(e.ids) for i in range(0, len(texts), 64) for e in encode(texts[i : i + 64], add_special_tokens=False)
        )

    total_tokens = bare()  # also warms the Rust thread pool
    n_batches = total_tokens // (batch_size * base.seq_len)
    results["tokens_per_round"] = total_tokens

    def stream(make):
        batches = make()
        for _ in range(n_batches):
            next(batches)
        if hasattr(batches, "close"):
            batches.close()
        return n_batches * batch_size * base.seq_len

    runs = {
        "bare": bare,
        "stream": lambda: stream(lambda: TokenBatches(base, plan, tok, batch_size=batch_size, seed=0)),
        "stream_workers2": lambda: stream(lambda: WorkerBatches(workers_cfg, plan, tok, batch_size=batch_size, seed=0)),
    }
    rates = {k: [] for k in runs}
    for r in range(args.rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - t0))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items()) + " tokens/s", flush=True)
    for name, values in rates.items():
        results[f"{name}_tok_s"] = statistics.median(values)
        results[f"{name}_tok_s_all"] = values
    for name in ("stream", "stream_workers2"):
        results[f"{name}_vs_bare"] = results[f"{name}_tok_s"] / results["bare_tok_s"]
        results[f"{name}_vs_bare_per_round"] = [a / b for a, b in zip(rates[name], rates["bare"])]
    print(f"bare encode_batch:        {results['bare_tok_s']:>12,.0f} tokens/s (median of {args.rounds})")
    for name in ("stream", "stream_workers2"):
        print(
            f"{name + ':':<25} {results[name + '_tok_s']:>12,.0f} tokens/s  "
            f"({results[name + '_vs_bare']:.0%} of bare; per round "
            + ", ".join(f"{x:.0%}" for x in results[name + "_vs_bare_per_round"])
            + ")"
        )

    # 4. prepared shards of the same documents
    with tempfile.TemporaryDirectory() as tmp:
        small = tmp + "/wiki.jsonl"
        with open(small, "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
        prep_cfg = DataConfig(**{**base.__dict__, "files": [small]})
        out = tmp + "/prepared"
        (index, dt) = timed(lambda: prepare(prep_cfg, resolve_data(prep_cfg).sources, tok, out))
        results["prepare_tok_s"] = index["tokens"]["train"] / dt
        print(f"pkmlm-prepare (write):    {results['prepare_tok_s']:>12,.0f} tokens/s  ({index['dtype']})")
        for order in ("random", "sequential"):
            for bs, seq in ((16, 128), (32, 1024)):
                cfg = DataConfig(
                    **{**base.__dict__, "files": [], "prepared": out, "seq_len": seq, "prepared_order": order}
                )
                batches = PreparedBatches(cfg, out, batch_size=bs, seed=0)
                next(batches)  # the epoch's permutation
                n = max(200, 20_000_000 // (bs * seq))
                t0 = time.perf_counter()
                for _ in range(n):
                    next(batches)
                rate = n * bs * seq / (time.perf_counter() - t0)
                results[f"prepared_{order}_{bs}x{seq}_tok_s"] = rate
                print(f"prepared {order:>10} {bs}x{seq}: {rate:>12,.0f} tokens/s")

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
