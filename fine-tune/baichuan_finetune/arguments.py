"""Command-line argument dataclasses (parsed with `transformers.HfArgumentParser`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class DataArguments:
    data_path: str = field(
        metadata={"help": "Training data: a .json/.jsonl file, several comma-separated files, or a directory of them."},
    )
    eval_data_path: Optional[str] = field(
        default=None, metadata={"help": "Evaluation data (same forms as data_path); overrides val_size."}
    )
    val_size: float = field(
        default=0.0,
        metadata={"help": "Held-out evaluation share of the training data: a fraction (<1) or a count (>=1)."},
    )
    on_bad_record: str = field(
        default="error",
        metadata={"help": "What to do with malformed records: stop with a list of them, or skip and count them.",
                  "choices": ["error", "skip"]},
    )
    padding: str = field(
        default="longest",
        metadata={"help": "'longest': pad each batch to its longest example (multiple of 8); "
                          "'max_length': pad to model_max_length as the official recipe.",
                  "choices": ["longest", "max_length"]},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack several conversations per row of model_max_length (no attention across them)."},
    )
    truncation: str = field(
        default="head",
        metadata={"help": "Long examples: 'head' keeps the first model_max_length tokens (official); "
                          "'rounds' drops whole trailing rounds.",
                  "choices": ["head", "rounds"]},
    )
    preprocessing_num_workers: Optional[int] = field(
        default=None, metadata={"help": "Tokenizing processes (default: one per CPU, at most 8)."}
    )
    data_cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Where tokenized data is cached (default: $BAICHUAN_FINETUNE_CACHE or "
                          "~/.cache/baichuan_finetune/data)."},
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a one-line message on a bad value."""
        # Local import: records.py must stay importable without this module and vice versa.
        from .records import DataError

        if not self.data_path:
            raise DataError("data_path: required (a file, comma-separated files or a directory)")
        for name, allowed in (("on_bad_record", ("error", "skip")), ("padding", ("longest", "max_length")),
                              ("truncation", ("head", "rounds"))):
            value = getattr(self, name)
            if value not in allowed:
                raise DataError(f"{name}: {value!r} is not one of {', '.join(allowed)}")
        if self.val_size < 0 or (self.val_size >= 1 and self.val_size != int(self.val_size)):
            raise DataError(f"val_size: {self.val_size} must be a fraction in [0, 1) or a whole count >= 1")
        if self.preprocessing_num_workers is not None and self.preprocessing_num_workers < 1:
            raise DataError(f"preprocessing_num_workers: {self.preprocessing_num_workers} must be >= 1")
