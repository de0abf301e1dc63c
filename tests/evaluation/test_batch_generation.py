"""Batched generation changes no answer: left-padded greedy batches equal plain one-prompt greedy decoding
(full forward passes, no cache, no ``generate``: ``tools_helpers.greedy_token_ids``) token for token, for
RoPE and ALiBi models, base and LoRA adapter; results come back in input order; eos ends one row while
the others go on."""

from pathlib import Path

import pytest
import torch
from tools_helpers import greedy_token_ids, make_lora_dir

from baichuan_finetune.evaluation.batch_generation import Generation, batches_by_length, generate_batch
from baichuan_finetune.evaluation.prompts import chat_prompt_ids, read_prompts
from baichuan_finetune.model.configuration_baichuan import chat_generation_config
from baichuan_finetune.tools.loading import load_model

QUICKSTART = Path(__file__).resolve().parents[2] / "data" / "quickstart.json"
MAX_NEW = 12
# The oracle decodes without a repetition penalty; the same here, so that only padding and the cache differ.
PLAIN_GREEDY = chat_generation_config(repetition_penalty=1.0)


def quickstart_prompt_ids(model, tokenizer, count: int = 10) -> list[list[int]]:
    """Prompts of very different lengths (one to four rounds of context), in file order."""
    prompts = read_prompts(QUICKSTART)[:count]
    ids = [chat_prompt_ids(model.config.model_max_length, tokenizer, p.messages, MAX_NEW) for p in prompts]
    assert len({len(i) for i in ids}) > count // 2  # real left padding in every batch
    return ids


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory):
    return make_lora_dir(tiny_model_dir, tmp_path_factory.mktemp("batch") / "adapter", scale=1.0)


@pytest.mark.parametrize("which", ["rope", "alibi", "rope_lora"])
def test_batched_greedy_equals_one_prompt_greedy(which, tiny_model_dir, tiny_alibi_model_dir, lora_dir):
    model_dir = {"rope": tiny_model_dir, "alibi": tiny_alibi_model_dir, "rope_lora": lora_dir}[which]
    torch.manual_seed(0)
    model, tokenizer = load_model(model_dir)
    prompts = quickstart_prompt_ids(model, tokenizer)
    batched = generate_batch(model, tokenizer, prompts, max_new_tokens=MAX_NEW, batch_size=16,
                             generation_config=PLAIN_GREEDY)
    expected = [greedy_token_ids(model, p, MAX_NEW) for p in prompts]
    assert [g.token_ids for g in batched] == expected
    assert all(g.finish_reason == "length" and g.new_tokens == MAX_NEW for g in batched)
    assert batched[0].text == tokenizer.decode(expected[0], skip_special_tokens=True)
    if which == "rope_lora":  # the adapter is active: its answers are not the base model's
        base, _ = load_model(tiny_model_dir)
        assert expected != [greedy_token_ids(base, p, MAX_NEW) for p in prompts]


def test_batches_of_two_with_the_chat_config_equal_one_at_a_time(tiny_alibi_model_dir):
    # The model's own chat config (repetition penalty 1.05): batch size changes nothing either.
    model, tokenizer = load_model(tiny_alibi_model_dir)
    prompts = quickstart_prompt_ids(model, tokenizer, count=6)
    one = generate_batch(model, tokenizer, prompts, max_new_tokens=MAX_NEW, batch_size=1)
    two = generate_batch(model, tokenizer, prompts, max_new_tokens=MAX_NEW, batch_size=2)
    assert [g.token_ids for g in two] == [g.token_ids for g in one]


def test_eos_ends_one_row_and_the_others_go_on(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    prompts = quickstart_prompt_ids(model, tokenizer, count=4)
    plain = [greedy_token_ids(model, p, MAX_NEW) for p in prompts]
    # Pretend the 4th token of the first answer is eos (a token that appears nowhere earlier in it).
    stop_at = next(i for i in range(3, MAX_NEW) if plain[0][i] not in plain[0][:i])
    stop = plain[0][stop_at]
    config = chat_generation_config(repetition_penalty=1.0, eos_token_id=stop)
    result = generate_batch(model, tokenizer, prompts, max_new_tokens=MAX_NEW, generation_config=config)
    assert result[0] == Generation(plain[0][:stop_at], tokenizer.decode(plain[0][:stop_at], skip_special_tokens=True),
                                   stop_at + 1, "stop")
    for generation, expected in zip(result[1:], plain[1:]):
        cut = expected.index(stop) if stop in expected else None
        assert generation.token_ids == expected[:cut]
        assert generation.finish_reason == ("stop" if cut is not None else "length")


def test_prompts_are_grouped_longest_first_and_empty_prompts_refused(tiny_model_dir):
    assert batches_by_length([[1], [1, 2, 3], [1, 2], [4, 5, 6]], 2) == [[1, 3], [2, 0]]
    model, tokenizer = load_model(tiny_model_dir)
    with pytest.raises(ValueError, match="empty prompt"):
        generate_batch(model, tokenizer, [[195, 5], []], max_new_tokens=2)
