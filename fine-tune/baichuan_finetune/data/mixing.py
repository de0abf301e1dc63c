"""Data sources and how their examples are mixed: ``--data_path "a.jsonl:0.7,b.json:0.3"``, ``--mix_strategy``.

The strategies follow ``datasets.interleave_datasets`` (what LLaMA-Factory's ``mix_strategy`` calls):

- ``concat``: every example of every source, source after source (no weights).
- ``interleave_under`` (``stopping_strategy="first_exhausted"``): draw a source at random with the
  weights as probabilities, take its next example, and stop as soon as one source has given all of its
  examples; without weights the sources take turns, each giving as many as the smallest has.
- ``interleave_over`` (``"all_exhausted"``): the same draws, but a source that has given all its
  examples starts again from its first, until every source has been seen whole (oversampling).

`mix_order` reimplements that rule (the same ``numpy.random.default_rng(seed)`` draws in blocks of 1000,
so the same order as ``interleave_datasets`` for the same seed; tests/data/test_mixing.py compares
them), on sizes rather than datasets: a pure function of ``(sizes, weights, strategy, seed)``, so every
rank that computes it gets the same order without talking to the others.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from ..core.errors import UsageFault
from .raw_text import document_files
from .records import DataError, expand_data_paths

STRATEGIES = ("concat", "interleave_under", "interleave_over")
_DRAW_BLOCK = 1000  # source draws per rng call, as datasets draws them


class MixError(ValueError, UsageFault):
    """A data path whose sources or weights cannot be used: one line naming the source (exit 2)."""


@dataclass
class Source:
    """One data source of a mix: a file or directory, and its weight (None when no weight was given)."""

    path: str
    weight: float | None = None


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _split_weight(part: str) -> Source:
    """A source's path and weight: the weight follows the last ':' when that is a number, so a path
    holding ':' (a Windows drive, a timestamp) still reads as a path."""
    if os.path.exists(part) or ":" not in part:
        return Source(part)
    path, _, tail = part.rpartition(":")
    weight = _number(tail.strip())
    if weight is None:
        if os.path.exists(path):
            raise MixError(f"--data_path source {path}: weight {tail.strip()!r} is not a number")
        return Source(part)
    if not math.isfinite(weight) or weight < 0:
        raise MixError(f"--data_path source {path}: weight {tail.strip()}: must be a finite number >= 0")
    return Source(path.strip(), weight)


def parse_data_sources(data_path: str) -> list[Source]:
    """The sources of ``--data_path``: one path, or comma-separated paths each with an optional
    ``:weight``.

    A `data_path` that exists as a whole is one source, even with a comma or ':' in its name. Weights
    are given for every source or for none; a weight that is not a number or is negative, a weight of
    0, or weights that sum to 0 raise `MixError` naming the source. Whether the paths exist is the
    readers' business (a `DataError` naming the file).
    """
    if os.path.exists(data_path):
        return [Source(data_path)]
    sources = [_split_weight(p.strip()) for p in data_path.split(",") if p.strip()]
    if not sources:
        raise MixError(f"--data_path {data_path!r}: names no source")
    weighted = [s for s in sources if s.weight is not None]
    if weighted and len(weighted) != len(sources):
        missing = next(s for s in sources if s.weight is None)
        raise MixError(f"--data_path source {missing.path}: no weight, but other sources have one: give a weight "
                       "to every source or to none")
    if weighted:
        if sum(s.weight for s in sources) == 0:
            raise MixError(f"--data_path {data_path!r}: the weights sum to 0")
        zero = next((s for s in sources if s.weight == 0), None)
        if zero is not None:
            raise MixError(f"--data_path source {zero.path}: weight 0 would never draw from it: remove the source")
    return sources


def source_files(path: str, stage: str = "sft") -> list[str]:
    """The files one source names: raw-text files (`raw_text.document_files`) for ``stage="pt"``,
    conversation or pair files (`records.expand_data_paths`) otherwise. `DataError` naming the path
    when there are none."""
    return document_files(path) if stage == "pt" else expand_data_paths(path)


def data_files(data_path: str, stage: str = "sft") -> list[tuple[str, float | None]]:
    """Every file of every source of `data_path`, in order, each with its source's weight."""
    sources = parse_data_sources(data_path)
    missing = next((s.path for s in sources if not os.path.exists(s.path)), None)
    if missing is not None and len(sources) > 1:  # a path with a comma in its name reads as two sources
        raise DataError(f"{missing}: no such file or directory (the data path {data_path!r} is not an existing "
                        "path, so it was split at commas)")
    return [(f, s.weight) for s in sources for f in source_files(s.path, stage)]


