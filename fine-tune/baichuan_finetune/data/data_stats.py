"""Statistics and readable previews of encoded data: pure functions of ids and lengths.

Printed when training starts and by `scripts/inspect_data.py` (through `data_preview`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from .collator import pack_examples, padded_length
from ..model.modeling_baichuan import IGNORE_INDEX
from ..model.tokenization_baichuan import ASSISTANT_ID, EOS_ID, USER_ID


@dataclass
class DataReport:
    """What preprocessing read, kept, dropped and how well each batching mode fills its batches."""

    files: dict[str, str] = field(default_factory=dict)  # path -> detected format
    records: int = 0  # records read, bad ones included
    bad_records: dict[str, int] = field(default_factory=dict)  # reason -> count (skipped)
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count (no supervised label)
    examples: int = 0  # kept examples
    truncated: int = 0
    model_max_length: int = 0
    tokens: int = 0  # tokens of kept examples after truncation
    supervised_tokens: int = 0
    length_percentiles: dict[str, int] = field(default_factory=dict)  # untruncated lengths of encoded examples
    efficiency: dict[str, float] = field(default_factory=dict)  # batching mode -> real tokens / batch slots
    batch_size: int = 8
    packed_rows: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    from_cache: bool = False
    cache_dir: str = ""
    stage: str = "sft"  # "pt": examples are documents, every token a target, always packed
    mix_strategy: str = "concat"
    mix_seed: int = 0
    # Per source of --data_path: path, weight, read (records/documents), examples and tokens in the mix.
    sources: list[dict[str, Any]] = field(default_factory=list)
    split_documents: int = 0  # pt: documents longer than a row, split into pieces (never truncated)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (stored next to the cached data)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DataReport":
        """The report `to_dict` gave."""
        return cls(**data)

    def format(self) -> str:
        """A short multi-line summary for people."""
        lines = ["Data:"]
        for path, fmt in self.files.items():
            lines.append(f"  file {path} ({fmt})")
        what = "documents" if self.stage == "pt" else "examples"
        lines.append(f"  {'documents' if self.stage == 'pt' else 'records'} read: {self.records}; kept {what}: "
                     f"{self.examples} (train {self.train_examples}, eval {self.eval_examples})")
        lines.extend(self.format_sources())
        for title, counts in (("skipped bad records", self.bad_records), ("dropped", self.dropped)):
            if counts:
                lines.append(f"  {title}: " + ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())))
        share = self.supervised_tokens / self.tokens if self.tokens else 0.0
        if self.stage == "pt":
            lines.append(f"  split into pieces of at most {self.model_max_length} tokens (not truncated): "
                         f"{self.split_documents} document(s)")
            if self.length_percentiles:
                p = self.length_percentiles
                lines.append(f"  tokens per document (with eos): p50 {p['p50']}, p90 {p['p90']}, p99 {p['p99']}, "
                             f"max {p['max']}")
            lines.append(f"  tokens: {self.tokens}, targets: {self.supervised_tokens} ({share:.1%}; the first "
                         "token of each row segment has nothing before it to predict it)")
            fill = self.efficiency.get("packing", 0.0)
            lines.append(f"  packed rows: {self.packed_rows}, filled {fill:.1%} (real tokens per row slot)")
            if self.cache_dir:
                lines.append(f"  cache: {self.cache_dir} ({'reused' if self.from_cache else 'written'})")
            return "\n".join(lines)
        lines.append(f"  truncated to {self.model_max_length} tokens: {self.truncated}")
        if self.length_percentiles:
            p = self.length_percentiles
            lines.append(f"  tokens per example (before truncation): p50 {p['p50']}, p90 {p['p90']}, "
                         f"p99 {p['p99']}, max {p['max']}")
        lines.append(f"  tokens: {self.tokens}, supervised: {self.supervised_tokens} ({share:.1%})")
        if self.efficiency:
            eff = self.efficiency
            lines.append(
                "  real tokens per batch slot: "
                f"max_length {eff['max_length']:.1%}, longest (batch {self.batch_size}) {eff['longest']:.1%}, "
                f"packing {eff['packing']:.1%} ({self.packed_rows} rows)"
            )
        if self.cache_dir:
            lines.append(f"  cache: {self.cache_dir} ({'reused' if self.from_cache else 'written'})")
        return "\n".join(lines)


    def format_sources(self) -> list[str]:
        """One line per source of a mix (none for a single source read whole): what was read from it,
        and its realised share of the mixed examples and tokens."""
        if len(self.sources) < 2 and self.mix_strategy == "concat":
            return []
        unit = "documents" if self.stage == "pt" else "records"
        examples = sum(s["examples"] for s in self.sources) or 1
        tokens = sum(s["tokens"] for s in self.sources) or 1
        seed = "" if self.mix_strategy == "concat" else f", seed {self.mix_seed}"
        lines = [f"  mix ({self.mix_strategy}{seed}):"]
        for s in self.sources:
            weight = "" if s["weight"] is None else f" (weight {s['weight']:g})"
            lines.append(f"    {s['path']}{weight}: {s['read']} {unit} read, {s['examples']} in the mix "
                         f"({s['examples'] / examples:.1%}), {s['tokens']} tokens ({s['tokens'] / tokens:.1%})")
        return lines


def length_percentiles(lengths: np.ndarray) -> dict[str, int]:
    """p50, p90, p99 (nearest actual length) and max of `lengths`; empty for no lengths."""
    if len(lengths) == 0:
        return {}
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99], method="nearest")
    return {"p50": int(p50), "p90": int(p90), "p99": int(p99), "max": int(lengths.max())}


def padding_efficiency(
    lengths: np.ndarray,
    model_max_length: int,
    batch_size: int = 8,
    seed: int = 42,
    packed_rows: int | None = None,
) -> tuple[dict[str, float], int]:
    """Real tokens / padded slots for max_length, longest (random batches, as the Trainer draws them) and
    packing (rows of `model_max_length`), plus the number of packed rows.

    `packed_rows` is the row count of packing these examples when the caller has packed them already;
    otherwise they are packed here (best-fit-decreasing, as `collator.pack_examples`) only to count rows.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return {"max_length": 0.0, "longest": 0.0, "packing": 0.0}, 0
    shuffled = lengths[np.random.default_rng(seed).permutation(len(lengths))]
    slots = 0
    for start in range(0, len(shuffled), batch_size):
        batch = shuffled[start : start + batch_size]
        slots += len(batch) * padded_length(int(batch.max()), model_max_length)
    rows = len(pack_examples(lengths, model_max_length)) if packed_rows is None else packed_rows
    return {
        "max_length": total / (len(lengths) * model_max_length),
        "longest": total / slots,
        "packing": total / (rows * model_max_length),
    }, rows


