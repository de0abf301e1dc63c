"""The API server under faults: abandoned streams, a full queue, SIGTERM, many clients, a stuck model.

The servers run a tiny model with a 4096-token context, so one request can ask for thousands of
tokens (seconds of generation): long enough that a generation the server failed to cancel, or a
stream that kept it from stopping, shows up as a timeout here.
"""

import contextlib
import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from tools_helpers import free_port, generate_reply, require, start_server, stop_server

QUESTION = [{"role": "user", "content": "你好，请介绍一下北京。"}]
OTHER_QUESTION = [{"role": "user", "content": "上海在哪里？"}]
LONG = 3000  # max_tokens of a request that must still be running when the test acts on it


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory):
    from baichuan_finetune.builder.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("serve_faults") / "long", model_max_length=4096)


@pytest.fixture(scope="module")
def long_model(long_model_dir):
    from baichuan_finetune.tools.loading import load_model

    return load_model(long_model_dir)


def expected_text(model_and_tokenizer, messages, max_tokens: int) -> str:
    """The greedy reply the library generates in-process (what the server must answer)."""
    from baichuan_finetune.tools.generation import make_generation_config

    model, tokenizer = model_and_tokenizer
    config = make_generation_config(model, max_new_tokens=max_tokens, greedy=True)
    return generate_reply(model, tokenizer, messages, config).text


@pytest.fixture(scope="module")
def logged_server(long_model_dir):
    """The server (20 may wait) and a function returning what it has printed so far."""
    require("fastapi", "the API server needs fastapi and uvicorn (requirements-tools.txt)")
    proc, base_url = start_server("openai_api.py", long_model_dir, "--model_name", "tiny", "--max_queue", "20")
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    yield base_url, lambda: "".join(output)
    stop_server(proc)
    reader.join(5)


@pytest.fixture(scope="module")
def server(logged_server):
    return logged_server[0]


