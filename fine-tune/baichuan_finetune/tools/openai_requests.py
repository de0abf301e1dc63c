"""OpenAI request bodies: parsed and checked into a `ChatRequest`, or a `RequestError` naming the field.

Every field of ``/v1/chat/completions`` and ``/v1/completions`` is either honoured or refused with a
400 naming it; nothing is silently ignored. `serve.py` turns a `ChatRequest` into a reply.
"""

import json
from dataclasses import dataclass

from ..core.errors import UsageFault

ROLES = ("system", "user", "assistant")
# A chat request nests about 5 levels (body, messages, message, content parts, part). Deeper bodies
# are refused before anything walks them recursively (a repr in an error message would raise
# RecursionError, as json.loads does for thousands of levels).
MAX_JSON_DEPTH = 64


class RequestError(ValueError, UsageFault):
    """A bad request: 400 in OpenAI's error shape, naming the field (``param``)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def error_body(message: str, param: str | None = None, code: str | None = None,
               type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class ChatRequest:
    messages: list[dict]
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    stop: list[str]
    stream: bool
    include_usage: bool
    seed: int | None
    top_k: int | None = None  # extra_body
    repetition_penalty: float | None = None  # extra_body
    presence_penalty: float = 0.0  # OpenAI's additive penalties (generation.OpenAIPenalties)
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    prompt: str | None = None  # /v1/completions: raw text, no chat format


# Every request field is honoured or refused with a 400 naming it; nothing is silently ignored.
CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
               "stream", "stream_options", "seed", "user", "logprobs", "top_logprobs", "presence_penalty",
               "frequency_penalty", "top_k", "repetition_penalty"}
COMPLETION_FIELDS = (CHAT_FIELDS - {"messages", "max_completion_tokens", "top_logprobs"}) | {"prompt", "echo", "suffix",
                                                                                             "best_of"}
UNSUPPORTED_FIELDS = {
    "tools": "tool calls are not supported by this server",
    "tool_choice": "tool calls are not supported by this server",
    "functions": "function calls are not supported by this server",
    "function_call": "function calls are not supported by this server",
    "parallel_tool_calls": "tool calls are not supported by this server",
    "response_format": "structured output (response_format) is not supported by this server",
    "logit_bias": "logit_bias is not supported by this server",
}


def _reject_unknown_fields(body: dict, known: set[str]) -> None:
    for name in body:
        if name in UNSUPPORTED_FIELDS:
            if name == "response_format" and body[name] in (None, {"type": "text"}):
                continue  # plain text is what this server returns
            if name == "tool_choice" and body[name] in (None, "none"):
                continue
            if name in ("tools", "functions") and body[name] in (None, []):
                continue
            raise RequestError(f"'{name}': {UNSUPPORTED_FIELDS[name]}", param=name, code="unsupported_parameter")
        if name not in known:
            raise RequestError(f"'{name}' is not a field this server accepts (supported: {', '.join(sorted(known))})",
                               param=name, code="unsupported_parameter")


def _sampling_options(body: dict) -> dict:
    """The sampling fields shared by both endpoints (``top_k``/``repetition_penalty`` come via extra_body)."""
    return {"presence_penalty": _number(body, "presence_penalty", -2, 2) or 0.0,
            "frequency_penalty": _number(body, "frequency_penalty", -2, 2) or 0.0,
            "top_k": _number(body, "top_k", 0, 10**6, integer=True),
            "repetition_penalty": _number(body, "repetition_penalty", 0.01, 10)}


def _number(body: dict, name: str, low: float, high: float, integer: bool = False):
    """``body[name]`` checked against ``[low, high]``: an int for integer fields, else a float.

    JSON does not tell 2 from 2.0, so both spellings are accepted: an integral float for an integer
    field, an int for a float field (converted: ``GenerationConfig`` wants a float temperature).
    """
    value = body.get(name)
    if value is None:
        return None
    what = "an integer" if integer else "a number"
    bad = RequestError(f"'{name}' must be {what} between {low} and {high}, got {short_repr(value)}", param=name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    if integer and isinstance(value, float):
        if not value.is_integer():
            raise bad
        value = int(value)
    if not low <= value <= high:  # also false for NaN
        raise bad
    return value if integer else float(value)


def short_repr(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _content_text(content, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"messages[{index}].content: only text parts are supported",
                                   param=f"messages[{index}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"messages[{index}].content must be a string", param=f"messages[{index}].content")


def json_depth_exceeds(value, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` nests objects/lists deeper than ``limit`` levels (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def parse_body(raw: bytes):
    """The JSON of a request body, or ``RequestError`` (invalid, or nested deeper than ``MAX_JSON_DEPTH``)."""
    too_deep = RequestError(f"the request body is nested too deeply (more than {MAX_JSON_DEPTH} levels "
                            "of objects and lists)", code="too_deep")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # thousands of levels: the parser gives up before our check can run
        raise too_deep from None
    if json_depth_exceeds(body):
        raise too_deep
    return body


def parse_chat_request(body, max_messages: int | None = None) -> ChatRequest:
    """Validate an OpenAI chat request body; raise ``RequestError`` naming the bad field.

    More than ``max_messages`` messages (the server's ``--max_messages``) are refused before any of
    them is looked at.
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _reject_unknown_fields(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' is required: a non-empty list of {role, content}", param="messages")
    if max_messages is not None and len(messages) > max_messages:
        raise RequestError(f"'messages' holds {len(messages)} messages; this server accepts at most {max_messages} "
                           "(--max_messages)", param="messages", code="too_many_messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{i}] must be an object with role and content", param=f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {short_repr(role)}",
                               param=f"messages[{i}].role")
        if role == "system" and i != 0:
            raise RequestError(f"messages[{i}]: a system message may only come first", param=f"messages[{i}].role")
        clean.append({"role": role, "content": _content_text(message.get("content"), i)})
    if all(m["role"] == "system" for m in clean):
        raise RequestError("'messages' needs at least one user message", param="messages")
    n = _number(body, "n", 1, 1, integer=True)  # noqa: F841  (only n=1 is supported)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        raise RequestError("'stop' must be a string or a list of at most 4 strings", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", param="stream_options")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", 1, 10**9, integer=True)
    logprobs = body.get("logprobs") or False
    if not isinstance(logprobs, bool):
        raise RequestError("'logprobs' must be true or false", param="logprobs")
    top_logprobs = _number(body, "top_logprobs", 0, 20, integer=True) or 0
    if top_logprobs and not logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return ChatRequest(
        messages=clean,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        **_sampling_options(body),
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0, 2),
        top_p=_number(body, "top_p", 0, 1),
        stop=stop,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        seed=_number(body, "seed", -(2**63), 2**63 - 1, integer=True),
    )


def parse_completion_request(body) -> ChatRequest:
    """Validate a legacy ``/v1/completions`` body (one raw text prompt, no chat format)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _reject_unknown_fields(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("'prompt' is required: one non-empty string", param="prompt")
    for name, neutral in (("echo", False), ("suffix", None), ("best_of", 1)):
        if body.get(name) not in (None, neutral):
            raise RequestError(f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    chat = parse_chat_request({k: v for k, v in body.items() if k not in ("prompt", "echo", "suffix", "best_of",
                                                                          "logprobs")}
                              | {"messages": [{"role": "user", "content": prompt}]})
    logprobs = _number(body, "logprobs", 0, 5, integer=True)  # legacy: the number of top alternatives
    chat.prompt = prompt
    chat.messages = []
    chat.logprobs, chat.top_logprobs = logprobs is not None, logprobs or 0
    return chat
