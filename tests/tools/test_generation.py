"""generation.py: generation config overrides, the prompt ids, streaming with stop strings and StopFlag."""

import pytest
from tools_helpers import generate_reply, greedy_token_ids

from baichuan_finetune.tools.generation import StopFlag, build_prompt_ids, make_generation_config, stream_reply
from baichuan_finetune.tools.loading import load_model
from baichuan_finetune.model.tokenization_baichuan import build_chat_input

MESSAGES = [{"role": "user", "content": "你好，请介绍一下北京。"}]
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir, dtype="float32")


@pytest.fixture(scope="module")
def greedy(tiny):
    """Greedy decoding without repetition penalty, so plain forward passes give the same reply."""
    model, _ = tiny
    config = make_generation_config(model, max_new_tokens=MAX_NEW_TOKENS, greedy=True)
    config.repetition_penalty = 1.0
    return config


@pytest.fixture(scope="module")
def full_reply(tiny, greedy):
    model, tokenizer = tiny
    reply = generate_reply(model, tokenizer, MESSAGES, greedy)
    # The tiny random model talks for the whole budget: the stop tests below need a long reply.
    assert reply.finish_reason == "length" and len(reply.token_ids) == MAX_NEW_TOKENS
    return reply


def test_make_generation_config_overrides(tiny):
    model, _ = tiny
    saved = model.generation_config.to_dict()
    config = make_generation_config(model, max_new_tokens=7, temperature=0.9, top_p=0.5)
    assert (config.max_new_tokens, config.temperature, config.top_p) == (7, 0.9, 0.5)
    assert config.do_sample and config.top_k == model.generation_config.top_k
    assert config.user_token_id == 195 and config.assistant_token_id == 196 and config.eos_token_id == 2
    assert model.generation_config.to_dict() == saved  # a copy: the model's config is unchanged
    default = make_generation_config(model)
    assert default.to_dict() == saved


@pytest.mark.parametrize("kwargs", [{"greedy": True}, {"temperature": 0}, {"temperature": 0, "top_p": 0.3}])
def test_make_generation_config_greedy(tiny, kwargs):
    model, _ = tiny
    config = make_generation_config(model, **kwargs)
    assert config.do_sample is False
    assert (config.temperature, config.top_p, config.top_k) == (1.0, 1.0, 50)
    assert config.max_new_tokens == model.generation_config.max_new_tokens


def test_build_prompt_ids_is_the_chat_format(tiny):
    model, tokenizer = tiny
    max_length = model.config.model_max_length
    assert build_prompt_ids(model, tokenizer, MESSAGES, 16) == build_chat_input(tokenizer, MESSAGES, max_length - 16)
    # None: the generation config's max_new_tokens sets the input budget.
    default = model.generation_config.max_new_tokens
    assert build_prompt_ids(model, tokenizer, MESSAGES) == build_chat_input(tokenizer, MESSAGES, max_length - default)
    # A long history: old rounds are dropped exactly as the chat format owner drops them.
    history = []
    for i in range(40):
        history += [{"role": "user", "content": f"第{i}个问题，关于北京的历史。"},
                    {"role": "assistant", "content": f"第{i}个回答，北京有三千多年的历史。"}]
    messages = [{"role": "system", "content": "你是一个助手。"}, *history, *MESSAGES]
    ids = build_prompt_ids(model, tokenizer, messages, 200)
    assert ids == build_chat_input(tokenizer, messages, max_length - 200)
    assert len(ids) <= max_length - 200 < len(build_chat_input(tokenizer, messages))
    assert ids[-1] == 196


def test_stream_reply_greedy_equals_plain_forward_passes(tiny, greedy, full_reply):
    model, tokenizer = tiny
    prompt_ids = build_prompt_ids(model, tokenizer, MESSAGES, MAX_NEW_TOKENS)
    assert full_reply.token_ids == greedy_token_ids(model, prompt_ids, MAX_NEW_TOKENS)
    assert full_reply.prompt_tokens == len(prompt_ids)
    assert full_reply.completion_tokens == MAX_NEW_TOKENS
    assert full_reply.text == tokenizer.decode(full_reply.token_ids, skip_special_tokens=True)
    pieces = [new for new, _ in stream_reply(model, tokenizer, MESSAGES, greedy)]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == full_reply.text