def post(url: str, body: dict, timeout: float = 60):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def health(base_url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(base_url + "/health", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def wait_for_health(base_url: str, predicate, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, state = health(base_url)
        except OSError:  # not listening yet
            state = {"status": None, "queue": None, "running": None}
        if predicate(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def open_request(base_url: str, body: dict) -> socket.socket:
    """A raw HTTP request on its own socket, so a test can drop the connection whenever it likes."""
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(data), data))
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    received = b""
    while marker not in received:
        data = sock.recv(65536)
        assert data, f"connection closed before {marker!r}: {received[-500:]!r}"
        received += data
    return received


def start_stream(base_url: str, max_tokens: int = LONG) -> socket.socket:
    """An open stream that has delivered its first text: its job is running."""
    sock = open_request(base_url, {"messages": QUESTION, "stream": True, "max_tokens": max_tokens, "temperature": 0})
    head = read_until(sock, b'"delta": {"content": "')  # past the role chunk: real text
    assert head.startswith(b"HTTP/1.1 200")
    return sock


def drop(sock: socket.socket, reset: bool) -> None:
    """Close like a client that goes away: a normal close (FIN) or an abort (RST)."""
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def test_back_to_back_disconnects_do_not_wedge_the_server(logged_server, long_model):
    """20 streams dropped mid-generation, then a normal request answers within 10 s (was: hung forever)."""
    server, log = logged_server
    for i in range(20):
        drop(start_stream(server), reset=i % 2 == 1)
    start = time.monotonic()
    status, reply = post(server + "/v1/chat/completions",
                         {"messages": QUESTION, "max_tokens": 8, "temperature": 0}, timeout=10)
    assert status == 200 and time.monotonic() - start < 10
    assert reply["choices"][0]["message"]["content"] == expected_text(long_model, QUESTION, 8)
    # (was: "RuntimeError: cannot join current thread" logged for each disconnect)
    assert "Traceback" not in log() and "cannot join" not in log(), log()
    # Each dropped stream stopped its generation: nothing is left running or queued.
    state = wait_for_health(server, lambda s: s["status"] == "ok", timeout=5)
    assert state["status"] == "ok" and state["queue"] == 0 and state["running"] is False


def test_dropped_non_stream_request_stops_its_generation(server):
    sock = open_request(server, {"messages": QUESTION, "max_tokens": LONG, "temperature": 0})
    state = wait_for_health(server, lambda s: s["running"], timeout=10)
    assert state["status"] == "busy" and state["running"]
    drop(sock, reset=False)
    # LONG tokens take many seconds; the worker is free again within about a poll interval.
    state = wait_for_health(server, lambda s: s["status"] == "ok", timeout=5)
    assert state["status"] == "ok"


def test_twenty_concurrent_clients_all_get_their_answers(server, long_model):
    openai = require("openai", "the concurrency test uses the official openai client (requirements-tools.txt)")
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)
    questions = [QUESTION if i % 2 == 0 else OTHER_QUESTION for i in range(20)]
    answers: list = [None] * 20

    def ask(i: int) -> None:
        try:
            if i % 4 == 3:  # some stream, some do not
                stream = client.chat.completions.create(model="tiny", messages=questions[i], max_tokens=8,
                                                        temperature=0, stream=True)
                answers[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            else:
                response = client.chat.completions.create(model="tiny", messages=questions[i], max_tokens=8,
                                                          temperature=0)
                answers[i] = response.choices[0].message.content
        except Exception as exc:  # noqa: BLE001  (reported by the assertion below)
            answers[i] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    expected = {id(QUESTION): expected_text(long_model, QUESTION, 8),
                id(OTHER_QUESTION): expected_text(long_model, OTHER_QUESTION, 8)}
    assert answers == [expected[id(q)] for q in questions]


def test_health_reports_busy_then_ok(server):
    status, state = health(server)
    assert status == 200 and state["status"] == "ok" and state["queue"] == 0 and state["running"] is False
    sock = start_stream(server)
    try:
        status, state = health(server)
        assert status == 200 and state["status"] == "busy" and state["running"] is True
        assert state["seconds_since_progress"] < 5
    finally:
        drop(sock, reset=False)
    assert wait_for_health(server, lambda s: s["status"] == "ok", timeout=5)["status"] == "ok"


@pytest.fixture(scope="module")
def small_queue_server(long_model_dir):
    require("fastapi", "the API server needs fastapi and uvicorn (requirements-tools.txt)")
    proc, base_url = start_server("openai_api.py", long_model_dir, "--max_queue", "1", "--queue_timeout", "1.5")
    yield proc, base_url
    stop_server(proc)


def test_full_queue_and_queue_timeout_give_503_not_a_hang(small_queue_server):
    _, server = small_queue_server
    running = start_stream(server)  # holds the model for many seconds
    waiting: dict = {}

    def wait_in_queue() -> None:
        start = time.monotonic()
        waiting["result"] = post(server + "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 4}, timeout=30)
        waiting["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=wait_in_queue)
    thread.start()
    try:
        state = wait_for_health(server, lambda s: s["queue"] == 1, timeout=5)
        assert state["status"] == "busy" and state["queue"] == 1
        # The one queue place is taken: the next request is refused at once.
        start = time.monotonic()
        status, error = post(server + "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 4}, timeout=10)
        assert status == 503 and time.monotonic() - start < 1.0
        assert error["error"]["type"] == "server_error" and error["error"]["code"] == "overloaded"
        assert "--max_queue 1" in error["error"]["message"]
        # The waiting one gives up after --queue_timeout, also with 503.
        thread.join(30)
        status, error = waiting["result"]
        assert status == 503 and error["error"]["code"] == "overloaded"
        assert "--queue_timeout" in error["error"]["message"] and 1.4 < waiting["seconds"] < 5
    finally:
        drop(running, reset=False)
        thread.join(30)
    assert wait_for_health(server, lambda s: s["status"] == "ok", timeout=5)["status"] == "ok"
    status, reply = post(server + "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 4}, timeout=10)
    assert status == 200 and reply["choices"][0]["message"]["content"]


def test_ctrl_c_stops_the_server_cleanly(small_queue_server):
    proc, base_url = small_queue_server  # its last use: the module's other server stops by SIGTERM
    try:
        sock = start_stream(base_url)
        proc.send_signal(signal.SIGINT)
        returncode = proc.wait(timeout=10)
        output = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    sock.close()
    assert returncode == 0 and "Traceback" not in output, output


def test_sigterm_with_open_streams_stops_within_5_seconds(long_model_dir):
    """Exit 0 within 5 s although two clients still hold long streams (was: only SIGKILL stopped it)."""
    require("fastapi", "the API server needs fastapi and uvicorn (requirements-tools.txt)")
    proc, base_url = start_server("openai_api.py", long_model_dir)
    try:
        for i in range(3):  # a few abandoned streams first: their cancellation logs no traceback
            drop(start_stream(base_url), reset=i == 1)
        streams = [start_stream(base_url)]
        streams.append(open_request(base_url, {"messages": QUESTION, "stream": True, "max_tokens": LONG}))  # queued
        wait_for_health(base_url, lambda s: s.get("queue") == 1, timeout=5)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=10)
        seconds = time.monotonic() - start
        output = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for sock in streams:
        sock.close()
    assert returncode == 0, output
    assert seconds < 5, output
    assert "Traceback" not in output and "cannot join" not in output, output
    assert "server stopped" in output


def test_stuck_generation_is_reported_by_health(tiny_model_dir):
    """A model that stops producing tokens: /health says stuck with 503, then ok once it moves again."""
    delay = {"seconds": 0.0}

    def slow_forward(model):  # a real slowdown in the forward pass (a hook), as a hung device would look from outside
        model.register_forward_pre_hook(lambda module, args: time.sleep(delay["seconds"]))

    with in_process_server(tiny_model_dir, on_model=slow_forward, stuck_after=0.5) as (base_url, _):
        assert health(base_url)[1]["status"] == "ok"
        delay["seconds"] = 1.5
        result: dict = {}
        request = threading.Thread(target=lambda: result.update(
            answer=post(base_url + "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 2})))
        request.start()
        state = wait_for_health(base_url, lambda s: s["status"] == "stuck", timeout=5)
        assert state["status"] == "stuck" and state["seconds_since_progress"] >= 0.5
        assert health(base_url)[0] == 503
        delay["seconds"] = 0.0
        request.join(30)
        assert wait_for_health(base_url, lambda s: s["status"] == "ok", timeout=5)["status"] == "ok"


@contextlib.contextmanager
def in_process_server(model_dir, on_model=None, **app_options):
    """The app of ``serve.create_app`` on a real uvicorn in a thread: its base URL and ``ChatService``.
    ``on_model(model)`` runs on the loaded model before the app is made (e.g. to slow its forward)."""
    require("fastapi", "the API server needs fastapi and uvicorn (requirements-tools.txt)")
    import uvicorn
    from baichuan_finetune.tools.loading import load_model
    from baichuan_finetune.tools.serve import create_app

    model, tokenizer = load_model(model_dir)
    if on_model is not None:
        on_model(model)
    app = create_app(model, tokenizer, "tiny", **app_options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base_url, lambda s: s["status"] is not None, timeout=30)
        yield base_url, app.state.service
    finally:
        server.should_exit = True
        thread.join(10)
        app.state.service.close(timeout=5)


def counting_prepare(service) -> list:
    """Record each request that reaches ``service.prepare`` (where tokenizing starts)."""
    calls, real_prepare = [], service.prepare

    def prepare(request):
        calls.append(request)
        return real_prepare(request)

    service.prepare = prepare
    return calls


def test_limits_are_checked_before_tokenizing(tiny_model_dir):
    """Too many messages or too many bytes: 400 naming the limit's flag; nothing reached tokenizing."""
    with in_process_server(tiny_model_dir, max_messages=100, max_request_bytes=20_000) as (base_url, service):
        calls = counting_prepare(service)
        many = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}] * 50
        status, error = post(base_url + "/v1/chat/completions", {"messages": many + many[:1], "max_tokens": 1})
        assert status == 400 and error["error"]["code"] == "too_many_messages", error
        assert "101 messages" in error["error"]["message"] and "--max_messages" in error["error"]["message"]
        big = [{"role": "user", "content": "x" * 20_000}]
        status, error = post(base_url + "/v1/chat/completions", {"messages": big, "max_tokens": 1})
        assert status == 400 and error["error"]["code"] == "body_too_large", error
        assert "--max_request_bytes" in error["error"]["message"] and "20000 bytes" in error["error"]["message"]
        assert calls == []
        status, _ = post(base_url + "/v1/chat/completions", {"messages": many[:-1], "max_tokens": 1})
        assert len(calls) == 1  # at the limit: accepted and tokenized


def test_a_huge_request_never_blocks_health_or_other_clients(tiny_model_dir):
    """While one request of 100,001 tiny messages is being parsed and tokenized, /health and another
    client's request are answered: tokenizing runs off the event loop. The big request is held inside
    ``prepare`` until both have their answers, so the order is certain, whatever the machine's speed."""
    with in_process_server(tiny_model_dir, max_messages=200_000, max_request_bytes=8 * 2**20) as (base_url, service):
        entered, release = threading.Event(), threading.Event()
        real_prepare = service.prepare

        def held_prepare(request):
            if len(request.messages) > 1000:
                entered.set()
                release.wait(120)
            return real_prepare(request)

        service.prepare = held_prepare
        huge = [{"role": "user", "content": "hi"}] * 100_001
        result: dict = {}
        big = threading.Thread(target=lambda: result.update(
            answer=post(base_url + "/v1/chat/completions", {"messages": huge, "max_tokens": 1}, timeout=300)))
        big.start()
        try:
            assert entered.wait(120), "the huge request never reached tokenizing"
            status, state = health(base_url)  # raises (socket timeout) if the event loop is blocked
            assert status == 200 and state["model"] == "tiny"
            status, answer = post(base_url + "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 2,
                                                                      "temperature": 0}, timeout=60)
            assert status == 200 and answer["choices"][0]["message"]["content"] is not None
            assert big.is_alive() and "answer" not in result  # still held inside prepare
        finally:
            release.set()
            big.join(300)
        status, error = result["answer"]
        assert status == 400 and error["error"]["code"] == "context_length_exceeded", error


@pytest.mark.parametrize("args, flag", [
    (["--api_key", ""], "--api_key is empty or blank"),
    (["--api_key", "   "], "--api_key is empty or blank"),
    (["--api_key", " key"], "whitespace"),
    (["--api_key", "schlüssel"], "printable ASCII"),
    (["--api_key", "two words"], "printable ASCII"),
    (["--max_messages", "0"], "--max_messages"),
    (["--max_request_bytes", "-5"], "--max_request_bytes"),
    (["--max_queue", "-1"], "--max_queue"),
    (["--queue_timeout", "0"], "--queue_timeout"),
    (["--stuck_after", "x"], "--stuck_after"),
    (["--model_dir_is_absent"], "--model"),
])
def test_bad_server_flags_exit_2(long_model_dir, tmp_path, capsys, args, flag):
    """Bad flags and a model directory that is not one: one line, exit 2, before any model loads."""
    from baichuan_finetune.tools.serve import build_arg_parser, serve

    parser = build_arg_parser("test")
    model = tmp_path / "absent" if args == ["--model_dir_is_absent"] else long_model_dir
    with pytest.raises(SystemExit) as info:
        argv = ["--model", str(model)] + ([] if args == ["--model_dir_is_absent"] else args)
        serve(parser.parse_args(argv), parser=parser)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and ": error: " in lines[0], lines
