"""An OpenAI-compatible chat server (and the browser demo page) for any of our model directories.

``POST /v1/chat/completions`` (with ``stream: true`` as server-sent events), ``GET /v1/models``,
``GET /health`` and ``GET /`` (the web demo: one HTML page consuming the same SSE stream); prompts
use the training chat format.

One model is in memory, so requests are generated one at a time by ONE worker thread that
``ChatService`` owns, fed by a bounded queue of jobs. Each job has its own output queue and
``StopFlag``: the HTTP side only reads its job's output (with timeouts) and never holds a lock
across generation; a client that goes away sets its job's flag and the worker moves on. A request
that cannot be started (queue full, or not started within ``queue_timeout``) gets 503, never a hang.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for bad requests,
503 (``type: server_error``, ``code: overloaded``) when the server cannot take the request.

A request's size (``--max_request_bytes``) and message count (``--max_messages``) are checked before
anything tokenizes it, and its parsing and tokenization run in a thread, so one huge request never
blocks the event loop: other clients and ``/health`` are answered meanwhile.
"""

# No ``from __future__ import annotations``: FastAPI reads the handlers' annotations (``Request`` is
# imported inside create_app) at run time.
import argparse
import asyncio
import collections
import contextlib
import html
import json
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from transformers import GenerationConfig

from .generation import OpenAIPenalties, Reply, StopFlag, make_generation_config, stream_reply
from .loading import (ModelDirError, ToolArgumentParser, add_model_arguments, chat_model, check_model_dir,
                      load_model_or_exit)
from .openai_requests import (ChatRequest, RequestError, error_body, parse_body, parse_chat_request,
                              parse_completion_request, short_repr)
from ..model.tokenization_baichuan import build_chat_input

# The web demo: one dependency-free page on the API (fetch + the SSE stream), so the browser chat
# needs nothing beyond the server's own packages. History lives in the page; "Clear" resets it.
WEB_PAGE_FILE = ("web", "chat.html")

DEFAULT_MAX_QUEUE = 16
DEFAULT_QUEUE_TIMEOUT = 60.0
DEFAULT_STUCK_AFTER = 120.0
# A chat request is a few KB; 4 MiB leaves room for long conversations and refuses a body that
# would only cost memory and parse time (default of --max_request_bytes).
MAX_BODY_BYTES = 4 * 1024 * 1024
# OpenAI's own limit on 'messages'; a conversation that fits a Baichuan2 context has far fewer (each
# message costs at least its role token). Default of --max_messages.
DEFAULT_MAX_MESSAGES = 2048
# A body over the limit is still read (and dropped) up to this size so the client, which is usually
# still uploading, receives the 400; answering mid-upload closes the connection under it (a reset).
MAX_DRAIN_BYTES = 64 * 1024 * 1024
# uvicorn waits this long for open connections after SIGTERM/Ctrl+C (our streams end as soon as
# their jobs are stopped, so this is only the backstop for a stuck one).
GRACEFUL_SHUTDOWN_SECONDS = 2
# How often a waiting request checks whether its client is still there.
POLL_SECONDS = 0.5


def api_key_problem(key: str | None) -> str | None:
    """Why ``--api_key`` cannot protect a server, or None (None itself: no key, an open server).

    An empty key is what ``--api_key "$KEY"`` gives when KEY is unset: it would start an open server
    without a word. Whitespace around a key, or a character outside printable ASCII, makes a key no
    client can send in an HTTP header (or that never compares equal): the server would refuse everyone.
    """
    if key is None:
        return None
    if not key.strip():
        return ("--api_key is empty or blank (an unset variable in --api_key \"$KEY\"?): give a key, or leave "
                "the flag out to serve without one")
    if key != key.strip():
        return "--api_key: the key starts or ends with whitespace, which clients cannot send; remove it"
    if not all(33 <= ord(c) <= 126 for c in key):
        return ("--api_key: the key may hold only printable ASCII characters without spaces (an HTTP header "
                "cannot carry others)")
    return None


def _size(n: int) -> str:
    """``4 MiB (4194304 bytes)`` for a byte count (MiB shown when whole)."""
    return f"{n // 2**20} MiB ({n} bytes)" if n % 2**20 == 0 else f"{n} bytes"


