"""fine-tune.py's options: the dataclasses, config files, parsing, and every check of a flag.

Each flag is checked once, here: a dataclass checks its own fields in ``__post_init__`` and
`validate` checks what needs several dataclasses, a file or this machine. Every failure is a
`UsageError`: one line naming the flag, exit code 2.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import socket
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import transformers
from transformers import HfArgumentParser

from ..objectives.attention import IMPLEMENTATIONS, check_available, check_model
from ..core.config_files import ConfigFileError, read_config_file
from ..core.json_files import JSONObjectError, read_json_object
from .plan import SHIPPED_CONFIG, PlanError, parse_lora_targets
from ..model.specs_baichuan import ALL_LINEAR
from ..objectives.quantize import check_qlora_available
from ..core import quiet
from ..core.errors import UsageFault
from ..data.mixing import MixError, parse_data_sources

# Before transformers.TrainingArguments is first touched (below): it imports peft, which imports
# bitsandbytes and its import-time warning. Every tool reaches this module (loading -> preflight).
quiet.install()

PROG = "fine-tune.py"


class UsageError(UsageFault):
    """A bad flag or an impossible combination: printed as one line, exit code 2."""


# The choices of the options that take one of a few names, declared once: the flags offer them, `check_choice`
# holds config files and code to them, and scripts/inspect_data.py offers and checks the same.
CHOICES = {
    "on_bad_record": ("error", "skip"),
    "padding": ("longest", "max_length"),
    "truncation": ("head", "rounds"),
    "stage": ("sft", "dpo", "pt"),
    "txt_split": ("line", "blank"),
    "mix_strategy": ("concat", "interleave_under", "interleave_over"),
    "pref_loss": ("sigmoid", "ipo", "orpo", "simpo"),
}
# The shortest training row (a turn needs its role id, some text and the closing eos).
MIN_MODEL_MAX_LENGTH = 8


def check_choice(name: str, value: Any) -> None:
    """`UsageError` when `value` is not one of ``CHOICES[name]`` (argparse checks flags; config files and code
    come here)."""
    if value not in CHOICES[name]:
        raise UsageError(f"--{name} {value!r}: not one of {', '.join(CHOICES[name])}")


def check_model_max_length(value: int) -> None:
    """`UsageError` below `MIN_MODEL_MAX_LENGTH` (training and scripts/inspect_data.py)."""
    if value < MIN_MODEL_MAX_LENGTH:
        raise UsageError(f"--model_max_length {value}: must be at least {MIN_MODEL_MAX_LENGTH}")


# ----- the option dataclasses -----


def _check_counts(t: "TrainingArguments") -> None:
    """Counts that must be positive, and rates that must be finite: found now rather than as a
    traceback from the sampler or the optimizer after data preparation and model loading."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(t, name)
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"--{name} {value}: must be a whole number >= 1")
    if t.max_steps <= 0 and not t.num_train_epochs > 0:
        raise UsageError(f"--num_train_epochs {t.num_train_epochs}: must be > 0 (or give --max_steps N)")
    if not (math.isfinite(t.learning_rate) and t.learning_rate >= 0):
        raise UsageError(f"--learning_rate {t.learning_rate}: must be a finite number >= 0")
    if not (math.isfinite(t.weight_decay) and t.weight_decay >= 0):
        raise UsageError(f"--weight_decay {t.weight_decay}: must be a finite number >= 0")
    if t.dataloader_num_workers < 0:
        raise UsageError(f"--dataloader_num_workers {t.dataloader_num_workers}: must be >= 0")
    if t.save_total_limit is not None and t.save_total_limit < 1:
        raise UsageError(f"--save_total_limit {t.save_total_limit}: must be at least 1 (or unset)")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="baichuan-inc/Baichuan2-7B-Base",
        metadata={"help": "Base model directory (or hub id) in the official Baichuan2 layout."},
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={"help": "Attention kernel: sdpa (default, also CPU), eager, flex_attention (GPU training; "
                          "block-sparse packed rows, ALiBi without a bias tensor), flash_attention_2 (flash-attn, "
                          "GPU; padding-free, ALiBi slopes), xformers (GPU; RoPE models only).",
                  "choices": list(IMPLEMENTATIONS)},
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
                  "choices": list(CHOICES["on_bad_record"])},
    )
    padding: str = field(
        default="longest",
        metadata={"help": "'longest': pad each batch to its longest example (multiple of 8); "
                          "'max_length': pad to model_max_length as the official recipe.",
                  "choices": list(CHOICES["padding"])},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack several conversations per row of model_max_length (no attention across them)."},
    )
    truncation: str = field(
        default="head",
        metadata={"help": "Long examples: 'head' keeps the first model_max_length tokens (official); "
                          "'rounds' drops whole trailing rounds.",
                  "choices": list(CHOICES["truncation"])},
    )
    preprocessing_num_workers: Optional[int] = field(
        default=None, metadata={"help": "Tokenizing processes (default: one per CPU, at most 8)."}
    )
    data_cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Where tokenized data is cached (default: $BAICHUAN_FINETUNE_CACHE or "
                          "~/.cache/baichuan_finetune/data)."},
    )
    # Mixing sources (every stage) and raw text (--stage pt): docs/pretraining.md.
    mix_strategy: str = field(
        default="concat",
        metadata={"help": "How the sources of --data_path are mixed: concat (all of each, in order), "
                          "interleave_under (draw by weight, stop when the first source runs out), "
                          "interleave_over (draw by weight, repeat sources until every one is seen whole).",
                  "choices": list(CHOICES["mix_strategy"])},
    )
    mix_seed: Optional[int] = field(
        default=None, metadata={"help": "Seed of the interleaving draws (default: --seed)."}
    )
    text_field: str = field(
        default="text", metadata={"help": "--stage pt: the field (JSON) or column (Parquet/Arrow) holding the text."}
    )
    txt_split: str = field(
        default="line",
        metadata={"help": "--stage pt, .txt files: one document per line, or documents separated by blank lines.",
                  "choices": list(CHOICES["txt_split"])},
    )
    pt_cross_document: bool = field(
        default=False,
        metadata={"help": "--stage pt: concatenate documents and cut rows of model_max_length, attending across "
                          "document boundaries (default: attention stays within a document, as SFT packing)."},
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Read --data_path lazily while training (corpora larger than memory or disk cache): "
                          "tokenized and packed on the fly in --dataloader_num_workers processes, sharded across "
                          "processes, resumed exactly; needs --max_steps (docs/pretraining.md)."},
    )

    def __post_init__(self) -> None:
        # argparse already enforces the choices on the command line; config files and code do not.
        if not self.data_path:
            raise UsageError("--data_path: required (a file, comma-separated files or a directory)")
        for name in ("on_bad_record", "padding", "truncation", "txt_split", "mix_strategy"):
            check_choice(name, getattr(self, name))
        _check_sources(self)
        if self.val_size < 0 or (self.val_size >= 1 and self.val_size != int(self.val_size)):
            raise UsageError(f"--val_size {self.val_size}: must be a fraction in [0, 1) or a whole count >= 1")
        if self.preprocessing_num_workers is not None and self.preprocessing_num_workers < 1:
            raise UsageError(f"--preprocessing_num_workers {self.preprocessing_num_workers}: must be at least 1")


