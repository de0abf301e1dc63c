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
    from baichuan_finetune.tools.generation import build_prompt_ids, make_generation_config
    from baichuan_finetune.tools.loading import load_model

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
        (b'{"messages": [{"role": "user", "content": "a"}], "temperature": 0.5.5}', None),
        (b'{"messages": [{"role": "user", "content": "a"}], "temperature": NaN}', "temperature"),
        (b'{"messages": [{"role": "user", "content": "a"}], "max_tokens": 2.5}', "max_tokens"),
        # Nested past json's recursion limit (was a 500 RecursionError), and past our own limit.
        (b'{"messages": [{"role": "user", "content": "a"}], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
        (b'{"messages": [{"role": "user", "content": "a"}], "x": ' + b"[" * 100 + b"]" * 100 + b"}", None),
    ],
)
def test_malformed_requests_get_openai_errors(server, body, param):
    status, error = post(server + "/v1/chat/completions", body)
    assert status == 400
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["type"] == "invalid_request_error" and error["error"]["message"]
    assert error["error"]["param"] == param
    if b"[[[" in body:
        assert error["error"]["code"] == "too_deep" and "nested too deeply" in error["error"]["message"]


def test_oversized_body_is_400(server):
    content = "x" * (5 * 1024 * 1024)
    status, error = post(server + "/v1/chat/completions",
                         json.dumps({"messages": [{"role": "user", "content": content}]}).encode())
    assert status == 400
    assert error["error"]["code"] == "body_too_large" and "4 MiB" in error["error"]["message"]


def test_integer_and_float_spellings_of_numbers(server):
    """JSON has one number type: ``"temperature": 2`` (an int, was a 500) and ``"max_tokens": 4.0`` work."""
    for extra in ({"temperature": 2, "top_p": 1, "seed": 3}, {"temperature": 0, "max_tokens": 4.0},
                  {"temperature": 1.0, "top_p": 0.5, "seed": 3.0}):
        body = {"messages": MESSAGES, "max_tokens": 4, **extra}
        status, reply = post(server + "/v1/chat/completions", json.dumps(body).encode())
        assert status == 200, reply
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert 1 <= reply["usage"]["completion_tokens"] <= 4


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
    from baichuan_finetune.tools.generation import build_prompt_ids
    from baichuan_finetune.tools.loading import load_model
    from baichuan_finetune.tools.openai_requests import RequestError, parse_chat_request
    from baichuan_finetune.tools.serve import ChatService

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
    service.close(timeout=5)


def test_web_page_is_package_data():
    from baichuan_finetune.tools.serve import web_page

    page = web_page("a<b>")
    assert page.startswith("<!doctype html>") and "<title>Baichuan2 chat: a&lt;b&gt;</title>" in page
    assert "{{MODEL_NAME}}" not in page
    assert 'buffer.indexOf("\\n\\n")' in page  # the SSE event separator, as the browser reads it


# ----- every request field honoured or refused -----


def test_extra_body_sampling_fields_are_honoured(client, lora_dir):
    """top_k and repetition_penalty (extra_body) reach generation: greedy with a strong penalty equals
    the library's reply with the same penalty."""
    from baichuan_finetune.tools.generation import make_generation_config
    from baichuan_finetune.tools.loading import load_model

    model, tokenizer = load_model(lora_dir)
    replies = {}
    for penalty in (1.0, 5.0):
        response = client.chat.completions.create(model="tiny-lora", messages=MESSAGES, max_tokens=16, temperature=0,
                                                  extra_body={"repetition_penalty": penalty, "top_k": 3})
        config = make_generation_config(model, max_new_tokens=16, greedy=True)
        config.repetition_penalty = penalty
        assert response.choices[0].message.content == generate_reply(model, tokenizer, MESSAGES, config).text
        replies[penalty] = response.choices[0].message.content
    assert replies[1.0] != replies[5.0]  # the penalty changed the reply: it was not ignored


def test_logprobs(client, lora_dir):
    """Each token, its log-probability and the top 3 equal a log-softmax of the model's own logits over
    the same greedy reply, computed here in one forward pass; token strings are the tokenizer's."""
    import torch

    from baichuan_finetune.tools.generation import build_prompt_ids, make_generation_config
    from baichuan_finetune.tools.loading import load_model

    response = client.chat.completions.create(model="tiny-lora", messages=MESSAGES, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    model, tokenizer = load_model(lora_dir)
    reply = generate_reply(model, tokenizer, MESSAGES, make_generation_config(model, max_new_tokens=6, greedy=True))
    assert response.choices[0].message.content == reply.text and len(content) == len(reply.token_ids) >= 1
    prompt = build_prompt_ids(model, tokenizer, MESSAGES, 6)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + reply.token_ids])).logits[0, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits.float(), dim=-1)
    for entry, token, row in zip(content, reply.token_ids, expected):
        assert entry.token == tokenizer.decode([token])
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-4)
        values, indices = row.topk(3)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([int(i)]) for i in indices]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    ("response_format", {"type": "json_object"}),
    ("presence_penalty", 2.5),  # outside OpenAI's [-2, 2]
    ("logit_bias", {"5": 10}),
    ("n", 2),
    ("bogus_field", 1),
])
def test_unsupported_fields_are_400_naming_them(client, field, value):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-lora", messages=MESSAGES, max_tokens=2, extra_body={field: value})
    assert info.value.body["param"] == field and field in info.value.body["message"]


