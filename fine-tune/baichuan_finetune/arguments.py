"""Command-line argument dataclasses (parsed with `transformers.HfArgumentParser`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import transformers


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


# ----- model, LoRA and training options -----


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="baichuan-inc/Baichuan2-7B-Base",
        metadata={"help": "Base model directory (or hub id) in the official Baichuan2 layout."},
    )


@dataclass
class LoraArguments:
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=1, metadata={"help": "LoRA rank (official default 1)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (official default 32)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout (official default 0.1)."})
    q_lora: bool = field(
        default=False,
        metadata={"help": "QLoRA: load the frozen base in 4-bit NF4 (bitsandbytes; needs a CUDA GPU)."},
    )
    lora_target_modules: str = field(
        default="W_pack",
        metadata={"help": "Comma-separated module names (W_pack,o_proj,gate_proj,up_proj,down_proj) or "
                          "'all-linear' (every linear layer but lm_head)."},
    )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """`transformers.TrainingArguments` plus the official script's fields."""

    cache_dir: Optional[str] = field(default=None, metadata={"help": "Hub download cache for the base model."})
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer (official default adamw_torch)."})
    model_max_length: int = field(
        default=512, metadata={"help": "Maximum sequence length; longer examples are truncated."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in an output_dir that already holds checkpoints (they are deleted)."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Our collator picks its own columns; keeping the 'length' column lets "
                          "--group_by_length read lengths instead of measuring every example."},
    )
    warmup_ratio: Optional[float] = field(
        default=None,
        metadata={"help": "Share of the training steps for linear warmup (the official flag; transformers 5 "
                          "takes a fraction in --warmup_steps instead)."},
    )

    def __post_init__(self) -> None:
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio {self.warmup_ratio}: must be in [0, 1)")
            if self.warmup_steps and self.warmup_ratio:
                raise ValueError("--warmup_ratio and --warmup_steps: give only one")
            if self.warmup_ratio:
                self.warmup_steps = self.warmup_ratio
        super().__post_init__()
