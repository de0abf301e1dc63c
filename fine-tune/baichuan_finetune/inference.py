"""Load any of our outputs and chat with it in the training prompt format.

One loader for the three kinds of model directory the toolkit produces or reads:

- a base model or a full fine-tune: ``config.json`` + weights, loaded by ``AutoModelForCausalLM``
  (our native classes, registered by importing this package);
- a LoRA adapter: ``adapter_config.json`` present, loaded by ``peft.AutoPeftModelForCausalLM`` on
  top of the base named in ``base_model_name_or_path``.

Generation always builds the prompt with the model module's ``build_chat_input``: the exact ids
``BaichuanForCausalLM.chat()`` builds, which are the ids training encodes (``[195] + user``,
``[196] + assistant``, eos after each reply). A fine-tune asked in another format "never stops
talking"; asked in this one it ends with eos.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

import baichuan_finetune  # noqa: F401  (registers our Auto classes)

from .tiny import chat_generation_config

ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILE = "tokenizer.model"
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_kind(model_dir: str | Path) -> str:
    """``"lora"`` for a PEFT adapter directory, ``"model"`` for a base model or full fine-tune."""
    model_dir = Path(model_dir)
    if (model_dir / ADAPTER_CONFIG).is_file():
        return "lora"
    if (model_dir / "config.json").is_file():
        return "model"
    raise FileNotFoundError(f"{model_dir}: neither {ADAPTER_CONFIG} (LoRA adapter) nor config.json (model) found")


def adapter_base_dir(adapter_dir: str | Path) -> str:
    """``base_model_name_or_path`` of a LoRA adapter directory."""
    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir}/{ADAPTER_CONFIG} has no base_model_name_or_path")
    return base


def resolve_dtype(dtype: str | torch.dtype | None):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_tokenizer(model_dir: str | Path):
    """The tokenizer saved with ``model_dir``; for an adapter without one, its base model's."""
    model_dir = Path(model_dir)
    source = model_dir
    if model_kind(model_dir) == "lora" and not (model_dir / TOKENIZER_FILE).is_file():
        source = adapter_base_dir(model_dir)
    return AutoTokenizer.from_pretrained(str(source))


def load_model(
    model_dir: str | Path,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = None,
    quantization_bits: int | None = None,
):
    """Model (a ``PeftModel`` for an adapter directory) and tokenizer, in eval mode.

    ``quantization_bits`` (8 or 4) quantizes the linear layers with bitsandbytes after loading
    (LoRA adapters are merged first: quantized weights cannot take a LoRA delta).
    """
    model_dir = Path(model_dir)
    kind = model_kind(model_dir)
    dtype = resolve_dtype(dtype)
    if kind == "lora":
        from peft import AutoPeftModelForCausalLM
        from peft.auto import get_default_import_allowlist

        # An adapter saved without task_type names its base class by module: allow ours.
        allowlist = [*get_default_import_allowlist(), "baichuan_finetune"]
        model = AutoPeftModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, import_allowlist=allowlist)
        base_dir = adapter_base_dir(model_dir)
        generation_source = model_dir if (model_dir / "generation_config.json").is_file() else Path(base_dir)
        base = model.get_base_model()
        base.generation_config = _load_generation_config(generation_source)
        if quantization_bits:
            model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        model.generation_config = _load_generation_config(model_dir)
    if device:
        model.to(device)
    if quantization_bits:
        from .quantize import quantize

        model = quantize(model, quantization_bits)
    model.eval()
    return model, load_tokenizer(model_dir)


