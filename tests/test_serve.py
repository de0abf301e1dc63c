"""The OpenAI-compatible server, started as a subprocess on a LoRA directory, driven by the openai client."""

import json
import urllib.error
import urllib.request

import pytest
from tools_helpers import generate_reply, make_lora_dir, require, start_server, stop_server

MESSAGES = [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "你好，请介绍一下北京。"}]


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory):
    return make_lora_dir(tiny_model_dir, tmp_path_factory.mktemp("serve") / "adapter")


@pytest.fixture(scope="module")
def server(lora_dir):
    require("fastapi", "the API server needs fastapi and uvicorn (requirements-tools.txt)")
    proc, base_url = start_server("openai_api.py", lora_dir, "--model_name", "tiny-lora")
    yield base_url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    openai = require("openai", "the API test uses the official openai client (requirements-tools.txt)")
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(url: str, data: bytes):
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny-lora"]


def test_completion_matches_in_process_chat_format(client, lora_dir):
    """Greedy reply and usage equal what the library generates from the same LoRA directory."""
    from baichuan_finetune.generation import build_prompt_ids, make_generation_config
    from baichuan_finetune.loading import load_model

    response = client.chat.completions.create(model="tiny-lora", messages=MESSAGES, max_tokens=12, temperature=0)
    model, tokenizer = load_model(lora_dir)
    expected = generate_reply(model, tokenizer, MESSAGES, make_generation_config(model, max_new_tokens=12, greedy=True))
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    prompt_ids = build_prompt_ids(model, tokenizer, MESSAGES, 12)
    assert prompt_ids[-1] == 196 and 195 in prompt_ids  # the training chat format
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert 1 <= response.usage.completion_tokens <= 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_stream_equals_non_stream(client):
    full = client.chat.completions.create(model="tiny-lora", messages=MESSAGES, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model="tiny-lora", messages=MESSAGES, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert len(pieces) > 1  # really streamed, not one block
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens


def test_stop_strings_and_sampling_options(client):
    full = client.chat.completions.create(model="tiny-lora", messages=MESSAGES, max_tokens=16, temperature=0)
    text = full.choices[0].message.content
    assert len(text) >= 4
    stop = text[2:4]
    cut = client.chat.completions.create(model="tiny-lora", messages=MESSAGES, max_tokens=16, temperature=0,
                                         stop=[stop, "never-appears"])
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model="tiny-lora", messages=MESSAGES, max_tokens=8, temperature=1.0,
                                              top_p=0.9, seed=7).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]  # seed makes sampling repeatable


@pytest.mark.parametrize(
    "body, param",
    [
        (b"{not json", None),
        (b'{"model": "tiny-lora"}', "messages"),
        (b'{"messages": []}', "messages"),
        (b'{"messages": [{"role": "tool", "content": "x"}]}', "messages[0].role"),
        (b'{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}', "messages[1].role"),
        (b'{"messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
        (b'{"messages": [{"role": "user", "content": "a"}], "temperature": 3}', "temperature"),
        (b'{"messages": [{"role": "user", "content": "a"}], "max_tokens": 0}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "a"}], "stop": [1]}', "stop"),
    ],
)
def test_malformed_requests_get_openai_errors(server, body, param):
    status, error = post(server + "/v1/chat/completions", body)
    assert status == 400
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["type"] == "invalid_request_error" and error["error"]["message"]
    assert error["error"]["param"] == param


def test_too_long_prompt(client, server):
    openai = require("openai", "")
    long_text = "北京是中国的首都。" * 400  # far beyond the tiny model's 512 tokens
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-lora", messages=[{"role": "user", "content": long_text}])
    assert info.value.code == "context_length_exceeded"
    assert "maximum context length is 512" in info.value.message
    status, error = post(server + "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "短"}], "max_tokens": 600}).encode())
    assert status == 400 and error["error"]["code"] == "context_length_exceeded"


def test_prepare_builds_the_prompt_once_in_the_chat_format(lora_dir):
    """One prepare per request: the context check and the prompt both come from build_chat_input."""
    from baichuan_finetune.generation import build_prompt_ids
    from baichuan_finetune.loading import load_model
    from baichuan_finetune.serve import ChatService, RequestError, parse_chat_request

    model, tokenizer = load_model(lora_dir)
    service = ChatService(model, tokenizer, "tiny-lora")
    prepared = service.prepare(parse_chat_request({"messages": MESSAGES, "max_tokens": 12, "temperature": 0}))
    assert prepared.prompt_ids == build_prompt_ids(model, tokenizer, MESSAGES, 12)
    assert prepared.generation_config.max_new_tokens == 12 and prepared.generation_config.do_sample is False
    # Without max_tokens the reply gets the room left, up to the generation config's max_new_tokens.
    prepared = service.prepare(parse_chat_request({"messages": MESSAGES}))
    room = model.config.model_max_length - len(prepared.prompt_ids)
    assert prepared.generation_config.max_new_tokens == min(model.generation_config.max_new_tokens, room)
    # max_tokens up to the room left fits (the prompt is the same); one more token does not.
    asked = len(prepared.prompt_ids)
    exact = service.prepare(parse_chat_request({"messages": MESSAGES, "max_tokens": service.max_length - asked}))
    assert exact.prompt_ids == prepared.prompt_ids
    with pytest.raises(RequestError, match=f"you requested {service.max_length + 1} tokens") as info:
        service.prepare(parse_chat_request({"messages": MESSAGES, "max_tokens": service.max_length - asked + 1}))
    assert info.value.code == "context_length_exceeded"


def test_web_page_is_package_data():
    from baichuan_finetune.serve import web_page

    page = web_page("a<b>")
    assert page.startswith("<!doctype html>") and "<title>Baichuan2 chat: a&lt;b&gt;</title>" in page
    assert "{{MODEL_NAME}}" not in page
    assert 'buffer.indexOf("\\n\\n")' in page  # the SSE event separator, as the browser reads it