def _check_sources(d: "DataArguments") -> None:
    """The sources and weights of --data_path and --eval_data_path (their files are read later, by the
    data readers, each problem a `DataError` naming the file)."""
    try:
        sources = parse_data_sources(d.data_path)
        eval_sources = parse_data_sources(d.eval_data_path) if d.eval_data_path else []
    except MixError as e:
        raise UsageError(str(e)) from None
    weighted = sources[0].weight is not None
    if weighted and d.mix_strategy == "concat":
        raise UsageError("--data_path has weights, but --mix_strategy concat takes every example once: use "
                         "--mix_strategy interleave_under or interleave_over")
    if any(s.weight is not None for s in eval_sources):
        raise UsageError("--eval_data_path: weights apply to --data_path only (evaluation reads every example once)")


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
        try:
            parse_lora_targets(self.lora_target_modules)  # the planner's parser: one rule for both
        except PlanError as e:
            raise UsageError(str(e)) from None

    @property
    def target_modules(self) -> str | list[str]:
        """``"all-linear"`` or the list of Baichuan2 module names given in ``--lora_target_modules``."""
        parsed = parse_lora_targets(self.lora_target_modules)
        return parsed if parsed == ALL_LINEAR else list(parsed)


# What a resume may be told to accept when the checkpoint's run record (resume_checks.py) differs: the
# rest (stage, LoRA or not, QLoRA, rank, targets, the base's architecture) changes the checkpoint's tensors.
RESUME_IGNORABLE = ("data_path", "eval_data_path", "data_content", "per_device_train_batch_size",
                    "gradient_accumulation_steps", "world_size", "model_max_length", "packing", "lora_alpha",
                    "base_model")


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
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={"help": "HF's default True logs a NaN/inf loss as the running average (or 0); ours logs it "
                          "as it is, and a non-finite loss stops the run anyway."},
    )
    allow_longer_than_trained: bool = field(
        default=False,
        metadata={"help": "Allow --model_max_length beyond a RoPE base model's max_position_embeddings "
                          "(positions it was never trained on); ALiBi models need no permission."},
    )
    skip_memory_check: bool = field(
        default=False,
        metadata={"help": "Do not print the memory planner's predicted peak at start, nor warn when it "
                          "exceeds the device memory (see scripts/plan.py)."},
    )
    logging_steps: Optional[float] = field(
        default=None,
        metadata={"help": "Log the loss every N update steps (a number < 1: that share of the run). Default: "
                          "about 10 lines per run, every max(1, total steps // 10) steps."},
    )
    # Preference tuning (docs/preference.md); names follow LLaMA-Factory.
    stage: str = field(
        default="sft",
        metadata={"help": "'sft': supervised fine-tuning; 'dpo': preference tuning on chosen/rejected pairs "
                          "(the loss is --pref_loss).", "choices": list(CHOICES["stage"])},
    )
    pref_loss: str = field(
        default="sigmoid",
        metadata={"help": "Preference loss of --stage dpo: sigmoid (DPO), ipo, orpo or simpo (the last two "
                          "need no reference model).", "choices": list(CHOICES["pref_loss"])},
    )
    pref_beta: float = field(
        default=0.1, metadata={"help": "beta of DPO/IPO/SimPO (IPO's tau), ORPO's lambda."}
    )
    pref_ftx: float = field(
        default=0.0,
        metadata={"help": "Weight of a supervised loss (per-token NLL of the chosen answer) added to the "
                          "preference loss."},
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO's target reward margin gamma."})
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "Conservative DPO: the assumed share of flipped preference labels, in [0, 0.5) "
                          "(--pref_loss sigmoid only; unrelated to --label_smoothing_factor)."},
    )
    precompute_ref_logps: bool = field(
        default=False,
        metadata={"help": "Compute the reference log-probs of every pair once before training (no reference "
                          "model held during training; resumption exact)."},
    )
    resume_ignore_mismatch: str = field(
        default="",
        metadata={"help": "Comma-separated settings in which --resume_from_checkpoint may differ from the run "
                          "that wrote the checkpoint: " + ", ".join(RESUME_IGNORABLE) + " (docs/training.md)."},
    )
    # Watching the fine-tune at each evaluation (training/generation_eval.py, docs/training.md).
    eval_generation_file: Optional[str] = field(
        default=None,
        metadata={"help": "Prompts (any predict input: a conversation file, JSONL {prompt, reference}, a .txt) "
                          "answered greedily at each evaluation: BLEU-4/ROUGE against their references and a "
                          "table of sample answers are logged."},
    )
    eval_generation_samples: int = field(
        default=32, metadata={"help": "How many prompts of --eval_generation_file (a fixed random sample)."}
    )
    eval_generation_max_new_tokens: int = field(
        default=128, metadata={"help": "Longest answer generated for --eval_generation_file, in tokens."}
    )
    eval_mc_dir: Optional[str] = field(
        default=None,
        metadata={"help": "A multiple-choice task directory (the C-Eval/CMMLU/MMLU layouts `eval` reads) scored "
                          "at each evaluation: eval_mc_accuracy (percent) is logged."},
    )
    eval_mc_shots: int = field(default=5, metadata={"help": "Few-shot examples per question of --eval_mc_dir."})
    eval_mc_limit: Optional[int] = field(
        default=None, metadata={"help": "At most this many questions per subject of --eval_mc_dir (default: all)."}
    )
    max_mc_drop: Optional[float] = field(
        default=None,
        metadata={"help": "Stop the run (exit 1) when eval_mc_accuracy falls this many points below the first "
                          "evaluation's; the last checkpoint evaluated before the drop is kept."},
    )

    def __post_init__(self) -> None:
        # Ours first: transformers' own checks below may already set up devices.
        # No --logging_steps: decided from the total step count when training starts (trainer.py); until
        # then transformers' checks see a valid share of the run (HF's default of 500 logs nothing in a
        # short run).
        self.default_logging_steps = self.logging_steps is None
        if self.default_logging_steps:
            self.logging_steps = 0.1
        check_model_max_length(self.model_max_length)
        if self.z_loss_weight is not None and not (math.isfinite(self.z_loss_weight) and self.z_loss_weight >= 0):
            raise UsageError(f"--z_loss_weight {self.z_loss_weight}: must be a finite number >= 0")
        if self.fp16 and self.use_cpu:
            raise UsageError("--fp16 True needs a GPU; use --bf16 True or fp32 on CPU")
        _check_counts(self)
        _check_preference(self)
        _check_resume_ignore_mismatch(self.resume_ignore_mismatch)
        _check_evaluation_watch(self)
        # Before transformers reads the DeepSpeed file itself (a JSON list, a bad file, or batch sizes that
        # disagree with the flags would otherwise fail there or only after the model is loaded).
        check_deepspeed_config(self)
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise UsageError(f"--warmup_ratio {self.warmup_ratio}: must be in [0, 1)")
            if self.warmup_steps and self.warmup_ratio:
                raise UsageError("--warmup_ratio and --warmup_steps: give only one")
            if self.warmup_ratio:
                self.warmup_steps = self.warmup_ratio
        super().__post_init__()


