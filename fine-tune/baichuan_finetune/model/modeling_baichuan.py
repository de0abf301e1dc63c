"""Baichuan2 (7B RoPE / 13B ALiBi) for current transformers.

Self-contained: this file is copied next to saved weights so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without our package.
Parameter names are the official ones, so official checkpoints load unchanged.

``attention_mask`` is a 2-D integer tensor: 0 marks padding and tokens with the same non-zero value
belong to the same sequence. A packed row numbers its conversations 1, 2, 3, ...; they never attend
to each other and RoPE positions restart at each of them.

Attention runs through transformers' attention interface: ``config._attn_implementation`` picks
the kernel ("sdpa", the default, and "eager" are defined here; any other name is looked up in
``ALL_ATTENTION_FUNCTIONS``). Besides the dense mask, every kernel receives the keyword arguments
``segment_ids`` (the 2-D mask ids, or None for plain causal rows), ``position_ids`` (restarting at
each packed sequence) and ``alibi_slopes`` (float32 ``[heads]`` for ALiBi models, else None), so a
kernel that works on sequence boundaries needs no change here. A kernel function with the attribute
``takes_segment_ids = True`` gets no dense mask at all (``attention_mask=None``) unless a cache holds
past keys (then it gets the dense mask, e.g. to hand decoding to SDPA).

With ``labels`` the model returns only the loss, computed by a ``head_loss`` callable inside the
head (``baichuan_finetune.objectives.losses.CausalLMLoss`` in training); without one, a self-contained chunked
fallback gives the same mean cross-entropy (+ z-loss).
"""

import functools
import math
from threading import Thread
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel, TextIteratorStreamer
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_baichuan import BaichuanConfig
from .specs_baichuan import LINEAR_LAYER_NAMES, ROPE  # LINEAR_LAYER_NAMES: LoRA targets, what quantize() replaces
from .tokenization_baichuan import build_chat_input

# Label of a token that is not trained on (the PyTorch cross-entropy convention).
IGNORE_INDEX = -100
# Tokens per chunk of the fallback loss: the [chunk, vocab] float32 logits are the largest tensor alive.
LOSS_CHUNK_SIZE = 256

