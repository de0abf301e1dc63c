"""What the fine-tune says while it trains, and whether it forgets: callbacks run at each evaluation.

- ``--eval_generation_file``: a fixed random sample (``--eval_generation_samples``) of held-out prompts
  is answered greedily (``evaluation.batch_generation``); BLEU-4, ROUGE-1/2/L and exact match against
  the references (``evaluation.metrics``) are logged as ``eval_bleu-4``, ``eval_rouge-l``, ... through
  the Trainer's log (so TensorBoard, wandb and ``trainer_state.json`` get them), the answers as a table
  (a TensorBoard text summary, a wandb Table) and as lines of ``<output_dir>/eval_generations.jsonl``.
- ``--eval_mc_dir``: multiple-choice accuracy (``evaluation.multiple_choice``), logged in percent as
  ``eval_mc_accuracy``; ``--max_mc_drop POINTS`` stops the run (`ForgettingDetected`, exit 1) when it falls
  that far below the first evaluation's, before the step's checkpoint is written.

Every process reads the same inputs and takes its share of them (prompt ``i`` goes to rank
``i % world_size``). Under ZeRO-3 each forward gathers the parameters with all ranks, so the shares are
scored in lockstep: generation with ``synced_gpus`` (a rank out of prompts keeps stepping) and scoring
with equal shares (the short ones padded with a repeated question that is not counted). Results are
gathered, so every rank computes the same figures and takes the same decision.

Evaluations of one run compare with each other because nothing but the weights changes between them:
the same sample, the same prompt ids, greedy decoding.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback, WandbCallback
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from ..checkpoints import saving
from ..data.records import DataError
from ..evaluation.batch_generation import generate_batch
from ..evaluation.metrics import METRIC_NAMES, text_metrics
from ..evaluation.multiple_choice import EvalDataError, Task, encode_task, read_task, score_prompts
from ..evaluation.prompts import Prompt, chat_prompt_ids, read_prompts
from ..options.arguments import TrainingArguments

logger = logging.getLogger(__name__)

SAMPLES_FILE = "eval_generations.jsonl"
TABLE_TAG = "eval/generation_samples"
# A table cell shows at most this many characters (TensorBoard renders the whole table as one text).
CELL_CHARS = 300


@dataclass
class WatchInputs:
    """The evaluation inputs, read and checked before the model loads: the sampled prompts (with their
    0-based numbers in the file) and the multiple-choice task (None when the flag is not given)."""

    prompts: list[tuple[int, Prompt]] | None = None
    task: Task | None = None


def read_inputs(t: TrainingArguments) -> WatchInputs:
    """Read ``--eval_generation_file`` (and sample it) and ``--eval_mc_dir``; a problem with either is one
    `DataError` naming the flag and the file (exit 1)."""
    inputs = WatchInputs()
    if t.eval_generation_file:
        try:
            prompts = read_prompts(t.eval_generation_file)
        except DataError as e:
            raise DataError(f"--eval_generation_file: {e}") from None
        inputs.prompts = [(i, prompts[i]) for i in sample(len(prompts), t.eval_generation_samples, t.seed)]
    if t.eval_mc_dir:
        try:
            inputs.task = read_task(t.eval_mc_dir, shots=t.eval_mc_shots, limit=t.eval_mc_limit)
        except (EvalDataError, FileNotFoundError) as e:
            raise DataError(f"--eval_mc_dir {t.eval_mc_dir}: {e}") from None
    return inputs


def sample(total: int, count: int, seed: int) -> list[int]:
    """`count` of the numbers ``0..total-1`` drawn with `seed` (all of them when there are no more), sorted."""
    if total <= count:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), count))


def watch_callbacks(trainer, inputs: WatchInputs) -> list[TrainerCallback]:
    """The callbacks for `inputs` (none for what was not asked), bound to `trainer` (they log through it)."""
    callbacks: list[TrainerCallback] = []
    if inputs.prompts:
        callbacks.append(GenerationWatch(trainer, inputs.prompts))
    if inputs.task is not None:
        callbacks.append(MultipleChoiceWatch(trainer, inputs.task))
    return callbacks


# ----- spreading the work over the processes -----


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather(mine: list, world: int) -> list[list]:
    """Every rank's `mine`, indexed by rank (a collective)."""
    if world == 1:
        return [mine]
    everyone: list = [None] * world
    torch.distributed.all_gather_object(everyone, mine)
    return everyone


