"""An OpenAI-compatible chat server (and the browser demo page) for any of our model directories.

``POST /v1/chat/completions`` (with ``stream: true`` as server-sent events), ``GET /v1/models``,
``GET /health`` and ``GET /`` (the web demo: one HTML page consuming the same SSE stream). Requests
are answered one at a time (one model in memory); prompts use the training chat format.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with status 400.
"""

# No ``from __future__ import annotations``: FastAPI reads the handlers' annotations (``Request`` is
# imported inside create_app) at run time.
import argparse
import html
import json
import threading
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from transformers import GenerationConfig

from .generation import StopFlag, make_generation_config, stream_reply
from .loading import add_model_arguments, chat_model, load_model, model_kind
from .tokenization_baichuan import build_chat_input

ROLES = ("system", "user", "assistant")
# The web demo: one dependency-free page on the API (fetch + the SSE stream), so the browser chat
# needs nothing beyond the server's own packages. History lives in the page; "Clear" resets it.
WEB_PAGE_FILE = ("web", "chat.html")


class RequestError(ValueError):
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


def _number(body: dict, name: str, low: float, high: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise RequestError(f"'{name}' must be {what} between {low} and {high}, got {value!r}", param=name)
    return value


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


def parse_chat_request(body) -> ChatRequest:
    """Validate an OpenAI chat request body; raise ``RequestError`` naming the bad field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' is required: a non-empty list of {role, content}", param="messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{i}] must be an object with role and content", param=f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
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
    return ChatRequest(
        messages=clean,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0, 2),
        top_p=_number(body, "top_p", 0, 1),
        stop=stop,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        seed=_number(body, "seed", -(2**63), 2**63 - 1, integer=True),
    )


@dataclass
class PreparedChat:
    """A request checked against the context and ready to generate: built once per request."""

    request: ChatRequest
    generation_config: GenerationConfig
    prompt_ids: list[int]


def web_page(model_name: str) -> str:
    """The browser chat page (package data ``web/chat.html``) titled with ``model_name``."""
    page = resources.files(__package__).joinpath(*WEB_PAGE_FILE).read_text(encoding="utf-8")
    return page.replace("{{MODEL_NAME}}", html.escape(model_name))


class ChatService:
    """The model, its tokenizer and a lock: turns a validated request into a reply or a stream."""

    def __init__(self, model, tokenizer, model_name: str):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.lock = threading.Lock()
        self.created = int(time.time())
        base = chat_model(model)
        self.max_length = base.config.model_max_length
        self.default_max_tokens = base.generation_config.max_new_tokens or 256

    def prepare(self, request: ChatRequest) -> PreparedChat:
        """Check that the prompt and ``max_tokens`` fit the context (else ``RequestError``); build both."""
        # The whole conversation in the chat format, no history dropped: a prompt that does not fit
        # is refused rather than silently shortened.
        prompt_ids = build_chat_input(self.tokenizer, request.messages)
        prompt_len = len(prompt_ids)
        room = self.max_length - prompt_len
        if room < 1 or (request.max_tokens is not None and request.max_tokens > room):
            asked = request.max_tokens or 1
            raise RequestError(
                f"This model's maximum context length is {self.max_length} tokens. However, you requested "
                f"{prompt_len + asked} tokens ({prompt_len} in the messages, {asked} in the completion). "
                "Please reduce the length of the messages or completion.",
                param="messages", code="context_length_exceeded",
            )
        max_tokens = request.max_tokens or min(self.default_max_tokens, room)
        config = make_generation_config(self.model, max_new_tokens=max_tokens, temperature=request.temperature,
                                        top_p=request.top_p)
        # prompt_len + max_tokens fits model_max_length, so the official input budget
        # (model_max_length - max_tokens) keeps every round: these are build_prompt_ids' ids.
        return PreparedChat(request, config, prompt_ids)

    def events(self, prepared: PreparedChat, stop_flag: StopFlag | None = None):
        """``(new_text, reply)`` pairs, generated under the lock."""
        request = prepared.request
        with self.lock:
            if request.seed is not None:
                torch.manual_seed(request.seed)
            yield from stream_reply(self.model, self.tokenizer, request.messages, prepared.generation_config,
                                    stop=request.stop, stop_flag=stop_flag, prompt_ids=prepared.prompt_ids)


def _usage(reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


def _finish_reason(reply) -> str:
    return "length" if reply.finish_reason in ("length", "interrupted") else "stop"


def create_app(model, tokenizer, model_name: str = "baichuan2"):
    """The FastAPI application serving ``model``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    service = ChatService(model, tokenizer, model_name)
    page = web_page(model_name)  # read once: a missing package file fails at start, not per request
    app = FastAPI(title="Baichuan2 OpenAI-compatible API")
    app.state.service = service

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_=type_), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return JSONResponse(error_body(str(exc.errors())), status_code=400)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": service.created, "owned_by": "baichuan-finetune"}]}

    @app.get("/", response_class=HTMLResponse)
    def web_demo():
        return page

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return JSONResponse(error_body(f"the request body is not valid JSON: {exc}"), status_code=400)
        try:
            chat_request = parse_chat_request(body)
            if body.get("model") not in (None, model_name):
                raise RequestError(f"the model {body.get('model')!r} does not exist; this server has {model_name!r}",
                                   param="model", code="model_not_found")
            prepared = service.prepare(chat_request)  # length errors before any streaming starts
        except RequestError as exc:
            status = 404 if exc.code == "model_not_found" else 400
            return JSONResponse(error_body(str(exc), exc.param, exc.code), status_code=status)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if not chat_request.stream:
            from starlette.concurrency import run_in_threadpool

            reply = await run_in_threadpool(_last_reply, service.events(prepared))
            return {
                "id": completion_id, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                             "finish_reason": _finish_reason(reply)}],
                "usage": _usage(reply),
            }
        return StreamingResponse(
            _sse(service, prepared, completion_id, created, model_name),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


def _last_reply(events):
    reply = None
    for _, reply in events:
        pass
    return reply


def _sse(service: ChatService, prepared: PreparedChat, completion_id: str, created: int, model_name: str):
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    request = prepared.request

    def chunk(delta: dict, finish_reason=None, usage=None, choices=True) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}] if choices else []}
        if request.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    stop_flag = StopFlag()
    events = service.events(prepared, stop_flag)
    try:
        yield chunk({"role": "assistant", "content": ""})
        reply = None
        for new_text, reply in events:
            if new_text:
                yield chunk({"content": new_text})
        yield chunk({}, _finish_reason(reply))
        if request.include_usage:
            yield chunk(None, usage=_usage(reply), choices=False)
        yield "data: [DONE]\n\n"
    finally:
        stop_flag.set()  # the client went away: stop generating
        events.close()


def build_arg_parser(description: str) -> argparse.ArgumentParser:
    """The flags of ``scripts/openai_api.py`` and ``scripts/web_demo.py``."""
    parser = argparse.ArgumentParser(description=description)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model_name", default=None, help="id reported by /v1/models (default: the directory name)")
    return parser


def serve(args, banner: str = "OpenAI-compatible API") -> None:
    import uvicorn

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, quantization_bits=args.quantize)
    name = args.model_name or Path(args.model).resolve().name
    app = create_app(model, tokenizer, name)
    print(f"{banner}: model {args.model} ({model_kind(args.model)}) as {name!r} at http://{args.host}:{args.port}",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