def _check_resume_ignore_mismatch(value: str) -> None:
    for name in (n.strip() for n in (value or "").split(",")):
        if name and name not in RESUME_IGNORABLE:
            raise UsageError(f"--resume_ignore_mismatch {value}: {name!r} cannot be ignored; choose from "
                             + ", ".join(RESUME_IGNORABLE))


def _check_evaluation_watch(t: "TrainingArguments") -> None:
    """The flags of generation and multiple-choice evaluation during training: numbers in range, paths
    that exist, and no option of one without its file or directory. The files' content is read before
    the model loads (training/generation_eval.py)."""
    for name, least in (("eval_generation_samples", 1), ("eval_generation_max_new_tokens", 1),
                        ("eval_mc_shots", 0), ("eval_mc_limit", 1)):
        value = getattr(t, name)
        if value is not None and value < least:
            raise UsageError(f"--{name} {value}: must be at least {least}")
    if t.max_mc_drop is not None and not (math.isfinite(t.max_mc_drop) and 0 < t.max_mc_drop <= 100):
        raise UsageError(f"--max_mc_drop {t.max_mc_drop}: must be accuracy points in (0, 100]")
    needs = {"eval_generation_file": {"eval_generation_samples": 32, "eval_generation_max_new_tokens": 128},
             "eval_mc_dir": {"eval_mc_shots": 5, "eval_mc_limit": None, "max_mc_drop": None}}
    for owner, defaults in needs.items():
        changed = [name for name, default in defaults.items() if getattr(t, name) != default]
        if changed and not getattr(t, owner):
            raise UsageError(f"--{changed[0]}: needs --{owner}")
    if t.eval_generation_file and not Path(t.eval_generation_file).is_file():
        raise UsageError(f"--eval_generation_file {t.eval_generation_file}: no such file")
    if t.eval_mc_dir and not Path(t.eval_mc_dir).is_dir():
        raise UsageError(f"--eval_mc_dir {t.eval_mc_dir}: no such directory")


