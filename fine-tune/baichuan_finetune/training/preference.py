"""Preference tuning: the DPO, IPO, ORPO and SimPO losses and the trainer that computes them.

One forward scores the chosen and the rejected answers of a batch (``preference_data.PairCollator``
puts them in one batch) through the fused head (``losses.SequenceLogProbs``): summed log-probs of
each answer's tokens, never ``[tokens, vocab]`` logits. The reference log-probs come from, in this
order: values precomputed before training (``--precompute_ref_logps``), a frozen reference model
(full fine-tune), or the policy itself with its LoRA adapters disabled. ORPO and SimPO need none.

Which log-probs each loss sees (as LLaMA-Factory and TRL): DPO (``sigmoid``) the summed ones; IPO,
ORPO and SimPO the per-token averages.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from ..objectives.losses import SequenceLogProbs
from ..model.modeling_baichuan import IGNORE_INDEX
from ..data.records import DataError
from .trainer import BaichuanTrainer

logger = logging.getLogger(__name__)

PREF_LOSSES = ("sigmoid", "ipo", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")
REF_LOGPS_FILE = "reference_logps.json"
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")


# ----- the losses, per pair (each a restatement of its paper's formula) -----


def dpo_loss(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): ``-log sigmoid(beta h)``, ``h = (pc - rc) - (pr - rr)``;
    with ``label_smoothing`` e, conservative DPO: ``-(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)``."""
    h = (pc - rc) - (pr - rr)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_loss(pc, pr, rc, rr, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17): ``(h - 1 / (2 beta))^2`` with DPO's ``h`` (beta is the paper's tau)."""
    h = (pc - rc) - (pr - rr)
    return (h - 1 / (2 * beta)) ** 2


def orpo_loss(pc_avg, pr_avg, beta: float) -> torch.Tensor:
    """ORPO (Hong et al. 2024, eq. 6-7): ``-pc_avg + beta * -log sigmoid(log odds(c) - log odds(r))``,
    ``odds(y) = P / (1 - P)`` with ``P = exp(average log-prob)``; beta is the paper's lambda."""
    log_odds = (pc_avg - pr_avg) - (torch.log1p(-torch.exp(pc_avg)) - torch.log1p(-torch.exp(pr_avg)))
    return -pc_avg - beta * F.logsigmoid(log_odds)


