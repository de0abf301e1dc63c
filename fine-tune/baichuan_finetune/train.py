"""Fine-tune Baichuan2 with the HF Trainer and DeepSpeed: parse -> model -> data -> Trainer -> save.

`main(argv)` is what ``fine-tune/fine-tune.py`` runs. Exit codes: 0 done, 1 bad data (`DataError`,
one message), 2 bad command line or impossible combination (one line on stderr).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, Trainer, TrainerCallback

from . import saving
from .arguments import DataArguments, LoraArguments, ModelArguments, TrainingArguments
from .encoding import IGNORE_INDEX
from .quantize import check_qlora_available, quantization_config_for_qlora
from .records import DataError

logger = logging.getLogger("baichuan_finetune")

PROG = "fine-tune.py"
LORA_MODULES = ("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj")


class UsageError(Exception):
    """A bad flag or an impossible combination: printed as one line, exit code 2."""


@dataclass
class Arguments:
    model: ModelArguments
    data: DataArguments
    lora: LoraArguments
    training: TrainingArguments


class _Parser(HfArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage (hundreds of flags) first
        raise UsageError(message)


def _parser() -> _Parser:
    return _Parser((ModelArguments, DataArguments, LoraArguments, TrainingArguments), prog=PROG)


def _is_config_file(argv: Sequence[str]) -> bool:
    return len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")) and not argv[0].startswith("-")


def _pop_local_rank(argv: list[str]) -> tuple[list[str], int | None]:
    """Launchers add ``--local_rank=N``; take it apart so that ``launcher fine-tune.py run.yaml`` works."""
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


def _load_config_file(path: str) -> dict[str, Any]:
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
    """DeepSpeed without a launcher needs the torch.distributed variables (else it looks for MPI)."""
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
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    parser = _parser()
    # The official command line uses --gradient_checkpointing, an alias of --activation_checkpointing.
    warnings.filterwarnings("ignore", message="`gradient_checkpointing.*` is deprecated", category=FutureWarning)
    without_rank, local_rank = _pop_local_rank(argv)
    try:
        if _is_config_file(without_rank):
            config = _load_config_file(without_rank[0])
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
        # Dataclass __post_init__ checks (ours, DataArguments' and TrainingArguments') land here.
        raise UsageError(" ".join(str(e).split())) from None
    args = Arguments(*parsed)
    validate(args)
    return args


def lora_targets(value: str) -> str | list[str]:
    if value.strip() == "all-linear":
        return "all-linear"
    targets = [t.strip() for t in value.split(",") if t.strip()]
    if not targets:
        raise UsageError("--lora_target_modules: give module names (e.g. W_pack,o_proj) or all-linear")
    return targets


def _deepspeed_config(training: TrainingArguments) -> dict | None:
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
    """Combinations the dataclasses cannot check one field at a time."""
    t, lora = args.training, args.lora
    if t.model_max_length < 8:
        raise UsageError(f"--model_max_length {t.model_max_length}: must be at least 8")
    if lora.q_lora:
        if not lora.use_lora:
            raise UsageError("--q_lora True trains LoRA adapters on a 4-bit base: add --use_lora True")
        ds_stage = (_deepspeed_config(t) or {}).get("zero_optimization", {}).get("stage")
        if ds_stage == 3:
            raise UsageError("--q_lora True cannot shard 4-bit weights with ZeRO-3: use ds_config_zero2.json")
        try:
            check_qlora_available()
        except RuntimeError as err:
            raise UsageError(str(err)) from None
    if args.lora.use_lora:
        if lora.lora_r < 1:
            raise UsageError(f"--lora_r {lora.lora_r}: must be at least 1")
        if not 0 <= lora.lora_dropout < 1:
            raise UsageError(f"--lora_dropout {lora.lora_dropout}: must be in [0, 1)")
        lora_targets(lora.lora_target_modules)
    ds = _deepspeed_config(t)
    if ds is not None:
        zero = ds.get("zero_optimization", {}) or {}
        gather = zero.get("stage3_gather_16bit_weights_on_model_save",
                          zero.get("stage3_gather_fp16_weights_on_model_save", False))
        if zero.get("stage") == 3 and not gather:
            raise UsageError(f"--deepspeed {t.deepspeed}: ZeRO-3 needs \"stage3_gather_16bit_weights_on_model_save\": "
                             "true to write a consolidated model")
    if t.fp16 and t.use_cpu:
        raise UsageError("--fp16 True needs a GPU; use --bf16 True or fp32 on CPU")


def resolve_resume(training: TrainingArguments) -> str | None:
    """The checkpoint to resume from, or None to start fresh; refuses to overwrite checkpoints silently."""
    output_dir = training.output_dir
    value = training.resume_from_checkpoint
    value = "" if value is None else str(value)  # a YAML/JSON config may give a boolean
    if value in ("", "False", "false", "None"):
        existing = saving.list_checkpoints(output_dir)
        if existing and not training.overwrite_output_dir:
            raise UsageError(
                f"output_dir {output_dir} already holds checkpoints ({existing[-1].name}): pass "
                "--resume_from_checkpoint True to continue, or --overwrite_output_dir True to delete them "
                "and start over, or choose another --output_dir"
            )
        return None
    if value in ("True", "true", "latest", "last"):
        last = saving.last_complete_checkpoint(output_dir)
        if last is None:
            raise UsageError(f"--resume_from_checkpoint {value}: no complete checkpoint in {output_dir}")
        return str(last)
    path = Path(value)
    if not path.is_dir():
        raise UsageError(f"--resume_from_checkpoint {value}: no such checkpoint directory")
    if not saving.is_complete_checkpoint(path):
        raise UsageError(f"--resume_from_checkpoint {value}: incomplete checkpoint (no {saving.COMPLETE_MARKER}; "
                         "its writing was interrupted); pick an earlier one")
    return str(path)


# ----- Trainer: token counting, complete checkpoints -----


class BaichuanTrainer(Trainer):
    """The HF Trainer plus tokens/s in every training log and checkpoints marked complete."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # [tokens, supervised tokens, batch slots] of this process: since the last log, and in all.
        # Kept on the batch's device so that counting never waits for the GPU.
        self._interval: torch.Tensor | None = None
        self._total: torch.Tensor | None = None
        self._last_log_time: float | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self._count(inputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def _count(self, inputs: dict[str, torch.Tensor]) -> None:
        ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels")
        slots = torch.tensor(ids.numel(), device=ids.device)
        tokens = (mask != 0).sum() if mask is not None else slots
        # The first label of a row never counts (labels shift by one inside the model).
        supervised = (labels[:, 1:] != IGNORE_INDEX).sum() if labels is not None else torch.zeros_like(slots)
        counts = torch.stack([tokens, supervised, slots]).to(torch.long)
        if self._interval is None:
            self._interval, self._total = torch.zeros_like(counts), torch.zeros_like(counts)
        self._interval += counts
        self._total += counts

    def _summed(self, counts: torch.Tensor | None) -> list[int]:
        """`counts` added up over all processes (a collective: every process must call it)."""
        counts = torch.zeros(3, dtype=torch.long) if counts is None else counts.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = counts.to(self.args.device)
            torch.distributed.all_reduce(counts)
        return [int(c) for c in counts.tolist()]

    def _training_started(self) -> None:
        self._last_log_time = time.perf_counter()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._last_log_time is not None:
            tokens, supervised, _ = self._summed(self._interval)
            now = time.perf_counter()
            elapsed = max(now - self._last_log_time, 1e-9)
            logs["tokens_per_second"] = round(tokens / elapsed, 1)
            logs["supervised_tokens_per_second"] = round(supervised / elapsed, 1)
            if self._interval is not None:
                self._interval.zero_()
            self._last_log_time = now
        super().log(logs, start_time)

    def throughput(self) -> dict[str, float]:
        """Tokens, supervised tokens and batch slots of the whole run (all processes), and their rates."""
        tokens, supervised, slots = self._summed(self._total)
        runtime = next((h["train_runtime"] for h in reversed(self.state.log_history) if "train_runtime" in h), 0.0)
        return {
            "train_runtime": runtime,
            "tokens": tokens,
            "supervised_tokens": supervised,
            "token_slots": slots,
            "real_token_share": tokens / slots if slots else 0.0,
            "tokens_per_second": tokens / runtime if runtime else 0.0,
            "supervised_tokens_per_second": supervised / runtime if runtime else 0.0,
            "world_size": self.args.world_size,
        }

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        path = Path(self._get_output_dir(trial=trial)) / f"{saving.CHECKPOINT_PREFIX}-{self.state.global_step}"
        # Every process has written its shards and RNG state before the marker says "complete".
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            saving.mark_checkpoint_complete(path, self.state.global_step)
        self.accelerator.wait_for_everyone()


class _StartClock(TrainerCallback):
    def __init__(self, trainer: BaichuanTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._training_started()


# ----- building blocks -----


def torch_dtype(training: TrainingArguments) -> torch.dtype:
    return torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else torch.float32


def base_model_path(model_args: ModelArguments) -> str:
    """Local directories become absolute, so an adapter's base_model_name_or_path works from anywhere."""
    path = model_args.model_name_or_path
    return os.path.abspath(path) if os.path.isdir(path) else path


def load_tokenizer(args: Arguments):
    return AutoTokenizer.from_pretrained(
        base_model_path(args.model),
        cache_dir=args.training.cache_dir,
        model_max_length=args.training.model_max_length,
        use_fast=False,
    )


def load_model(args: Arguments):
    """The base model (native classes registered by this package; never remote code), LoRA-wrapped if asked."""
    t, lora = args.training, args.lora
    quantization = quantization_config_for_qlora(torch_dtype(t)) if lora.q_lora else None
    model = AutoModelForCausalLM.from_pretrained(
        base_model_path(args.model), dtype=torch_dtype(t), cache_dir=t.cache_dir, quantization_config=quantization
    )
    model.config.use_cache = False
    if lora.use_lora:
        from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

        if lora.q_lora:
            model = prepare_model_for_kbit_training(model, t.activation_checkpointing)

        targets = lora_targets(lora.lora_target_modules)
        if targets != "all-linear":
            names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
            missing = [t_ for t_ in targets if t_ not in names]
            if missing:
                raise UsageError(f"--lora_target_modules: no module named {', '.join(missing)} in the model "
                                 f"(Baichuan2 has {', '.join(LORA_MODULES)})")
        if t.activation_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        config = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            target_modules=targets,
            inference_mode=False,
            r=lora.lora_r,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
        )
        model = get_peft_model(model, config)
        if t.process_index == 0:
            model.print_trainable_parameters()
    return model


def _setup_logging(training: TrainingArguments) -> None:
    # DeepSpeed's ZeRO calls these torch.distributed functions every step.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    level = training.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.setLevel(logging.INFO if training.process_index == 0 else logging.WARNING)
    transformers.utils.logging.set_verbosity(level)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def plot_loss_curve(log_history: list[dict], output_dir: str) -> Path | None:
    """``loss_curve.png`` in `output_dir` (skipped with a log line when matplotlib is absent)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no loss_curve.png (pip install matplotlib)")
        return None
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    path = Path(output_dir) / "loss_curve.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def run(args: Arguments, callbacks: Sequence[TrainerCallback] = ()) -> BaichuanTrainer:
    """Train and save; returns the trainer (its model is the trained one)."""
    t = args.training
    _setup_logging(t)
    if t.deepspeed:
        import deepspeed

        # Before the model is built: ZeRO-3 builds it inside zero.Init, which needs the process group.
        deepspeed.init_distributed(dist_backend="gloo" if t.use_cpu else "nccl")

    resume = resolve_resume(t)
    if resume is None and t.overwrite_output_dir:
        if t.should_save and saving.list_checkpoints(t.output_dir):
            removed = saving.remove_checkpoints(t.output_dir)
            logger.info("--overwrite_output_dir: deleted %d old checkpoint(s) in %s", len(removed), t.output_dir)
        _barrier()  # on every process: none may look at output_dir while it is being cleaned

    transformers.set_seed(t.seed)  # LoRA's initial weights depend on it
    tokenizer = load_tokenizer(args)
    from .preprocess import prepare_data

    data = prepare_data(args.data, tokenizer, t.model_max_length, seed=t.seed)
    if t.process_index == 0:
        print(data.report.format(), flush=True)
    model = load_model(args)

    trainer = BaichuanTrainer(
        model=model,
        args=t,
        train_dataset=data.train_dataset,
        eval_dataset=data.eval_dataset,
        data_collator=data.data_collator,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    trainer.add_callback(_StartClock(trainer))
    if resume:
        logger.info("Resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    throughput = trainer.throughput()  # a collective: every process
    if data.eval_dataset is not None and t.eval_strategy == "no":
        trainer.evaluate()
    trainer.save_state()

    if not args.lora.use_lora:
        trainer.model.config.use_cache = True  # saved for inference
    if args.lora.use_lora:
        saving.save_lora_adapter(trainer, t.output_dir)
    else:
        trainer.save_model(t.output_dir)
    if t.should_save:
        saving.finish_output_dir(t.output_dir, tokenizer, base_model_path(args.model), t.model_max_length,
                                 is_lora=args.lora.use_lora)
        plot_loss_curve(trainer.state.log_history, t.output_dir)
        # Counted since this process started (a resumed run counts only its own steps).
        (Path(t.output_dir) / "throughput.json").write_text(json.dumps(throughput, indent=2) + "\n")
        logger.info("Throughput: %.1f tokens/s, %.1f supervised tokens/s, %.1f%% real tokens per batch slot",
                    throughput["tokens_per_second"], throughput["supervised_tokens_per_second"],
                    100 * throughput["real_token_share"])
        logger.info("Saved %s to %s", "the LoRA adapter" if args.lora.use_lora else "the model", t.output_dir)
    _barrier()
    return trainer


def main(argv: Sequence[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> int:
    try:
        args = parse_args(argv)
        run(args, callbacks)
    except UsageError as e:
        if int(os.environ.get("LOCAL_RANK", "0") or 0) <= 0:
            print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except DataError as e:
        if int(os.environ.get("LOCAL_RANK", "0") or 0) <= 0:
            print(f"{PROG}: data error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
