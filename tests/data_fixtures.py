"""Small corpora written by the data tests: JSON lines, text, Parquet, and Common Crawl WET files
with real WARC headers (one gzip member per record, as Common Crawl ships them)."""

from __future__ import annotations

import gzip
import json
import random
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = "alpha beta gamma delta memory key value layer token river".split()


def make_docs(n, seed=0, prefix="doc"):
    rng = random.Random(seed)
    return [f"{prefix}{i:04d} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for i in range(n)]


def stitch(windows):
    """The token stream back from windows that overlap by one token."""
    stream = list(windows[0])
    for w in windows[1:]:
        assert w[0] == stream[-1]
        stream.extend(w[1:])
    return stream


def roundtrip(state):
    """What a checkpoint would give back; also proves the state is plain JSON."""
    return json.loads(json.dumps(state))


def write_jsonl(path, records, compress=False):
    data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)
    return str(path)


def write_texts_jsonl(path, texts, compress=False):
    return write_jsonl(path, [{"text": t} for t in texts], compress=compress)


def write_parquet(path, texts, row_group_size=2, column="text"):
    pq.write_table(pa.table({column: texts, "n": list(range(len(texts)))}), path, row_group_size=row_group_size)
    return str(path)


def warc_record(record_type: str, uri: str, body: bytes) -> bytes:
    headers = (
        "WARC/1.0\r\n"
        f"WARC-Type: {record_type}\r\n"
        f"WARC-Target-URI: {uri}\r\n"
        "WARC-Date: 2024-02-20T10:00:00Z\r\n"
        f"WARC-Record-ID: <urn:uuid:{uuid.UUID(int=random.getrandbits(128))}>\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return headers + body + b"\r\n\r\n"


def write_wet(path, pages, compress=True, warcinfo=True):
    """A WET file: a warcinfo record, then one `conversion` record per (uri, text or bytes)."""
    records = (
        [warc_record("warcinfo", "", b"software: pkmlm-tests\r\nformat: WARC File Format 1.0\r\n")] if warcinfo else []
    )
    for uri, text in pages:
        records.append(warc_record("conversion", uri, text if isinstance(text, bytes) else text.encode()))
    with open(path, "wb") as f:
        for r in records:
            f.write(gzip.compress(r) if compress else r)
    return str(path)
