"""Generate chat replies in the training prompt format, streamed, stoppable, with OpenAI bookkeeping.

The prompt is always built by ``tokenization_baichuan.build_chat_input``: the exact ids
``BaichuanForCausalLM.chat()`` builds, which are the ids training encodes (``[195] + user``,
``[196] + assistant``, eos after each reply). A fine-tune asked in another format "never stops
talking"; asked in this one it ends with eos.
"""

from __future__ import annotations

import argparse
import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .loading import chat_model
from ..evaluation.prompts import chat_prompt_ids


def build_prompt_ids(model, tokenizer, messages: list[dict], max_new_tokens: int | None = None) -> list[int]:
    """The prompt ids ``model.chat()`` builds, leaving room for ``max_new_tokens`` in the context.

    ``max_new_tokens`` None means the model's generation config's (the official input budget is
    ``model_max_length - max_new_tokens``).
    """
    base = chat_model(model)
    max_new_tokens = max_new_tokens or base.generation_config.max_new_tokens or 0
    return chat_prompt_ids(base.config.model_max_length, tokenizer, messages, max_new_tokens)


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """``--max_new_tokens``, ``--temperature``, ``--top_p``, ``--greedy``: `make_generation_config`'s
    overrides (chat and predict)."""
    parser.add_argument("--max_new_tokens", type=int, default=None, help="default: the model's generation config")
    parser.add_argument("--temperature", type=float, default=None,
                        help="default: the generation config's (0.3 for the chat models); 0 = greedy")
    parser.add_argument("--top_p", type=float, default=None, help="default: the generation config's")
    parser.add_argument("--greedy", action="store_true",
                        help="greedy decoding (default: the model's config, which samples for the chat models)")


def check_generation_arguments(args) -> None:
    """Refuse the `add_generation_arguments` values (on any object with those attributes) that would start
    and fail, or silently misbehave, later: ``ValueError`` with one line naming the flag."""
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens {args.max_new_tokens}: expected a number >= 1")
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature {args.temperature}: expected a number >= 0 (0 = greedy)")
    if args.top_p is not None and not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise ValueError(f"--top_p {args.top_p}: expected a number in (0, 1]")


def make_generation_config(
    model,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    greedy: bool = False,
) -> GenerationConfig:
    """The model's chat generation config with the given overrides (temperature 0 means greedy)."""
    config = GenerationConfig.from_dict(chat_model(model).generation_config.to_dict())
    if max_new_tokens is not None:
        config.max_new_tokens = max_new_tokens
    if top_p is not None:
        config.top_p = top_p
    if temperature is not None:
        if temperature <= 0:
            greedy = True
        else:
            config.temperature = temperature
    if greedy:
        # The neutral values, not None: generate would fill None from the model's sampling config.
        config.do_sample = False
        config.temperature, config.top_p, config.top_k = 1.0, 1.0, 50
    return config


class StopFlag(StoppingCriteria):
    """Stops ``generate`` at the next token once ``set()`` is called (e.g. on Ctrl+C)."""

    def __init__(self):
        self.event = threading.Event()

    def set(self) -> None:
        self.event.set()

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _TokenQueue(BaseStreamer):
    """Receives generated token ids from ``generate`` (the prompt comes first and is skipped)."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self):
        self.queue.put(None)


@dataclass
class Reply:
    """A finished (or streamed-so-far) reply with OpenAI-style bookkeeping."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" (eos or a stop string), "length", "interrupted"
    token_ids: list[int] = field(default_factory=list)


