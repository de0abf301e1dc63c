"""--stage pt data: documents + eos, every token a target, long documents split (never truncated), packing
with attention kept inside a document (default) or concatenate-and-chunk (--pt_cross_document)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from baichuan_finetune.data.collator import DataCollator
from baichuan_finetune.data.pretrain import DROP_EMPTY, chunk_lengths, encode_documents, pack_documents
from baichuan_finetune.data.preprocess import prepare_data
from baichuan_finetune.data.raw_text import iter_documents
from baichuan_finetune.model.modeling_baichuan import IGNORE_INDEX
from baichuan_finetune.model.tokenization_baichuan import EOS_ID
from baichuan_finetune.options.arguments import DataArguments

from conftest import FIXTURE_DATA, REAL_TOKENIZER

WIKI = FIXTURE_DATA / "llamafactory_wiki_demo.txt"  # 3 articles of 22,000-47,000 characters
C4 = FIXTURE_DATA / "llamafactory_c4_demo.jsonl"


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(REAL_TOKENIZER))


def test_documents_are_their_ids_then_eos_and_every_token_a_target(sp):
    texts = ["Hello world.", "   ", "", "第二个文档。"]
    chunk = encode_documents(sp, texts, ["a:1", "a:2", "a:3", "a:4"])
    assert chunk.dropped == {DROP_EMPTY: 2} and chunk.dropped_sources == {DROP_EMPTY: ["a:2", "a:3"]}
    assert chunk.kept_index.tolist() == [0, 3]
    expected = [sp.encode("Hello world.") + [EOS_ID], sp.encode("第二个文档。") + [EOS_ID]]
    assert [list(map(int, x)) for x, _ in chunk.examples()] == expected
    assert np.array_equal(chunk.labels, chunk.input_ids)


def test_chunk_lengths():
    assert chunk_lengths(np.array([3, 8, 9, 17, 1]), 8).tolist() == [3, 8, 8, 1, 8, 8, 1, 1]
    assert chunk_lengths(np.array([], dtype=np.int64), 8).tolist() == []


def _documents(rng: np.random.Generator, lengths: list[int]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Documents of distinct ids (each token id says its document and position): a piece is traceable."""
    docs = [np.arange(n, dtype=np.int32) + 1000 * (d + 1) for d, n in enumerate(lengths)]
    return np.concatenate(docs), np.array(lengths), docs


def _segments(rows, lengths_field="row_lengths"):
    """(ids, labels, segment numbers) of each row of `PackedArrays`."""
    ends = np.cumsum(getattr(rows, lengths_field))
    for end, n in zip(ends, getattr(rows, lengths_field)):
        yield rows.input_ids[end - n:end], rows.labels[end - n:end], rows.segment_ids[end - n:end]