def _check_preference(t: "TrainingArguments") -> None:
    """The preference flags: values, and no preference flag without --stage dpo."""
    for name in ("stage", "pref_loss"):
        check_choice(name, getattr(t, name))
    for name in ("pref_beta", "pref_ftx", "simpo_gamma", "label_smoothing"):
        if not math.isfinite(getattr(t, name)):
            raise UsageError(f"--{name} {getattr(t, name)}: must be a finite number")
    if t.pref_beta <= 0:
        raise UsageError(f"--pref_beta {t.pref_beta}: must be > 0")
    if t.pref_ftx < 0:
        raise UsageError(f"--pref_ftx {t.pref_ftx}: must be >= 0")
    if not 0 <= t.label_smoothing < 0.5:
        raise UsageError(f"--label_smoothing {t.label_smoothing}: must be in [0, 0.5)")
    if t.stage != "dpo":
        defaults = {"pref_loss": "sigmoid", "pref_beta": 0.1, "pref_ftx": 0.0, "simpo_gamma": 0.5,
                    "label_smoothing": 0.0, "precompute_ref_logps": False}
        changed = [k for k, v in defaults.items() if getattr(t, k) != v]
        if changed:
            raise UsageError(f"--{changed[0]}: a preference flag; add --stage dpo")
        return
    if t.label_smoothing and t.pref_loss != "sigmoid":
        raise UsageError(f"--label_smoothing: conservative DPO applies to --pref_loss sigmoid, not {t.pref_loss}")
    if t.label_smoothing_factor:
        raise UsageError("--label_smoothing_factor: smooths token labels, which --stage dpo does not train on; "
                         "use --label_smoothing (conservative DPO)")
    if t.z_loss_weight:
        raise UsageError("--z_loss_weight: not used by --stage dpo (the preference loss has no z-loss)")


