"""Preference pairs: read them, encode them as supervised training does, and batch chosen with rejected.

Formats, detected per file from its first record that has ``chosen`` or ``rejected``:

- ShareGPT pairs: ``{"conversations": [... ending with a human turn], "chosen": {"from": "gpt",
  "value": ...}, "rejected": {...}}``, optional ``"system"``;
- message pairs (TRL's conversational format): ``{"prompt": [messages], "chosen": [assistant
  message(s)], "rejected": [...]}``;
- text pairs: ``{"prompt": str, "chosen": str, "rejected": str}``, optional ``"system"``.

The prompt (system text and every turn) is encoded exactly as ``encoding`` encodes supervised data
(``turn_ids``, ``PlainTextEncoder``); each answer follows as assistant turn(s) and the closing eos.
Only the answer is scored: its labels are the supervised labels of those turns plus eos, every
prompt label is -100. A batch holds the chosen sequences first, then the rejected ones, so one
forward scores both (``PairCollator``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch
from datasets import Dataset

from .collator import DataCollator
from .encoding import turn_labels
from ..model.modeling_baichuan import IGNORE_INDEX
from .mixing import mix_order, parse_data_sources
from .preprocess import mix_seed, split_sizes
from .records import (
    _OPENAI_EXPECTED,
    _OPENAI_ROLES,
    _SHAREGPT_EXPECTED,
    _SHAREGPT_ROLES,
    BadRecord,
    Conversation,
    DataError,
    BadField,
    _json_type,
    load_items,
    parse_items,
    _parse_messages,
    text_value,
    bad_records_error,
    expand_data_paths,
)
from ..model.tokenization_baichuan import ASSISTANT, EOS_ID, USER, PlainTextEncoder, turn_ids

DROP_TOO_LONG = "prompt too long to leave room for the answers"
# Answers that differ only beyond the cut (or not at all once tokenized): both rows would score the same
# tokens, so the pair has no preference to learn and only dilutes the batch's loss.
DROP_IDENTICAL = "chosen and rejected identical after truncation"


@dataclass
class PreferencePair:
    """A prompt (system + turns ending with the user's) and two answers (assistant texts)."""

    prompt: Conversation
    chosen: list[str]
    rejected: list[str]

    @property
    def source(self) -> str:
        return self.prompt.source


@dataclass
class PairReadResult:
    pairs: list[PreferencePair] = field(default_factory=list)
    bad_records: list[BadRecord] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)


def detect_pair_format(record: dict) -> str | None:
    """'sharegpt_pair', 'prompt_pair' or None, from a record's keys."""
    if "chosen" not in record and "rejected" not in record:
        return None
    if "conversations" in record:
        return "sharegpt_pair"
    if "prompt" in record:
        return "prompt_pair"
    return None


def _answer(record: dict, key: str, sharegpt: bool) -> list[str]:
    """The assistant text(s) of ``record[key]``: a message, a list of messages, or a string."""
    value = record.get(key)
    if value is None:
        raise BadField(key, "missing answer", "missing answer")
    messages = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        raise BadField(key, "empty answer (no message)", "empty answer")
    texts: list[str] = []
    for i, msg in enumerate(messages):
        where = f"{key}[{i}]" if isinstance(value, list) else key
        if isinstance(msg, str):
            texts.append(msg)
            continue
        if not isinstance(msg, dict):
            raise BadField(where, f"is a JSON {_json_type(msg)}, expected a message or a string", "bad answer")
        role_key = "from" if "from" in msg else "role"
        text_key = "value" if "value" in msg else "content"
        roles = _SHAREGPT_ROLES if sharegpt else _OPENAI_ROLES
        role = msg.get(role_key, "gpt" if sharegpt else "assistant")
        if roles.get(role) != ASSISTANT:
            raise BadField(f"{where}.{role_key}", f"role {role!r}: an answer must be the assistant's", "bad answer")
        texts.append(text_value(msg.get(text_key), f"{where}.{text_key}"))
    if any(not t.strip() for t in texts):
        raise BadField(key, "empty answer", "empty answer")
    return texts