def test_stream_reply_stop_strings(tiny, greedy, full_reply):
    model, tokenizer = tiny
    text = full_reply.text
    stop = text[3:5]
    assert len(text) > 6 and stop.strip()
    events = list(stream_reply(model, tokenizer, MESSAGES, greedy, stop=["never-appears", stop]))
    reply = events[-1][1]
    assert reply.text == text[: text.find(stop)]
    assert reply.finish_reason == "stop"
    # Held-back text never leaks: the streamed pieces are exactly the cut reply.
    assert "".join(new for new, _ in events) == reply.text
    assert reply.token_ids == full_reply.token_ids[: len(reply.token_ids)]


class StopAfter(StopFlag):
    """A StopFlag set from inside ``generate`` after exactly ``n`` tokens (as Ctrl+C would, deterministically)."""

    def __init__(self, n: int):
        super().__init__()
        self.calls, self.n = 0, n

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1  # once per generated token
        if self.calls >= self.n:
            self.set()
        return super().__call__(input_ids, scores, **kwargs)


@pytest.mark.parametrize("n", [1, 5])
def test_stop_flag_interrupts_generation(tiny, greedy, full_reply, n):
    model, tokenizer = tiny
    reply = generate_reply(model, tokenizer, MESSAGES, greedy, stop_flag=StopAfter(n))
    assert reply.finish_reason == "interrupted"
    assert reply.token_ids == full_reply.token_ids[:n]
    assert reply.completion_tokens == n
    assert reply.text == tokenizer.decode(full_reply.token_ids[:n], skip_special_tokens=True)


def test_stop_flag_set_before_generation_gives_one_token(tiny, greedy, full_reply):
    model, tokenizer = tiny
    flag = StopFlag()
    flag.set()
    reply = generate_reply(model, tokenizer, MESSAGES, greedy, stop_flag=flag)
    assert reply.finish_reason == "interrupted" and reply.token_ids == full_reply.token_ids[:1]


def test_openai_penalties_subtract_counts_of_generated_tokens_only():
    import torch

    from baichuan_finetune.tools.generation import OpenAIPenalties

    input_ids = torch.tensor([[7, 7, 3, 3, 3, 5]])  # prompt [7, 7], then 3 three times and 5 once
    scores = torch.zeros(1, 8)
    out = OpenAIPenalties(prompt_length=2, presence_penalty=0.5, frequency_penalty=0.25)(input_ids, scores)
    expected = torch.zeros(1, 8)
    expected[0, 3] = -(0.5 + 3 * 0.25)
    expected[0, 5] = -(0.5 + 0.25)
    assert torch.equal(out, expected)  # token 7 appears only in the prompt: not penalised


# ----- sampling: temperature, seed and top_k change the reply exactly as they should -----


def sampled(tiny, seed: int, **overrides):
    """A sampled reply (temperature 1, top-p 1, the model's top-k 5, no repetition penalty)."""
    import torch

    model, tokenizer = tiny
    config = make_generation_config(model, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, top_p=1.0)
    config.repetition_penalty = 1.0
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return generate_reply(model, tokenizer, MESSAGES, config).token_ids


def test_sampling_is_seeded_and_differs_from_greedy(tiny, full_reply):
    first = sampled(tiny, seed=1)
    assert sampled(tiny, seed=1) == first  # the same seed gives the same reply
    assert sampled(tiny, seed=2) != first  # another seed another one (24 draws from 5 tokens each)
    assert first != full_reply.token_ids  # temperature > 0 samples: not the greedy reply


@pytest.mark.parametrize("seed", [1, 2])
def test_top_k_1_is_greedy_whatever_the_seed(tiny, full_reply, seed):
    assert sampled(tiny, seed, top_k=1) == full_reply.token_ids


def test_neutral_penalties_leave_the_greedy_reply_unchanged(tiny, greedy, full_reply):
    from baichuan_finetune.tools.generation import OpenAIPenalties

    model, tokenizer = tiny
    prompt = build_prompt_ids(model, tokenizer, MESSAGES, MAX_NEW_TOKENS)
    reply = generate_reply(model, tokenizer, MESSAGES, greedy, logits_processors=[OpenAIPenalties(len(prompt))])
    assert reply.token_ids == full_reply.token_ids
    # and a real penalty does change it (the tiny model repeats itself), so the comparison can fail
    penalised = generate_reply(model, tokenizer, MESSAGES, greedy,
                               logits_processors=[OpenAIPenalties(len(prompt), presence_penalty=2.0)])
    assert penalised.token_ids != full_reply.token_ids
