"""Every source type and every kind of bad input: WET (gzipped, with WARC headers), Hub datasets
through the same streaming call on a local directory, and skip-and-count vs strict errors."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import zstandard
from data_fixtures import make_docs, write_jsonl, write_parquet, write_texts_jsonl, write_wet

from pkmlm.data.config import DataConfig, SourceConfig
from pkmlm.data.mixing import resolve_sources
from pkmlm.data.sources import DocumentStream, HubSpec, open_hub_dataset
from pkmlm.errors import DataError

PAGES = [
    ("http://example.com/a", "First page.\nWith two lines, café."),
    ("https://b.org/x?y=1", "Second page 東京"),
    ("http://c.net/", "Third"),
]


# ------------------------------------------------------------------------------------------------
# WET


@pytest.mark.parametrize("compress", [True, False])
def test_wet_conversion_records_with_their_uri(tmp_path, compress):
    path = write_wet(tmp_path / ("cc.warc.wet.gz" if compress else "cc.warc.wet"), PAGES, compress=compress)
    docs = list(DocumentStream([path]).documents_iter())
    assert [(d.url, d.text) for d in docs] == PAGES  # warcinfo left out, text and URI kept


def test_wet_truncated_gzip_keeps_the_records_before(tmp_path):
    path = write_wet(tmp_path / "cut.warc.wet.gz", PAGES)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-30])  # the last record's gzip member breaks off
    stream = DocumentStream([path])
    assert list(stream) == [t for _, t in PAGES[:2]]
    assert stream.stats == {"truncated": 1}
    with pytest.raises(DataError, match=r"cut\.warc\.wet\.gz, after conversion record 2: the compressed data "):
        list(DocumentStream([path], strict=True))


def test_wet_non_utf8_record_skipped(tmp_path):
    path = write_wet(
        tmp_path / "bytes.warc.wet.gz",
        [("http://a/", "good"), ("http://b/", b"bad \xff\xfe"), ("http://c/", "also good")],
    )
    stream = DocumentStream([path])
    assert list(stream) == ["good", "also good"] and stream.stats == {"non_utf8": 1}
    with pytest.raises(DataError, match=r"bytes\.warc\.wet\.gz, conversion record 2: the record is not valid UTF-8"):
        list(DocumentStream([path], strict=True))


# ------------------------------------------------------------------------------------------------
# Bad input, one kind at a time: lenient skips and counts, strict names file and place


def _gz(path, data: bytes):
    with gzip.open(path, "wb") as f:
        f.write(data)
    return str(path)


def _bad_inputs(tmp_path):
    """kind -> (file, documents a lenient read gives, regex of the strict error)."""
    good = json.dumps({"text": "good"}) + "\n"
    cases = {}
    p = tmp_path / "malformed.jsonl"
    p.write_bytes((good + '{"text": "no end\n' + good).encode())
    cases["malformed_json"] = (str(p), ["good", "good"], r"malformed\.jsonl, line 2: the record is not a JSON object")
    p = tmp_path / "bytes.jsonl"
    p.write_bytes(good.encode() + b'{"text": "caf\xe9"}\n' + good.encode())
    cases["non_utf8"] = (str(p), ["good", "good"], r"bytes\.jsonl, line 2: the record is not valid UTF-8")
    p = tmp_path / "surrogate.jsonl"
    p.write_text(good + '{"text": "lone \\udc80"}\n')
    cases["non_utf8/surrogate"] = (str(p), ["good"], r"surrogate\.jsonl, line 2: the record is not valid UTF-8")
    p = tmp_path / "latin1.txt"
    p.write_bytes(b"good\n\ncaf\xe9\nsecond line\n\ngood too\n")
    cases["non_utf8/text"] = (str(p), ["good", "good too"], r"latin1\.txt, paragraph 2: the record is not valid UTF-8")
    p = write_jsonl(tmp_path / "missing.jsonl", [{"text": "good"}, {"other": 1}])
    cases["missing_field"] = (p, ["good"], r"missing\.jsonl, line 2: the record has no field 'text'")
    p = write_jsonl(tmp_path / "number.jsonl", [{"text": "good"}, {"text": 5}])
    cases["non_string"] = (p, ["good"], r"number\.jsonl, line 2: the record has a field 'text' .* not a string")
    p = tmp_path / "notobject.jsonl"
    p.write_text(good + "[1, 2]\n")
    cases["malformed_json/array"] = (str(p), ["good"], r"notobject\.jsonl, line 2: the record is not a JSON object")
    # Varied text, so that half the compressed bytes hold many whole buffers of lines.
    raw = "".join(json.dumps({"text": "good", "pad": t}) + "\n" for t in make_docs(3000)).encode()
    full = gzip.compress(raw)
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(full[: len(full) // 2])
    cases["truncated"] = (str(p), None, r"cut\.jsonl\.gz, after line \d+: the compressed data breaks off")
    p = tmp_path / "cut.jsonl.zst"
    frame = zstandard.ZstdCompressor().compress(raw)
    p.write_bytes(frame[: len(frame) // 2])
    cases["truncated/zst"] = (str(p), None, r"cut\.jsonl\.zst, after line \d+: the compressed data breaks off")
    p = tmp_path / "empty.jsonl.gz"
    p.write_bytes(b"")
    cases["empty_file"] = (str(p), [], r"empty\.jsonl\.gz, at its start: it holds no record")
    p = tmp_path / "notgzip.jsonl.gz"
    p.write_bytes(b"this is not gzip data at all\n")
    cases["unreadable"] = (str(p), [], r"notgzip\.jsonl\.gz, at its start: it cannot be read")
    p = tmp_path / "damaged.parquet"
    p.write_bytes(b"PAR1 not really parquet")
    cases["unreadable/parquet"] = (str(p), [], r"damaged\.parquet, at its start: it cannot be read")
    p = write_jsonl(tmp_path / "blank.jsonl", [{"text": "good"}, {"text": ""}])
    cases["empty"] = (p, ["good"], None)  # an empty text is counted, never an error
    return cases


KINDS = [
    "malformed_json",
    "non_utf8",
    "non_utf8/surrogate",
    "non_utf8/text",
    "missing_field",
    "non_string",
    "malformed_json/array",
    "truncated",
    "truncated/zst",
    "empty_file",
    "unreadable",
    "unreadable/parquet",
    "empty",
]


@pytest.mark.parametrize("case", KINDS)
def test_bad_input_lenient_counts_strict_raises(tmp_path, case):
    path, expected, strict_error = _bad_inputs(tmp_path)[case]
    kind = case.split("/")[0]
    stream = DocumentStream([path])
    docs = list(stream)
    assert stream.stats == {kind: 1}
    if expected is not None:
        assert docs == expected
    else:
        assert 0 < len(docs) < 3000 and set(docs) == {"good"}  # the lines before the break
    if strict_error is None:
        assert list(DocumentStream([path], strict=True)) == docs
    else:
        with pytest.raises(DataError, match=strict_error):
            list(DocumentStream([path], strict=True))


def test_file_gone_between_expansion_and_reading_is_unreadable(tmp_path):
    keep = write_texts_jsonl(tmp_path / "keep.jsonl", ["kept"])
    gone = write_texts_jsonl(tmp_path / "gone.jsonl", ["never read"])
    stream = DocumentStream([gone, keep])
    strict = DocumentStream([gone, keep], strict=True)
    os.remove(gone)
    assert list(stream) == ["kept"] and stream.stats == {"unreadable": 1}
    with pytest.raises(DataError, match=r"gone\.jsonl, at its start: it cannot be read \(FileNotFoundError"):
        list(strict)


# Paths and globs are checked up front, the same in both modes: a training run never starts on them.


def test_unreadable_path_fails_before_reading_in_both_modes(tmp_path):
    # A Unix socket exists and is no directory, but open() fails even for root (chmod 0 would not).
    path = tmp_path / "corpus.jsonl"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        for strict in (False, True):
            with pytest.raises(DataError, match=r"data file .*corpus\.jsonl cannot be read"):
                resolve_sources(DataConfig(files=[str(path)], strict=strict))
        with pytest.raises(DataError, match=r"data\.sources\[0\]\.files pattern '.*\*\.jsonl'\) cannot be read"):
            resolve_sources(DataConfig(files=[], sources=[SourceConfig(files=[str(tmp_path / "*.jsonl")])]))


@pytest.mark.parametrize("strict", [False, True])
def test_glob_matching_nothing_fails_before_reading_in_both_modes(tmp_path, strict):
    with pytest.raises(DataError, match=r"data\.files pattern .*nothing/\*\.jsonl.* matches no file"):
        resolve_sources(DataConfig(files=[str(tmp_path / "nothing" / "*.jsonl")], strict=strict))


@pytest.mark.parametrize("name", ["c.parquet.gz", "c.parquet.zst"])
def test_compressed_parquet_is_refused_up_front(tmp_path, name):
    plain = write_parquet(tmp_path / "c.parquet", ["one", "two"])
    data = open(plain, "rb").read()
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else zstandard.compress(data))
    with pytest.raises(DataError, match=rf"{name}.* compressed Parquet file: give the \.parquet file itself"):
        resolve_sources(DataConfig(files=[str(tmp_path / name)]))


def test_each_kind_counted_over_a_mixed_corpus_and_resume_keeps_counts(tmp_path):
    cases = _bad_inputs(tmp_path)
    files = [cases[k][0] for k in KINDS]
    full = DocumentStream(files)
    docs = list(full)
    expected_counts = {}
    for k in KINDS:
        expected_counts[k.split("/")[0]] = expected_counts.get(k.split("/")[0], 0) + 1
    assert full.stats == expected_counts
    for stop in (1, 5, len(docs) - 1):
        s = DocumentStream(files)
        it = s.documents_iter()
        head = [next(it).text for _ in range(stop)]
        state = json.loads(json.dumps(s.state_dict()))
        again = DocumentStream(files)
        again.load_state_dict(state)
        assert head + list(again) == docs
        assert again.stats == expected_counts


# ------------------------------------------------------------------------------------------------
# Hub datasets: the same load_dataset(name, config, split, streaming=True) call, on a local directory


def test_hub_source_streams_and_resumes_from_the_dataset_state(tmp_path):
    repo = tmp_path / "my_dataset"
    repo.mkdir()
    texts = make_docs(9)
    write_texts_jsonl(repo / "part-0.jsonl", texts[:5])
    write_texts_jsonl(repo / "part-1.jsonl", texts[5:])
    sources = resolve_sources(DataConfig(files=[], sources=[SourceConfig(hub=str(repo), split="train")]))
    assert sources[0].hub == HubSpec(name=str(repo), config=None, split="train")
    assert list(sources[0].stream(strict=False)) == texts
    for stop in (1, 4, 7):
        stream = sources[0].stream(strict=False)
        it = iter(stream)
        head = [next(it) for _ in range(stop)]
        state = json.loads(json.dumps(stream.state_dict()))
        assert state["hub"] is not None  # the dataset's own position, not a count to re-read
        again = sources[0].stream(strict=False)
        again.load_state_dict(state)
        assert head + list(again) == texts


def test_hub_offline_is_a_one_line_data_error_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(
        DataError, match=r"cannot open Hub dataset 'no-such-org/no-such-data'.*not reachable.*data\.files"
    ):
        open_hub_dataset(HubSpec(name="no-such-org/no-such-data", config="en"))
    assert time.perf_counter() - t0 < 30


def test_cli_hub_preset_offline_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PKMLM_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pkmlm.cli.train",
            "data=c4_hub",
            "logging.wandb.mode=disabled",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "allenai/c4" in lines[0] and "data.files" in lines[0]