def parse_pair(record: dict, fmt: str) -> PreferencePair:
    """One pair record of format `fmt`; raises `records.BadField` naming the field."""
    sharegpt = fmt == "sharegpt_pair"
    if sharegpt:
        prompt = _parse_messages(record, "conversations", _SHAREGPT_ROLES, _SHAREGPT_EXPECTED)
        key = "conversations"
    elif isinstance(record.get("prompt"), str):
        if not record["prompt"].strip():
            raise BadField("prompt", "empty prompt", "empty prompt")
        prompt = Conversation(turns=[(USER, record["prompt"])],
                              system=text_value(record.get("system"), "system", required=False))
        key = "prompt"
    else:
        prompt = _parse_messages(record, "prompt", _OPENAI_ROLES, _OPENAI_EXPECTED)
        key = "prompt"
    if prompt.turns[-1][0] != USER:
        raise BadField(f"{key}[{len(record[key]) - 1}]", "the prompt ends with an assistant turn; it must end with "
                   "the user's turn that the answers reply to", "prompt ends with assistant")
    chosen = _answer(record, "chosen", sharegpt)
    rejected = _answer(record, "rejected", sharegpt)
    if chosen == rejected:
        raise BadField("rejected", "identical to chosen (nothing to prefer)", "identical answers")
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected)


def read_pairs(data_path: str, on_bad_record: Literal["error", "skip"] = "error") -> PairReadResult:
    """Every pair of the files named by `data_path`; bad records raise one `DataError` or are skipped."""
    result = PairReadResult()
    for path in expand_data_paths(data_path):
        items = load_items(path)
        fmt = next((detect_pair_format(item) for _, item in items
                    if isinstance(item, dict) and detect_pair_format(item)), None)
        if fmt is None:
            first = next((item for _, item in items if isinstance(item, dict)), None)
            keys = ", ".join(list(first)[:10]) if first is not None else "no JSON object records"
            raise DataError(f"{path}: no preference pairs (first record keys: {keys}); --stage dpo needs records "
                            "with 'chosen' and 'rejected' answers and 'conversations' or 'prompt' (docs/preference.md)")
        result.formats[path] = fmt
        parsed, bad = parse_items(items, lambda item: parse_pair(item, fmt))
        for where, pair in parsed:
            pair.prompt.source = where
            result.pairs.append(pair)
        result.bad_records.extend(bad)
    if result.bad_records and on_bad_record == "error":
        raise bad_records_error(result.bad_records)
    return result


# ----- encoding -----


@dataclass
class EncodedPair:
    chosen_input_ids: list[int]
    chosen_labels: list[int]
    rejected_input_ids: list[int]
    rejected_labels: list[int]


def _prompt_ids(conv: Conversation, ids: list[list[int]]) -> list[int]:
    """System text then each turn, as ``encoding`` lays them out (`ids` holds their text ids in order)."""
    out: list[int] = []
    k = 0
    if conv.system:
        out += ids[0]
        k = 1
    for (role, _), text_ids in zip(conv.turns, ids[k:]):
        out += turn_ids(role, text_ids)
    return out


def _answer_ids(answer_ids: list[list[int]]) -> tuple[list[int], list[int]]:
    inp, lab = [], []
    for text_ids in answer_ids:
        inp += turn_ids(ASSISTANT, text_ids)
        lab += turn_labels(ASSISTANT, text_ids)
    return inp + [EOS_ID], lab + [EOS_ID]


