"""Continued pre-training (``--stage pt``): documents to ids, and ids to packed rows where every token is a target.

A document is encoded as its text's ids followed by eos (no bos: Baichuan2's tokenizer adds none, and
LLaMA-Factory's pt stage appends only eos). Its labels are its ids: every token is a target.

Two layouts of the rows of `model_max_length` tokens:

- **per document** (default, ``--pt_cross_document False``): a document longer than a row is split into
  pieces of `model_max_length` tokens (the last one shorter); nothing is truncated. The pieces are
  packed into rows best-fit-decreasing, exactly as SFT packing packs conversations
  (`collator.pack_arrays`): each piece is its own segment of the row's ``attention_mask`` (1, 2, 3,
  ...), attention and positions restart at every segment, and the label of a segment's first token is
  -100 (nothing is predicted across a boundary).
- **cross document** (``--pt_cross_document True``): the classic concatenate-and-chunk. All documents
  (each ending in eos) are concatenated in order and cut into rows of `model_max_length`; attention
  runs across document boundaries within a row. The last, shorter row is kept (LLaMA-Factory drops it;
  here nothing is dropped silently), padded by the collator.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Any, Sequence

import numpy as np

from .collator import PackedArrays, pack_arrays
from .encoding import EncodedChunk
from .records import DataError
from ..model.tokenization_baichuan import EOS_ID, PlainTextEncoder

DROP_EMPTY = "empty document"


def encode_documents(encoder: PlainTextEncoder | Any, texts: Sequence[str],
                     sources: Sequence[str] = ()) -> EncodedChunk:
    """Encode documents as ``ids(text) + [eos]`` with labels equal to the ids, back to back.

    Empty or whitespace-only documents are dropped and counted (`DROP_EMPTY`); `sources` (document ids,
    as `raw_text.iter_documents` gives them) name them and name a document that cannot be encoded.
    Lengths are those of whole documents: splitting into rows is `chunk_lengths`' job.
    """
    if not isinstance(encoder, PlainTextEncoder):
        encoder = PlainTextEncoder(getattr(encoder, "sp_model", encoder))
    sources = list(sources) or [f"document {i}" for i in range(len(texts))]
    keep = [i for i, t in enumerate(texts) if t.strip()]
    empty = [sources[i] for i, t in enumerate(texts) if not t.strip()]
    try:
        ids = encoder.encode([texts[i] for i in keep])
    except ValueError:
        ids = []
        for i in keep:  # rare (a vocabulary without byte pieces): again one by one, to name the document
            try:
                ids += encoder.encode([texts[i]])
            except ValueError as e:
                raise DataError(f"{sources[i]}: {e}") from None
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int32, count=len(ids))
    total = int(lengths.sum())
    flat = np.fromiter(chain.from_iterable(x + [EOS_ID] for x in ids), dtype=np.int32, count=total)
    return EncodedChunk(
        input_ids=flat,
        labels=flat.copy(),
        lengths=lengths,
        kept_index=np.asarray(keep, dtype=np.int64),
        full_lengths=lengths.copy(),
        num_truncated=0,
        num_tokens=total,
        dropped={DROP_EMPTY: len(empty)} if empty else {},
        dropped_sources={DROP_EMPTY: empty} if empty else {},
    )


def chunk_lengths(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """The lengths of the pieces of documents of `lengths` cut every `capacity` tokens, in order:
    a document of n tokens gives n // capacity full pieces and one of n % capacity (if not 0)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    full = lengths // capacity
    rest = lengths % capacity
    pieces = full + (rest > 0)
    out = np.full(int(pieces.sum()), capacity, dtype=np.int64)
    ends = np.cumsum(pieces)
    has_rest = rest > 0
    out[ends[has_rest] - 1] = rest[has_rest]
    return out


@dataclass
class PretrainRows:
    """Packed pre-training rows (flat, back to back) and how the documents were laid out."""

    rows: PackedArrays
    split_documents: int  # documents longer than a row, split into several pieces
    pieces: int  # segments written (documents, or their pieces)


def pack_documents(input_ids: np.ndarray, lengths: np.ndarray, capacity: int,
                   cross_document: bool = False) -> PretrainRows:
    """Rows of at most `capacity` tokens holding every token of the documents (see the module docstring).

    `input_ids` and `lengths` are flat documents as `encode_documents` gives them; every token of
    them is in exactly one row. Labels are the ids, except the first token of every segment (per
    document) or of every row (cross document), which nothing before it in the row predicts.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    input_ids = np.asarray(input_ids, dtype=np.int32)
    split = int((lengths > capacity).sum())
    if cross_document:
        total = len(input_ids)
        row_lengths = chunk_lengths(np.array([total]), capacity) if total else np.zeros(0, dtype=np.int64)
        starts = np.cumsum(row_lengths) - row_lengths
        labels = input_ids.copy()
        labels[starts] = -100
        rows = PackedArrays(input_ids=input_ids.copy(), labels=labels,
                            segment_ids=np.ones(total, dtype=np.int32),
                            row_lengths=row_lengths.astype(np.int32))
        return PretrainRows(rows, split, len(row_lengths))
    pieces = chunk_lengths(lengths, capacity)
    rows = pack_arrays(input_ids, input_ids, pieces, capacity)  # pack_arrays copies the labels it changes
    return PretrainRows(rows, split, len(pieces))


__all__ = ["DROP_EMPTY", "PretrainRows", "chunk_lengths", "encode_documents", "pack_documents"]
