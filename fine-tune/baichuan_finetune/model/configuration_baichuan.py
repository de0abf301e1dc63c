"""Baichuan2 model configuration.

Self-contained: this file is copied next to saved weights so that
``AutoConfig.from_pretrained(dir, trust_remote_code=True)`` works without our package.
"""

from transformers import GenerationConfig, PretrainedConfig

from .specs_baichuan import (ALIBI, ASSISTANT_ID, BOS_ID, EOS_ID, PAD_ID, RELEASED, ROPE, USER_ID,
                             position_embedding_of, shape_problem)

__all__ = ["ALIBI", "ROPE", "BaichuanConfig", "CHAT_GENERATION_CONFIG", "chat_generation_config"]
_DEFAULT = RELEASED["7b"]  # the defaults: Baichuan2-7B

# The official Baichuan2 chat generation config (generation_config.json of Baichuan2-7B/13B-Chat).
CHAT_GENERATION_CONFIG = dict(
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    user_token_id=USER_ID,
    assistant_token_id=ASSISTANT_ID,
    max_new_tokens=2048,
    temperature=0.3,
    top_k=5,
    top_p=0.85,
    repetition_penalty=1.05,
    do_sample=True,
)


def chat_generation_config(**overrides) -> GenerationConfig:
    """The official Baichuan2 chat generation config, with ``overrides``."""
    return GenerationConfig(**{**CHAT_GENERATION_CONFIG, **overrides})


class BaichuanConfig(PretrainedConfig):
    """Configuration of Baichuan2-7B (RoPE) and Baichuan2-13B (ALiBi) style models.

    The official config files have no ``position_embedding`` field: the 7B one has
    ``max_position_embeddings`` (RoPE) and the 13B one does not (ALiBi). We resolve it here once
    and save the resolved value, so a saved config never depends on that guess again.
    """

    model_type = "baichuan"
    # Output fields that are not predictions (the Trainer leaves them out of evaluation outputs).
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = _DEFAULT["vocab_size"],
        hidden_size: int = _DEFAULT["hidden_size"],
        intermediate_size: int = _DEFAULT["intermediate_size"],
        num_hidden_layers: int = _DEFAULT["num_hidden_layers"],
        num_attention_heads: int = _DEFAULT["num_attention_heads"],
        hidden_act: str = "silu",
        max_position_embeddings: int | None = None,
        model_max_length: int = 4096,
        position_embedding: str | None = None,
        rope_theta: float = 10000.0,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        z_loss_weight: float = 0.0,
        use_cache: bool = True,
        pad_token_id: int = PAD_ID,
        bos_token_id: int = BOS_ID,
        eos_token_id: int = EOS_ID,
        user_token_id: int = USER_ID,
        assistant_token_id: int = ASSISTANT_ID,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        position_embedding = position_embedding_of(
            {"position_embedding": position_embedding, "max_position_embeddings": max_position_embeddings})
        problem = shape_problem(hidden_size, num_attention_heads, position_embedding)
        if problem:
            raise ValueError(problem)
        if hidden_act != "silu":
            raise ValueError(f"Baichuan2 uses hidden_act 'silu', got {hidden_act!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.model_max_length = model_max_length
        self.position_embedding = position_embedding
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.z_loss_weight = z_loss_weight
        self.use_cache = use_cache
        self.user_token_id = user_token_id
        self.assistant_token_id = assistant_token_id
        # Official configs carry this obsolete flag; it is meaningless now and would only confuse.
        kwargs.pop("gradient_checkpointing", None)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
