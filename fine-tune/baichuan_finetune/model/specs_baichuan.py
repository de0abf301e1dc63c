"""Baichuan2's fixed facts: released shapes, position schemes, linear layer names, chat ids.

Self-contained and standard-library only (no torch, transformers or sentencepiece): the model,
config and tokenizer modules import it relatively, and it is copied next to saved weights with
them (``saving.MODEL_CODE_FILES``; transformers' ``save_pretrained`` copies a custom module's
relative imports too), so ``trust_remote_code`` loads a saved directory without our package. The
planner, the argument checks and the benchmarks read the same facts without importing torch.
"""

import json

# ----- position schemes: the 7B uses rotary embeddings, the 13B ALiBi biases -----
ROPE = "rope"
ALIBI = "alibi"
POSITION_EMBEDDINGS = (ROPE, ALIBI)


def position_embedding_of(config: dict) -> str:
    """The scheme of a config.json's fields. The official files have no ``position_embedding``: the 7B
    one has ``max_position_embeddings`` (RoPE) and the 13B one does not (ALiBi)."""
    given = config.get("position_embedding")
    return given if given is not None else ROPE if config.get("max_position_embeddings") is not None else ALIBI


# ----- the released shapes (config.json of Baichuan2-7B/13B-Base), so that "7b"/"13b" need no download -----
VOCAB_SIZE = 125696
RELEASED = {
    "7b": dict(vocab_size=VOCAB_SIZE, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, position_embedding=ROPE),
    "13b": dict(vocab_size=VOCAB_SIZE, hidden_size=5120, intermediate_size=13696, num_hidden_layers=40,
                num_attention_heads=40, position_embedding=ALIBI),
}

# ----- the linear layers of a decoder layer (attention's fused q/k/v W_pack and o_proj, the MLP) -----
LINEAR_LAYER_NAMES = ("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj")
# ``--lora_target_modules`` value for all of them (peft's name; lm_head, a NormHead, is never one).
ALL_LINEAR = "all-linear"

# ----- the chat format's ids -----
# A conversation is: optional system text (no role token), then each turn as its role token followed
# by its text, ``[195] + ids(user text)`` and ``[196] + ids(assistant text)``; a prompt that asks for a
# reply ends with ``196``. Training adds one closing eos (2).
PAD_ID = 0  # also unk: the official tokenizer pads with <unk>
BOS_ID = 1
EOS_ID = 2
USER_ID = 195  # the piece <reserved_106>
ASSISTANT_ID = 196  # the piece <reserved_107>


def shape_problem(hidden_size: int, num_attention_heads: int, position_embedding: str) -> str | None:
    """Why these dimensions make no Baichuan2 model (one line naming the fields), or None."""
    if position_embedding not in POSITION_EMBEDDINGS:
        return f'"position_embedding" {json.dumps(position_embedding)}: expected "rope" or "alibi"'
    if hidden_size % num_attention_heads:
        return f'"hidden_size" {hidden_size} is not a multiple of "num_attention_heads" {num_attention_heads}'
    if position_embedding == ROPE and (hidden_size // num_attention_heads) % 2:
        # RoPE rotates pairs of channels: with an odd head size the model would fail at its first step.
        return (f"head size {hidden_size // num_attention_heads} (hidden_size {hidden_size} / num_attention_heads "
                f"{num_attention_heads}) is odd; RoPE needs an even head size")
    return None