def _interleave(shares: list[list], total: int) -> list:
    """Results of item ``i`` from rank ``i % world`` put back in input order."""
    world = len(shares)
    return [shares[i % world][i // world] for i in range(total)]


class ForgettingDetected(saving.RunError):
    """Multiple-choice accuracy fell more than ``--max_mc_drop`` points below the first evaluation's."""


# ----- the callbacks -----


class GenerationWatch(TrainerCallback):
    """At each evaluation: answers to the sampled prompts, their BLEU/ROUGE, a table of them."""

    def __init__(self, trainer, prompts: list[tuple[int, Prompt]]):
        self.trainer = trainer
        self.numbers = [number for number, _ in prompts]  # in the file: the `id` of predict's output
        self.prompts = [prompt for _, prompt in prompts]
        self.has_references = [p.reference is not None for p in self.prompts]
        self._ids: list[list[int]] | None = None
        if trainer.args.process_index == 0 and not any(self.has_references):
            logger.info("--eval_generation_file: no prompt has a reference; answers are logged without BLEU/ROUGE")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        model, tokenizer = self.trainer.model, self.trainer.processing_class
        max_new_tokens = args.eval_generation_max_new_tokens
        if self._ids is None:  # the model's context, known once it is loaded
            self._ids = [chat_prompt_ids(model.config.model_max_length, tokenizer, p.messages, max_new_tokens)
                         for p in self.prompts]
        rank, world = _rank_and_world()
        started = time.perf_counter()
        mine = generate_batch(model, tokenizer, self._ids[rank::world], max_new_tokens=max_new_tokens,
                              batch_size=args.per_device_eval_batch_size,
                              synced_gpus=world > 1 and is_deepspeed_zero3_enabled())
        shares = _gather([(g.text, g.new_tokens, g.finish_reason) for g in mine], world)
        answers = _interleave(shares, len(self.prompts))
        logs = {"eval_generation_seconds": round(time.perf_counter() - started, 2)}
        scored = [i for i, has in enumerate(self.has_references) if has]
        scores = text_metrics([answers[i][0] for i in scored], [self.prompts[i].reference for i in scored])
        if scored:
            logs |= {f"eval_{name}": scores["mean"][name] for name in METRIC_NAMES}
        per_example = dict(zip(scored, scores["examples"]))
        self.trainer.log(logs)
        if metrics is not None:  # evaluate() returns them: usable as --metric_for_best_model
            metrics.update(logs)
        if state.is_world_process_zero:
            rows = [{"step": state.global_step, "id": self.numbers[i], "source": p.source, "prompt": p.text,
                     "reference": p.reference, "prediction": text, "new_tokens": new_tokens, "finish_reason": finish,
                     **({"metrics": per_example[i]} if i in per_example else {})}
                    for i, (p, (text, new_tokens, finish)) in enumerate(zip(self.prompts, answers))]
            self._write(args, state, rows)

    def _write(self, args, state, rows: list[dict]) -> None:
        output = Path(args.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        with open(output / SAMPLES_FILE, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        columns = ["id", "prompt", "reference", "prediction", "rouge-l"]
        table = [[row["id"], row["prompt"], row["reference"] or "", row["prediction"],
                  row.get("metrics", {}).get("rouge-l", "")] for row in rows]
        for callback in self.trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                callback.tb_writer.add_text(TABLE_TAG, markdown_table(columns, table), state.global_step)
                callback.tb_writer.flush()
            elif isinstance(callback, WandbCallback):
                import wandb

                if wandb.run is not None:  # WandbCallback steps every metric by train/global_step
                    wandb.log({TABLE_TAG: wandb.Table(columns=columns, data=table),
                               "train/global_step": state.global_step})


def markdown_table(columns: list[str], rows: list[list]) -> str:
    """A Markdown table (what TensorBoard's text tab renders); cells on one line, pipes escaped, long
    cells cut to `CELL_CHARS` characters."""

    def cell(value) -> str:
        text = " ".join(str(value).split()).replace("|", "\\|")
        return text if len(text) <= CELL_CHARS else text[:CELL_CHARS] + "…"

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class MultipleChoiceWatch(TrainerCallback):
    """At each evaluation: multiple-choice accuracy (percent) as ``eval_mc_accuracy``; with
    ``--max_mc_drop``, the stop when it falls that many points below the first evaluation's."""

    def __init__(self, trainer, task: Task):
        self.trainer = trainer
        self.task = task
        self.answers = [item.answer for result in task.results for item in result.items]
        self.prompts: list[list[int]] | None = None

    def accuracy(self) -> float:
        """Percent of the questions the trainer's model answers right (a collective on every rank)."""
        if self.prompts is None:  # the model's context, known once it is loaded: as `eval` builds them
            encode_task(self.task, self.trainer.processing_class, self.trainer.model.config.model_max_length)
            self.prompts = [ids for result in self.task.results for ids in result.prompts]
        rank, world = _rank_and_world()
        share = list(range(len(self.prompts)))[rank::world]
        # Equal shares: under ZeRO-3 every rank must make the same number of forwards.
        width = -(-len(self.prompts) // world)
        padded = share + [share[0] if share else 0] * (width - len(share))
        predictions = score_prompts(self.trainer.model, [self.prompts[i] for i in padded], self.task.letter_ids,
                                    self.trainer.args.per_device_eval_batch_size)
        correct = sum(predictions[n] == self.answers[i] for n, i in enumerate(share))
        total = torch.tensor([float(correct)], device=self.trainer.args.device)
        if world > 1:
            torch.distributed.all_reduce(total)
        return 100.0 * total.item() / len(self.prompts)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        was_training = self.trainer.model.training
        self.trainer.model.eval()
        try:
            accuracy = round(self.accuracy(), 4)
        finally:
            self.trainer.model.train(was_training)
        self.trainer.log({"eval_mc_accuracy": accuracy})
        if metrics is not None:
            metrics["eval_mc_accuracy"] = accuracy
        if args.max_mc_drop is not None:
            check_forgetting(state.log_history, args)


def check_forgetting(log_history: list[dict], args) -> None:
    """`ForgettingDetected` when the last ``eval_mc_accuracy`` of `log_history` is more than
    ``--max_mc_drop`` points below the first. Read from the history, not kept in the callback: a resumed
    run restores it from its checkpoint, so the first evaluation stays the run's first."""
    history = [(h["step"], h["eval_mc_accuracy"]) for h in log_history if "eval_mc_accuracy" in h]
    (first_step, first), (step, accuracy) = history[0], history[-1]
    drop, limit = first - accuracy, args.max_mc_drop
    if drop <= limit:
        return
    good_steps = [s for s, a in history[:-1] if first - a <= limit]
    good = None
    if good_steps:
        good = next((c for c in reversed(saving.complete_checkpoints(args.output_dir))
                     if int(c.name.rsplit("-", 1)[1]) <= good_steps[-1]), None)
    keep = (f"the last checkpoint evaluated before the drop: {good}" if good is not None
            else "no checkpoint was saved before the drop")
    raise ForgettingDetected(
        f"multiple-choice accuracy fell from {first:.2f}% (step {first_step}, the first evaluation) to "
        f"{accuracy:.2f}% at step {step}: {drop:.2f} points, more than --max_mc_drop {limit:g}; stopped "
        f"without saving step {step}, {keep}. Try a lower --learning_rate (now {args.learning_rate:g}), "
        "fewer steps, or general data mixed into the training data")
