"""Baichuan2 (7B RoPE / 13B ALiBi) for current transformers.

Self-contained: this file is copied next to saved weights so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without our package.
Parameter names are the official ones, so official checkpoints load unchanged.

``attention_mask`` is a 2-D integer tensor: 0 marks padding and tokens with the same non-zero value
belong to the same sequence. A packed row numbers its conversations 1, 2, 3, ...; they never attend
to each other and RoPE positions restart at each of them.
"""

import math
from threading import Thread
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel, TextIteratorStreamer
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_baichuan import ALIBI, ROPE, BaichuanConfig

IGNORE_INDEX = -100
# Tokens per chunk of the loss: the [chunk, vocab] float32 logits are the largest tensor alive.
LOSS_CHUNK_SIZE = 256


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
    ``[batch or 1, heads, q, k]`` in ``dtype`` (ALiBi: ``slope * (j - i)``).
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
    distance = (k_idx[None, :] - q_idx[:, None]).to(dtype)
    bias = slopes.to(dtype)[:, None, None] * distance  # [heads, q, k]
    return bias[None].masked_fill(~allowed[:, None], torch.finfo(dtype).min)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class BaichuanAttention(nn.Module):
    def __init__(self, config: BaichuanConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.W_pack = nn.Linear(self.hidden_size, 3 * self.hidden_size, bias=False)
        self.o_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attn_mask: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        bsz, q_len, _ = hidden_states.shape
        # W_pack rows: [Q; K; V], head i of each block at rows i*d .. (i+1)*d - 1.
        qkv = self.W_pack(hidden_states).view(bsz, q_len, 3, self.num_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        is_causal = attn_mask is None and q_len > 1
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=1.0 / math.sqrt(self.head_dim)
        )
        return self.o_proj(out.transpose(1, 2).reshape(bsz, q_len, self.hidden_size))


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
        attn_mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), attn_mask, rope, cache)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class NormHeadLoss(torch.autograd.Function):
    """Cross-entropy (+ z-loss) of ``hidden @ normalize(W).T``, a chunk of tokens at a time.

    The full ``[tokens, vocab]`` logits never exist: each chunk's float32 logits are made, turned
    into their gradient at once, and folded into the gradients of ``hidden`` and ``W`` (the latter
    accumulated in place), then freed. Nothing of the weight is kept for backward, which only
    scales the stored gradients, so ZeRO-3 need not gather the head weight again.
    With ``s_v = 1/|W_v|`` and ``logit_tv = s_v (h_t . W_v)``, the weight gradient is
    ``s_v sum_t g_tv h_t - s_v^2 (sum_t g_tv logit_tv) W_v``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, z_loss_weight, chunk_size):
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        n_supervised = (labels != IGNORE_INDEX).sum().clamp(min=1).float()
        inv_norm = 1.0 / torch.linalg.vector_norm(weight, dim=-1, dtype=torch.float32).clamp_min(1e-12)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        weighted_hidden = hidden.new_zeros(weight.shape, dtype=torch.float32) if need_weight else None
        logit_coef = hidden.new_zeros(vocab, dtype=torch.float32) if need_weight else None
        ce_sum = hidden.new_zeros((), dtype=torch.float32)
        z_sum = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, n_tokens, chunk_size):
            h = hidden[start : start + chunk_size]
            y = labels[start : start + chunk_size]
            logits = F.linear(h, weight).float() * inv_norm
            ce_sum += F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
            if not (need_hidden or need_weight) and z_loss_weight == 0:
                continue
            rows = torch.arange(h.shape[0], device=h.device)
            if z_loss_weight > 0:
                max_logit, argmax = logits.max(dim=-1)
                z_sum += max_logit.pow(2).sum()
            if not (need_hidden or need_weight):
                continue
            # d(mean CE)/d logits = (softmax - onehot) / n_supervised on supervised rows.
            valid = y != IGNORE_INDEX
            grad = torch.softmax(logits, dim=-1).mul_((valid.float() / n_supervised)[:, None])
            grad[rows[valid], y[valid]] -= 1.0 / n_supervised
            if z_loss_weight > 0:
                grad[rows, argmax] += z_loss_weight * 2.0 * max_logit / n_tokens
            if need_weight:
                weighted_hidden.addmm_(grad.T, h.float())
                logit_coef += (grad * logits).sum(dim=0)
            if need_hidden:
                grad_hidden[start : start + chunk_size] = (grad * inv_norm).to(weight.dtype) @ weight
        grad_weight = None
        if need_weight:
            grad_weight = weighted_hidden.mul_(inv_norm[:, None])
            grad_weight.addcmul_(weight.float(), (-(inv_norm**2) * logit_coef)[:, None])
            grad_weight = grad_weight.to(weight.dtype)
        ctx.grads = (grad_hidden, grad_weight)
        return ce_sum / n_supervised + z_loss_weight * z_sum / max(n_tokens, 1)

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_output)
        return grad_hidden, grad_weight, None, None, None


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
        z_loss_weight: float = 0.0,
    ) -> torch.Tensor:
        """Logits for ``hidden_states`` or, with ``labels`` (already shifted), the loss.

        The loss never materialises the full ``[tokens, vocab]`` logits (see ``NormHeadLoss``).
        """
        if labels is None:
            return F.linear(hidden_states, self.normalized_weight())
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        labels = labels.reshape(-1).to(hidden.device)
        weight = self.weight
        if not torch.is_grad_enabled():  # evaluation: no gradients to fold in
            hidden, weight = hidden.detach(), weight.detach()
        # An all-masked batch gives 0, not 0/0 = NaN.
        return NormHeadLoss.apply(hidden, weight, labels, z_loss_weight, LOSS_CHUNK_SIZE)


class BaichuanPreTrainedModel(PreTrainedModel):
    config_class = BaichuanConfig
    config: BaichuanConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BaichuanLayer"]
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
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        cache = cache if cache is not None else past_key_values
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

        rope = None
        slopes = None
        if self.config.position_embedding == ROPE:
            if position_ids is None:
                if segments is None:
                    position_ids = torch.arange(past_len, kv_len, device=device)[None].expand(bsz, -1)
                else:
                    position_ids = segment_positions(segments)[:, -q_len:]
            rope = rope_cos_sin(position_ids.to(device), self.config.head_dim, self.config.rope_theta)
        else:
            slopes = torch.tensor(alibi_slopes(self.config.num_attention_heads), device=device)

        attn_mask = None
        if segments is not None or slopes is not None or (q_len > 1 and past_len > 0):
            attn_mask = attention_bias(segments, q_len, kv_len, inputs_embeds.dtype, device, slopes)

        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, attn_mask=attn_mask, rope=rope, cache=cache)
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
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """With ``labels``: the loss (logits are not computed, see ``NormHead``); else logits."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden = outputs.last_hidden_state
        if labels is not None:
            loss = self.lm_head(hidden[:, :-1], labels[:, 1:], self.config.z_loss_weight)
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
        input_ids = build_chat_input(self, tokenizer, messages, generation_config.max_new_tokens)
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

    QUANTIZED_LINEARS = ("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj")

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
        for layer in self.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name in self.QUANTIZED_LINEARS:
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