class Overloaded(RuntimeError):
    """The server cannot take the request now (queue full, waited too long, shutting down): 503."""


def _penalties(request: ChatRequest, prompt_ids: list[int]) -> list[OpenAIPenalties]:
    if not (request.presence_penalty or request.frequency_penalty):
        return []
    return [OpenAIPenalties(len(prompt_ids), request.presence_penalty, request.frequency_penalty)]


@dataclass
class PreparedChat:
    """A request checked against the context and ready to generate: built once per request."""

    request: ChatRequest
    generation_config: GenerationConfig
    prompt_ids: list[int]


def page_defaults(model) -> dict:
    """The web page's initial settings: the model's own generation config (what ``model.chat`` uses)."""
    config = chat_model(model).generation_config
    return {"max_tokens": config.max_new_tokens or 256,
            "temperature": config.temperature if config.do_sample else 0,
            "top_p": config.top_p if config.top_p is not None else 1.0,
            "top_k": config.top_k if config.top_k is not None else 0,
            "repetition_penalty": config.repetition_penalty or 1.0}


def web_page(model_name: str, defaults: dict | None = None) -> str:
    """The browser chat page (package data ``web/chat.html``) titled with ``model_name``, its settings
    starting from ``defaults`` (`page_defaults`)."""
    page = resources.files(__package__).joinpath(*WEB_PAGE_FILE).read_text(encoding="utf-8")
    defaults = defaults or {"max_tokens": 256, "temperature": 0.3, "top_p": 0.85, "top_k": 5,
                            "repetition_penalty": 1.05}
    # JSON inside a <script>: "</" must not close the script element.
    page = page.replace("{{DEFAULTS}}", json.dumps(defaults).replace("</", "<\\/"))
    return page.replace("{{MODEL_NAME}}", html.escape(model_name))


class ProgressFlag(StopFlag):
    """A job's ``StopFlag`` that also notes when ``generate`` last produced a token.

    ``generate`` calls its stopping criteria once per new token, so this is the token clock
    ``/health`` reads to tell a slow generation from a stuck one.
    """

    def __init__(self):
        super().__init__()
        self.last_progress = time.monotonic()

    def __call__(self, input_ids, scores, **kwargs):
        self.last_progress = time.monotonic()
        return super().__call__(input_ids, scores, **kwargs)


# What a job's output queue carries, in order: STARTED, then ("text", new_text, reply)*, then one
# of ("done", reply), ("error", exception) or ("cancelled", message).
STARTED = ("started",)


class Job:
    """One request's generation: its prepared chat, stop flag and output queue (filled by the worker)."""

    def __init__(self, prepared: PreparedChat):
        self.prepared = prepared
        self.stop_flag = ProgressFlag()
        self.output: queue.Queue = queue.Queue()
        self.started_at: float | None = None
        # Called (from the worker thread) after each item is queued: an asyncio reader's wake-up.
        self.notify: Callable[[], None] | None = None

    def put(self, item: tuple) -> None:
        self.output.put(item)
        notify = self.notify
        if notify is not None:
            notify()

    def seconds_since_progress(self) -> float | None:
        """Seconds since the last token (or the start); None before the job started."""
        if self.started_at is None:
            return None
        return time.monotonic() - max(self.started_at, self.stop_flag.last_progress)

    def events(self, wait_timeout: float | None = None) -> Iterator[tuple[str, Reply]]:
        """The job's ``(new_text, reply)`` pairs, for callers outside the event loop (tests, scripts).

        Raises ``Overloaded`` when the job is cancelled before it starts and re-raises a
        generation error; ``wait_timeout`` bounds each wait for the next item.
        """
        while True:
            try:
                item = self.output.get(timeout=wait_timeout)
            except queue.Empty:
                raise Overloaded(f"no output from the generation worker for {wait_timeout} s") from None
            kind = item[0]
            if kind == "text":
                yield item[1], item[2]
            elif kind == "done":
                yield "", item[1]
                return
            elif kind == "error":
                raise item[1]
            elif kind == "cancelled":
                raise Overloaded(item[1])


