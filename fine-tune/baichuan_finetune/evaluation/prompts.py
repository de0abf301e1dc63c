"""Held-out prompts for generation: read from a file, turned into the chat prompt ids.

Three kinds of file, told apart by their content (the first object record, or a ``.txt`` name):

- any supported conversation format (``data.records``: official/ShareGPT, OpenAI messages, Alpaca):
  the last assistant turn, when present, is the reference; the turns before it are the context,
  which must end with a user turn;
- JSON Lines or a JSON array of ``{"prompt": str, "reference"?: str, "system"?: str}`` (LLaMA-Factory's
  and lm-evaluation-harness's shape of a generation task);
- a ``.txt`` file: one prompt per non-blank line, no references.

A prompt whose text is empty, a file with no prompt, and every malformed record are ``DataError``\\ s
naming the file, record and field (one line for one problem), raised before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.records import DataError, BadField, load_items, text_value, bad_records_error, detect_format, parse_items, read_file
from ..model.tokenization_baichuan import ASSISTANT, SYSTEM, USER, build_chat_input

PROMPT_KEYS = ("prompt", "reference", "system", "id")


@dataclass
class Prompt:
    """One prompt: ``messages`` end with the user turn to answer; ``reference`` is the expected answer
    (None when the file has none); ``source`` says where it was read ("file line N")."""

    messages: list[dict]
    reference: str | None = None
    source: str = ""

    @property
    def text(self) -> str:
        """The last user message: what a report shows as the prompt."""
        return self.messages[-1]["content"]


def _from_conversation(where: str, turns: list[tuple[str, str]], system: str) -> Prompt:
    reference = None
    if turns and turns[-1][0] == ASSISTANT:
        reference, turns = turns[-1][1], turns[:-1]
    if not turns or turns[-1][0] != USER:
        raise DataError(f"{where}: no user turn to answer (the turns before the last assistant turn must end "
                        "with a user turn)")
    if not turns[-1][1].strip():
        raise DataError(f"{where}: empty prompt (the last user turn has no text)")
    messages = ([{"role": SYSTEM, "content": system}] if system else []) + [
        {"role": role, "content": text} for role, text in turns]
    return Prompt(messages, reference, where)


def _parse_prompt_record(record: dict) -> Prompt:
    unknown = [key for key in record if key not in PROMPT_KEYS]
    if unknown:
        raise BadField(unknown[0], f"unknown field (a prompt record has {', '.join(PROMPT_KEYS)})", "unknown field")
    prompt = text_value(record.get("prompt"), "prompt")
    if not prompt.strip():
        raise BadField("prompt", "empty prompt", "empty prompt")
    reference = text_value(record["reference"], "reference") if record.get("reference") is not None else None
    system = text_value(record.get("system"), "system", required=False)
    messages = ([{"role": SYSTEM, "content": system}] if system else []) + [{"role": USER, "content": prompt}]
    return Prompt(messages, reference)


def _read_prompt_records(path: str, items: list[tuple[str, Any]]) -> list[Prompt]:
    parsed, bad = parse_items(items, _parse_prompt_record)
    if bad:
        raise bad_records_error(bad, "prompts", can_skip=False)
    prompts = []
    for where, prompt in parsed:
        prompt.source = where
        prompts.append(prompt)
    return prompts


def _read_text_prompts(path: Path) -> list[Prompt]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e.strerror or e}") from None
    return [Prompt([{"role": USER, "content": line}], None, f"{path} line {number}")
            for number, line in enumerate(lines, start=1) if line.strip()]


def read_prompts(path: str | Path) -> list[Prompt]:
    """The prompts of one file (see the module's docstring), in file order; ``DataError`` if none."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    if path.suffix == ".txt":
        prompts = _read_text_prompts(path)
    else:
        items = load_items(str(path))
        first = next((item for _, item in items if isinstance(item, dict)), None)
        if first is not None and "prompt" in first and detect_format(first) is None:
            prompts = _read_prompt_records(str(path), items)
        else:
            conversations = read_file(str(path))
            if conversations.bad_records:
                raise bad_records_error(conversations.bad_records, "prompts", can_skip=False)
            prompts = [_from_conversation(c.source, c.turns, c.system) for c in conversations.conversations]
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def chat_prompt_ids(model_max_length: int, tokenizer, messages: list[dict], max_new_tokens: int) -> list[int]:
    """The ids ``model.chat()`` sends for ``messages``, leaving ``max_new_tokens`` of the context for
    the answer (the official input budget: ``model_max_length - max_new_tokens``; older rounds are
    dropped first, then the prompt is cut from the left)."""
    return build_chat_input(tokenizer, messages, model_max_length - max_new_tokens)