def _load_generation_config(model_dir: Path) -> GenerationConfig:
    """The saved generation config, or the official chat one where the directory has none."""
    if (Path(model_dir) / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(str(model_dir))
    return chat_generation_config()


def chat_model(model):
    """The model whose ``chat()``/``generate()`` to call: for a ``PeftModel`` its base model.

    PEFT injects the LoRA layers into the base model's modules in place, so the base model's
    forward (hence ``chat``) runs with the adapter active.
    """
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


def build_prompt_ids(model, tokenizer, messages: list[dict], max_new_tokens: int | None = None) -> list[int]:
    """The prompt ids ``model.chat()`` builds (the model module's own ``build_chat_input``)."""
    base = chat_model(model)
    build = sys.modules[type(base).__module__].build_chat_input
    return build(base, tokenizer, messages, max_new_tokens)


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


def stream_reply(
    model,
    tokenizer,
    messages: list[dict],
    generation_config: GenerationConfig | None = None,
    stop: list[str] | None = None,
    stop_flag: StopFlag | None = None,
    prompt_ids: list[int] | None = None,
    poll_seconds: float = 0.1,
) -> Iterator[tuple[str, Reply]]:
    """Yield ``(new_text, reply_so_far)`` while generating; the last item has ``finish_reason``.

    ``generate`` runs in a thread; this generator consumes its tokens. Text is held back while it
    could still become a stop string or ends in an incomplete UTF-8 sequence. Setting
    ``stop_flag`` (or a ``KeyboardInterrupt`` in the consuming thread, which sets it) ends
    generation at the next token with ``finish_reason="interrupted"``.
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
        thread.join()
    if errors and not stopped_by_flag:
        raise errors[0]
    if reply.finish_reason is None:
        reply.finish_reason = "interrupted" if stopped_by_flag else "length"
    text = tokenizer.decode(reply.token_ids, skip_special_tokens=True)
    cut = _first_stop(text, stop)
    reply.text = text[:cut] if cut >= 0 else text
    yield reply.text[emitted:], reply


def generate_reply(model, tokenizer, messages: list[dict], generation_config=None, **kwargs) -> Reply:
    """The whole reply (see ``stream_reply``)."""
    reply = Reply()
    for _, reply in stream_reply(model, tokenizer, messages, generation_config, **kwargs):
        pass
    return reply


# ----- terminal chat (scripts/cli_demo.py) -----

CLI_HELP = """Commands: 'clear' new conversation, 'stream' toggle streaming, 'exit' quit.
Multi-line input: end a line with '\\' to continue it, or type '\"\"\"' to start and end a pasted block.
Ctrl+C stops a reply being generated (and clears a half-typed input); Ctrl+D quits."""
USER_PROMPT = "\nUser: "
CONTINUATION_PROMPT = "... "
ASSISTANT_PREFIX = "\nBaichuan 2: "


def read_user_message(read_line=input) -> str:
    """One message from the terminal: ``\\`` at a line's end continues it; ``\"\"\"`` brackets a paste."""
    line = read_line(USER_PROMPT)
    if line.strip() == '"""':
        lines = []
        while (line := read_line(CONTINUATION_PROMPT)).strip() != '"""':
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read_line(CONTINUATION_PROMPT)
    lines.append(line)
    return "\n".join(lines)


def run_terminal_chat(model, tokenizer, generation_config: GenerationConfig, stream: bool = True,
                      read_line=input, write=None) -> None:
    """The interactive loop of ``scripts/cli_demo.py``; history is kept in the chat format."""
    write = write or (lambda text: print(text, end="", flush=True))
    messages: list[dict] = []
    write(f"Baichuan 2 chat ({'streaming' if stream else 'not streaming'}). {CLI_HELP}\n")
    while True:
        try:
            text = read_user_message(read_line)
        except KeyboardInterrupt:
            write("\n")
            continue
        except EOFError:
            write("\n")
            return
        command = text.strip().lower()
        if command in ("exit", "quit"):
            return
        if command == "clear":
            messages = []
            write("(history cleared)\n")
            continue
        if command == "stream":
            stream = not stream
            write(f"(streaming {'on' if stream else 'off'})\n")
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        write(ASSISTANT_PREFIX)
        stop_flag = StopFlag()
        events = stream_reply(model, tokenizer, messages, generation_config, stop_flag=stop_flag)
        reply = Reply()
        try:
            for new_text, reply in events:
                if stream and new_text:
                    write(new_text)
        except KeyboardInterrupt:  # Ctrl+C while printing: same as inside generation
            stop_flag.set()
            events.close()
            reply.finish_reason = "interrupted"
        if not stream:
            write(reply.text)
        if reply.finish_reason == "interrupted":
            write(" [stopped]")
        write("\n")
        # What was shown is what the model said: an interrupted reply stays in the history.
        messages.append({"role": "assistant", "content": reply.text})


def add_generation_arguments(parser) -> None:
    parser.add_argument("--max_new_tokens", type=int, default=None, help="default: the model's generation config")
    parser.add_argument("--temperature", type=float, default=None, help="default: the generation config's (0.3)")
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (no sampling)")
