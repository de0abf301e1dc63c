"""Raw-text readers of --stage pt and eval --perplexity: every format, document ids, laziness, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from baichuan_finetune.data.raw_text import document_files, iter_documents
from baichuan_finetune.data.records import BadRecord, DataError

from conftest import FIXTURE_DATA

C4 = FIXTURE_DATA / "llamafactory_c4_demo.jsonl"
WIKI = FIXTURE_DATA / "llamafactory_wiki_demo.txt"
TEXTS = ["First document.", "Zweites Dokument, mit Umlauten: äöü.", "第三个文档。"]


def test_fixtures_read_whole_in_file_order():
    c4 = list(iter_documents(str(C4)))
    expected = [json.loads(line)["text"] for line in C4.read_text(encoding="utf-8").splitlines()]
    assert [t for _, t in c4] == expected
    assert [d for d, _ in c4] == [f"{C4}:{i}" for i in range(1, len(expected) + 1)]
    wiki = list(iter_documents(str(WIKI)))
    assert [t for _, t in wiki] == WIKI.read_text(encoding="utf-8").splitlines()


def test_txt_line_and_blank_modes(tmp_path: Path):
    path = tmp_path / "d.txt"
    path.write_text("a first line\nits second line\n\n\n  \nanother document\r\n\nlast\n", encoding="utf-8")
    assert list(iter_documents(str(path))) == [
        (f"{path}:1", "a first line"), (f"{path}:2", "its second line"), (f"{path}:6", "another document"),
        (f"{path}:8", "last")]
    assert list(iter_documents(str(path), txt_split="blank")) == [
        (f"{path}:1", "a first line\nits second line"), (f"{path}:6", "another document"), (f"{path}:8", "last")]


def _tables(tmp_path: Path, texts: list[str], column: str = "text") -> dict[str, Path]:
    table = pa.table({column: texts, "n": list(range(len(texts)))})
    paths = {"parquet": tmp_path / "t.parquet", "arrow_file": tmp_path / "f.arrow",
             "arrow_stream": tmp_path / "s.arrow"}
    pq.write_table(table, paths["parquet"], row_group_size=2)
    with pa.OSFile(str(paths["arrow_file"]), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=2)
    with pa.OSFile(str(paths["arrow_stream"]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=2)
    return paths


def test_json_jsonl_parquet_arrow_give_the_same_documents(tmp_path: Path):
    (tmp_path / "a.json").write_text(json.dumps([{"body": t} for t in TEXTS], ensure_ascii=False), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": t, "x": 1}) + "\n" for t in TEXTS), encoding="utf-8")
    files = {"json": tmp_path / "a.json", "jsonl": tmp_path / "b.jsonl", **_tables(tmp_path, TEXTS, "body")}
    for kind, path in files.items():
        docs = list(iter_documents(str(path), text_field="body"))
        assert [t for _, t in docs] == TEXTS, kind
        assert len({d for d, _ in docs}) == len(TEXTS), kind
    assert [d for d, _ in iter_documents(str(files["json"]), "body")][1] == f"{files['json']}:record 1"
    assert [d for d, _ in iter_documents(str(files["parquet"]), "body")][2] == f"{files['parquet']}:row 2"


def test_directory_reads_known_files_sorted(tmp_path: Path):
    (tmp_path / "b.txt").write_text("from b\n", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"text": "from a"}\n', encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored\n", encoding="utf-8")
    assert [Path(p).name for p in document_files(str(tmp_path))] == ["a.jsonl", "b.txt"]
    assert [t for _, t in iter_documents(str(tmp_path))] == ["from a", "from b"]


def test_lazy_documents_before_a_later_problem(tmp_path: Path):
    """Documents are yielded as they are read: the first comes out before a bad line further on is reached."""
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "good"}\n{"text": 1}\n', encoding="utf-8")
    docs = iter_documents(str(path))
    assert next(docs) == (f"{path}:1", "good")
    with pytest.raises(DataError, match=r"t.jsonl:2: text: is a JSON number, expected a string"):
        next(docs)


def test_skip_mode_counts_bad_records(tmp_path: Path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "good"}\n{"text": null}\n[1]\n{"other": "x"}\nnot json\n{"text": "also good"}\n',
                    encoding="utf-8")
    skipped: list[BadRecord] = []
    assert [t for _, t in iter_documents(str(path), skipped=skipped)] == ["good", "also good"]
    assert [b.reason for b in skipped] == ["non-string text", "not an object", "missing text", "invalid JSON"]


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"", "empty.txt: empty file"),
    ("blank.txt", b"\n\n  \n", "blank.txt: empty file (no document in it)"),
    ("empty.json", b"[]", "empty.json: empty file (no document in it)"),
    ("zip.txt", b"PK\x03\x04\x00\x00binary", "zip.txt: a binary file (a NUL byte at byte 4)"),
    ("latin.jsonl", b'{"text": "caf\xe9"}\n', "latin.jsonl: a binary file or not UTF-8 text (byte 13)"),
    ("s.jsonl", b'{"text": "a\\ud800b"}\n', "s.jsonl:1: text: invalid Unicode: a lone surrogate"),
    ("bad.json", b'[{"text": "a"},', "bad.json: invalid JSON"),
    ("table.parquet", b"not parquet at all", "table.parquet: not a readable Parquet file"),
    ("doc.pdf", b"%PDF", "doc.pdf: unknown raw-text file type"),
])
def test_bad_files_are_one_line(tmp_path: Path, name: str, content: bytes, message: str):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        list(iter_documents(str(path)))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_table_column_problems(tmp_path: Path):
    paths = _tables(tmp_path, TEXTS)
    with pytest.raises(DataError, match=r"no column 'body' \(columns: text, n; choose one with --text_field\)"):
        list(iter_documents(str(paths["parquet"]), text_field="body"))
    with pytest.raises(DataError, match=r"column 'n' is int64, expected strings"):
        list(iter_documents(str(paths["arrow_stream"]), text_field="n"))
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a", None]}), nulls)
    with pytest.raises(DataError, match=r"nulls.parquet:row 1: text: null, expected a string"):
        list(iter_documents(str(nulls)))


def test_missing_source(tmp_path: Path):
    with pytest.raises(DataError, match="nope.txt: no such file or directory"):
        list(iter_documents(str(tmp_path / "nope.txt")))
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="directory holds no .txt"):
        list(iter_documents(str(tmp_path / "d")))
