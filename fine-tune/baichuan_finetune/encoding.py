"""The official Baichuan2 masking rule, and text encoding that can't inject special tokens.

For each turn: a user turn adds ``[195] + ids(text)`` to the input ids and ``[2] + [-100] * len`` to the
labels; an assistant turn adds ``[196] + ids(text)`` and ``[-100] + ids(text)``. One eos (2) ends both.
A system text is plain ``ids(system)`` before the first turn, labels all -100. Examples longer than
`model_max_length` are cut to their first `model_max_length` tokens ("head", official) or lose whole
trailing rounds ("rounds").

``ids(text)`` is the plain sentencepiece encoding, except that a piece whose id is one of
``FORBIDDEN_IDS`` (pad/unk 0, bos 1, eos 2, user 195, assistant 196) is replaced by the byte pieces
``<0xNN>`` of its text. The real tokenizer maps the literal strings ``<reserved_106>``/``<reserved_107>``
to 195/196 (user-defined pieces), so without this a conversation could forge a role switch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Sequence

import numpy as np

from .records import ASSISTANT, USER, Conversation, DataError
from .tokenization_baichuan import CONTROL_IDS, respell_control_pieces

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
USER_ID = 195
ASSISTANT_ID = 196
IGNORE_INDEX = -100
FORBIDDEN_IDS = CONTROL_IDS  # {PAD_ID, BOS_ID, EOS_ID, USER_ID, ASSISTANT_ID}

DROP_NO_ASSISTANT = "no assistant turn"
DROP_NO_LABEL = "no supervised label after truncation"


def sp_model_of(tokenizer: Any):
    """The SentencePieceProcessor behind a tokenizer (`BaichuanTokenizer.sp_model`) or the processor itself."""
    return getattr(tokenizer, "sp_model", tokenizer)


class TextEncoder:
    """Batched sentencepiece encoding of data text that never yields a FORBIDDEN_IDS id."""

    def __init__(self, sp: Any):
        self.sp = sp_model_of(sp)
        size = self.sp.get_piece_size()
        # Only user-defined pieces can be matched from raw text; control pieces (<s>, </s>) never are.
        self._forbidden_strings = [
            self.sp.id_to_piece(i)
            for i in sorted(FORBIDDEN_IDS)
            if i < size and not (self.sp.is_control(i) or self.sp.is_unknown(i))
        ]
        self._has_byte_pieces = all(self.sp.is_byte(self.sp.piece_to_id(f"<0x{b:02X}>")) for b in range(256))
        # Without byte fallback, characters outside the vocabulary become unk (0).
        self._can_emit_unk = not self._has_byte_pieces or not self._has_byte_fallback()

    def _has_byte_fallback(self) -> bool:
        return self.sp.encode("\U0010fffd")[0] != self.sp.unk_id()

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        ids = self.sp.encode(texts, num_threads=1)
        # Cheap scans first: the safe path is rare and slow (one proto per text).
        suspects: set[int] = set()
        for s in self._forbidden_strings:
            suspects.update(i for i, text in enumerate(texts) if s in text)
        if self._can_emit_unk:
            suspects.update(i for i, x in enumerate(ids) if PAD_ID in x)
        for i in suspects:
            ids[i] = self._encode_safely(texts[i])
        return ids

    def _encode_safely(self, text: str) -> list[int]:
        if self._has_byte_pieces:
            return respell_control_pieces(self.sp, text)
        raw = text.encode("utf-8")
        for piece in self.sp.encode(text, return_type="proto").pieces:
            if piece.id in FORBIDDEN_IDS:
                raise DataError(
                    f"text {raw[piece.begin:piece.end].decode('utf-8', 'replace')!r} would encode to special id "
                    f"{piece.id} and this tokenizer has no byte pieces <0xNN> to spell it"
                )
        return self.sp.encode(text)


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


def _assemble(conv: Conversation, ids: list[list[int]], k: int) -> tuple[list[int], list[int], list[int], int]:
    inp: list[int] = []
    lab: list[int] = []
    if conv.system:
        inp += ids[k]
        lab += [IGNORE_INDEX] * len(ids[k])
        k += 1
    round_ends: list[int] = []
    for role, _ in conv.turns:
        t = ids[k]
        k += 1
        if role == USER:
            inp.append(USER_ID)
            inp += t
            lab.append(EOS_ID)
            lab += [IGNORE_INDEX] * len(t)
        else:
            inp.append(ASSISTANT_ID)
            inp += t
            lab.append(IGNORE_INDEX)
            lab += t
            round_ends.append(len(inp))
    inp.append(EOS_ID)
    lab.append(EOS_ID)
    return inp, lab, round_ends, k


def encode_conversations(
    encoder: TextEncoder | Any,
    conversations: Sequence[Conversation],
    model_max_length: int,
    truncation: str = "head",
) -> EncodedChunk:
    """Encode conversations with the official rule; drop (and count) those with no supervised label.

    `truncation` is "head" (keep the first `model_max_length` tokens, as the official recipe) or
    "rounds" (drop whole trailing rounds and end on eos; a first round that alone is too long is head-cut).
    """
    if truncation not in ("head", "rounds"):
        raise ValueError(f"truncation must be 'head' or 'rounds', got {truncation!r}")
    if not isinstance(encoder, TextEncoder):
        encoder = TextEncoder(encoder)
    dropped: dict[str, int] = {}
    dropped_sources: dict[str, list[str]] = {}

    def drop(reason: str, conv: Conversation) -> None:
        dropped[reason] = dropped.get(reason, 0) + 1
        dropped_sources.setdefault(reason, []).append(conv.source)

    todo = [i for i, c in enumerate(conversations) if any(role == ASSISTANT for role, _ in c.turns)]
    for i in sorted(set(range(len(conversations))) - set(todo)):
        drop(DROP_NO_ASSISTANT, conversations[i])
    texts = [t for i in todo for t in _texts(conversations[i])]
    ids = encoder.encode(texts)

    all_inp: list[list[int]] = []
    all_lab: list[list[int]] = []
    full_lengths = np.empty(len(todo), dtype=np.int32)
    num_truncated = 0
    k = 0
    for j, i in enumerate(todo):
        inp, lab, round_ends, k = _assemble(conversations[i], ids, k)
        full_lengths[j] = len(inp)
        if len(inp) > model_max_length:
            num_truncated += 1
            fitting = [e for e in round_ends if e + 1 <= model_max_length] if truncation == "rounds" else []
            if fitting:
                inp = inp[: fitting[-1]] + [EOS_ID]
                lab = lab[: fitting[-1]] + [EOS_ID]
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


def _texts(conv: Conversation) -> list[str]:
    head = [conv.system] if conv.system else []
    return head + [text for _, text in conv.turns]


def encode_conversation(
    tokenizer: Any, conversation: Conversation, model_max_length: int, truncation: str = "head"
) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) of one conversation, unpadded, or None if it would be dropped."""
    chunk = encode_conversations(TextEncoder(tokenizer), [conversation], model_max_length, truncation)
    examples = chunk.examples()
    return examples[0] if examples else None
