"""Fine-tune Baichuan2 with the HF Trainer and DeepSpeed: parse -> model -> data -> Trainer -> save.

`main(argv)` is what ``fine-tune/fine-tune.py`` runs. Exit codes: 0 done, 1 bad data (`DataError`,
one message), 2 bad command line or impossible combination (`UsageError`, one line on stderr);
128 + the signal number (143 SIGTERM, 130 SIGINT) stopped by a signal (`preemption`: a checkpoint at the
next step boundary during training, nothing left behind before it).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from ..checkpoints import fingerprint, resume_checks, saving
from . import generation_eval, launch_guard, preemption, preflight
from ..objectives.attention import kernel_name
from ..options.arguments import PROG, Arguments, LoraArguments, ModelArguments, TrainingArguments, UsageError, parse_args
from ..options.arguments import deepspeed_config
from ..options import plan as memory_plan
from .lora import add_lora
from ..objectives.quantize import quantization_config_for_qlora
from ..data.records import DataError
from ..objectives.losses import training_objective
from .trainer import BaichuanTrainer, plot_loss_curve
from ..core import launch_checks, quiet
from ..core.errors import exit_code

logger = logging.getLogger("baichuan_finetune")


# ----- the training method, decided once -----


@dataclass(frozen=True)
class TrainingMethod:
    """What a run trains and what it saves: all weights ("full"), or LoRA adapters on a base loaded
    as is ("lora") or in 4 bits ("qlora")."""

    name: str

    @property
    def is_adapter(self) -> bool:
        """Trains and saves LoRA adapters, not the whole model."""
        return self.name != "full"

    @property
    def what(self) -> str:
        return "the LoRA adapter" if self.is_adapter else "the model"

    def load_model(self, args: Arguments):
        """The base model (native classes registered by this package; never remote code), LoRA-wrapped
        for the adapter methods."""
        t = args.training
        quantization = quantization_config_for_qlora(torch_dtype(t)) if self.name == "qlora" else None
        model = AutoModelForCausalLM.from_pretrained(
            base_model_path(args.model), dtype=torch_dtype(t), cache_dir=t.cache_dir, quantization_config=quantization,
            attn_implementation=kernel_name(args.model.attn_implementation),
            trust_remote_code=False,  # never ask on stdin; preflight refused code that is not ours
        )
        model.config.use_cache = False
        if self.is_adapter:
            model = add_lora(model, args.lora, quantized=self.name == "qlora",
                             activation_checkpointing=t.activation_checkpointing, report=t.process_index == 0)
        return model

    def save(self, trainer: BaichuanTrainer, output_dir: str) -> None:
        """Write the trained weights (every process calls this: gathering ZeRO-3 shards is a collective)."""
        if self.is_adapter:
            saving.save_lora_adapter(trainer, output_dir)
        else:
            trainer.model.config.use_cache = True  # saved for inference
            trainer.save_model(output_dir)


def training_method(lora: LoraArguments) -> TrainingMethod:
    return TrainingMethod("qlora" if lora.q_lora else "lora" if lora.use_lora else "full")


# ----- building blocks -----


def torch_dtype(training: TrainingArguments) -> torch.dtype:
    return getattr(torch, memory_plan.PRECISIONS[memory_plan.precision_of(training)][0])


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
        trust_remote_code=False,
    )


def resolve_resume(training: TrainingArguments) -> str | None:
    """The checkpoint to resume from, or None to start fresh; refuses to overwrite checkpoints silently."""
    output_dir = training.output_dir
    value = training.resume_from_checkpoint
    value = "" if value is None else str(value)  # a YAML/JSON config may give a boolean
    if value in ("", "False", "false", "None"):
        existing = saving.list_checkpoints(output_dir)
        if existing and not training.overwrite_output_dir:
            raise UsageError(launch_checks.checkpoints_refusal(output_dir, existing[-1].name))
        return None
    if value in ("True", "true", "latest", "last"):
        # The newest complete checkpoint that validates; a damaged newer one is skipped, saying so.
        damaged = []
        for path in reversed(saving.complete_checkpoints(output_dir)):
            problem = saving.validate_checkpoint(path)
            if problem is None:
                if damaged and training.process_index == 0:
                    logger.warning("--resume_from_checkpoint %s: skipping damaged %s; resuming from %s instead",
                                   value, "; ".join(damaged), path.name)
                return str(path)
            damaged.append(f"{path.name} ({problem})")
        if damaged:
            raise UsageError(f"--resume_from_checkpoint {value}: no loadable checkpoint in {output_dir}: "
                             + "; ".join(damaged))
        raise UsageError(f"--resume_from_checkpoint {value}: no complete checkpoint in {output_dir}")
    problem = saving.validate_checkpoint(value)
    if problem is not None:
        hint = "; pick an earlier one" if Path(value).is_dir() else ""
        raise UsageError(f"--resume_from_checkpoint {value}: {problem}{hint}")
    return str(value)


def _setup_logging(training: TrainingArguments) -> None:
    quiet.install()  # library warnings that tell the user nothing, filtered in one place
    level = training.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.setLevel(logging.INFO if training.process_index == 0 else logging.WARNING)
    transformers.utils.logging.set_verbosity(level)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# ----- the run -----


def run(args: Arguments, callbacks: Sequence[TrainerCallback] = ()) -> BaichuanTrainer:
    """Train and save; returns the trainer (its model is the trained one)."""
    t = args.training
    method = training_method(args.lora)
    _setup_logging(t)
    if t.deepspeed:
        import deepspeed

        # Before the model is built: ZeRO-3 builds it inside zero.Init, which needs the process group.
        deepspeed.init_distributed(dist_backend="gloo" if t.use_cpu else "nccl")

    # Output dir, model files, positions: checked before the lock creates output_dir, old checkpoints are
    # deleted, data is prepared or the model loaded (each failure one line, nothing written).
    preflight.check_run(args)
    created = preflight.missing_dirs(t.output_dir)  # the lock makes them; a failed run removes them if empty
    # One writer per output directory, from before anything in it is read or cleaned to the end of the run.
    lock = saving.lock_output_dir(t.output_dir, is_global_main=t.process_index == 0)
    ok = False
    try:
        trainer = _run_locked(args, method, callbacks)
        ok = True
        return trainer
    finally:
        lock.release()
        if not ok and t.process_index == 0:
            preflight.remove_empty_dirs(created)


def _run_locked(args: Arguments, method: TrainingMethod, callbacks: Sequence[TrainerCallback]) -> BaichuanTrainer:
    t = args.training
    if t.should_save:
        saving.remove_leftovers(t.output_dir)  # of a killed run: set-aside checkpoints, a temporary final dir
    if t.process_index == 0 and not t.skip_memory_check:
        # Before data and model: an over-memory launch is flagged in seconds, not after loading.
        memory_plan.report_launch(base_model_path(args.model), t, args.lora, args.data, deepspeed_config(t))
    resume = resolve_resume(t)
    # What every checkpoint records; a resume must match it before any data or model is loaded.
    record = resume_checks.run_record(args, base_model_path(args.model))
    if resume:
        for line in resume_checks.check_resume(resume, record, t.resume_ignore_mismatch):
            logger.warning("--resume_ignore_mismatch: %s", line)
    if resume is None and t.overwrite_output_dir:
        if t.should_save and saving.list_checkpoints(t.output_dir):
            removed = saving.remove_checkpoints(t.output_dir)
            logger.info("--overwrite_output_dir: deleted %d old checkpoint(s) in %s", len(removed), t.output_dir)
        _barrier()  # on every process: none may look at output_dir while it is being cleaned

    transformers.set_seed(t.seed)  # LoRA's initial weights depend on it
    tokenizer = load_tokenizer(args)
    # --eval_generation_file / --eval_mc_dir read and checked before the data and the model.
    watch = generation_eval.read_inputs(t)
    from ..data.preprocess import prepare_data

    if args.data.streaming:  # read lazily while training, from where `resume` left the stream
        from ..data.streaming import prepare_stream

        data = prepare_stream(args.data, tokenizer, t, resume)
    elif t.stage == "dpo":  # pairs: chosen and rejected answers to one prompt (docs/preference.md)
        from ..data.preference_data import prepare_pairs

        data = prepare_pairs(args.data, tokenizer, t.model_max_length, seed=t.seed)
    else:
        data = prepare_data(args.data, tokenizer, t.model_max_length, seed=t.seed, stage=t.stage)  # sft or pt
    if t.process_index == 0:
        print(data.report.format(), flush=True)
    memory_plan.memory_probe_start()  # only with BAICHUAN_FINETUNE_MEMORY_LOG (benchmarks/memory.py)
    model = method.load_model(args)
    base_config = model.config  # a PeftModel's is its base model's

    trainer_class, objective = BaichuanTrainer, {"head_loss": training_objective(t.z_loss_weight, base_config)}
    if t.stage == "dpo":
        from .preference import PreferenceTrainer, preference_options

        # A full fine-tune's reference is a frozen copy of the base (LoRA: the adapters disabled).
        trainer_class = PreferenceTrainer
        objective = preference_options(t, lambda: TrainingMethod("full").load_model(args), method.is_adapter)
    trainer = trainer_class(
        model=model,
        args=t,
        train_dataset=data.train_dataset,
        eval_dataset=data.eval_dataset,
        data_collator=data.data_collator,
        processing_class=tokenizer,
        callbacks=[*callbacks, preemption.StopOnSignal()],
        **objective,
    )
    trainer.run_record = record
    for callback in generation_eval.watch_callbacks(trainer, watch):  # they log through the trainer
        trainer.add_callback(callback)
    if resume:
        logger.info("Resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    preemption.training_finished()  # a signal from here on lets the final save finish
    if trainer.stream_loader is not None:
        from ..data.streaming import describe_counts

        logger.info("Stream read by this process: %s", describe_counts(trainer.stream_loader.counts(),
                                                                        trainer.stream_loader.dataset.config.sources))
    throughput = trainer.throughput()  # a collective: every process
    if data.eval_dataset is not None and t.eval_strategy == "no":
        trainer.evaluate()
    trainer.save_state()

    trainer.check_finite_weights()  # never a non-finite final model
    base_dir = base_model_path(args.model)

    def finish(tmp: Path) -> None:
        saving.finish_output_dir(
            tmp, tokenizer, saving.output_generation_config(base_dir, t.model_max_length),
            # The model still takes the base's full context; a longer training length raises it.
            model_max_length=max(base_config.model_max_length, t.model_max_length),
            is_adapter=method.is_adapter,
        )
        if method.is_adapter:  # lets merge_lora.py check that it merges into this very base
            fingerprint.write_fingerprint(base_dir, tmp)

    # Complete or clearly absent: written into a temporary directory, config.json/adapter_config.json moved last.
    saving.save_final_output(t.output_dir, lambda tmp: method.save(trainer, str(tmp)), finish,
                             is_main=t.should_save, is_adapter=method.is_adapter, step=trainer.state.global_step,
                             needed=saving.parameter_bytes(trainer.model, trainable_only=method.is_adapter))
    if t.should_save:
        plot_loss_curve(trainer.state.log_history, t.output_dir)
        # Counted since this process started (a resumed run counts only its own steps).
        (Path(t.output_dir) / "throughput.json").write_text(json.dumps(throughput, indent=2) + "\n")
        write_run_config(args, t.output_dir)
        logger.info("Throughput: %.1f tokens/s, %.1f supervised tokens/s, %.1f%% real tokens per batch slot",
                    throughput["tokens_per_second"], throughput["supervised_tokens_per_second"],
                    100 * throughput["real_token_share"])
        logger.info("Saved %s to %s", method.what, t.output_dir)
    _barrier()
    return trainer


RUN_CONFIG = "run_config.yaml"


def write_run_config(args: Arguments, output_dir: str | Path) -> Path:
    """The run's options (config file and flags, resolved) as ``run_config.yaml`` in `output_dir`:
    ``baichuan-finetune train <output_dir>/run_config.yaml`` (or fine-tune.py) repeats the run."""
    import yaml

    path = Path(output_dir) / RUN_CONFIG
    header = "# The options of the run that wrote this directory; repeat it with:\n" \
             f"#   baichuan-finetune train {path}   (or: python fine-tune/fine-tune.py {path})\n"
    path.write_text(header + yaml.safe_dump(args.resolved, sort_keys=True, allow_unicode=True))
    return path


def main(argv: Sequence[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> int:
    """Parse, train, save; the exit code (errors as one line on stderr, from the first process only)."""
    launch_guard.guard_against_orphaning()  # first: a rank must not outlive its launcher, even while loading
    preemption.install()  # SIGTERM/SIGINT: a checkpoint at the next step, or nothing left behind
    try:
        # Cheap checks first (fine-tune.py made them before importing torch; here for callers of main).
        argv = list(sys.argv[1:] if argv is None else argv)
        problem = launch_checks.problem(argv)
        if problem is not None:
            raise UsageError(problem)
        launch_checks.announce_op_builds(argv)  # before parsing: --deepspeed sets up (and builds) its comm op
        args = parse_args(argv)
        preemption.set_output_dir(args.training.output_dir)
        run(args, callbacks)
        launch_guard.record_run_finished(args.training.output_dir, args.training.local_process_index)
    except UsageError as e:
        if int(os.environ.get("LOCAL_RANK", "0") or 0) <= 0:
            print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return exit_code(e)
    except DataError as e:
        if int(os.environ.get("LOCAL_RANK", "0") or 0) <= 0:
            print(f"{PROG}: data error: {e}", file=sys.stderr, flush=True)
        return exit_code(e)
    except saving.RunError as e:  # diverged, disk full, output_dir in use
        if int(os.environ.get("LOCAL_RANK", "0") or 0) <= 0:
            print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return exit_code(e)
    except preemption.Preempted as e:  # SIGTERM/SIGINT: the checkpoint (if any) is complete
        if int(os.environ.get("LOCAL_RANK", "0") or 0) <= 0:
            print(e.message, file=sys.stderr, flush=True)
        return e.code
    finally:
        preemption.uninstall()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
