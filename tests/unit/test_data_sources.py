"""Data sources: file expansion, one reader per file type, skipped records, exact resume."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pkmlm.data.sources import DocumentStream, expand_files, file_kind
from pkmlm.errors import DataError


def write_jsonl(path, records, compress=False):
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)
    return str(path)


def write_parquet(path, texts, row_group_size=2):
    pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), path, row_group_size=row_group_size)
    return str(path)


def touch(path, text="x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------------------------------------
# expand_files


def test_expand_files_globs_sorted_dedup_in_pattern_order(tmp_path, monkeypatch):
    for name in ["b.jsonl", "a.jsonl", "c.txt", "sub/deep/d.jsonl"]:
        touch(tmp_path / name)
    (tmp_path / "dir.jsonl").mkdir()  # a directory matched by a glob is left out
    monkeypatch.chdir(tmp_path)
    files = expand_files(["c.txt", "*.jsonl", "a.jsonl", "**/*.jsonl"])
    rel = [os.path.relpath(f, tmp_path) for f in files]
    assert rel == ["c.txt", "a.jsonl", "b.jsonl", os.path.join("sub", "deep", "d.jsonl")]
    assert all(os.path.isabs(f) for f in files)


def test_expand_files_home_and_single_string(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = touch(tmp_path / "corpus.txt")
    assert expand_files("~/corpus.txt") == [path]


def test_expand_files_errors_name_the_pattern(tmp_path):
    with pytest.raises(DataError, match=r"data\.files is empty"):
        expand_files([])
    with pytest.raises(DataError, match=r"nothing_here/\*\.jsonl"):
        expand_files([str(tmp_path / "nothing_here/*.jsonl")])
    with pytest.raises(DataError, match="missing.jsonl.*does not exist"):
        expand_files([str(tmp_path / "missing.jsonl")])
    (tmp_path / "corpus").mkdir()
    with pytest.raises(DataError, match="corpus.*is a directory"):
        expand_files([str(tmp_path / "corpus")])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_expand_files_unreadable(tmp_path):
    path = touch(tmp_path / "secret.txt")
    os.chmod(path, 0)
    with pytest.raises(DataError, match="secret.txt.*cannot be read"):
        expand_files([path])


@pytest.mark.skipif(importlib.util.find_spec("zstandard") is not None, reason="zstandard installed")
def test_expand_files_zst_needs_zstandard(tmp_path):
    path = touch(tmp_path / "a.jsonl.zst")
    with pytest.raises(DataError, match="a.jsonl.zst.*zstandard"):
        expand_files([path])


def test_file_kind():
    assert [
        file_kind(p)
        for p in [
            "a.jsonl",
            "a.json.gz",
            "a.JSONL.zst",
            "a.parquet",
            "a.txt.gz",
            "a.md",
            "a",
            "x.warc.wet.gz",
            "x.warc.wet",
            "x.wet",
            "x.warc.gz",
        ]
    ] == ["json", "json", "json", "parquet", "text", "text", "text", "wet", "wet", "wet", "wet"]


# ------------------------------------------------------------------------------------------------
# readers


def test_each_source_type_in_order(tmp_path):
    docs = ["first doc", "café 東京 🎉", "two\nlines"]
    json_file = write_jsonl(tmp_path / "a.jsonl", [{"id": i, "text": t} for i, t in enumerate(docs)])
    gz_file = write_jsonl(tmp_path / "b.jsonl.gz", [{"text": "gz " + t} for t in docs], compress=True)
    array_file = tmp_path / "c.json"
    array_file.write_text(json.dumps([{"text": "array one"}, {"text": "array two"}]))
    parquet_file = write_parquet(tmp_path / "d.parquet", ["pq 0", "pq 1", "pq 2", "pq 3", "pq 4"])
    text_file = tmp_path / "e.txt"
    text_file.write_text("para one\n  line two\n\n\n \nsecond para\r\nend\n\n")
    text_gz = tmp_path / "f.txt.gz"
    with gzip.open(text_gz, "wt") as f:
        f.write("only doc, no trailing newline")

    files = [json_file, gz_file, str(array_file), parquet_file, str(text_file), str(text_gz)]
    got = list(DocumentStream(files))
    assert got == (
        docs
        + ["gz " + t for t in docs]
        + ["array one", "array two"]
        + [f"pq {i}" for i in range(5)]
        + ["para one\n  line two", "second para\nend", "only doc, no trailing newline"]
    )


def test_missing_and_non_string_records_skipped_and_counted(tmp_path):
    records = [{"text": "a"}, {"id": 1}, {"text": None}, {"text": 5}, {"text": ""}, {"text": "b"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    stream = DocumentStream([path])
    assert list(stream) == ["a", "b"]
    assert stream.stats == {"missing_field": 2, "non_string": 1, "empty": 1}
    assert stream.documents == 2

    pq_path = write_parquet(tmp_path / "nulls.parquet", ["x", None, "y"])
    stream = DocumentStream([pq_path])
    assert list(stream) == ["x", "y"] and stream.stats["missing_field"] == 1


def test_strict_raises_naming_the_file(tmp_path):
    path = write_jsonl(tmp_path / "bad_record.jsonl", [{"text": "a"}, {"text": None}])
    with pytest.raises(DataError, match=r"bad_record\.jsonl, line 2: the record has no field 'text'.*data\.strict"):
        list(DocumentStream([path], strict=True))


def test_unknown_text_field_names_field_and_choices(tmp_path):
    path = write_jsonl(tmp_path / "body.jsonl", [{"body": "a"}])
    with pytest.raises(DataError, match=r"body\.jsonl has no field 'text' \(data\.text_field\).*'body'"):
        list(DocumentStream([path]))
    assert list(DocumentStream([path], text_field="body")) == ["a"]
    pq_path = write_parquet(tmp_path / "t.parquet", ["a"])
    with pytest.raises(DataError, match=r"t\.parquet has no column 'content'"):
        list(DocumentStream([pq_path], text_field="content"))


def test_malformed_json_line_is_skipped_not_the_file(tmp_path):
    # Our line-level reader: one broken line is one skipped record (HF's builder fails the file).
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a"}\n{"text": oops\n{"text": "b"}\n')
    stream = DocumentStream([str(path)])
    assert list(stream) == ["a", "b"] and stream.stats == {"malformed_json": 1}
    with pytest.raises(DataError, match=r"broken\.jsonl, line 2: the record is not a JSON object"):
        list(DocumentStream([str(path)], strict=True))


def test_empty_files_yield_nothing(tmp_path):
    files = [touch(tmp_path / "e.jsonl", ""), touch(tmp_path / "e.txt", "\n\n"), touch(tmp_path / "x.txt", "x")]
    stream = DocumentStream(files)
    assert list(stream) == ["x"] and stream.stats == {"empty_file": 2}


def test_names_with_glob_characters_are_literal(tmp_path):
    json_file = write_jsonl(tmp_path / "a[1].jsonl", [{"text": "bracket"}])
    write_jsonl(tmp_path / "a1.jsonl", [{"text": "decoy"}])
    parquet_file = write_parquet(tmp_path / "b[2].parquet", ["pq bracket"])
    files = expand_files([json_file, parquet_file])
    assert files == [json_file, parquet_file]
    assert list(DocumentStream(files)) == ["bracket", "pq bracket"]


# ------------------------------------------------------------------------------------------------
# resume


def test_resume_continues_with_the_exact_next_document(tmp_path):
    files = [
        write_jsonl(
            tmp_path / "a.jsonl.gz", [{"text": f"a{i}"} if i != 2 else {"x": 0} for i in range(5)], compress=True
        ),
        write_parquet(tmp_path / "b.parquet", [f"b{i}" for i in range(5)]),
        touch(tmp_path / "c.txt", "c0\n\nc1\n\nc2\n"),
    ]
    full = list(DocumentStream(files))
    assert len(full) == 12
    for k in range(len(full) + 1):
        stream = DocumentStream(files)
        it = iter(stream)
        head = [next(it) for _ in range(k)]
        state = json.loads(json.dumps(stream.state_dict()))  # plain JSON values
        resumed = DocumentStream(files)
        resumed.load_state_dict(state)
        assert head + list(resumed) == full, k
        assert resumed.documents == len(full)


def test_iterating_again_continues_rather_than_restarting(tmp_path):
    path = touch(tmp_path / "c.txt", "c0\n\nc1\n\nc2\n")
    stream = DocumentStream([path])
    it = iter(stream)
    assert next(it) == "c0"
    del it
    assert list(stream) == ["c1", "c2"]
    assert list(stream) == []
