"""The HF Trainer as we run it: our training objective, token counts and rates, checkpoints written as
transactions (see `saving`), and a stop at the first non-finite loss, gradient norm or weight.

`BaichuanTrainer` passes its `head_loss` (a `losses.CausalLMLoss`) into every model call; it reaches
``BaichuanForCausalLM.forward(..., head_loss=...)`` through a ``PeftModel`` and the DeepSpeed engine,
which pass keyword arguments on unchanged.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import Trainer, TrainerCallback

from ..checkpoints import checkpoint_trust, resume_checks, saving
from ..data.streaming import StreamingDataset, StreamLoader, save_position
from ..model.modeling_baichuan import IGNORE_INDEX

logger = logging.getLogger(__name__)


class BaichuanTrainer(Trainer):
    """The HF Trainer plus `head_loss` as the objective, tokens/s in every training log, checkpoints as
    transactions and a stop at the first non-finite loss."""

    def __init__(self, *args, head_loss: Callable | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_loss = head_loss
        # [tokens, supervised tokens, batch slots] of this process: since the last log, and in all.
        # Kept on the batch's device so that counting never waits for the GPU.
        self._interval: torch.Tensor | None = None
        self._total: torch.Tensor | None = None
        self._last_log_time: float | None = None
        # This process's summed loss after the previous step, and the last step checked for divergence.
        self._loss_before: torch.Tensor | None = None
        self._checked_step = -1
        # What this run is (resume_checks.run_record), written into every checkpoint; set by train.run.
        self.run_record: dict | None = None
        self.add_callback(_StartClock(self))
        self.add_callback(_DefaultLogging())
        self.stream_loader: StreamLoader | None = None  # --streaming: its position goes into every checkpoint
        if isinstance(self.train_dataset, StreamingDataset):
            # The stream continues from the position its checkpoint saved; HF's skipping of the batches
            # already trained would read them again on top of that.
            self.args.ignore_data_skip = True

    def get_train_dataloader(self):
        # A stream (--streaming) is this rank's share already, in collated batches: accelerate must not
        # shard it again nor dispatch rank 0's batches to every rank.
        if isinstance(self.train_dataset, StreamingDataset):
            self.stream_loader = StreamLoader(self.train_dataset, self.args.dataloader_num_workers,
                                              self.args.dataloader_prefetch_factor, self.args.dataloader_pin_memory)
            return self.stream_loader
        return super().get_train_dataloader()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self._count(inputs)
        if self.head_loss is not None:
            inputs = {**inputs, "head_loss": self.head_loss}
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
        """Tokens, supervised tokens and batch slots of the whole run (all processes), and their rates.

        A collective: every process must call it.
        """
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

    def _run_epoch(self, *args, **kwargs) -> None:
        # Resumed from the checkpoint of the last step (a run killed while writing its final output): HF
        # would skip the trained batches and then train one step past --max_steps. Nothing is left to train.
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return
        super()._run_epoch(*args, **kwargs)

    # ----- non-finite losses: stop, on every process, before anything non-finite is saved -----

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                                 learning_rate=None) -> None:
        # Called after every optimizer step (and again at an epoch's end, for the same step).
        diverged = None
        if self.state.global_step != self._checked_step:
            self._checked_step = self.state.global_step
            diverged = self._divergence(tr_loss, grad_norm)
            if diverged is not None:
                # Log this step as it is (nan, not the 0 HF's filter would show), evaluate and save nothing.
                self.control.should_log = True
                self.control.should_evaluate = False
                self.control.should_save = False
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                                         learning_rate=learning_rate)
        self._loss_before = tr_loss.detach().clone()  # after the log's reset: the next step's baseline
        if diverged is not None:
            raise diverged

    def _divergence(self, tr_loss: torch.Tensor, grad_norm) -> "TrainingDiverged | None":
        """A `TrainingDiverged` when this step's loss (mean over processes) or the gradient norm is not
        finite, else None. A collective, so that every process stops at the same step."""
        before = self._loss_before if self._loss_before is not None else torch.zeros_like(tr_loss)
        step_loss = (tr_loss.detach() - before).to(torch.float64)  # tr_loss sums the steps since the last log
        # An fp16 overflow that the loss scaler skipped is routine, not divergence.
        norm = 0.0 if grad_norm is None or self.accelerator.optimizer_step_was_skipped else grad_norm
        values = torch.stack([step_loss.reshape(()).to(self.args.device),
                              torch.as_tensor(norm, dtype=torch.float64, device=self.args.device).reshape(())])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(values)
            values /= torch.distributed.get_world_size()
        loss, norm = values.tolist()
        if math.isfinite(loss) and math.isfinite(norm):
            return None
        return TrainingDiverged.at(self.state.global_step, f"loss {loss}, grad_norm {norm}", self.args)

    def check_finite_weights(self) -> None:
        """Raise `TrainingDiverged` unless every trainable weight (each process's ZeRO-3 partition) is
        finite. A collective; run before every save, so that nothing non-finite is ever written."""
        finite = all(bool(torch.isfinite(getattr(p, "ds_tensor", p).detach()).all())
                     for p in self.model.parameters() if p.requires_grad)
        flag = torch.tensor([0.0 if finite else 1.0], device=self.args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag)
        if flag.item():
            raise TrainingDiverged.at(self.state.global_step, "non-finite weights", self.args)

    # ----- checkpoints as transactions -----

    def _save_checkpoint(self, model, trial) -> None:
        """HF's checkpoint, made a transaction: old marker removed and old content set aside first, marker
        (with the file list) written last after every process has saved, rotation only after that."""
        step = self.state.global_step
        run_dir = Path(self._get_output_dir(trial=trial))
        path = saving.checkpoint_path(run_dir, step)
        self.check_finite_weights()
        main = self.args.should_save
        previous = saving.last_complete_checkpoint(run_dir) if main else None
        limit = self.args.save_total_limit
        try:
            if main:
                saving.begin_checkpoint(path, step)
                saving.fault("before_save", step, path)
            self.accelerator.wait_for_everyone()  # nobody writes into path before the old one is gone
            self.args.save_total_limit = None  # HF would rotate before our marker exists: we rotate below
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.save_total_limit = limit
            if self.stream_loader is not None:  # every rank: where its share of the stream stands
                save_position(self.stream_loader, path)
            # Every process has written its shards and RNG state before the marker says "complete".
            self.accelerator.wait_for_everyone()
            if main:
                saving.fault("before_marker", step, path)
                if self.run_record is not None:
                    resume_checks.write_run_record(path, self.run_record)
                saving.mark_checkpoint_complete(path, step)
        except Exception as e:
            needed, basis = self._checkpoint_bytes_needed(previous)
            if not saving.is_disk_full(e, path, needed):
                raise
            if main:
                shutil.rmtree(path, ignore_errors=True)  # incomplete anyway; frees what it took
            raise saving.disk_full_error(path.name, path, needed, basis, previous) from None
        self.accelerator.wait_for_everyone()
        if main:
            saving.fault("after_marker", step, path)
            saving.rotate_checkpoints(run_dir, limit, keep=[path, self.state.best_model_checkpoint], step=step)
        self.accelerator.wait_for_everyone()

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # The one moment between DeepSpeed's engine being built (accelerator.prepare) and HF resuming
        # through it: from here on it loads checkpoints with weights_only=True (checkpoint_trust).
        engine = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        if engine is not None:
            checkpoint_trust.install_safe_checkpoint_engine(engine.engine)
        return super().create_scheduler(num_training_steps, optimizer)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        saving.fault("after_weights", self.state.global_step, output_dir)
        super()._save_optimizer_and_scheduler(output_dir)

    def _save_rng_state(self, output_dir: str) -> None:
        saving.fault("after_optimizer", self.state.global_step, output_dir)
        super()._save_rng_state(output_dir)

    def _checkpoint_bytes_needed(self, previous: Path | None) -> tuple[int | None, str]:
        """Bytes a checkpoint takes: the previous one's recorded size, else an estimate."""
        if previous is not None and (size := saving.checkpoint_bytes(previous)):
            return size, f"the size of {previous.name}"
        adapter = hasattr(self.model, "peft_config")
        weights = saving.parameter_bytes(self.model, trainable_only=adapter)
        trainable = sum((getattr(p, "ds_numel", None) or p.numel()) for p in self.model.parameters() if p.requires_grad)
        # AdamW's two fp32 moments, plus DeepSpeed's fp32 master copy.
        per_param = 12 if self.is_deepspeed_enabled else 8
        return weights + trainable * per_param, "estimated from the weights and AdamW states"


class TrainingDiverged(saving.RunError):
    """A non-finite loss, gradient norm or weight: the run stops (exit code 1) and saves nothing more."""

    @classmethod
    def at(cls, step: int, what: str, args) -> "TrainingDiverged":
        last = saving.last_complete_checkpoint(args.output_dir)
        where = (f"last complete checkpoint: {last} (from before the divergence)" if last is not None
                 else "no checkpoint was saved")
        clip = (f"a smaller --max_grad_norm (now {args.max_grad_norm:g})" if args.max_grad_norm > 0
                else "gradient clipping (--max_grad_norm 1.0)")
        return cls(f"training diverged at step {step}: {what}; nothing from this step on was saved, {where}. "
                   f"Try a lower --learning_rate (now {args.learning_rate:g}), {clip}, or check the data and "
                   "the base model's weights for NaN")


class _StartClock(TrainerCallback):
    """Starts the tokens/s clock when training starts (not when the Trainer is built)."""

    def __init__(self, trainer: BaichuanTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._training_started()


class _DefaultLogging(TrainerCallback):
    """Without --logging_steps, a loss line at least every 10% of the run: every max(1, steps // 10)
    steps (transformers' default, every 500 steps, logs nothing in a short run)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if getattr(args, "default_logging_steps", False) and state.max_steps > 0:
            state.logging_steps = default_logging_steps(state.max_steps)


def default_logging_steps(max_steps: int) -> int:
    """Steps between loss lines when --logging_steps is not given: about 10 lines per run."""
    return max(1, max_steps // 10)


def plot_loss_curve(log_history: list[dict], output_dir: str) -> Path | None:
    """``loss_curve.png`` of a Trainer's log history in `output_dir` (skipped with a log line when
    matplotlib is absent or no loss was logged)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no loss_curve.png (pip install matplotlib)")
        return None
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train and not evals:  # never an empty picture (nor matplotlib's warning about its legend)
        logger.info("No loss was logged (fewer steps than --logging_steps?): no loss_curve.png")
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    # Preference runs (--stage dpo): reward accuracy and margin on a second axis.
    rewards = [(name, [(h["step"], h[name]) for h in log_history if name in h])
               for name in ("rewards/accuracies", "rewards/margins", "eval_rewards/accuracies")]
    if any(points for _, points in rewards):
        ax2 = ax.twinx()
        for (name, points), style in zip(rewards, ("g--", "m:", "go")):
            if points:
                ax2.plot(*zip(*points), style, label=name)
        ax2.set_ylabel("reward accuracy / margin")
        ax2.legend(loc="center right")
    path = Path(output_dir) / "loss_curve.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