def probabilities(weights: list[float] | None) -> list[float] | None:
    """Weights normalised to sum to 1 (None stays None: the sources take turns)."""
    if weights is None:
        return None
    total = float(sum(weights))
    return [w / total for w in weights]


def mix_order(sizes: list[int], weights: list[float] | None, strategy: str, seed: int) -> list[tuple[int, int]]:
    """The mixed examples as ``(source index, example index in that source)``, in order.

    `sizes` are the sources' example counts; `weights` (any positive scale, or None) their sampling
    weights; `strategy` one of `STRATEGIES`. The rule is ``datasets.interleave_datasets``'s (see the
    module docstring): for the same seed, the same order. Deterministic: a function of its arguments
    only. An interleaving with an empty source gives nothing under ``interleave_under`` and is refused
    under ``interleave_over`` (it could never be exhausted), as a `MixError`.
    """
    if strategy not in STRATEGIES:
        raise MixError(f"--mix_strategy {strategy!r}: not one of {', '.join(STRATEGIES)}")
    sizes = [int(n) for n in sizes]
    if weights is not None and len(weights) != len(sizes):
        raise MixError(f"{len(weights)} weights for {len(sizes)} sources")
    if strategy == "concat":
        return [(s, i) for s, n in enumerate(sizes) for i in range(n)]
    if not sizes:
        return []
    oversample = strategy == "interleave_over"
    if min(sizes) == 0:
        if oversample:
            empty = sizes.index(0)
            raise MixError(f"source {empty} has no example: interleave_over could never exhaust it")
        return []
    p = probabilities(weights)
    if p is None:
        rounds = max(sizes) if oversample else min(sizes)
        return [(s, r % n) for r in range(rounds) for s, n in enumerate(sizes)]
    return _weighted_order(sizes, p, oversample, seed)


def _weighted_order(sizes: list[int], p: list[float], oversample: bool, seed: int) -> list[tuple[int, int]]:
    """Random draws of a source per example until the first (under) or the last (over) source has given
    as many examples as it has; a source's k-th draw takes its example k modulo its size."""
    lengths = np.asarray(sizes, dtype=np.int64)
    rng = np.random.default_rng(seed)
    blocks, counts = [], np.zeros(len(sizes), dtype=np.int64)
    while True:
        reached = counts >= lengths
        if reached.all() if oversample else reached.any():
            break
        block = rng.choice(len(sizes), size=_DRAW_BLOCK, p=p)
        blocks.append(block)
        counts += np.bincount(block, minlength=len(sizes))
    draws = np.concatenate(blocks)
    # The draw that exhausts source s is its sizes[s]-th; the mix ends with the first (under) or last (over).
    exhausted = [int(np.flatnonzero(draws == s)[n - 1]) for s, n in enumerate(sizes) if counts[s] >= n]
    used = draws[: (max(exhausted) if oversample else min(exhausted)) + 1]
    index = np.empty(len(used), dtype=np.int64)
    for s, n in enumerate(sizes):
        where = np.flatnonzero(used == s)
        index[where] = np.arange(len(where)) % n
    return list(zip(used.tolist(), index.tolist()))


def realised_shares(order: list[tuple[int, int]], sources: int) -> list[float]:
    """Each source's share of the mixed examples (0 for none)."""
    counts = np.bincount(np.fromiter((s for s, _ in order), dtype=np.int64, count=len(order)), minlength=sources)
    return (counts / max(1, len(order))).tolist()


__all__ = ["STRATEGIES", "MixError", "Source", "data_files", "mix_order", "parse_data_sources", "probabilities",
           "realised_shares", "source_files"]