class ChatService:
    """The model and its one generation worker: validated requests in, replies or streams out."""

    def __init__(self, model, tokenizer, model_name: str, max_queue: int = DEFAULT_MAX_QUEUE,
                 queue_timeout: float = DEFAULT_QUEUE_TIMEOUT, stuck_after: float = DEFAULT_STUCK_AFTER):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.max_queue, self.queue_timeout, self.stuck_after = max_queue, queue_timeout, stuck_after
        self.created = int(time.time())
        base = chat_model(model)
        self.max_length = base.config.model_max_length
        self.default_max_tokens = base.generation_config.max_new_tokens or 256
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._current: Job | None = None
        self._closing = False
        self._worker = threading.Thread(target=self._work, name="generation-worker", daemon=True)
        self._worker.start()

    def prepare(self, request: ChatRequest) -> PreparedChat:
        """Check that the prompt and ``max_tokens`` fit the context (else ``RequestError``); build both."""
        # The whole conversation in the chat format, no history dropped: a prompt that does not fit
        # is refused rather than silently shortened. A raw /v1/completions prompt is tokenized as the
        # tokenizer does (role-token strings give role ids, as in vLLM), so a prompt rendered with the
        # saved chat_template is the chat prompt.
        if request.prompt is not None:
            prompt_ids = self.tokenizer.encode(request.prompt, add_special_tokens=False)
        else:
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
        if request.top_k is not None:
            config.top_k = request.top_k or None  # 0: no top-k filtering (vLLM's -1/0)
        if request.repetition_penalty is not None:
            config.repetition_penalty = request.repetition_penalty
        # prompt_len + max_tokens fits model_max_length, so the official input budget
        # (model_max_length - max_tokens) keeps every round: these are build_prompt_ids' ids.
        return PreparedChat(request, config, prompt_ids)

    # -- the queue -------------------------------------------------------------------------------

    def submit(self, prepared: PreparedChat) -> Job:
        """Queue a job for the worker, or raise ``Overloaded`` (queue full, or shutting down)."""
        job = Job(prepared)
        with self._cond:
            if self._closing:
                raise Overloaded("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(f"the server is busy: {len(self._waiting)} request(s) are already waiting "
                                 f"(--max_queue {self.max_queue}); retry later")
            self._waiting.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> bool:
        """Stop ``job`` (its client went away or gave up); True if it had not started yet."""
        job.stop_flag.set()  # a running generation stops at its next token
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                return True
        return False

    def generate(self, prepared: PreparedChat) -> Iterator[tuple[str, Reply]]:
        """Submit ``prepared`` and yield its ``(new_text, reply)`` pairs (cancelled if abandoned)."""
        job = self.submit(prepared)
        try:
            yield from job.events()
        finally:
            self.cancel(job)

    def health(self) -> dict:
        """``{"status": "ok"|"busy"|"stuck", "queue": waiting, ...}``: stuck means a job made no token
        progress for ``stuck_after`` seconds (or the worker is gone)."""
        with self._cond:
            current, waiting, closing = self._current, len(self._waiting), self._closing
        idle = current.seconds_since_progress() if current is not None else None
        if not self._worker.is_alive() and not closing:
            status = "stuck"
        elif idle is not None and idle > self.stuck_after:
            status = "stuck"
        elif current is not None or waiting:
            status = "busy"
        else:
            status = "ok"
        return {"status": status, "queue": waiting, "running": current is not None,
                "seconds_since_progress": None if idle is None else round(idle, 1),
                "stuck_after": self.stuck_after, "model": self.model_name}

    def close(self, timeout: float | None = None) -> None:
        """Stop every job (waiting ones are told ``cancelled``) and let the worker end."""
        with self._cond:
            self._closing = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            current = self._current
            self._cond.notify_all()
        for job in waiting:
            job.stop_flag.set()
            job.put(("cancelled", "the server is shutting down"))
        if current is not None:
            current.stop_flag.set()
        if timeout is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout)

    # -- the worker --------------------------------------------------------------------------------

    def _next_job(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
            job = self._waiting.popleft()
            self._current = job
            job.started_at = time.monotonic()
            return job

    def _work(self) -> None:
        while True:
            job = self._next_job()
            if job is None:
                return
            try:
                job.put(STARTED)
                job.put(("done", self._run(job)))
            except Exception as exc:  # noqa: BLE001  (the worker must survive any one request)
                job.put(("error", exc))
            finally:
                with self._cond:
                    self._current = None

    def _run(self, job: Job) -> Reply:
        request = job.prepared.request
        if request.seed is not None:
            torch.manual_seed(request.seed)
        reply = None
        for new_text, reply in stream_reply(self.model, self.tokenizer, request.messages,
                                            job.prepared.generation_config, stop=request.stop,
                                            stop_flag=job.stop_flag, prompt_ids=job.prepared.prompt_ids,
                                            logits_processors=_penalties(request, job.prepared.prompt_ids)):
            if new_text:
                job.put(("text", new_text, reply))
        if request.logprobs and reply is not None:
            reply.logprobs = self.token_logprobs(job.prepared.prompt_ids, reply.token_ids, request.top_logprobs)
        return reply

    @torch.no_grad()
    def token_logprobs(self, prompt_ids: list[int], token_ids: list[int], top: int) -> list[dict]:
        """Log-probability of each generated token (and the ``top`` most likely ones) under the model's
        distribution, before temperature, top-p/k and penalties: one forward pass over the reply."""
        if not token_ids:
            return []
        base = chat_model(self.model)
        ids = torch.tensor([prompt_ids + token_ids], device=base.device)
        logits = base(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        out = []
        for position, token in enumerate(token_ids):
            row = logprobs[position]
            entry = self._token_entry(token, float(row[token]))
            if top:
                values, indices = row.topk(top)
                entry["top_logprobs"] = [self._token_entry(int(i), float(v)) for v, i in zip(values, indices)]
            else:
                entry["top_logprobs"] = []
            out.append(entry)
        return out

    def _token_entry(self, token: int, logprob: float) -> dict:
        text = self.tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


class _AsyncReader:
    """Reads a job's output queue from the event loop without blocking it or a thread."""

    def __init__(self, job: Job):
        self.job = job
        self.loop = asyncio.get_running_loop()
        self.ready = asyncio.Event()
        job.notify = self._notify

    def _notify(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.ready.set)
        except RuntimeError:  # the loop is closed (server shutdown): nobody is reading any more
            pass

    async def next(self, timeout: float) -> tuple | None:
        """The next item, or None after ``timeout`` seconds without one."""
        deadline = self.loop.time() + timeout
        while True:
            self.ready.clear()
            try:
                return self.job.output.get_nowait()
            except queue.Empty:
                pass
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self.ready.wait(), remaining)
            except asyncio.TimeoutError:
                pass


def _usage(reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


def _finish_reason(reply) -> str:
    return "length" if reply.finish_reason in ("length", "interrupted") else "stop"


def _overloaded_body(message: str) -> dict:
    return error_body(message, code="overloaded", type_="server_error")


def _chat_logprobs(reply) -> dict | None:
    entries = getattr(reply, "logprobs", None)
    return None if entries is None else {"content": entries}


def _legacy_logprobs(reply) -> dict | None:
    """``/v1/completions``' logprobs shape: parallel lists and one {token: logprob} dict per position."""
    entries = getattr(reply, "logprobs", None)
    if entries is None:
        return None
    offsets, offset = [], 0
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def create_app(model, tokenizer, model_name: str = "baichuan2", max_queue: int = DEFAULT_MAX_QUEUE,
               queue_timeout: float = DEFAULT_QUEUE_TIMEOUT, stuck_after: float = DEFAULT_STUCK_AFTER,
               api_key: str | None = None, max_messages: int = DEFAULT_MAX_MESSAGES,
               max_request_bytes: int = MAX_BODY_BYTES):
    """The FastAPI application serving ``model`` (its ``ChatService`` is ``app.state.service``).

    With ``api_key``, every ``/v1/`` request needs ``Authorization: Bearer <api_key>`` (else 401);
    the page and ``/health`` stay open (the page asks for the key and sends it). A key that cannot
    work (`api_key_problem`: empty, blank, not printable ASCII) raises ``ValueError``. Bodies over
    ``max_request_bytes`` and chats of more than ``max_messages`` messages get a 400 naming the limit
    before anything is tokenized.
    """
    problem = api_key_problem(api_key)
    if problem:
        raise ValueError(problem)
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    service = ChatService(model, tokenizer, model_name, max_queue=max_queue, queue_timeout=queue_timeout,
                          stuck_after=stuck_after)
    # Read once: a missing package file fails at start, not per request.
    page = web_page(model_name, page_defaults(model) | {"needs_key": bool(api_key)})
    app = FastAPI(title="Baichuan2 OpenAI-compatible API")
    app.state.service = service

    if api_key:
        import hmac

        @app.middleware("http")
        async def require_key(request: Request, call_next):
            if request.url.path.startswith("/v1/"):
                given = request.headers.get("authorization", "")
                scheme, _, token = given.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                    message = ("Incorrect API key provided" if given else
                               "You didn't provide an API key: send Authorization: Bearer <key>")
                    return JSONResponse(error_body(message, code="invalid_api_key"), status_code=401)
            return await call_next(request)

    class JobStream(StreamingResponse):
        """A stream whose job is cancelled however the response ends (done, disconnect, error)."""

        def __init__(self, content, job: Job, **kwargs):
            super().__init__(content, **kwargs)
            self.job = job

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                service.cancel(self.job)

    def overloaded(message: str) -> JSONResponse:
        # Retry-After: the official client waits this long before its automatic retries.
        return JSONResponse(_overloaded_body(message), status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_=type_), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return JSONResponse(error_body(str(exc.errors())), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request, exc):  # still logged by the server; the client gets OpenAI's shape
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", type_="server_error"),
                            status_code=500)

    @app.get("/health")
    def health():
        state = service.health()
        return JSONResponse(state, status_code=503 if state["status"] == "stuck" else 200)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": service.created, "owned_by": "baichuan-finetune"}]}

    @app.get("/", response_class=HTMLResponse)
    def web_demo():
        return page

    drain_bytes = max(MAX_DRAIN_BYTES, max_request_bytes)

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length", "")
        too_large = RequestError(f"the request body is larger than {_size(max_request_bytes)}, this server's "
                                 "limit (--max_request_bytes)", code="body_too_large")
        if length.isdigit() and int(length) > drain_bytes:
            raise too_large  # answered at once; the connection closes under the rest of the upload
        chunks, size = [], 0
        async for chunk in request.stream():  # also bounds a chunked body without a length
            size += len(chunk)
            if size > drain_bytes:
                raise too_large
            if size <= max_request_bytes:
                chunks.append(chunk)
        if size > max_request_bytes:
            raise too_large
        return b"".join(chunks)

    def parse_and_prepare(raw: bytes, chat: bool) -> tuple[ChatRequest, PreparedChat]:
        """Body to prepared chat (``RequestError`` for a bad one). Parsing and tokenizing cost time in
        proportion to the body: this runs in a thread, never on the event loop."""
        body = parse_body(raw)
        if chat:
            chat_request = parse_chat_request(body, max_messages=max_messages)
        else:
            chat_request = parse_completion_request(body)
        if chat_request.logprobs and chat_request.stream:
            raise RequestError("'logprobs' is not supported with 'stream': true (ask without streaming)",
                               param="logprobs", code="unsupported_parameter")
        if body.get("model") not in (None, model_name):
            raise RequestError(f"the model {short_repr(body.get('model'))} does not exist; this server "
                               f"has {model_name!r}", param="model", code="model_not_found")
        return chat_request, service.prepare(chat_request)  # length errors before any streaming

    async def wait_for_start(request: Request, job: Job, reader: _AsyncReader) -> str | None:
        """None once the worker has started ``job``; else why it never will (the job is withdrawn)."""
        deadline = time.monotonic() + service.queue_timeout
        while True:
            item = await reader.next(min(POLL_SECONDS, max(deadline - time.monotonic(), 0)))
            if item == STARTED:
                return None
            if item is not None and item[0] == "cancelled":
                return item[1]
            if await request.is_disconnected():
                service.cancel(job)
                return "the client went away"
            if time.monotonic() >= deadline and service.cancel(job):
                return (f"the server is busy: the request waited {service.queue_timeout:g} s "
                        "(--queue_timeout) without starting; retry later")
            # (cancel() False: the worker took it just now; its STARTED is on the way.)

    def stuck_message(job: Job) -> str | None:
        idle = job.seconds_since_progress()
        if idle is not None and idle > service.stuck_after:
            return f"generation made no progress for {idle:.0f} s (--stuck_after {service.stuck_after:g})"
        return None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    async def complete(request: Request, chat: bool):
        try:
            raw = await read_body(request)
            chat_request, prepared = await asyncio.to_thread(parse_and_prepare, raw, chat)
        except RequestError as exc:
            status = 404 if exc.code == "model_not_found" else 400
            return JSONResponse(error_body(str(exc), exc.param, exc.code), status_code=status)
        try:
            job = service.submit(prepared)
        except Overloaded as exc:
            return overloaded(str(exc))
        reader = _AsyncReader(job)
        try:
            why = await wait_for_start(request, job, reader)
        except BaseException:  # cancelled while waiting (shutdown): withdraw the job
            service.cancel(job)
            raise
        if why is not None:
            return overloaded(why)
        completion_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if chat_request.stream:
            return JobStream(
                _sse(reader, stuck_message, chat_request, completion_id, created, model_name, chat), job,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            reply = None
            last_check = time.monotonic()
            while reply is None:
                item = await reader.next(POLL_SECONDS)
                if item is not None and item[0] == "done":
                    reply = item[1]
                elif item is not None and item[0] == "error":
                    raise item[1]
                elif item is not None and item[0] == "cancelled":
                    return overloaded(item[1])
                if reply is None and time.monotonic() - last_check >= POLL_SECONDS:
                    last_check = time.monotonic()
                    if await request.is_disconnected():  # nobody will read the answer: stop now
                        # 499 (nginx's "client closed request"): logged only, nobody receives it.
                        return JSONResponse(error_body("the client went away"), status_code=499)
                    why = stuck_message(job)
                    if why is not None:
                        return JSONResponse(error_body(why, code="stuck", type_="server_error"), status_code=503)
        finally:
            service.cancel(job)  # a no-op once done; frees the worker on every other way out
        if not chat:
            return {
                "id": completion_id, "object": "text_completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "text": reply.text, "logprobs": _legacy_logprobs(reply),
                             "finish_reason": _finish_reason(reply)}],
                "usage": _usage(reply),
            }
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "logprobs": _chat_logprobs(reply), "finish_reason": _finish_reason(reply)}],
            "usage": _usage(reply),
        }

    return app