def _first_stop(text: str, stop: list[str]) -> int:
    positions = [text.find(s) for s in stop if s and s in text]
    return min(positions) if positions else -1


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's additive penalties over the tokens generated so far (the prompt does not count):
    ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``."""

    def __init__(self, prompt_length: int, presence_penalty: float = 0.0, frequency_penalty: float = 0.0):
        self.prompt_length = prompt_length
        self.presence_penalty, self.frequency_penalty = presence_penalty, frequency_penalty

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length:]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency_penalty * counts - self.presence_penalty * (counts > 0).to(scores.dtype)


def stream_reply(
    model,
    tokenizer,
    messages: list[dict],
    generation_config: GenerationConfig | None = None,
    stop: list[str] | None = None,
    stop_flag: StopFlag | None = None,
    prompt_ids: list[int] | None = None,
    poll_seconds: float = 0.1,
    logits_processors: list[LogitsProcessor] | None = None,
) -> Iterator[tuple[str, Reply]]:
    """Yield ``(new_text, reply_so_far)`` while generating; the last item has ``finish_reason``.

    ``generate`` runs in a thread; this generator consumes its tokens. Text is held back while it
    could still become a stop string or ends in an incomplete UTF-8 sequence. Setting
    ``stop_flag`` (or a ``KeyboardInterrupt`` in the consuming thread, which sets it) ends
    generation at the next token with ``finish_reason="interrupted"``. ``prompt_ids`` (already
    built by the caller) replaces ``build_prompt_ids(messages)``. ``logits_processors`` are added to
    the generation config's own (e.g. ``OpenAIPenalties``).
    """
    base = chat_model(model)
    generation_config = generation_config or make_generation_config(model)
    stop = [s for s in (stop or []) if s]
    stop_flag = stop_flag or StopFlag()
    if prompt_ids is None:
        prompt_ids = build_prompt_ids(model, tokenizer, messages, generation_config.max_new_tokens)
    input_ids = torch.tensor([prompt_ids], device=base.device)
    streamer = _TokenQueue()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                base.generate(
                    inputs=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    generation_config=generation_config,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([stop_flag]),
                    logits_processor=LogitsProcessorList(logits_processors or []),
                )
        except BaseException as exc:  # re-raised in the consuming thread
            errors.append(exc)
            streamer.end()

    eos_ids = generation_config.eos_token_id
    eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else [])
    reply = Reply(prompt_tokens=len(prompt_ids))
    emitted = 0
    hold = max((len(s) for s in stop), default=1) - 1
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    finished = stopped_by_flag = False
    try:
        while not finished:
            try:
                ids = streamer.queue.get(timeout=poll_seconds)
            except queue.Empty:
                if not thread.is_alive() and streamer.queue.empty():
                    break  # generate ended without its end() (cannot happen today): never wait forever
                continue
            if ids is None:
                break
            for token in ids:
                if token in eos_ids:
                    reply.finish_reason = "stop"
                    finished = True
                    break
                reply.token_ids.append(token)
            reply.completion_tokens = len(reply.token_ids) + (1 if reply.finish_reason == "stop" else 0)
            text = tokenizer.decode(reply.token_ids, skip_special_tokens=True)
            cut = _first_stop(text, stop)
            if cut >= 0:
                text, reply.finish_reason, finished = text[:cut], "stop", True
                stop_flag.set()
                safe = len(text)
            else:
                safe = len(text) if finished else len(text) - hold
                while safe > emitted and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 sequence
                    safe -= 1
            reply.text = text
            if safe > emitted:
                new, emitted = text[emitted:safe], safe
                yield new, reply
        stopped_by_flag = reply.finish_reason is None and stop_flag.event.is_set()
    except GeneratorExit:  # the consumer went away (e.g. an HTTP client disconnected)
        stop_flag.set()
        raise
    except KeyboardInterrupt:
        stopped_by_flag = True
        stop_flag.set()
    finally:
        if thread.is_alive() and reply.finish_reason != "stop" and not stopped_by_flag:
            stop_flag.set()  # an error in this thread: do not leave generate running
        # A generator abandoned without close() is finalized by the garbage collector in whichever
        # thread happens to run it, possibly generate's own: joining there raised "cannot join
        # current thread" (the flag is set, so that thread ends by itself).
        if thread is not threading.current_thread():
            thread.join()
    if errors and not stopped_by_flag:
        raise errors[0]
    if reply.finish_reason is None:
        reply.finish_reason = "interrupted" if stopped_by_flag else "length"
    text = tokenizer.decode(reply.token_ids, skip_special_tokens=True)
    cut = _first_stop(text, stop)
    reply.text = text[:cut] if cut >= 0 else text
    yield reply.text[emitted:], reply
