"""Prepare data and show it as the model will see it: what `scripts/inspect_data.py` prints."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import sentencepiece as spm

from .data_stats import format_example, padding_efficiency
from ..model.modeling_baichuan import IGNORE_INDEX
from .preprocess import DataOptions, prepare_data
from .records import DataError


def load_sentencepiece(tokenizer_path: str) -> spm.SentencePieceProcessor:
    """A SentencePieceProcessor from a `.model` file or a directory holding `tokenizer.model`."""
    path = os.path.join(tokenizer_path, "tokenizer.model") if os.path.isdir(tokenizer_path) else tokenizer_path
    if not os.path.isfile(path):
        raise DataError(f"{tokenizer_path}: no tokenizer.model found")
    return spm.SentencePieceProcessor(model_file=path)


def inspect_data(
    data_args: DataOptions,
    tokenizer: Any,
    model_max_length: int,
    batch_size: int = 8,
    preview: int = 3,
    dump: str | None = None,
    color: bool = False,
    stage: str = "sft",
) -> str:
    """Statistics and a preview of the first examples as text; with `dump`, write every kept example
    (unpadded ``input_ids`` and ``labels``, input order) as one JSON object per line.

    ``stage="pt"`` reads raw-text documents (`prepare_data`'s pt rows: every token but a segment's
    first is a target). Raises `DataError` as `prepare_data` does.
    """
    prepared = prepare_data(data_args, tokenizer, model_max_length, stage=stage)
    report = prepared.report
    # The report's "longest" figure assumed batches of 8. When the training set holds the examples
    # themselves (not packed rows, not a split), measure it again for `batch_size`; the packed row
    # count of those same examples is already in the report.
    if stage != "pt" and not data_args.packing and not data_args.val_size and not data_args.eval_data_path:
        report.efficiency, report.packed_rows = padding_efficiency(
            np.asarray(prepared.train_dataset["length"]), model_max_length, batch_size,
            packed_rows=report.packed_rows)
        report.batch_size = batch_size
    sp = getattr(tokenizer, "sp_model", tokenizer)
    parts = [report.format()]
    for i in range(min(preview, len(prepared.train_dataset))):
        row = prepared.train_dataset[i]
        parts.append(f"--- example {i} ({len(row['input_ids'])} tokens; supervised in "
                     f"{'green' if color else '[[ ]]'}) ---\n" + format_example(sp, row["input_ids"], row["labels"], color))
    if dump:
        with open(dump, "w", encoding="utf-8") as f:
            for row in prepared.train_dataset:
                f.write(json.dumps({"input_ids": row["input_ids"], "labels": row["labels"]}) + "\n")
        parts.append(f"wrote {len(prepared.train_dataset)} examples to {dump}")
    return "\n".join(parts)


def inspect_pairs(data_args: Any, tokenizer: Any, model_max_length: int, preview: int = 3, color: bool = False) -> str:
    """What `--stage dpo` reads: the pair report, then the first pairs as prompt, chosen and rejected,
    the scored tokens of each answer marked as supervised text is (``[[ ]]`` or green).

    Raises `DataError` as `preference_data.prepare_pairs` does.
    """
    from .preference_data import prepare_pairs

    prepared = prepare_pairs(data_args, tokenizer, model_max_length)
    sp = getattr(tokenizer, "sp_model", tokenizer)
    parts = [prepared.report.format()]
    for i in range(min(preview, len(prepared.train_dataset))):
        row = prepared.train_dataset[i]
        ids, labels = row["chosen_input_ids"], row["chosen_labels"]
        # The answer starts at its assistant role token, just before the first scored label.
        start = next(k for k, label in enumerate(labels) if label != IGNORE_INDEX) - 1
        parts.append(f"--- pair {i} (chosen {len(ids)} tokens, rejected {len(row['rejected_input_ids'])}; scored in "
                     f"{'green' if color else '[[ ]]'}) ---")
        parts.append("prompt:" + format_example(sp, ids[:start], labels[:start], color))
        for side in ("chosen", "rejected"):
            side_ids, side_labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            parts.append(f"{side}:" + format_example(sp, side_ids[start:], side_labels[start:], color))
    return "\n".join(parts)
