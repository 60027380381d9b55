"""Cut the repository's sample corpora (`data/`) from the full files, deterministically.

    .venv/bin/python scripts/cut_sample.py --wiki FULL/enwiki2015_AA.jsonl.gz \
        --c4 FULL/c4_en_train_first1000.jsonl.gz            # writes data/wiki/... and data/c4/...
    .venv/bin/python scripts/cut_sample.py --count          # token counts of data/ (data/README.md)

Each output is the first N JSON lines of its input, byte for byte (records are not re-encoded),
gzipped at level 9 with no file name and mtime 0 in the header, so the same input always gives the
same bytes. The input is streamed (never held whole). N is chosen so that the default run
(`make train`: 600 steps x 16 x 128 = 1,228,800 training tokens after the first data.val_docs=20
articles, which are held out) reads its training text less than once; data/README.md records the
counts that `--count` prints. Where the full files come from: data/README.md.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (option, output path under data/, records kept, sha256 of the full input file it is cut from)
CUTS = (
    (
        "wiki",
        "wiki/enwiki2015_first800.jsonl.gz",
        800,
        "cd2f53f058115503dd339d52d88d9eb85371112044f2457e52094826c77c642b",
    ),
    (
        "c4",
        "c4/c4_en_train_first1000.jsonl.gz",
        1000,
        "dcfdf62b19eb09228088ca49ac154af348981a40aa894add9b73a64726d1251a",
    ),
)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def cut(source: Path, target: Path, records: int) -> int:
    """Write the first `records` non-blank lines of the gzipped JSON lines file `source` to
    `target` (gzip level 9, no name, mtime 0); returns the number written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    written = 0
    with (
        gzip.open(source, "rb") as src,
        open(tmp, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as out,
    ):
        for line in src:
            if written == records:
                break
            if not line.strip():
                continue
            json.loads(line)  # a record, or the input is not what this script expects
            out.write(line if line.endswith(b"\n") else line + b"\n")
            written += 1
    os.replace(tmp, target)
    return written


def count(data_dir: Path) -> None:
    """Documents, characters and tokens of each sample file, with the default run's tokenizer
    (byte-level BPE, data.vocab_size=8192, trained on the first data.tokenizer_docs=2000 documents
    of the Wikipedia sample, as `make train` trains it), split as its preset splits it."""
    sys.path.insert(0, str(ROOT / "src"))
    from pkmlm.data.config import DataConfig, default_cache_dir
    from pkmlm.data.loader import load_or_train_tokenizer, resolve_data
    from pkmlm.data.sources import DocumentStream
    from pkmlm.data.tokenizer import encode_documents

    wiki_cfg = DataConfig(files=[str(data_dir / CUTS[0][1])])
    tok, info = load_or_train_tokenizer(wiki_cfg, resolve_data(wiki_cfg), default_cache_dir())
    print(f"tokenizer: vocab {tok.get_vocab_size()} ({info['source']}, {info['path']})")
    # The held-out split of each preset: configs/data/wiki.yaml and the default take 20, c4.yaml 50.
    for (name, rel, _, _), val_docs in zip(CUTS, (20, 50)):
        path = data_dir / rel
        texts = list(DocumentStream([str(path)]))
        tokens = [
            len(ids) + 1
            for i in range(0, len(texts), 64)  # + 1: the EOS after each document
            for ids in encode_documents(tok, texts[i : i + 64])
        ]
        train = sum(tokens[val_docs:])
        print(
            json.dumps(
                {
                    "file": rel,
                    "bytes": path.stat().st_size,
                    "sha256": sha256_of(path),
                    "documents": len(texts),
                    "characters": sum(map(len, texts)),
                    "tokens": sum(tokens),
                    "val_docs": val_docs,
                    "val_tokens": sum(tokens[:val_docs]),
                    "train_tokens": train,
                    "default_run_passes": round(600 * 16 * 128 / train, 3),
                }
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wiki", type=Path, help="the full Wikipedia file, enwiki2015_AA.jsonl.gz (data/README.md)")
    ap.add_argument("--c4", type=Path, help="the full C4 file, c4_en_train_first1000.jsonl.gz (data/README.md)")
    ap.add_argument("--out", type=Path, default=ROOT / "data", help="where to write (default: the repository's data/)")
    ap.add_argument("--count", action="store_true", help="print document and token counts of the files in --out")
    args = ap.parse_args()
    if not (args.wiki or args.c4 or args.count):
        ap.error("give --wiki and/or --c4 (the full files to cut from), or --count")
    for name, rel, records, expected in CUTS:
        source = getattr(args, name)
        if source is None:
            continue
        if not source.is_file():
            sys.exit(f"error: --{name} {source}: no such file")
        digest = sha256_of(source)
        if digest != expected:
            print(
                f"warning: --{name} {source} has sha256 {digest[:16]}..., not the {expected[:16]}... "
                "data/README.md describes; the sample will differ from the committed one",
                file=sys.stderr,
            )
        n = cut(source, args.out / rel, records)
        print(f"{args.out / rel}: {n} documents, {(args.out / rel).stat().st_size:,} bytes")
    if args.count:
        count(args.out)


if __name__ == "__main__":
    main()
