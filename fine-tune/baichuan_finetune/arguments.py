"""fine-tune.py's options: the dataclasses, config files, parsing, and every check of a flag.

Each flag is checked once, here: a dataclass checks its own fields in ``__post_init__`` and
`validate` checks what needs several dataclasses, a file or this machine. Every failure is a
`UsageError`: one line naming the flag, exit code 2.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import transformers
from transformers import HfArgumentParser

from .quantize import check_qlora_available

PROG = "fine-tune.py"
ALL_LINEAR = "all-linear"


class UsageError(Exception):
    """A bad flag or an impossible combination: printed as one line, exit code 2."""


# ----- the option dataclasses -----


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="baichuan-inc/Baichuan2-7B-Base",
        metadata={"help": "Base model directory (or hub id) in the official Baichuan2 layout."},
    )


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
        # argparse already enforces the choices on the command line; config files and code do not.
        if not self.data_path:
            raise UsageError("--data_path: required (a file, comma-separated files or a directory)")
        for name, allowed in (("on_bad_record", ("error", "skip")), ("padding", ("longest", "max_length")),
                              ("truncation", ("head", "rounds"))):
            value = getattr(self, name)
            if value not in allowed:
                raise UsageError(f"--{name} {value!r}: not one of {', '.join(allowed)}")
        if self.val_size < 0 or (self.val_size >= 1 and self.val_size != int(self.val_size)):
            raise UsageError(f"--val_size {self.val_size}: must be a fraction in [0, 1) or a whole count >= 1")
        if self.preprocessing_num_workers is not None and self.preprocessing_num_workers < 1:
            raise UsageError(f"--preprocessing_num_workers {self.preprocessing_num_workers}: must be at least 1")


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

    def __post_init__(self) -> None:
        if self.q_lora and not self.use_lora:
            raise UsageError("--q_lora True trains LoRA adapters on a 4-bit base: add --use_lora True")
        if not self.use_lora:
            return  # the LoRA options are unused
        if self.lora_r < 1:
            raise UsageError(f"--lora_r {self.lora_r}: must be at least 1")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora_dropout {self.lora_dropout}: must be in [0, 1)")
        if not self.target_modules:
            raise UsageError("--lora_target_modules: give module names (e.g. W_pack,o_proj) or all-linear")

    @property
    def target_modules(self) -> str | list[str]:
        """``"all-linear"`` or the list of module names given in ``--lora_target_modules``."""
        if self.lora_target_modules.strip() == ALL_LINEAR:
            return ALL_LINEAR
        return [t.strip() for t in self.lora_target_modules.split(",") if t.strip()]


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """`transformers.TrainingArguments` plus the official script's fields and ours."""

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
    z_loss_weight: Optional[float] = field(
        default=None,
        metadata={"help": "Weight of the z-loss (mean squared log-partition of the logits) added to the "
                          "cross-entropy (default: the base model config's z_loss_weight)."},
    )

    def __post_init__(self) -> None:
        # Ours first: transformers' own checks below may already set up devices.
        if self.model_max_length < 8:
            raise UsageError(f"--model_max_length {self.model_max_length}: must be at least 8")
        if self.z_loss_weight is not None and not (math.isfinite(self.z_loss_weight) and self.z_loss_weight >= 0):
            raise UsageError(f"--z_loss_weight {self.z_loss_weight}: must be a finite number >= 0")
        if self.fp16 and self.use_cpu:
            raise UsageError("--fp16 True needs a GPU; use --bf16 True or fp32 on CPU")
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise UsageError(f"--warmup_ratio {self.warmup_ratio}: must be in [0, 1)")
            if self.warmup_steps and self.warmup_ratio:
                raise UsageError("--warmup_ratio and --warmup_steps: give only one")
            if self.warmup_ratio:
                self.warmup_steps = self.warmup_ratio
        super().__post_init__()


@dataclass
class Arguments:
    model: ModelArguments
    data: DataArguments
    lora: LoraArguments
    training: TrainingArguments


# ----- parsing: flags or one config file -----