def test_neutral_values_of_unsupported_fields_are_accepted(client):
    response = client.chat.completions.create(model="tiny-lora", messages=MESSAGES, max_tokens=2, presence_penalty=0,
                                              frequency_penalty=0, response_format={"type": "text"}, user="u1")
    assert response.choices[0].message.content is not None


def test_seed_top_k_and_neutral_penalties_change_the_reply_as_they_should(client):
    """Sampling (temperature 1, top-p 1, the model's top-k 5): the same seed gives the same reply, another
    seed another one; top_k 1 is greedy whatever the seed; zero penalties leave the greedy reply as it is."""
    def ask(**kwargs) -> str:
        response = client.chat.completions.create(model="tiny-lora", messages=MESSAGES, max_tokens=16, **kwargs)
        return response.choices[0].message.content

    sample = {"temperature": 1.0, "top_p": 1.0}
    first = ask(seed=1, **sample)
    assert ask(seed=1, **sample) == first
    assert ask(seed=2, **sample) != first
    greedy = ask(temperature=0)
    assert first != greedy
    for seed in (1, 2):
        assert ask(seed=seed, extra_body={"top_k": 1}, **sample) == greedy
    assert ask(temperature=0, presence_penalty=0, frequency_penalty=0) == greedy


def test_presence_and_frequency_penalties_are_applied(client, lora_dir):
    from baichuan_finetune.tools.generation import OpenAIPenalties, build_prompt_ids, make_generation_config
    from baichuan_finetune.tools.loading import load_model

    model, tokenizer = load_model(lora_dir)
    config = make_generation_config(model, max_new_tokens=12, greedy=True)
    prompt = build_prompt_ids(model, tokenizer, MESSAGES, 12)
    plain = generate_reply(model, tokenizer, MESSAGES, config).text
    penalised = generate_reply(model, tokenizer, MESSAGES, config,
                               logits_processors=[OpenAIPenalties(len(prompt), -2.0, -2.0)]).text
    assert penalised != plain  # negative penalties favour repeating the reply: it changes here
    response = client.chat.completions.create(model="tiny-lora", messages=MESSAGES, max_tokens=12, temperature=0,
                                              presence_penalty=-2.0, frequency_penalty=-2.0)
    assert response.choices[0].message.content == penalised


def test_logprobs_with_stream_is_refused(client):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-lora", messages=MESSAGES, max_tokens=2, stream=True, logprobs=True)
    assert info.value.body["param"] == "logprobs"


def test_text_completions_endpoint(client, lora_dir):
    """/v1/completions: a raw prompt; one rendered with the saved chat_template is the chat prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(lora_dir))
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    response = client.completions.create(model="tiny-lora", prompt=prompt, max_tokens=12, temperature=0, logprobs=2)
    chat = client.chat.completions.create(model="tiny-lora", messages=MESSAGES, max_tokens=12, temperature=0)
    assert response.object == "text_completion"
    assert response.choices[0].text == chat.choices[0].message.content
    assert response.usage.prompt_tokens == chat.usage.prompt_tokens
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) >= 1
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-lora", prompt=prompt, max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == response.choices[0].text


def test_api_key_and_served_model_name(lora_dir, monkeypatch):
    openai = require("openai", "the API test uses the official openai client (requirements-tools.txt)")
    monkeypatch.setenv("BAICHUAN_API_KEY", "from-env")  # the flag wins over the environment
    proc, base_url = start_server("openai_api.py", lora_dir, "--served_model_name", "served", "--api_key", "s3cret")
    try:
        good = openai.OpenAI(base_url=base_url + "/v1", api_key="s3cret", max_retries=0, timeout=120)
        assert [m.id for m in good.models.list().data] == ["served"]
        assert good.chat.completions.create(model="served", messages=MESSAGES, max_tokens=2).choices
        for key in ("wrong", "from-env"):
            bad = openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=120)
            with pytest.raises(openai.AuthenticationError) as info:
                bad.chat.completions.create(model="served", messages=MESSAGES, max_tokens=2)
            assert info.value.body["code"] == "invalid_api_key"
        status, error = post(base_url + "/v1/models", None)  # no header at all
        assert status == 401
        with urllib.request.urlopen(base_url + "/health", timeout=10) as response:  # health stays open
            assert response.status == 200
    finally:
        stop_server(proc)
