"""Batching: dynamic padding, the official max-length padding, and packing.

Packing is a dataset transformation done once before training (`pack_arrays`); a packed row carries
an ``attention_mask`` of segment numbers 1, 2, 3, ... (0 is padding) that the model turns into
block-diagonal causal attention with positions restarting per conversation.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch

from ..model.modeling_baichuan import IGNORE_INDEX
from ..model.tokenization_baichuan import PAD_ID


def padded_length(longest: int, model_max_length: int, multiple_of: int = 8) -> int:
    """Length a "longest" batch is padded to: rounded up to `multiple_of`, never above `model_max_length`."""
    return min(-(-longest // multiple_of) * multiple_of, model_max_length)


@dataclass
class DataCollator:
    """Pads examples (``input_ids``, ``labels``, optional ``attention_mask`` of segment numbers) into tensors.

    ``padding="longest"`` pads to the batch's longest example rounded up to a multiple of 8 (capped at
    `model_max_length`); ``"max_length"`` pads every batch to `model_max_length` as the official recipe.
    Padding: input id 0, label -100, attention mask 0. Other keys (e.g. ``length``) are ignored.
    """

    model_max_length: int
    padding: Literal["longest", "max_length"] = "longest"
    pad_to_multiple_of: int = 8
    pad_id: int = PAD_ID

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if longest > self.model_max_length:
            raise ValueError(f"example of {longest} tokens is longer than model_max_length {self.model_max_length}")
        if self.padding == "max_length":
            width = self.model_max_length
        else:
            width = padded_length(longest, self.model_max_length, self.pad_to_multiple_of)
        batch = len(features)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
            mask = f.get("attention_mask")
            attention_mask[row, :n] = 1 if mask is None else torch.as_tensor(mask, dtype=torch.long)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pack_examples(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing: groups of example indices whose lengths sum to at most `capacity`.

    Deterministic: ties are broken by example index. Each group lists its examples longest first.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"an example of {int(lengths.max())} tokens does not fit in a row of {capacity}")
    order = np.argsort(-lengths, kind="stable")
    smallest = int(lengths.min()) if len(lengths) else 0
    bins: list[list[int]] = []
    # Open bins as (remaining space, bin number), sorted; bisect finds the tightest bin that fits.
    open_bins: list[tuple[int, int]] = []
    for i in order.tolist():
        n = int(lengths[i])
        pos = bisect.bisect_left(open_bins, (n, -1))
        if pos == len(open_bins):
            bins.append([i])
            remaining, b = capacity - n, len(bins) - 1
        else:
            remaining, b = open_bins.pop(pos)
            bins[b].append(i)
            remaining -= n
        if remaining >= smallest:  # a bin nothing can fill any more is closed for good
            bisect.insort(open_bins, (remaining, b))
    return bins


@dataclass
class PackedArrays:
    """Packed rows, flat and back to back like `EncodedChunk`'s arrays."""

    input_ids: np.ndarray  # flat int32, rows back to back
    labels: np.ndarray  # flat int32; first label of every conversation is -100
    segment_ids: np.ndarray  # flat int32: 1, 2, 3, ... per conversation within its row
    row_lengths: np.ndarray  # int32


def pack_arrays(input_ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray, capacity: int) -> PackedArrays:
    """Pack flat, back-to-back examples into rows of at most `capacity` tokens (see `pack_examples`)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    bins = pack_examples(lengths, capacity)
    order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(lengths))
    segment = np.fromiter((s for b in bins for s in range(1, len(b) + 1)), dtype=np.int32, count=len(lengths))
    starts = np.cumsum(lengths) - lengths
    new_lengths = lengths[order]
    new_starts = np.cumsum(new_lengths) - new_lengths
    total = int(new_lengths.sum())
    # Index of every output token in the input: its example's old start plus its offset in the example.
    gather = np.repeat(starts[order] - new_starts, new_lengths) + np.arange(total)
    packed_labels = labels[gather].copy()
    # Position 0's label would teach the previous conversation's last token to predict across the
    # boundary (the official user-turn label there is eos); in an unpacked example it is never used.
    packed_labels[new_starts] = IGNORE_INDEX
    return PackedArrays(
        input_ids=input_ids[gather],
        labels=packed_labels,
        segment_ids=np.repeat(segment, new_lengths),
        row_lengths=np.array([int(lengths[b].sum()) for b in bins], dtype=np.int32),
    )