# A head loss maps (hidden [N, H], unnormalised head weight [V, H], labels [N]) to the output's loss.
HeadLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(self.weight.dtype)


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """Position of every token within its sequence: 0 at the start of each run of equal mask values."""
    idx = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=1).values


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [batch, 1, seq, head_dim]
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Rotated in float32 as the official code does: bf16 rotations drift at long positions.
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def alibi_slopes(num_heads: int) -> list[float]:
    """The ALiBi head slopes of the official 13B model (also for non-power-of-two head counts)."""

    def power_of_2_slopes(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_2_slopes(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_2_slopes(closest) + power_of_2_slopes(2 * closest)[0::2][: num_heads - closest]


def attention_bias(
    segments: torch.Tensor | None,
    q_len: int,
    kv_len: int,
    dtype: torch.dtype,
    device: torch.device,
    slopes: torch.Tensor | None,
) -> torch.Tensor:
    """Mask for the last ``q_len`` queries over ``kv_len`` keys, built only as large as needed.

    Returns a bool mask ``[batch or 1, 1, q, k]`` (RoPE) or an additive float bias
    ``[batch or 1, heads, q, k]`` in ``dtype`` (ALiBi: ``slope * (j - i)`` computed in float32 and
    rounded once, as the official code does; a slope rounded to bf16 first has 2.4x its error).
    """
    k_idx = torch.arange(kv_len, device=device)
    q_idx = torch.arange(kv_len - q_len, kv_len, device=device)
    allowed = (k_idx[None, :] <= q_idx[:, None])[None]  # [1, q, k]
    if segments is not None:
        same = segments[:, -q_len:, None] == segments[:, None, :]
        # A padding query would see no key at all, and softmax over nothing is NaN: let it see itself.
        allowed = (allowed & same & (segments[:, None, :] != 0)) | (k_idx[None, :] == q_idx[:, None])[None]
    if slopes is None:
        return allowed[:, None]
    distance = (k_idx[None, :] - q_idx[:, None]).float()
    fill = torch.finfo(dtype).min
    bias = torch.empty(allowed.shape[0], slopes.shape[0], q_len, kv_len, dtype=dtype, device=device)
    # One head at a time: the float32 [q, k] product is the only temporary, never [heads, q, k] of it.
    for head, slope in enumerate(slopes.float()):
        bias[:, head] = (slope * distance).to(dtype).masked_fill(~allowed, fill)
    return bias


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``F.scaled_dot_product_attention``; ``[B, H, q, D]`` inputs, ``[B, q, H, D]`` output.

    ``attention_mask`` is a bool mask or an additive bias broadcastable to ``[B, H, q, k]``. None
    means plain causal when ``q > 1`` (the model only leaves it out when there is no cached past).
    """
    is_causal = attention_mask is None and query.shape[2] > 1
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling
    )
    return out.transpose(1, 2), None


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain matmul-softmax reference of ``sdpa_attention``; also returns the attention weights."""
    q_len, kv_len = query.shape[2], key.shape[2]
    scaling = 1.0 / math.sqrt(query.shape[-1]) if scaling is None else scaling
    scores = (query @ key.transpose(-1, -2)) * scaling
    if attention_mask is None and q_len > 1:
        # Causal with the queries aligned to the last keys.
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2), weights


def attention_function(name: str | None) -> Callable:
    """The attention kernel called ``name``: ours for "sdpa" (also None) and "eager", else transformers'."""
    if name in (None, "sdpa"):
        return sdpa_attention
    if name == "eager":
        return eager_attention
    return ALL_ATTENTION_FUNCTIONS.get_interface(name, sdpa_attention)


class BaichuanAttention(nn.Module):
    # Read by transformers' kernels: a missing mask means causal.
    is_causal = True

    def __init__(self, config: BaichuanConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = 1.0 / math.sqrt(self.head_dim)
        self.W_pack = nn.Linear(self.hidden_size, 3 * self.hidden_size, bias=False)
        self.o_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: Cache | None,
        **kwargs,
    ) -> torch.Tensor:
        bsz, q_len, _ = hidden_states.shape
        # W_pack rows: [Q; K; V], head i of each block at rows i*d .. (i+1)*d - 1.
        qkv = self.W_pack(hidden_states).view(bsz, q_len, 3, self.num_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention = attention_function(self.config._attn_implementation)
        out, _ = attention(self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0, **kwargs)
        return self.o_proj(out.reshape(bsz, q_len, self.hidden_size))


class BaichuanLayer(GradientCheckpointingLayer):
    def __init__(self, config: BaichuanConfig, layer_idx: int):
        super().__init__()
        self.self_attn = BaichuanAttention(config, layer_idx)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_input = self.input_layernorm(hidden_states)
        hidden_states = hidden_states + self.self_attn(attn_input, attention_mask, rope, cache, **kwargs)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def _chunk_loss_terms(
    hidden: torch.Tensor, weight: torch.Tensor, inv_norm: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(hidden, weight).float() * inv_norm
    ce_sum = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return ce_sum, logits.max(dim=-1).values.pow(2).sum()


def supervised_rows(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``hidden [N, H]`` and ``labels [N]`` whose label is not ``IGNORE_INDEX``.

    Cross-entropy ignores the other rows, so the head need not compute their ``[vocab]`` logits;
    their gradient is zero either way (the gather's backward scatters zeros there).
    """
    keep = labels != IGNORE_INDEX
    return hidden[keep], labels[keep]


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    z_loss_weight: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over supervised tokens of ``hidden @ normalize(weight).T``, plus z-loss.

    ``z_loss_weight * mean(max logit ** 2)`` over all tokens is added; an all-masked batch gives 0.
    Without z-loss only the supervised tokens are computed (``supervised_rows``).
    The fallback head loss: the same value and gradients as ``losses.CausalLMLoss``, with only
    plain autograd. Each chunk of ``chunk_size`` tokens (default ``LOSS_CHUNK_SIZE``) is
    checkpointed, so its float32 ``[chunk, vocab]`` logits are freed at once and remade in backward.
    """
    chunk_size = chunk_size or LOSS_CHUNK_SIZE
    n_tokens = hidden.shape[0]
    n_supervised = (labels != IGNORE_INDEX).sum().clamp(min=1).float()
    if not z_loss_weight:
        # Without z-loss an unsupervised token adds nothing: only supervised rows go through the head.
        hidden, labels = supervised_rows(hidden, labels)
    inv_norm = 1.0 / torch.linalg.vector_norm(weight, dim=-1, dtype=torch.float32).clamp_min(1e-12)
    ce_sum = hidden.new_zeros((), dtype=torch.float32)
    z_sum = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n_tokens, chunk_size):
        args = (hidden[start : start + chunk_size], weight, inv_norm, labels[start : start + chunk_size])
        if torch.is_grad_enabled():
            ce, z = checkpoint(_chunk_loss_terms, *args, use_reentrant=False)
        else:
            ce, z = _chunk_loss_terms(*args)
        ce_sum, z_sum = ce_sum + ce, z_sum + z
    loss = ce_sum / n_supervised
    if z_loss_weight:
        loss = loss + z_loss_weight * z_sum / max(n_tokens, 1)
    return loss


class NormHead(nn.Module):
    """Output head with row-normalised weights: ``logits = hidden @ normalize(W).T``.

    The stored weight stays unnormalised (as in official checkpoints) and is never changed in
    place, which ZeRO-3 requires. The weight is only read inside ``forward`` so that ZeRO-3 has
    gathered it.
    """

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        self._cached_weight: torch.Tensor | None = None
        self._cache_key: tuple | None = None

    def normalized_weight(self) -> torch.Tensor:
        if torch.is_grad_enabled():
            return F.normalize(self.weight, dim=-1)
        # Inference: reuse the normalised copy while the weight is the same tensor, unmodified.
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
        if self._cache_key != key:
            self._cached_weight = F.normalize(w, dim=-1)
            self._cache_key = key
        return self._cached_weight

    def forward(
        self,
        hidden_states: torch.Tensor,
        labels: torch.Tensor | None = None,
        head_loss: HeadLoss | None = None,
    ) -> torch.Tensor:
        """Logits for ``hidden_states`` or, with ``labels`` (already shifted), ``head_loss``'s result.

        ``head_loss(hidden [N, H], weight [V, H], labels [N])`` gets the flattened tokens and the
        stored (unnormalised) weight, here inside the head's forward, where ZeRO-3 has gathered it.
        Without one, ``chunked_causal_lm_loss`` (no z-loss). Neither materialises the full
        ``[tokens, vocab]`` logits.
        """
        if labels is None:
            return F.linear(hidden_states, self.normalized_weight())
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        labels = labels.reshape(-1).to(hidden.device)
        head_loss = chunked_causal_lm_loss if head_loss is None else head_loss
        return head_loss(hidden, self.weight, labels)


class BaichuanPreTrainedModel(PreTrainedModel):
    config_class = BaichuanConfig
    config: BaichuanConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BaichuanLayer"]
    # Attention goes through the attention interface and keyword arguments reach the kernel.
    # transformers' own flash and flex kernels are not declared: they would not apply the ALiBi bias or
    # the packed-row mask. Ours that do are registered under other names (baichuan_finetune.objectives.attention).
    _supports_attention_backend = True
    _supports_sdpa = True
    # Official 7B checkpoints may carry RoPE buffers; we compute them on the fly.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.", r"future_mask"]
    # Our loss is the mean over the micro-batch's supervised tokens, as in the official recipe.
    accepts_loss_kwargs = False

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, NormHead):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        else:
            super()._init_weights(module)


class BaichuanModel(BaichuanPreTrainedModel):
    def __init__(self, config: BaichuanConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(BaichuanLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Final hidden states; ``kwargs`` go on to the attention kernel of every layer."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds")
        if kwargs.pop("past_key_values", None) is not None:
            raise TypeError("BaichuanModel takes the key/value cache as `cache`, not `past_key_values`")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        bsz, q_len = inputs_embeds.shape[:2]
        past_len = cache.get_seq_length() if cache is not None else 0
        kv_len = past_len + q_len
        device = inputs_embeds.device

        segments = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[1] != kv_len:
                raise ValueError(
                    f"attention_mask must be [batch, past + new tokens] = [{bsz}, {kv_len}], "
                    f"got {list(attention_mask.shape)}"
                )
            segments = attention_mask.to(device=device, dtype=torch.long)
            if bool((segments == 1).all()):
                segments = None  # plain causal: lets SDPA use its fastest kernel

        if position_ids is None:
            if segments is None:
                position_ids = torch.arange(past_len, kv_len, device=device)[None].expand(bsz, -1)
            else:
                position_ids = segment_positions(segments)[:, -q_len:]
        position_ids = position_ids.to(device)
        rope = None
        slopes = None
        if self.config.position_embedding == ROPE:
            rope = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        else:
            slopes = torch.tensor(alibi_slopes(self.config.num_attention_heads), dtype=torch.float32, device=device)

        attn_mask = None
        # A kernel marked ``takes_segment_ids`` (FlexAttention, FlashAttention varlen) reads the sequence
        # boundaries and slopes below instead of a dense mask, so none is built, except with cached past
        # keys, where such a kernel hands the call to SDPA.
        dense = not getattr(attention_function(self.config._attn_implementation), "takes_segment_ids", False)
        if (dense or past_len > 0) and (segments is not None or slopes is not None or (q_len > 1 and past_len > 0)):
            attn_mask = attention_bias(segments, q_len, kv_len, inputs_embeds.dtype, device, slopes)
        # Sequence boundaries for kernels that use them instead of (or besides) the dense mask.
        kwargs.update(segment_ids=segments, position_ids=position_ids, alibi_slopes=slopes)

        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=attn_mask, rope=rope, cache=cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class BaichuanForCausalLM(BaichuanPreTrainedModel, GenerationMixin):
    def __init__(self, config: BaichuanConfig):
        super().__init__(config)
        self.model = BaichuanModel(config)
        self.lm_head = NormHead(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> NormHead:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        head_loss: HeadLoss | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """With ``labels``: ``loss`` only (no logits); else ``logits`` (of the last ``logits_to_keep``).

        Token ``t`` predicts ``labels[t + 1]``; ``IGNORE_INDEX`` labels are not trained on. The loss is
        ``head_loss(hidden [N, H], lm_head.weight [V, H], labels [N])`` over the flattened shifted
        tokens, and ``loss`` holds whatever it returns: a scalar for ``losses.CausalLMLoss`` (the
        training objective), but a loss may return something else (e.g. per-sequence
        log-probabilities). Without ``head_loss``: ``chunked_causal_lm_loss`` with
        ``config.z_loss_weight``. ``kwargs`` go on to the attention kernels.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if labels is not None:
            if head_loss is None:
                head_loss = functools.partial(chunked_causal_lm_loss, z_loss_weight=self.config.z_loss_weight)
            loss = self.lm_head(hidden[:, :-1], labels[:, 1:], head_loss)
            return CausalLMOutputWithPast(loss=loss, cache=outputs.cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=self.lm_head(hidden), cache=outputs.cache)

    # ----- chat, as in the official release -----

    def chat(
        self,
        tokenizer,
        messages: list[dict],
        stream: bool = False,
        generation_config: GenerationConfig | None = None,
    ) -> str | Iterator[str]:
        """Answer the last user message; with ``stream=True`` yield the growing reply."""
        generation_config = generation_config or self.generation_config
        # The official input budget: the context length minus the room kept for the reply.
        max_new_tokens = generation_config.max_new_tokens or self.generation_config.max_new_tokens or 0
        input_ids = build_chat_input(tokenizer, messages, self.config.model_max_length - max_new_tokens)
        input_ids = torch.tensor([input_ids], device=self.device)
        if not stream:
            output = self.generate(input_ids, generation_config=generation_config)
            return tokenizer.decode(output[0][input_ids.shape[1] :], skip_special_tokens=True)
        return self._stream_chat(tokenizer, input_ids, generation_config)

    def _stream_chat(self, tokenizer, input_ids: torch.Tensor, generation_config: GenerationConfig) -> Iterator[str]:
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        thread = Thread(
            target=self.generate,
            kwargs=dict(inputs=input_ids, generation_config=generation_config, streamer=streamer),
            daemon=True,
        )
        thread.start()
        response = ""
        for piece in streamer:
            response += piece
            yield response
        thread.join()

    # ----- online quantization, as in the official release (bitsandbytes, imported lazily) -----

    def quantize(self, bits: int, compute_dtype: torch.dtype | None = None) -> "BaichuanForCausalLM":
        """Replace every layer's linear weights by bitsandbytes int8 (``bits=8``) or NF4 (``bits=4``).

        The model is quantized where it is (bitsandbytes quantizes on a CUDA device; its CPU support
        depends on the bitsandbytes release). Returns ``self`` for ``model = model.quantize(8)``.
        """
        if bits not in (4, 8):
            raise ValueError(f"quantize(bits): bits must be 8 or 4, got {bits}")
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ImportError("quantize() needs bitsandbytes: pip install bitsandbytes") from exc
        compute_dtype = compute_dtype or self.dtype
        if bits == 4 and self.device.type == "cpu":
            # bitsandbytes' CPU 4-bit kernel on AVX512-BF16 CPUs packs weights in blocks of 32 output
            # rows and 2 input columns; checked on every CPU so that the outcome never depends on it.
            for index, layer in enumerate(self.model.layers):
                for part, parent in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
                    for name in LINEAR_LAYER_NAMES:
                        linear = getattr(parent, name, None)
                        if isinstance(linear, nn.Linear) and (linear.out_features % 32 or linear.in_features % 2):
                            raise ValueError(
                                f"quantize(4) on CPU: model.layers.{index}.{part}.{name} is {linear.in_features}->"
                                f"{linear.out_features}; bitsandbytes' CPU 4-bit kernel needs out_features a "
                                "multiple of 32 and in_features even (use 8 bits, or a CUDA device)")
        for layer in self.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name in LINEAR_LAYER_NAMES:
                    linear = getattr(parent, name, None)
                    if not isinstance(linear, nn.Linear):
                        continue  # absent here, or already quantized
                    device, weight = linear.weight.device, linear.weight.data
                    if bits == 8:
                        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False,
                                                  has_fp16_weights=False, threshold=6.0)
                        new.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
                    else:
                        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                                compute_dtype=compute_dtype, quant_type="nf4")
                        new.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4")
                    setattr(parent, name, new.to(device))  # moving to the device quantizes
        return self