def _encode_text(tokenizer, text: str) -> list[int]:
    # Role-token text typed by a user stays text, exactly as the training data encodes it.
    encode = getattr(tokenizer, "encode_plain_text", None)
    return encode(text) if encode is not None else tokenizer.encode(text, add_special_tokens=False)


def build_chat_input(model, tokenizer, messages: list[dict], max_new_tokens: int | None = None) -> list[int]:
    """Prompt ids in the official chat format.

    Optional system text first (no role token); each user message ``[195] + ids``, each assistant
    message ``[196] + ids``; ``196`` appended when the last message is not the assistant's. The
    input budget is ``model_max_length - max_new_tokens``: whole rounds are dropped oldest first,
    the newest round is always kept, then the prompt is cut from the left.
    """
    gen = model.generation_config
    user_id = getattr(gen, "user_token_id", model.config.user_token_id)
    assistant_id = getattr(gen, "assistant_token_id", model.config.assistant_token_id)
    max_new_tokens = max_new_tokens or gen.max_new_tokens or 0
    max_input_tokens = model.config.model_max_length - max_new_tokens

    system, rounds, current = "", [], []
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "system":
            if i != 0:
                raise ValueError("a system message may only come first")
            system = content
            continue
        if role not in ("user", "assistant"):
            raise ValueError(f"unknown role {role!r} (expected system, user or assistant)")
        if role == "user" and current:
            rounds.append(current)
            current = []
        current.append(message)
    if current:
        rounds.append(current)

    system_ids = _encode_text(tokenizer, system) if system else []
    max_history_tokens = max_input_tokens - len(system_ids)
    history: list[int] = []
    for round_messages in reversed(rounds):
        round_ids: list[int] = []
        for message in round_messages:
            round_ids.append(user_id if message["role"] == "user" else assistant_id)
            round_ids.extend(_encode_text(tokenizer, message["content"]))
        if history and len(history) + len(round_ids) > max_history_tokens:
            break
        history = round_ids + history
        if len(history) >= max_history_tokens:
            break
    input_ids = system_ids + history
    if not messages or messages[-1]["role"] != "assistant":
        input_ids.append(assistant_id)
    return input_ids[-max_input_tokens:] if max_input_tokens > 0 else input_ids
