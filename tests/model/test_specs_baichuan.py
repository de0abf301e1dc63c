"""specs_baichuan: Baichuan2's facts, owned once, standard library only, read by the model and the planner."""

import ast
import re
import sys
from pathlib import Path

import pytest

from baichuan_finetune.options import plan
from baichuan_finetune.model import specs_baichuan
from baichuan_finetune.model.configuration_baichuan import CHAT_GENERATION_CONFIG, BaichuanConfig
from baichuan_finetune.model.specs_baichuan import ALIBI, RELEASED, ROPE, position_embedding_of, shape_problem

SPECS = Path(specs_baichuan.__file__)


def test_standard_library_only():
    # Copied next to saved weights and read by the planner without torch: nothing but the standard library.
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(SPECS.read_text(encoding="utf-8")))
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(SPECS.read_text(encoding="utf-8")))
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_shapes_build_the_model_config_and_the_plan(name):
    shape = RELEASED[name]
    config = BaichuanConfig(**shape)
    assert {k: getattr(config, k) for k in shape} == shape
    assert plan.load_shape(name).position_embedding == shape["position_embedding"]
    assert shape_problem(shape["hidden_size"], shape["num_attention_heads"], shape["position_embedding"]) is None


def test_the_config_defaults_are_the_7b():
    config = BaichuanConfig(max_position_embeddings=4096)
    assert {k: getattr(config, k) for k in RELEASED["7b"]} == RELEASED["7b"]


def test_one_owner_each():
    from baichuan_finetune.options import arguments
    from baichuan_finetune.training import lora
    from baichuan_finetune.model import modeling_baichuan, tokenization_baichuan

    assert modeling_baichuan.LINEAR_LAYER_NAMES is plan.LINEAR_LAYER_NAMES is lora.LINEAR_LAYER_NAMES
    assert plan.ALL_LINEAR is arguments.ALL_LINEAR is specs_baichuan.ALL_LINEAR
    assert plan.RELEASED is RELEASED
    assert (tokenization_baichuan.USER_ID, tokenization_baichuan.ASSISTANT_ID, tokenization_baichuan.EOS_ID) == (
        CHAT_GENERATION_CONFIG["user_token_id"], CHAT_GENERATION_CONFIG["assistant_token_id"],
        CHAT_GENERATION_CONFIG["eos_token_id"]) == (195, 196, 2)


@pytest.mark.parametrize("config, scheme", [
    ({"max_position_embeddings": 4096}, ROPE),  # the official 7B config.json
    ({}, ALIBI),  # the official 13B one
    ({"max_position_embeddings": None}, ALIBI),
    ({"position_embedding": "alibi", "max_position_embeddings": 4096}, ALIBI),  # a saved config says it outright
])
def test_position_embedding_of_an_official_or_saved_config(config, scheme):
    assert position_embedding_of(config) == scheme
    kwargs = {k: v for k, v in config.items() if k in ("position_embedding", "max_position_embeddings")}
    assert BaichuanConfig(**kwargs).position_embedding == scheme


@pytest.mark.parametrize("hidden, heads, scheme, problem", [
    (4096, 3, ROPE, '"hidden_size" 4096 is not a multiple of "num_attention_heads" 3'),
    (12, 4, ROPE, "head size 3 (hidden_size 12 / num_attention_heads 4) is odd; RoPE needs an even head size"),
    (12, 4, ALIBI, None),  # ALiBi has no pairs of channels
    (4096, 32, "xpos", '"position_embedding" "xpos": expected "rope" or "alibi"'),
])
def test_shape_problem_is_what_the_config_and_the_planner_say(hidden, heads, scheme, problem):
    assert shape_problem(hidden, heads, scheme) == problem
    if problem:
        with pytest.raises(ValueError, match="^" + re.escape(problem)):
            BaichuanConfig(hidden_size=hidden, num_attention_heads=heads, position_embedding=scheme)
        with pytest.raises(plan.PlanError, match="^where: " + re.escape(problem)):
            plan.ModelShape(100, hidden, 64, 2, heads, scheme, name="where")