def encode_pair(encoder: PlainTextEncoder, pair: PreferencePair, model_max_length: int) -> EncodedPair | None:
    """Both sequences of `pair`, or None when the prompt leaves no room for the answers.

    Too long: whole leading rounds of the prompt history go first (the system text and the last user
    turn stay), then the answers lose their tails (no eos then, as supervised head truncation); a
    prompt that still takes more than half of `model_max_length` drops the pair.
    """
    conv = pair.prompt
    texts = ([conv.system] if conv.system else []) + [t for _, t in conv.turns] + pair.chosen + pair.rejected
    try:
        ids = encoder.encode(texts)
    except ValueError as e:
        raise DataError(f"{pair.source}: {e}") from None
    n_prompt = len(texts) - len(pair.chosen) - len(pair.rejected)
    c_inp, c_lab = _answer_ids(ids[n_prompt : n_prompt + len(pair.chosen)])
    r_inp, r_lab = _answer_ids(ids[n_prompt + len(pair.chosen) :])
    head, turns = (1 if conv.system else 0), list(conv.turns)
    turn_texts = ids[head:n_prompt]
    prompt = _prompt_ids(Conversation(turns=turns, system=conv.system), ids[:n_prompt])
    while len(prompt) + max(len(c_inp), len(r_inp)) > model_max_length and len(turns) > 2:
        turns, turn_texts = turns[2:], turn_texts[2:]  # the oldest (user, assistant) round
        prompt = _prompt_ids(Conversation(turns=turns, system=conv.system), ids[:head] + turn_texts)
    room = model_max_length - len(prompt)
    if room < model_max_length // 2 and room < max(len(c_inp), len(r_inp)):
        return None
    return EncodedPair(prompt + c_inp[:room], [IGNORE_INDEX] * len(prompt) + c_lab[:room],
                       prompt + r_inp[:room], [IGNORE_INDEX] * len(prompt) + r_lab[:room])


# ----- datasets and batches -----


@dataclass
class PairReport:
    """What was read and kept, printed at training start like the supervised `DataReport`."""

    text: str

    def format(self) -> str:
        return self.text


@dataclass
class PreparedPairs:
    train_dataset: Dataset
    eval_dataset: Dataset | None
    data_collator: "PairCollator"
    report: PairReport


def _dataset(encoded: list[EncodedPair]) -> Dataset:
    columns: dict[str, list] = {name: [getattr(e, name) for e in encoded] for name in EncodedPair.__dataclass_fields__}
    columns["pair_index"] = list(range(len(encoded)))
    columns["length"] = [len(e.chosen_input_ids) + len(e.rejected_input_ids) for e in encoded]
    return Dataset.from_dict(columns)


def encode_pairs(encoder: PlainTextEncoder, pairs: Sequence[PreferencePair],
                 model_max_length: int) -> tuple[list[EncodedPair], dict[str, list[str]]]:
    """Encoded pairs, and the sources of those dropped, by reason (`DROP_TOO_LONG`, `DROP_IDENTICAL`)."""
    kept: list[EncodedPair] = []
    dropped: dict[str, list[str]] = {}
    for pair in pairs:
        e = encode_pair(encoder, pair, model_max_length)
        if e is None:
            dropped.setdefault(DROP_TOO_LONG, []).append(pair.source)
        elif e.chosen_input_ids == e.rejected_input_ids:
            dropped.setdefault(DROP_IDENTICAL, []).append(pair.source)
        else:
            kept.append(e)
    return kept, dropped


def _dropped_text(dropped: dict[str, list[str]]) -> str:
    return ", ".join(f"{len(sources)} {reason}" for reason, sources in sorted(dropped.items()))


def read_mixed_pairs(data_args: Any, seed: int) -> tuple[PairReadResult, list[str]]:
    """The pairs of every source of ``--data_path``, mixed by ``--mix_strategy`` (`mixing.mix_order`), and
    one report line per source when there are several."""
    sources = parse_data_sources(data_args.data_path)
    parts = [read_pairs(s.path, "skip") for s in sources]
    result = PairReadResult()
    for part in parts:
        result.bad_records.extend(part.bad_records)
        result.formats.update(part.formats)
    if result.bad_records and data_args.on_bad_record == "error":
        raise bad_records_error(result.bad_records)
    weights = None if sources[0].weight is None else [s.weight for s in sources]
    strategy = getattr(data_args, "mix_strategy", "concat") if len(sources) > 1 else "concat"
    order = mix_order([len(p.pairs) for p in parts], weights, strategy, mix_seed(data_args, seed))
    result.pairs = [parts[s].pairs[i] for s, i in order]
    lines = []
    if len(sources) > 1:
        counts = np.bincount(np.array([s for s, _ in order], dtype=np.int64), minlength=len(sources))
        lines.append(f"  mix ({strategy}, seed {mix_seed(data_args, seed)}):")
        for source, part, n in zip(sources, parts, counts):
            weight = "" if source.weight is None else f" (weight {source.weight:g})"
            lines.append(f"    {source.path}{weight}: {len(part.pairs) + len(part.bad_records)} records read, "
                         f"{n} in the mix ({n / max(1, len(order)):.1%})")
    return result, lines