def format_example(sp: Any, input_ids: Sequence[int], labels: Sequence[int], color: bool = False) -> str:
    """Readable text of one example: roles as <user>/<assistant>, supervised text in [[ ]] (or green).

    A label that differs from its input id (the official eos label on a user token) is shown as [[</s>]]
    just before that token: it is what the model learns to say there.
    """
    open_, close = ("\033[32m", "\033[0m") if color else ("[[", "]]")
    out: list[str] = []
    run: list[int] = []
    run_supervised = False

    def flush() -> None:
        if run:
            text = sp.decode(run)
            out.append(f"{open_}{text}{close}" if run_supervised else text)
            run.clear()

    for position, (token, label) in enumerate(zip(input_ids, labels)):
        token, label = int(token), int(label)
        if token in (USER_ID, ASSISTANT_ID, EOS_ID):
            flush()
            if label not in (IGNORE_INDEX, token) and position > 0:  # position 0's label is never used
                out.append(f"{open_}</s>{close}")
            name = {USER_ID: "\n<user>: ", ASSISTANT_ID: "\n<assistant>: ", EOS_ID: "</s>"}[token]
            out.append(f"{open_}{name}{close}" if label == token else name)
            continue
        supervised = label != IGNORE_INDEX
        if supervised != run_supervised:
            flush()
            run_supervised = supervised
        run.append(token)
    flush()
    return "".join(out).lstrip("\n")