class _Parser(HfArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage (hundreds of flags) first
        raise UsageError(message)


def _parser() -> _Parser:
    return _Parser((ModelArguments, DataArguments, LoraArguments, TrainingArguments), prog=PROG)


def is_config_file(argv: Sequence[str]) -> bool:
    """Whether `argv` (without ``--local_rank``) is a single ``.yaml``/``.yml``/``.json`` file."""
    return len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")) and not argv[0].startswith("-")


def pop_local_rank(argv: Sequence[str]) -> tuple[list[str], int | None]:
    """`argv` without ``--local_rank N``/``--local_rank=N``, and N (None when absent).

    Launchers add that flag; taking it apart lets ``launcher fine-tune.py run.yaml`` work.
    """
    rest, local_rank, i = [], None, 0
    while i < len(argv):
        if argv[i].startswith("--local_rank="):
            local_rank = int(argv[i].split("=", 1)[1])
        elif argv[i] == "--local_rank" and i + 1 < len(argv):
            local_rank = int(argv[i + 1])
            i += 1
        else:
            rest.append(argv[i])
        i += 1
    return rest, local_rank


def load_config_file(path: str) -> dict[str, Any]:
    """The option mapping in a ``.json`` or ``.yaml`` file; `UsageError` when unreadable or not a mapping."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UsageError(f"{path}: cannot read config file: {e.strerror or e}") from None
    try:
        if path.endswith(".json"):
            config = json.loads(text)
        else:
            import yaml

            config = yaml.safe_load(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        kind = "JSON" if path.endswith(".json") else "YAML"
        raise UsageError(f"{path}: not valid {kind}: {' '.join(str(e).split())}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a mapping of option names to values")
    return config


def _default_distributed_env(uses_deepspeed: bool) -> None:
    """DeepSpeed without a launcher needs the torch.distributed variables (else it looks for MPI).

    Set before TrainingArguments is built: with --deepspeed it sets up the process group.
    """
    if not uses_deepspeed or "RANK" in os.environ:
        return
    if "LOCAL_RANK" in os.environ and os.environ["LOCAL_RANK"] not in ("", "0", "-1"):
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)


def parse_args(argv: Sequence[str] | None = None) -> Arguments:
    """Parse flags, or a single ``.yaml``/``.json`` config file, into the four dataclasses.

    Raises `UsageError` (one line) on unknown flags, bad values and impossible combinations.
    On a machine without CUDA, ``--use_cpu True`` is the default.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    parser = _parser()
    # The official command line uses --gradient_checkpointing, an alias of --activation_checkpointing.
    warnings.filterwarnings("ignore", message="`gradient_checkpointing.*` is deprecated", category=FutureWarning)
    without_rank, local_rank = pop_local_rank(argv)
    try:
        if is_config_file(without_rank):
            config = load_config_file(without_rank[0])
            if local_rank is not None:
                config.setdefault("local_rank", local_rank)
            if not cuda:
                config.setdefault("use_cpu", True)
            _default_distributed_env(bool(config.get("deepspeed")))
            known = {f for dtype in parser.dataclass_types for f in dtype.__dataclass_fields__}
            unknown = sorted(set(config) - known)
            if unknown:
                raise UsageError(f"{without_rank[0]}: unknown option(s): {', '.join(unknown)}")
            parsed = parser.parse_dict(config)
        else:
            if not cuda and not any(a == "--use_cpu" or a.startswith("--use_cpu=") for a in argv):
                argv += ["--use_cpu", "True"]
            _default_distributed_env(any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in argv))
            parsed = parser.parse_args_into_dataclasses(args=argv)
    except UsageError:
        raise
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        # transformers.TrainingArguments' own checks, and a config file's missing or mistyped options.
        raise UsageError(" ".join(str(e).split())) from None
    args = Arguments(*parsed)
    validate(args)
    return args


# ----- checks across dataclasses, files and this machine -----


def deepspeed_config(training: TrainingArguments) -> dict | None:
    """The ``--deepspeed`` config as a dict (None without one); `UsageError` when unreadable."""
    ds = training.deepspeed
    if not ds:
        return None
    if isinstance(ds, dict):
        return ds
    try:
        return json.loads(Path(ds).read_text())
    except OSError as e:
        raise UsageError(f"--deepspeed {ds}: cannot read: {e.strerror or e}") from None
    except ValueError as e:
        raise UsageError(f"--deepspeed {ds}: not valid JSON: {e}") from None


def validate(args: Arguments) -> None:
    """What one dataclass cannot check alone: the DeepSpeed config file, QLoRA with it and on this machine."""
    t, lora = args.training, args.lora
    zero = (deepspeed_config(t) or {}).get("zero_optimization", {}) or {}
    if lora.q_lora:
        if zero.get("stage") == 3:
            raise UsageError("--q_lora True cannot shard 4-bit weights with ZeRO-3: use ds_config_zero2.json")
        try:
            check_qlora_available()
        except RuntimeError as err:
            raise UsageError(str(err)) from None
    gather = zero.get("stage3_gather_16bit_weights_on_model_save",
                      zero.get("stage3_gather_fp16_weights_on_model_save", False))
    if zero.get("stage") == 3 and not gather:
        raise UsageError(f"--deepspeed {t.deepspeed}: ZeRO-3 needs \"stage3_gather_16bit_weights_on_model_save\": "
                         "true to write a consolidated model")
