"""The HF Trainer as we run it: our training objective, token counts and rates, complete checkpoints.

`BaichuanTrainer` passes its `head_loss` (a `losses.CausalLMLoss`) into every model call; it reaches
``BaichuanForCausalLM.forward(..., head_loss=...)`` through a ``PeftModel`` and the DeepSpeed engine,
which pass keyword arguments on unchanged.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import Trainer, TrainerCallback

from . import saving
from .losses import CausalLMLoss
from .modeling_baichuan import IGNORE_INDEX

logger = logging.getLogger(__name__)


def training_objective(z_loss_weight: float | None, model_config) -> CausalLMLoss:
    """The loss the Trainer passes as `head_loss`: cross-entropy plus z-loss weighted by
    ``--z_loss_weight``, or when that is None by the base model config's ``z_loss_weight``."""
    return CausalLMLoss(z_loss_weight=model_config.z_loss_weight if z_loss_weight is None else z_loss_weight)


class BaichuanTrainer(Trainer):
    """The HF Trainer plus `head_loss` as the objective, tokens/s in every training log and checkpoints
    marked complete."""

    def __init__(self, *args, head_loss: Callable | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_loss = head_loss
        # [tokens, supervised tokens, batch slots] of this process: since the last log, and in all.
        # Kept on the batch's device so that counting never waits for the GPU.
        self._interval: torch.Tensor | None = None
        self._total: torch.Tensor | None = None
        self._last_log_time: float | None = None
        self.add_callback(_StartClock(self))

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

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        path = Path(self._get_output_dir(trial=trial)) / f"{saving.CHECKPOINT_PREFIX}-{self.state.global_step}"
        # Every process has written its shards and RNG state before the marker says "complete".
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            saving.mark_checkpoint_complete(path, self.state.global_step)
        self.accelerator.wait_for_everyone()


class _StartClock(TrainerCallback):
    """Starts the tokens/s clock when training starts (not when the Trainer is built)."""

    def __init__(self, trainer: BaichuanTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._training_started()


def plot_loss_curve(log_history: list[dict], output_dir: str) -> Path | None:
    """``loss_curve.png`` of a Trainer's log history in `output_dir` (skipped with a log line when
    matplotlib is absent)."""
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