def prepare_pairs(data_args: Any, tokenizer: Any, model_max_length: int, seed: int = 42) -> PreparedPairs:
    """Read, check, encode and split preference pairs (every process does it: pairs are few).

    Raises `DataError` as `preprocess.prepare_data` does (bad records in "error" mode, no pair left).
    """
    encoder = PlainTextEncoder(getattr(tokenizer, "sp_model", tokenizer))
    read, mix_lines = read_mixed_pairs(data_args, seed)
    train, dropped = encode_pairs(encoder, read.pairs, model_max_length)
    if not train:
        why = f" (dropped: {_dropped_text(dropped)} at --model_max_length {model_max_length})" if dropped else ""
        raise DataError(f"{data_args.data_path}: no preference pair left to train on{why}")
    eval_pairs: list[EncodedPair] = []
    eval_dropped: dict[str, list[str]] = {}
    if data_args.eval_data_path:
        eval_read = read_pairs(data_args.eval_data_path, data_args.on_bad_record)
        eval_pairs, eval_dropped = encode_pairs(encoder, eval_read.pairs, model_max_length)
        if not eval_pairs:
            why = f" (dropped: {_dropped_text(eval_dropped)})" if eval_dropped else ""
            raise DataError(f"{data_args.eval_data_path}: no evaluation pair left{why}")
    elif data_args.val_size > 0:
        k = split_sizes(len(train), data_args.val_size)
        perm = np.random.default_rng(seed).permutation(len(train))
        eval_pairs = [train[i] for i in sorted(perm[:k])]
        train = [train[i] for i in sorted(perm[k:])]
    bad: dict[str, int] = {}
    for b in read.bad_records:
        bad[b.reason] = bad.get(b.reason, 0) + 1
    lines = ["Preference data:"] + [f"  file {p} ({f})" for p, f in read.formats.items()] + mix_lines
    lines.append(f"  records read: {len(read.pairs) + len(read.bad_records)}; pairs: train {len(train)}, "
                 f"eval {len(eval_pairs)}")
    if bad:
        lines.append("  skipped bad records: " + ", ".join(f"{n} {r}" for r, n in sorted(bad.items())))
    if dropped:
        lines.append(f"  dropped: {_dropped_text(dropped)}")
    if eval_dropped:
        lines.append(f"  dropped from evaluation: {_dropped_text(eval_dropped)}")
    collator = PairCollator(model_max_length=model_max_length, padding=data_args.padding)
    return PreparedPairs(_dataset(train), _dataset(eval_pairs) if eval_pairs else None, collator, PairReport("\n".join(lines)))


@dataclass
class PairCollator:
    """A batch of B pairs as 2B rows: the chosen sequences, then the rejected ones, padded together.

    Adds ``pair_index`` ``[B]`` (the pair's row in its dataset, for precomputed reference log-probs).
    """

    model_max_length: int
    padding: Literal["longest", "max_length"] = "longest"

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [{"input_ids": f[f"{side}_input_ids"], "labels": f[f"{side}_labels"]}
                for side in ("chosen", "rejected") for f in features]
        batch = DataCollator(model_max_length=self.model_max_length, padding=self.padding)(rows)
        batch["pair_index"] = torch.tensor([int(f["pair_index"]) for f in features], dtype=torch.long)
        return batch