def simpo_loss(pc_avg, pr_avg, beta: float, gamma: float) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6): ``-log sigmoid(beta pc_avg - beta pr_avg - gamma)``."""
    return -F.logsigmoid(beta * pc_avg - beta * pr_avg - gamma)


@dataclass(frozen=True)
class PreferenceObjective:
    """The flags of a preference run: which loss, beta, the SFT term's weight, SimPO's gamma, cDPO's smoothing."""

    loss: str = "sigmoid"
    beta: float = 0.1
    ftx: float = 0.0
    simpo_gamma: float = 0.5
    label_smoothing: float = 0.0

    @property
    def needs_reference(self) -> bool:
        return self.loss not in REFERENCE_FREE

    def __call__(self, logps: torch.Tensor, counts: torch.Tensor, ref: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """Mean loss over the pairs and the metrics, from ``logps``/``counts`` ``[2B]`` (chosen rows first)
        and the reference's summed log-probs ``ref`` ``[2B]`` (None for ORPO/SimPO)."""
        n = logps.shape[0] // 2
        avg = logps / counts.clamp(min=1)
        pc, pr, pc_avg, pr_avg = logps[:n], logps[n:], avg[:n], avg[n:]
        if self.loss in ("sigmoid", "ipo"):
            if self.loss == "sigmoid":
                c, r, rc, rr = pc, pr, ref[:n], ref[n:]
                losses = dpo_loss(c, r, rc, rr, self.beta, self.label_smoothing)
            else:
                ref_avg = ref / counts.clamp(min=1)
                c, r, rc, rr = pc_avg, pr_avg, ref_avg[:n], ref_avg[n:]
                losses = ipo_loss(c, r, rc, rr, self.beta)
            chosen_rewards, rejected_rewards = self.beta * (c - rc).detach(), self.beta * (r - rr).detach()
        else:
            losses = orpo_loss(pc_avg, pr_avg, self.beta) if self.loss == "orpo" else simpo_loss(
                pc_avg, pr_avg, self.beta, self.simpo_gamma)
            chosen_rewards, rejected_rewards = self.beta * pc_avg.detach(), self.beta * pr_avg.detach()
        if self.ftx:
            losses = losses + self.ftx * -pc_avg  # supervised NLL per token of the chosen answer
        metrics = {
            "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean(),
        }
        return losses.mean(), metrics


def preference_options(t: Any, load_reference: Callable[[], Any], is_adapter: bool) -> dict[str, Any]:
    """`PreferenceTrainer`'s keyword arguments from the training flags: the objective and the reference
    model (loaded by `load_reference` only for a full fine-tune whose loss needs one and whose reference
    log-probs are not precomputed)."""
    objective = PreferenceObjective(loss=t.pref_loss, beta=t.pref_beta, ftx=t.pref_ftx, simpo_gamma=t.simpo_gamma,
                                    label_smoothing=t.label_smoothing)
    need_model = objective.needs_reference and not is_adapter and not t.precompute_ref_logps
    return {"objective": objective, "ref_model": load_reference() if need_model else None,
            "precompute_ref_logps": t.precompute_ref_logps}


# ----- the trainer -----


class PreferenceTrainer(BaichuanTrainer):
    """`BaichuanTrainer` for pairs: policy and reference log-probs, the preference loss, its metrics
    (in every log line and ``trainer_state.json``, averaged over the steps since the last log and
    over the processes; eval metrics prefixed ``eval_``)."""

    def __init__(self, *args, objective: PreferenceObjective, ref_model=None, precompute_ref_logps: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.ref_model = ref_model
        self.precompute_ref_logps = precompute_ref_logps and objective.needs_reference
        self._ref_table: dict[str, torch.Tensor] = {}
        self._stored: dict[str, list[torch.Tensor]] = {"train": [], "eval": []}
        self.can_return_loss = True  # evaluation calls compute_loss although the batch has no "labels" key name
        if ref_model is not None and objective.needs_reference:
            self.ref_model = _prepare_reference(ref_model, self)
        if self.precompute_ref_logps:
            self.add_callback(_PrecomputeReference(self))

    # --- log-probs ---

    def sequence_logps(self, model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probs ``[rows]`` of each row's label tokens, and their counts."""
        rows = inputs["input_ids"].shape[0]
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"],
                    head_loss=SequenceLogProbs(num_sequences=rows))
        counts = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
        return out.loss, counts

    @contextlib.contextmanager
    def _adapters_disabled(self, model):
        unwrapped = self.accelerator.unwrap_model(model)
        with unwrapped.disable_adapter() if hasattr(unwrapped, "disable_adapter") else contextlib.nullcontext():
            yield

    def reference_logps(self, model, inputs: dict[str, torch.Tensor], split: str) -> torch.Tensor | None:
        """The reference's summed log-probs ``[rows]``, or None when the loss needs none."""
        if not self.objective.needs_reference:
            return None
        if self.precompute_ref_logps and split in self._ref_table:
            pairs = self._ref_table[split][inputs["pair_index"].cpu()]
            return torch.cat([pairs[:, 0], pairs[:, 1]]).to(inputs["input_ids"].device)
        with torch.no_grad():
            if self.ref_model is not None:
                return self.sequence_logps(self.ref_model, inputs)[0].detach()
            with self._adapters_disabled(model):
                return self.sequence_logps(model, inputs)[0].detach()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        split = "train" if model.training else "eval"
        if model.training:
            self._count(inputs)
        ref = self.reference_logps(model, inputs, split)
        logps, counts = self.sequence_logps(model, inputs)
        loss, metrics = self.objective(logps, counts, ref)
        self._stored[split].append(torch.stack([loss.detach(), *metrics.values()]).float())
        return (loss, {"loss": loss}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        stored = self._stored[split]
        sums = torch.stack(stored).sum(0) if stored else torch.zeros(len(METRICS) + 1)
        counts = torch.tensor([float(len(stored))])
        totals = torch.cat([sums.cpu(), counts])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            totals = totals.to(self.args.device)
            torch.distributed.all_reduce(totals)  # every process logs at the same steps
        totals = totals.cpu()
        if totals[-1] > 0:
            for name, value in zip(METRICS, (totals[1:-1] / totals[-1]).tolist()):
                logs[prefix + name] = round(value, 6)
        self._stored[split] = []
        super().log(logs, start_time)


def _prepare_reference(ref_model, trainer: PreferenceTrainer):
    """The frozen reference under the run's ZeRO stage (ZeRO-3 shards it; other stages keep a whole copy
    per process, as DeepSpeed has no optimizer state for it to shard)."""
    ref_model.requires_grad_(False)
    ref_model.eval()
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return ref_model.to(trainer.args.device)
    import copy

    import deepspeed

    config = copy.deepcopy(plugin.deepspeed_config)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        hidden = ref_model.config.hidden_size
        for key, value in (("reduce_bucket_size", hidden * hidden), ("stage3_param_persistence_threshold", 10 * hidden),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))):
            if zero.get(key) == "auto":
                zero[key] = value
    else:
        zero["stage"] = 0
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    for key in ("bf16", "fp16"):
        if isinstance(config.get(key), dict) and config[key].get("enabled") == "auto":
            config[key]["enabled"] = bool(getattr(trainer.args, key))
    engine, *_ = deepspeed.initialize(model=ref_model, config=config)
    engine.eval()
    return engine


class _PrecomputeReference(TrainerCallback):
    """At training start, the reference log-probs of every pair (train and eval), once.

    The policy then still is the reference (LoRA: adapters disabled). They are written to
    ``output_dir/reference_logps.json``; a resumed run reads them back instead (the policy has moved),
    which makes resumption exact.
    """

    def __init__(self, trainer: PreferenceTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        t = self.trainer
        path = Path(args.output_dir) / REF_LOGPS_FILE
        if state.global_step > 0:
            if not path.is_file():
                raise DataError(f"{path}: missing; a resumed --precompute_ref_logps run needs the reference "
                                "log-probs written when it started")
            saved = json.loads(path.read_text())
            t._ref_table = {k: torch.tensor(v, dtype=torch.float32) for k, v in saved.items()}
            return
        datasets = {"train": t.train_dataset, "eval": t.eval_dataset}
        t._ref_table = {k: _reference_table(t, d) for k, d in datasets.items() if d is not None}
        if args.should_save:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({k: v.tolist() for k, v in t._ref_table.items()}))


def _reference_table(t: PreferenceTrainer, dataset) -> torch.Tensor:
    """``[pairs, 2]`` reference log-probs (chosen, rejected); each process scores every world-th pair."""
    rank, world = t.args.process_index, t.args.world_size
    batch = t.args.per_device_eval_batch_size
    mine = list(range(rank, len(dataset), world))
    steps = -(-(-(-len(dataset) // world)) // batch)  # the same on every process (ZeRO-3 gathers collectively)
    model = t.model_wrapped
    values: list[tuple[int, float, float]] = []
    was_training = model.training
    model.eval()
    for s in range(steps):
        idx = mine[s * batch : (s + 1) * batch]
        inputs = t._prepare_inputs(t.data_collator([dataset[i] for i in (idx or [0])]))
        with torch.no_grad(), t._adapters_disabled(model):
            logps = t.sequence_logps(model, inputs)[0].float().cpu()
        n = inputs["pair_index"].shape[0]
        values += [(i, logps[j].item(), logps[n + j].item()) for j, i in enumerate(idx)]
    model.train(was_training)
    gathered: list[Any] = [values]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, values)
    table = torch.zeros(len(dataset), 2)
    for part in gathered:
        for i, c, r in part:
            table[i] = torch.tensor([c, r])
    return table