def test_per_document_rows_lose_no_token_and_never_mix_documents():
    capacity = 16
    lengths = [5, 16, 40, 3, 17, 1, 33]
    ids, lengths_arr, docs = _documents(np.random.default_rng(0), lengths)
    laid = pack_documents(ids, lengths_arr, capacity)
    assert laid.split_documents == 3  # 40, 17 and 33 tokens
    seen: dict[int, list[np.ndarray]] = {}
    for row_ids, row_labels, segments in _segments(laid.rows):
        assert len(row_ids) <= capacity
        for s in np.unique(segments):
            piece, labels = row_ids[segments == s], row_labels[segments == s]
            owner = {int(t) // 1000 for t in piece}
            assert len(owner) == 1  # a segment holds one document's tokens only
            assert np.all(np.diff(piece) == 1)  # contiguous, in order
            # Every token is a target but the segment's first, which nothing in the row precedes.
            assert labels[0] == IGNORE_INDEX and np.array_equal(labels[1:], piece[1:])
            seen.setdefault(owner.pop(), []).append(piece)
    # Token count in == token count out: each document is exactly the union of its pieces.
    for d, doc in enumerate(docs):
        pieces = sorted(seen[d + 1], key=lambda p: p[0])
        assert np.array_equal(np.concatenate(pieces), doc)
    assert int((laid.rows.labels != IGNORE_INDEX).sum()) == sum(lengths) - laid.pieces


def test_cross_document_rows_are_the_concatenation_cut_every_capacity():
    lengths = [5, 16, 40, 3]
    ids, lengths_arr, _ = _documents(np.random.default_rng(0), lengths)
    laid = pack_documents(ids, lengths_arr, 16, cross_document=True)
    assert laid.rows.row_lengths.tolist() == [16, 16, 16, 16]
    assert np.array_equal(laid.rows.input_ids, ids)
    assert set(laid.rows.segment_ids.tolist()) == {1}  # one sequence per row: attention crosses documents
    starts = np.arange(0, 64, 16)
    assert np.all(laid.rows.labels[starts] == IGNORE_INDEX)
    assert np.array_equal(np.delete(laid.rows.labels, starts), np.delete(ids, starts))
    short = pack_documents(ids[:30], np.array([30]), 16, cross_document=True)
    assert short.rows.row_lengths.tolist() == [16, 14]  # the last, shorter row is kept


def test_prepare_pt_splits_long_documents_and_trains_every_token(sp, tmp_path: Path):
    """The Wikipedia fixture through prepare_data: all tokens of all articles are in the rows, in order
    within each segment; targets = tokens - segments; nothing truncated."""
    texts = [t for _, t in iter_documents(str(WIKI))]
    doc_ids = [sp.encode(t) + [EOS_ID] for t in texts]
    args = DataArguments(data_path=str(WIKI), data_cache_dir=str(tmp_path))
    prepared = prepare_data(args, sp, 512, stage="pt")
    report = prepared.report
    train = prepared.train_dataset
    assert report.tokens == sum(map(len, doc_ids)) == sum(train["length"])
    assert report.split_documents == 3 and report.examples == 3
    pieces = []
    for row in train:
        segments = np.asarray(row["attention_mask"])
        ids, labels = np.asarray(row["input_ids"]), np.asarray(row["labels"])
        for s in np.unique(segments):
            pieces.append(ids[segments == s].tolist())
            assert labels[segments == s][0] == IGNORE_INDEX
            assert np.array_equal(labels[segments == s][1:], ids[segments == s][1:])
    assert report.supervised_tokens == report.tokens - len(pieces)
    # The pieces, in document order, are the documents: the multiset of 512-token cuts matches.
    expected = sorted(tuple(d[i:i + 512]) for d in doc_ids for i in range(0, len(d), 512))
    assert sorted(map(tuple, pieces)) == expected
    text = report.format()
    assert "split into pieces of at most 512 tokens (not truncated): 3 document(s)" in text
    assert "packed rows:" in text and "truncated to" not in text


def test_packed_row_attends_only_within_a_document(tiny_model_dir, tmp_path: Path):
    """The model's logits for each document piece inside a packed pt row equal its logits alone."""
    from baichuan_finetune.model.modeling_baichuan import BaichuanForCausalLM
    from baichuan_finetune.model.tokenization_baichuan import BaichuanTokenizer

    model = BaichuanForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = BaichuanTokenizer.from_pretrained(tiny_model_dir)
    data = tmp_path / "docs.jsonl"
    lines = C4.read_text(encoding="utf-8").splitlines()[:12]
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepared = prepare_data(DataArguments(data_path=str(data), data_cache_dir=str(tmp_path / "c")), tokenizer, 128,
                            stage="pt")
    row = next(r for r in prepared.train_dataset if max(r["attention_mask"]) >= 3)
    batch = DataCollator(model_max_length=128)([row])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0]
        segments = np.asarray(row["attention_mask"])
        for s in range(1, segments.max() + 1):
            where = np.flatnonzero(segments == s)
            alone = model(input_ids=torch.tensor([row["input_ids"][where[0]:where[-1] + 1]])).logits[0]
            assert torch.allclose(logits[where[0]:where[-1] + 1], alone, atol=1e-5)
    cross = prepare_data(DataArguments(data_path=str(data), data_cache_dir=str(tmp_path / "c"),
                                       pt_cross_document=True), tokenizer, 128, stage="pt")
    assert "attention_mask" not in cross.train_dataset.column_names  # the collator gives all ones
    assert sum(cross.train_dataset["length"]) == prepared.report.tokens
    assert cross.report.packed_rows == -(-prepared.report.tokens // 128)


def test_pt_cache_keys_on_the_raw_text_options(sp, tmp_path: Path):
    data = tmp_path / "d.txt"
    data.write_text("one line\nsecond line\n\nthird\n", encoding="utf-8")
    base = dict(data_path=str(data), data_cache_dir=str(tmp_path / "c"))
    dirs = set()
    for extra in ({}, {"txt_split": "blank"}, {"pt_cross_document": True}):
        report = prepare_data(DataArguments(**base, **extra), sp, 64, stage="pt").report
        dirs.add(report.cache_dir)
    assert len(dirs) == 3
    assert prepare_data(DataArguments(**base, txt_split="blank"), sp, 64, stage="pt").report.examples == 2
    assert prepare_data(DataArguments(**base), sp, 64, stage="pt").report.from_cache
    json.dumps(report.to_dict())