async def _sse(reader: _AsyncReader, stuck_message: Callable[[Job], str | None], request: ChatRequest,
               completion_id: str, created: int, model_name: str, chat: bool = True):
    """Server-sent events in OpenAI's chunk format (chat or legacy text completion), ending with
    ``data: [DONE]``.

    Only reads the job's output; the response (``JobStream``) cancels the job however it ends.
    """

    def chunk(delta: dict, finish_reason=None, usage=None, choices=True) -> str:
        if chat:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": (delta or {}).get("content", ""), "logprobs": None,
                      "finish_reason": finish_reason}
        body = {"id": completion_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": model_name, "choices": [choice] if choices else []}
        if request.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def error(body: dict) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    if chat:
        yield chunk({"role": "assistant", "content": ""})
    while True:
        item = await reader.next(POLL_SECONDS)
        if item is None:
            why = stuck_message(reader.job)
            if why is not None:  # OpenAI sends errors inside a stream as an error event
                yield error(error_body(why, code="stuck", type_="server_error"))
                return
            continue
        kind = item[0]
        if kind == "text":
            yield chunk({"content": item[1]})
        elif kind == "done":
            reply = item[1]
            yield chunk({}, _finish_reason(reply))
            if request.include_usage:
                yield chunk(None, usage=_usage(reply), choices=False)
            yield "data: [DONE]\n\n"
            return
        elif kind == "error":
            yield error(error_body(f"generation failed: {type(item[1]).__name__}: {item[1]}", type_="server_error"))
            return
        elif kind == "cancelled":
            yield error(_overloaded_body(item[1]))
            return


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def build_arg_parser(description: str) -> ToolArgumentParser:
    """The flags of ``scripts/openai_api.py`` and ``scripts/web_demo.py`` (errors: one line, exit 2)."""
    parser = ToolArgumentParser(description=description)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served_model_name", "--model_name", dest="model_name", default=None,
                        help="the model id of /v1/models and of requests (default: the directory name)")
    parser.add_argument("--api_key", default=os.environ.get("BAICHUAN_API_KEY") or None,
                        help="require 'Authorization: Bearer KEY' on /v1/ (default: $BAICHUAN_API_KEY; none: open)")
    parser.add_argument("--max_queue", type=_count, default=DEFAULT_MAX_QUEUE,
                        help="requests that may wait while one generates; more get HTTP 503 (default %(default)s)")
    parser.add_argument("--queue_timeout", type=_positive_float, default=DEFAULT_QUEUE_TIMEOUT,
                        help="seconds a request may wait for the model before HTTP 503 (default %(default)s)")
    parser.add_argument("--stuck_after", type=_positive_float, default=DEFAULT_STUCK_AFTER,
                        help="seconds without a new token after which /health says stuck (HTTP 503) "
                             "(default %(default)s)")
    parser.add_argument("--max_messages", type=_positive_int, default=DEFAULT_MAX_MESSAGES,
                        help="most messages in one chat request; more get HTTP 400 before any tokenizing "
                             "(default %(default)s)")
    parser.add_argument("--max_request_bytes", type=_positive_int, default=MAX_BODY_BYTES,
                        help="largest request body in bytes; larger get HTTP 400 (default %(default)s: 4 MiB)")
    return parser


