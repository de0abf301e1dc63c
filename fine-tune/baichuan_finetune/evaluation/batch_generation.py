"""Generate answers to many prompts at once: left padding, KV cache, prompts grouped by length.

Batching is only worth it if it changes nothing: the model restarts positions after left padding
(``attention_mask`` 0 marks padding; RoPE positions and the ALiBi distances count from each row's
first real token) and no real token attends to padding, so a batched greedy answer equals the
one-at-a-time answer token for token (tests/evaluation/test_batch_generation.py checks it for RoPE
and ALiBi models, with and without a LoRA adapter).

Prompts are sorted by length (longest first, so a batch that does not fit fails at once) and grouped
into batches of similar lengths, which keeps padding small; results come back in input order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import GenerationConfig, set_seed


@dataclass
class Generation:
    """One generated answer.

    ``token_ids``: the answer's ids (without the eos that ended it); ``text``: them decoded (special
    tokens skipped); ``new_tokens``: the tokens the model generated, the eos included (as OpenAI's
    ``completion_tokens``); ``finish_reason``: "stop" (eos) or "length" (``max_new_tokens`` reached).
    """

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    new_tokens: int = 0
    finish_reason: str = "length"


def generating_model(model):
    """The model whose ``generate`` to call: a ``PeftModel``'s base model (PEFT injects the LoRA layers
    into its modules in place, so it generates with the adapter active), else the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


def batch_generation_config(
    model,
    tokenizer,
    max_new_tokens: int,
    do_sample: bool = False,
    generation_config: GenerationConfig | None = None,
) -> GenerationConfig:
    """``generation_config`` (default: the model's own, the chat config) with ``max_new_tokens``,
    ``do_sample`` and the padding id set; greedy resets the sampling knobs to their neutral values."""
    source = generation_config or generating_model(model).generation_config
    config = GenerationConfig.from_dict(source.to_dict())
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.do_sample = do_sample
    if not do_sample:
        # Neutral values, not None: generate would fill None from the model's sampling config.
        config.temperature, config.top_p, config.top_k = 1.0, 1.0, 50
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return config


def eos_ids(config: GenerationConfig) -> set[int]:
    """The ids that end an answer according to ``config``."""
    eos = config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def batches_by_length(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices of ``prompts``, longest first (ties in input order), cut into batches of ``batch_size``."""
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (0 on padding) of ``prompts`` padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def _finished(new_ids: list[int], stop_ids: set[int], tokenizer) -> Generation:
    for position, token in enumerate(new_ids):
        if token in stop_ids:
            answer = new_ids[:position]
            return Generation(answer, tokenizer.decode(answer, skip_special_tokens=True), position + 1, "stop")
    return Generation(new_ids, tokenizer.decode(new_ids, skip_special_tokens=True), len(new_ids), "length")


def _batches_everywhere(count: int, synced_gpus: bool) -> int:
    """The number of batches every rank runs: under ``synced_gpus`` (ZeRO-3) each forward gathers the
    parameters with all ranks, so a rank with fewer prompts keeps generating (a dummy batch) until the
    busiest rank is done; otherwise ``count``."""
    if not (synced_gpus and torch.distributed.is_available() and torch.distributed.is_initialized()):
        return count
    device = "cuda" if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl" else "cpu"
    total = torch.tensor([count], device=device)
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.MAX)
    return int(total.item())


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    do_sample: bool = False,
    seed: int | None = None,
    generation_config: GenerationConfig | None = None,
    synced_gpus: bool = False,
) -> list[Generation]:
    """Answers to ``prompts`` (token ids, e.g. from ``prompts.chat_prompt_ids``), in their order.

    Greedy unless ``do_sample``; ``seed`` seeds the sampling (Python, NumPy, torch) once before the first
    batch, and None leaves the random state alone (a training run's, when called during training). ``generation_config`` defaults to the model's (the chat config: eos, repetition penalty,
    sampling values). ``synced_gpus`` must be True under ZeRO-3 on several ranks (every rank calls this
    function, possibly with different prompts or none; all run the same number of forwards).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate_batch: an empty prompt (no token ids)")
    base = generating_model(model)
    config = batch_generation_config(model, tokenizer, max_new_tokens, do_sample, generation_config)
    stop_ids = eos_ids(config)
    if seed is not None:
        set_seed(seed)
    was_training = base.training
    base.eval()
    batches = batches_by_length(prompts, batch_size)
    results: list[Generation | None] = [None] * len(prompts)
    try:
        for number in range(_batches_everywhere(len(batches), synced_gpus)):
            # A rank out of prompts runs one dummy prompt so that the others' gathers complete.
            indices = batches[number] if number < len(batches) else []
            rows = [prompts[i] for i in indices] or [[config.pad_token_id]]
            input_ids, attention_mask = left_padded(rows, config.pad_token_id, base.device)
            output = base.generate(inputs=input_ids, attention_mask=attention_mask, generation_config=config,
                                   synced_gpus=synced_gpus)
            new = output[:, input_ids.shape[1]:].tolist()
            for row, index in enumerate(indices):
                results[index] = _finished(new[row], stop_ids, tokenizer)
    finally:
        base.train(was_training)
    return results  # type: ignore[return-value]