@dataclass
class Arguments:
    model: ModelArguments
    data: DataArguments
    lora: LoraArguments
    training: TrainingArguments
    # The options given (config file, then flags over it) that differ from the defaults: saved as the
    # output's run_config.yaml, which repeats the run (`baichuan-finetune train out/run_config.yaml`).
    resolved: dict[str, Any] = field(default_factory=dict, compare=False)


# ----- parsing: flags or one config file -----


class _Parser(HfArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage (hundreds of flags) first
        raise UsageError(message)


def _parser() -> _Parser:
    return _Parser((ModelArguments, DataArguments, LoraArguments, TrainingArguments), prog=PROG)


def is_config_file(argv: Sequence[str]) -> bool:
    """Whether `argv` (without ``--local_rank``) starts with a ``.yaml``/``.yml``/``.json`` file (flags may follow)."""
    return (len(argv) >= 1 and argv[0].endswith((".yaml", ".yml", ".json")) and not argv[0].startswith("-")
            and (len(argv) == 1 or argv[1].startswith("--")))


def _plain(value: Any) -> Any:
    """A parsed option value as YAML can write it (enums by their value, other objects as text)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def _parse_with_config(parser: _Parser, config: dict[str, Any], source: str | None,
                       flags: list[str]) -> tuple[list, dict[str, Any]]:
    """The four dataclasses from `config`'s options overridden by `flags`, and the resolved options."""
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    given = set()  # the options the flags name (argparse also takes a flag's unambiguous prefix)
    for flag in (f.split("=", 1)[0] for f in flags if f.startswith("--")):
        action = parser._option_string_actions.get(flag) or next(
            (a for s, a in parser._option_string_actions.items() if s.startswith(flag)), None)
        if action is not None:
            given.add(action.dest)
    unknown = sorted(set(config) - set(actions))
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(actions), n=1, cutoff=0.6)
        raise UsageError(f"{source}: unknown option(s): {', '.join(unknown)}"
                         + (f" (did you mean {close[0]}?)" if close else ""))
    for key, value in config.items():
        actions[key].default = value
        actions[key].required = False
    namespace, _ = parser.parse_known_args(flags)  # unknown flags: parse_args_into_dataclasses says so
    resolved = {dest: _plain(value) for dest, value in vars(namespace).items()
                if dest != "local_rank" and (dest in config or dest in given)}
    return parser.parse_args_into_dataclasses(args=flags), resolved


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
    """The option mapping in a ``.json`` or ``.yaml`` file (`core.config_files`); `UsageError` when
    unreadable or not a mapping."""
    try:
        return read_config_file(path)
    except ConfigFileError as e:
        raise UsageError(str(e)) from None


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
    """Parse flags, or a ``.yaml``/``.json`` config file followed by flags that override it, into the four
    dataclasses; the options given are kept as ``Arguments.resolved`` (the output's run_config.yaml).

    Raises `UsageError` (one line) on unknown flags, bad values and impossible combinations.
    On a machine without CUDA, ``--use_cpu True`` is the default.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    parser = _parser()
    quiet.install()  # again: a caller's warnings.catch_warnings (pytest's) may have reset the filters
    without_rank, local_rank = pop_local_rank(argv)
    try:
        config: dict[str, Any] = {}
        source, flags = None, without_rank
        if is_config_file(without_rank):  # a config file, then flags that override it
            source, flags = without_rank[0], without_rank[1:]
            config = {str(k).replace("-", "_"): v for k, v in load_config_file(source).items()}
        if local_rank is not None and "local_rank" not in config:  # a config file's own local_rank wins
            flags = flags + ["--local_rank", str(local_rank)]
        given = {a[2:].split("=", 1)[0].replace("-", "_") for a in flags if a.startswith("--")}
        if not cuda and "use_cpu" not in config and "use_cpu" not in given:
            flags = flags + ["--use_cpu", "True"]  # recorded in nothing: run_config.yaml stays portable
        _default_distributed_env(bool(config.get("deepspeed")) or "deepspeed" in given)
        parsed, resolved = _parse_with_config(parser, config, source, flags)
        if "use_cpu" not in config and "use_cpu" not in given:
            resolved.pop("use_cpu", None)
    except UsageError:
        raise
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        # transformers.TrainingArguments' own checks, and a config file's missing or mistyped options.
        raise UsageError(" ".join(str(e).split())) from None
    args = Arguments(*parsed, resolved=resolved)
    validate(args)
    return args


# ----- checks across dataclasses, files and this machine -----


def deepspeed_config(training: TrainingArguments) -> dict | None:
    """The ``--deepspeed`` config as a dict (None without one); `UsageError` when unreadable, not JSON
    or not a JSON object."""
    ds = training.deepspeed
    if not ds:
        return None
    if isinstance(ds, dict):
        return ds
    try:
        return read_json_object(ds, of=" of DeepSpeed options")
    except JSONObjectError as e:
        raise UsageError(f"--deepspeed {ds}: {e.reason}") from None


# The DeepSpeed batch options and the flags they must equal when given as numbers ("auto" takes the flags).
_DS_BATCH_FLAGS = {"train_micro_batch_size_per_gpu": "--per_device_train_batch_size",
                   "gradient_accumulation_steps": "--gradient_accumulation_steps"}


def check_deepspeed_config(training: TrainingArguments) -> None:
    """The ``--deepspeed`` file: a JSON object, a ZeRO stage 0-3, and batch sizes that agree with the flags.

    Transformers fills ``"auto"`` values from the flags and refuses numbers that differ, but only once the
    model is loaded; the total ``train_batch_size`` is checked against this launch's ``WORLD_SIZE``.
    """
    config = deepspeed_config(training)
    if config is None:
        return
    ds = training.deepspeed if isinstance(training.deepspeed, str) else "config"
    zero = config.get("zero_optimization", {})
    if zero is not None and not isinstance(zero, dict):
        raise UsageError(f"--deepspeed {ds}: \"zero_optimization\" must be a JSON object")
    stage = (zero or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise UsageError(f"--deepspeed {ds}: \"zero_optimization.stage\" {json.dumps(stage)}: must be 0, 1, 2 or 3")
    wanted = {"train_micro_batch_size_per_gpu": training.per_device_train_batch_size,
              "gradient_accumulation_steps": training.gradient_accumulation_steps}
    try:
        world_size = max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        world_size = 1
    wanted["train_batch_size"] = (training.per_device_train_batch_size * training.gradient_accumulation_steps
                                  * world_size)
    for key, expected in wanted.items():
        value = config.get(key, "auto")
        if value == "auto" or value is None:
            continue
        if key == "train_batch_size":
            how = (f"--per_device_train_batch_size {training.per_device_train_batch_size} x "
                   f"--gradient_accumulation_steps {training.gradient_accumulation_steps} x {world_size} "
                   f"process(es) = {expected}")
        else:
            how = f"{_DS_BATCH_FLAGS[key]} {expected}"
        if isinstance(value, bool) or not isinstance(value, int) or value != expected:
            raise UsageError(f"--deepspeed {ds}: \"{key}\" {json.dumps(value)} disagrees with {how}: "
                             "set it to \"auto\" or change the flag")


def _check_attention(model: ModelArguments, t: TrainingArguments) -> None:
    """--attn_implementation: a known kernel, installed and able to train on this device (and, for a
    local model directory, able to compute its position scheme), before any model is loaded."""
    device = "cpu" if t.use_cpu or not torch.cuda.is_available() else "cuda"
    try:
        check_available(model.attn_implementation, device, training=True)
        config_file = Path(model.model_name_or_path) / "config.json"
        if model.attn_implementation == "xformers" and config_file.is_file():
            from ..model.configuration_baichuan import BaichuanConfig

            check_model(model.attn_implementation, BaichuanConfig.from_pretrained(model.model_name_or_path))
    except ValueError as err:
        raise UsageError(f"--attn_implementation {model.attn_implementation}: {err}") from None


# What to install for each --report_to integration of transformers (named in the one-line error).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                    "neptune": "neptune", "clearml": "clearml", "dagshub": "dagshub mlflow", "dvclive": "dvclive",
                    "swanlab": "swanlab", "trackio": "trackio", "codecarbon": "codecarbon", "azure_ml": "azureml-core",
                    "flyte": "flytekit flytekitplugins-deck-standard"}


def _check_trackers(t: TrainingArguments) -> None:
    """--report_to: every named tracker is one transformers knows and its package is installed, so a
    missing one fails here in one line, not as a traceback when the Trainer is built after data
    preparation and model loading."""
    from transformers.integrations import integration_utils as tracking

    names = [t.report_to] if isinstance(t.report_to, str) else list(t.report_to or [])
    available = set(tracking.get_available_reporting_integrations())
    if tracking.is_flyte_deck_standard_available():
        available.add("flyte")
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in tracking.INTEGRATION_TO_CALLBACK:
            raise UsageError(f"--report_to {name}: unknown tracker (known: none, all, "
                             f"{', '.join(sorted(tracking.INTEGRATION_TO_CALLBACK))})")
        if name not in available:
            need = (f"pip install {TRACKER_PACKAGES[name]}" if name in TRACKER_PACKAGES
                    else "see the transformers documentation of this integration")
            raise UsageError(f"--report_to {name}: not available on this machine ({need}); "
                             "tensorboard is in requirements.txt, or use --report_to none")


def _check_streaming(args: Arguments) -> None:
    """--streaming: a run measured in steps (a stream has no length), of a stage that reads a stream."""
    d, t = args.data, args.training
    if not d.streaming:
        return
    if t.max_steps <= 0:
        raise UsageError("--streaming True: needs --max_steps N (a stream has no length to count epochs in)")
    if t.stage == "dpo":
        raise UsageError("--streaming True: not supported with --stage dpo (preference pairs are read whole)")
    if d.val_size:
        raise UsageError("--streaming True: --val_size would hold examples out of a stream read once; give "
                         "--eval_data_path instead")


def validate(args: Arguments) -> None:
    """What one dataclass cannot check alone: the DeepSpeed config file, QLoRA with it and on this machine."""
    t, lora = args.training, args.lora
    _check_attention(args.model, t)
    _check_trackers(t)
    watch = "--eval_generation_file" if t.eval_generation_file else "--eval_mc_dir" if t.eval_mc_dir else None
    if watch and (t.eval_strategy == "no" or not (args.data.eval_data_path or args.data.val_size)):
        # They run inside the Trainer's evaluation, which needs an evaluation set and a schedule.
        raise UsageError(f"{watch}: runs at each evaluation; add --eval_strategy steps --eval_steps N and an "
                         "evaluation set (--val_size or --eval_data_path)")
    pt_defaults = {"text_field": "text", "txt_split": "line", "pt_cross_document": False}
    changed = [k for k, v in pt_defaults.items() if getattr(args.data, k) != v]
    if changed and t.stage != "pt":
        raise UsageError(f"--{changed[0]}: a raw-text flag; add --stage pt (docs/pretraining.md)")
    _check_streaming(args)
    if t.stage == "dpo" and args.data.packing:
        raise UsageError("--packing True: not supported with --stage dpo (a batch pairs each chosen answer "
                         "with its rejected one)")
    zero = (deepspeed_config(t) or {}).get("zero_optimization", {}) or {}
    if lora.q_lora:
        if zero.get("stage") == 3:
            raise UsageError(f"--q_lora True cannot shard 4-bit weights with ZeRO-3: use {SHIPPED_CONFIG['zero2']}")
        try:
            check_qlora_available()
        except RuntimeError as err:
            raise UsageError(str(err)) from None
    gather = zero.get("stage3_gather_16bit_weights_on_model_save",
                      zero.get("stage3_gather_fp16_weights_on_model_save", False))
    if zero.get("stage") == 3 and not gather:
        raise UsageError(f"--deepspeed {t.deepspeed}: ZeRO-3 needs \"stage3_gather_16bit_weights_on_model_save\": "
                         "true to write a consolidated model")