@contextlib.contextmanager
def _exit_quietly_on_signals():
    """Make SIGTERM/Ctrl+C a clean stop (exit 0) rather than a kill or a KeyboardInterrupt traceback.

    uvicorn handles both signals itself, and once shut down re-raises the signal to the handler that
    was installed before it ran; this installs one that does nothing, for that moment only.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in handled}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(args, banner: str = "OpenAI-compatible API", parser: ToolArgumentParser | None = None) -> None:
    """Load ``args.model`` and serve it until SIGTERM or Ctrl+C (which stop it within seconds).

    The model directory is checked before loading (one line, exit 2, through ``parser``'s error);
    returns once stopped; the scripts then call ``exit_now()``.
    """
    parser = parser or build_arg_parser("serve")
    try:
        import fastapi  # noqa: F401  (the tools extras: one line, not a ModuleNotFoundError traceback)
        import uvicorn
    except ImportError as e:
        parser.fail(f"the server needs {e.name or 'fastapi and uvicorn'}: pip install -r requirements-tools.txt")
    api_key = getattr(args, "api_key", None)
    problem = api_key_problem(api_key)
    if problem:
        parser.error(problem)
    try:
        kind = check_model_dir(args.model)
    except ModelDirError as exc:
        parser.error(str(exc))
    model, tokenizer = load_model_or_exit(parser, args.model, dtype=args.dtype, device=args.device,
                                          quantization_bits=args.quantize)
    name = args.model_name or Path(args.model).resolve().name
    app = create_app(model, tokenizer, name, max_queue=args.max_queue, queue_timeout=args.queue_timeout,
                     stuck_after=args.stuck_after, api_key=api_key,
                     max_messages=getattr(args, "max_messages", DEFAULT_MAX_MESSAGES),
                     max_request_bytes=getattr(args, "max_request_bytes", MAX_BODY_BYTES))
    service: ChatService = app.state.service

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # Stop every job first so open streams end now instead of at their max_tokens. From a
            # new thread: this handler interrupts the event loop's thread, which may hold the
            # service's lock at that moment.
            threading.Thread(target=service.close, name="stop-jobs", daemon=True).start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
    print(f"{banner}: model {args.model} ({kind}) as {name!r} at http://{args.host}:{args.port}",
          flush=True)
    with _exit_quietly_on_signals():
        Server(config).run()
    service.close(timeout=GRACEFUL_SHUTDOWN_SECONDS)
    print("server stopped", flush=True)


def exit_now() -> None:
    """Exit 0 at once, skipping the interpreter's teardown (for the scripts, after ``serve``).

    Tearing down torch and transformers takes seconds here (5 s measured on 2 busy cores), which
    made a SIGTERM'd server linger; nothing of ours needs it (streams are closed, output flushed).
    """
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
