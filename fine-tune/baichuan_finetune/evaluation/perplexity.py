"""Perplexity of a model on raw text (``baichuan-finetune eval --perplexity FILE``).

Documents are read by the pre-training readers (`data.raw_text`) and encoded as pre-training encodes
them (`data.pretrain.encode_documents`: the text's ids, then eos). A document longer than
`max_length` is scored in windows of `max_length` tokens:

- chunked (``stride`` None or equal to `max_length`, the default): consecutive, non-overlapping
  windows, as ``--stage pt`` lays documents into rows; the first token of each window has no context
  and is not scored.
- sliding (``stride < max_length``): a window every `stride` tokens, each scoring only the tokens the
  previous windows did not, with up to ``max_length - stride`` tokens of context before them (the
  Hugging Face perplexity guide's method); only the document's first token is unscored.

The perplexity is ``exp(total NLL / scored tokens)``: token-weighted over all documents, not a mean of
per-document perplexities. Log-probabilities come from the model's own head through
`losses.SequenceLogProbs` (chunked: no ``[tokens, vocab]`` logits; no z-loss).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..data.pretrain import DROP_EMPTY, encode_documents
from ..data.raw_text import iter_documents
from ..model.modeling_baichuan import IGNORE_INDEX
from ..model.tokenization_baichuan import PAD_ID, PlainTextEncoder
from ..objectives.losses import SequenceLogProbs


@dataclass
class Window:
    """A slice ``[begin, end)`` of one document's ids, scoring its tokens from `first_scored` on."""

    document: int
    begin: int
    end: int
    first_scored: int


def windows(length: int, max_length: int, stride: int | None = None, document: int = 0) -> list[Window]:
    """The windows that score a document of `length` tokens (see the module docstring); together they
    score every token but the first exactly once (chunked: every token but each window's first)."""
    stride = max_length if stride is None else stride
    if not 0 < stride <= max_length:
        raise ValueError(f"stride {stride}: must be in 1..{max_length}")
    out: list[Window] = []
    scored_to = 0
    for begin in range(0, length, stride):
        end = min(begin + max_length, length)
        first = max(scored_to, begin + 1)
        if first < end:
            out.append(Window(document, begin, end, first))
        scored_to = end
        if end == length:
            break
    return out


@dataclass
class PerplexityResult:
    """What ``eval --perplexity`` prints and writes."""

    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    documents: int  # documents scored
    empty_documents: int  # skipped: empty or whitespace only
    max_length: int
    stride: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values."""
        return asdict(self)


def read_documents(path: str, sp: Any, text_field: str = "text", txt_split: str = "line"
                   ) -> tuple[list[np.ndarray], int]:
    """The ids (text + eos) of every document of `path`, and how many were empty; `DataError` on bad input."""
    docs = list(iter_documents(path, text_field, txt_split))
    chunk = encode_documents(PlainTextEncoder(getattr(sp, "sp_model", sp)), [t for _, t in docs], [d for d, _ in docs])
    ends = np.cumsum(chunk.lengths)
    ids = [chunk.input_ids[e - n:e] for e, n in zip(ends, chunk.lengths)]
    return ids, chunk.dropped.get(DROP_EMPTY, 0)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score(model: Any, documents: Sequence[np.ndarray], max_length: int, stride: int | None = None,
          batch_size: int = 8) -> tuple[float, int]:
    """Total negative log-likelihood (nats) and the number of tokens scored, over `documents` (ids)."""
    plan = [w for i, doc in enumerate(documents) for w in windows(len(doc), max_length, stride, i)]
    # Longest first: batches of similar lengths pad little.
    plan.sort(key=lambda w: w.end - w.begin, reverse=True)
    device = _device(model)
    total, count = 0.0, 0
    head_loss = SequenceLogProbs()
    for start in range(0, len(plan), batch_size):
        batch = plan[start:start + batch_size]
        width = max(w.end - w.begin for w in batch)
        input_ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, w in enumerate(batch):
            ids = torch.as_tensor(documents[w.document][w.begin:w.end].astype(np.int64))
            input_ids[row, :len(ids)] = ids
            mask[row, :len(ids)] = 1
            labels[row, w.first_scored - w.begin:len(ids)] = ids[w.first_scored - w.begin:]
        out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), labels=labels.to(device),
                    head_loss=head_loss)
        total -= float(out.loss.float().sum())
        count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    return total, count


def perplexity(model: Any, documents: Sequence[np.ndarray], max_length: int, stride: int | None = None,
               batch_size: int = 8, empty_documents: int = 0) -> PerplexityResult:
    """Token-weighted perplexity of `model` on `documents` (ids as `read_documents` gives them)."""
    nll, tokens = score(model, documents, max_length, stride, batch_size)
    mean = nll / tokens if tokens else float("nan")
    return PerplexityResult(perplexity=math.exp(mean) if tokens else float("nan"), nll=mean, tokens=tokens,
                            documents=len(documents), empty_documents=empty_documents, max_length=max_length,
                            stride=max_length if stride is None else stride)


def format_result(result: PerplexityResult, path: str, model: str) -> str:
    """One line for people."""
    return (f"perplexity of {model} on {path}: {result.perplexity:.4f} (mean NLL {result.nll:.4f} nats over "
            f"{result.tokens} tokens of {result.documents} documents; windows of {result.max_length}, stride "
            f"{result.stride}" + (f"; {result.empty_documents} empty documents skipped" if result.empty_documents
                                  else "") + ")")


__all__ = ["PerplexityResult", "Window", "format_result", "perplexity", "read_documents", "score", "windows"]
