"""Encode conversations for training: the chat format's layout plus the official Baichuan2 masking rule.

The layout (role ids, turn order, safe text encoding) belongs to ``tokenization_baichuan``, so the
training data and the chat prompt are built the same way. This module adds the labels:

| turn | input ids | labels |
|---|---|---|
| system text (if any) | ``ids(system)`` | all -100 |
| user | ``195, ids(text)`` | ``2, -100 ...`` |
| assistant | ``196, ids(text)`` | ``-100, ids(text)`` |
| end | ``2`` | ``2`` |

An assistant turn with ``"weight": 0`` (OpenAI fine-tuning format) has all labels -100, and so has
the eos that ends it (the next user role token's label, or the final eos's).

Examples longer than `model_max_length` are cut to their first `model_max_length` tokens ("head",
official) or lose whole trailing rounds ("rounds").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Literal, Sequence

import numpy as np

from ..model.modeling_baichuan import IGNORE_INDEX
from .records import ASSISTANT, USER, Conversation, DataError
from ..model.tokenization_baichuan import EOS_ID, PlainTextEncoder, turn_ids

DROP_NO_ASSISTANT = "no assistant turn"
DROP_NO_LABEL = "no supervised label after truncation"


def turn_labels(role: str, text_ids: list[int]) -> list[int]:
    """The official labels of one turn (see ``turn_ids`` for its input ids).

    A user turn's role token is labelled eos: the model learns to end the previous answer there.
    An assistant turn learns its text, never its role token.
    """
    if role == USER:
        return [EOS_ID] + [IGNORE_INDEX] * len(text_ids)
    return [IGNORE_INDEX, *text_ids]


@dataclass
class EncodedChunk:
    """Encoded conversations, kept ones concatenated (flat arrays) to avoid per-example objects."""

    input_ids: np.ndarray  # int32, all kept examples back to back
    labels: np.ndarray  # int32
    lengths: np.ndarray  # int32, one per kept example
    kept_index: np.ndarray  # int64, index of each kept example in the input list
    full_lengths: np.ndarray  # int32, untruncated length of every encoded example
    num_truncated: int = 0
    num_tokens: int = 0  # tokens produced before truncation (the throughput measure)
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_sources: dict[str, list[str]] = field(default_factory=dict)

    def examples(self) -> list[tuple[list[int], list[int]]]:
        """(input_ids, labels) per kept example, as Python lists."""
        ends = np.cumsum(self.lengths)
        starts = ends - self.lengths
        return [(self.input_ids[s:e].tolist(), self.labels[s:e].tolist()) for s, e in zip(starts, ends)]


def _assemble(conv: Conversation, ids: list[list[int]],
              k: int) -> tuple[list[int], list[int], list[tuple[int, int]], int]:
    """Input ids, labels, and (end, label of the eos that closes it) of each assistant turn of `conv`,
    whose texts are `ids[k:]`.

    An untrained turn (``"weight": 0``) has no label, and neither has the eos that ends it (the next
    user role token's or the final one): learning to stop that answer is part of that answer.
    """
    inp: list[int] = []
    lab: list[int] = []
    if conv.system:
        inp += ids[k]
        lab += [IGNORE_INDEX] * len(ids[k])
        k += 1
    untrained = set(conv.untrained_turns)
    rounds: list[tuple[int, int]] = []
    eos_label = EOS_ID  # the label of the next eos: ignored right after an untrained answer
    for t, (role, _) in enumerate(conv.turns):
        labels = turn_labels(role, ids[k])
        if t in untrained:
            labels = [IGNORE_INDEX] * len(labels)
        elif role == USER:
            labels[0] = eos_label
        inp += turn_ids(role, ids[k])
        lab += labels
        k += 1
        eos_label = IGNORE_INDEX if t in untrained else EOS_ID
        if role == ASSISTANT:
            rounds.append((len(inp), eos_label))
    inp.append(EOS_ID)
    lab.append(eos_label)
    return inp, lab, rounds, k


def _texts(conv: Conversation) -> list[str]:
    head = [conv.system] if conv.system else []
    return head + [text for _, text in conv.turns]


def _encode_texts(encoder: PlainTextEncoder, conversations: list[Conversation]) -> list[list[int]]:
    """Ids of every text of `conversations`, in order; a text that cannot be encoded safely is bad data."""
    try:
        return encoder.encode([t for c in conversations for t in _texts(c)])
    except ValueError:
        pass
    # Rare (a vocabulary without byte pieces): encode again one conversation at a time to name the record.
    ids: list[list[int]] = []
    for conv in conversations:
        try:
            ids += encoder.encode(_texts(conv))
        except ValueError as e:
            raise DataError(f"{conv.source or 'conversation'}: {e}") from None
    return ids


def encode_conversations(
    encoder: PlainTextEncoder | Any,
    conversations: Sequence[Conversation],
    model_max_length: int,
    truncation: Literal["head", "rounds"] = "head",
) -> EncodedChunk:
    """Encode conversations with the official rule; drop (and count) those with no supervised label.

    `encoder` is a `PlainTextEncoder`, or a sentencepiece processor (or a tokenizer with ``sp_model``)
    to make one from. `truncation` is "head" (keep the first `model_max_length` tokens, as the official
    recipe) or "rounds" (drop whole trailing rounds and end on eos; a first round that alone is too
    long is head-cut). Raises `DataError` naming the record when a text cannot be encoded without a
    control id (only with a vocabulary that has no byte pieces).
    """
    if not isinstance(encoder, PlainTextEncoder):
        encoder = PlainTextEncoder(getattr(encoder, "sp_model", encoder))
    dropped: dict[str, int] = {}
    dropped_sources: dict[str, list[str]] = {}

    def drop(reason: str, conv: Conversation) -> None:
        dropped[reason] = dropped.get(reason, 0) + 1
        dropped_sources.setdefault(reason, []).append(conv.source)

    todo = [i for i, c in enumerate(conversations) if any(role == ASSISTANT for role, _ in c.turns)]
    for i in sorted(set(range(len(conversations))) - set(todo)):
        drop(DROP_NO_ASSISTANT, conversations[i])
    ids = _encode_texts(encoder, [conversations[i] for i in todo])

    all_inp: list[list[int]] = []
    all_lab: list[list[int]] = []
    full_lengths = np.empty(len(todo), dtype=np.int32)
    num_truncated = 0
    k = 0
    for j, i in enumerate(todo):
        inp, lab, rounds, k = _assemble(conversations[i], ids, k)
        full_lengths[j] = len(inp)
        if len(inp) > model_max_length:
            num_truncated += 1
            fitting = [r for r in rounds if r[0] + 1 <= model_max_length] if truncation == "rounds" else []
            if fitting:
                end, eos_label = fitting[-1]
                inp = inp[:end] + [EOS_ID]
                lab = lab[:end] + [eos_label]
            else:
                inp = inp[:model_max_length]
                lab = lab[:model_max_length]
        all_inp.append(inp)
        all_lab.append(lab)

    lengths = np.fromiter(map(len, all_inp), dtype=np.int32, count=len(all_inp))
    total = int(lengths.sum())
    flat_inp = np.fromiter(chain.from_iterable(all_inp), dtype=np.int32, count=total)
    flat_lab = np.fromiter(chain.from_iterable(all_lab), dtype=np.int32, count=total)

    # The label at position 0 is never used (the model shifts labels by one), so an example needs a
    # supervised label at position >= 1 to teach anything.
    starts = np.cumsum(lengths) - lengths
    supervised = (flat_lab != IGNORE_INDEX).astype(np.int32)
    supervised[starts] = 0
    per_example = np.add.reduceat(supervised, starts) if total else np.zeros(0, dtype=np.int64)
    has_label = per_example > 0
    if not has_label.all():
        for j in np.flatnonzero(~has_label):
            drop(DROP_NO_LABEL, conversations[todo[j]])
        token_keep = np.repeat(has_label, lengths)
        flat_inp, flat_lab, lengths = flat_inp[token_keep], flat_lab[token_keep], lengths[has_label]
    kept_index = np.asarray(todo, dtype=np.int64)[has_label] if todo else np.zeros(0, dtype=np.int64)
    return EncodedChunk(
        input_ids=flat_inp,
        labels=flat_lab,
        lengths=lengths,
        kept_index=kept_index,
        full_lengths=full_lengths,
        num_truncated=num_truncated,
        num_tokens=int(full_lengths.sum()),
        dropped=dropped,
        dropped_sources=dropped_sources,
    )
