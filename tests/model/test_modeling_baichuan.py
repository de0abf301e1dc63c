"""Our Baichuan2 against a plainly written float64 restatement of the published math."""

import math

import pytest
import torch
import torch.nn.functional as F

from baichuan_finetune.model import modeling_baichuan
from baichuan_finetune.model.configuration_baichuan import BaichuanConfig
from baichuan_finetune.model.modeling_baichuan import BaichuanForCausalLM, alibi_slopes

TOL = 1e-4


def tiny_config(position_embedding: str, heads: int = 4, **overrides) -> BaichuanConfig:
    kwargs = dict(
        vocab_size=211,
        hidden_size=heads * 8,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=heads,
        position_embedding=position_embedding,
        model_max_length=128,
    )
    kwargs.update(overrides)
    return BaichuanConfig(**kwargs)


def random_model(config: BaichuanConfig, seed: int = 0) -> BaichuanForCausalLM:
    torch.manual_seed(seed)
    model = BaichuanForCausalLM(config).eval()
    with torch.no_grad():
        # Non-trivial norms and an unnormalised head, so every term of the math matters.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        model.lm_head.weight.mul_(torch.rand(config.vocab_size, 1) * 3 + 0.1)
    return model


# ----- the reference: one sequence at a time, float64, written from the text -----


def ref_slopes(n: int) -> list[float]:
    def pow2(m):
        start = 2.0 ** (-(2.0 ** -(math.log2(m) - 3)))
        return [start**k for k in range(1, m + 1)]

    if 2 ** int(math.log2(n)) == n:
        return pow2(n)
    c = 2 ** int(math.floor(math.log2(n)))
    return pow2(c) + pow2(2 * c)[::2][: n - c]


def ref_rmsnorm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def ref_logits(model: BaichuanForCausalLM, ids: list[int]) -> torch.Tensor:
    """Logits of one unpadded sequence, positions 0..T-1."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    h, n, d = cfg.hidden_size, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    T = len(ids)
    x = sd["model.embed_tokens.weight"][ids]
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        a = ref_rmsnorm(x, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        qkv = a @ sd[p + "self_attn.W_pack.weight"].T
        heads_out = []
        for i in range(n):
            q = qkv[:, i * d : (i + 1) * d]
            k = qkv[:, h + i * d : h + (i + 1) * d]
            v = qkv[:, 2 * h + i * d : 2 * h + (i + 1) * d]
            if cfg.position_embedding == "rope":
                pos = torch.arange(T, dtype=torch.float64)[:, None]
                inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
                ang = torch.cat([pos * inv, pos * inv], dim=1)

                def rot(t):
                    return torch.cat([-t[:, d // 2 :], t[:, : d // 2]], dim=1)

                q = q * ang.cos() + rot(q) * ang.sin()
                k = k * ang.cos() + rot(k) * ang.sin()
            scores = q @ k.T / math.sqrt(d)
            if cfg.position_embedding == "alibi":
                slope = ref_slopes(n)[i]
                rel = torch.arange(T)[None, :] - torch.arange(T)[:, None]
                scores = scores + slope * rel.double()
            scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            heads_out.append(torch.softmax(scores, dim=-1) @ v)
        x = x + torch.cat(heads_out, dim=1) @ sd[p + "self_attn.o_proj.weight"].T
        m = ref_rmsnorm(x, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate = m @ sd[p + "mlp.gate_proj.weight"].T
        up = m @ sd[p + "mlp.up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    x = ref_rmsnorm(x, sd["model.norm.weight"], cfg.rms_norm_eps)
    w = sd["lm_head.weight"]
    return x @ (w / w.norm(dim=1, keepdim=True)).T


# ----- tests -----


def test_alibi_slopes_match_formula():
    for n in (4, 8, 32, 40, 6, 12):
        assert alibi_slopes(n) == pytest.approx(ref_slopes(n), rel=1e-12)
    # 40 heads: the 32 power-of-two slopes, then every second slope of 64, cut to 8.
    assert alibi_slopes(40)[:32] == pytest.approx(ref_slopes(32))
    assert alibi_slopes(40)[32:] == pytest.approx(ref_slopes(64)[::2][:8])


@pytest.mark.parametrize(
    "position_embedding,heads", [("rope", 4), ("alibi", 4), ("alibi", 6), ("rope", 6)]
)
def test_logits_match_reference(position_embedding, heads):
    model = random_model(tiny_config(position_embedding, heads))
    ids = torch.randint(3, 211, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    for b in range(2):
        ref = ref_logits(model, ids[b].tolist())
        assert (logits[b].double() - ref).abs().max() < TOL


@pytest.mark.parametrize("position_embedding", ["rope", "alibi"])
def test_right_and_left_padding_and_packing_match_unpadded(position_embedding):
    model = random_model(tiny_config(position_embedding, 4))
    g = torch.Generator().manual_seed(2)
    a, b, c = (torch.randint(3, 211, (n,), generator=g).tolist() for n in (9, 5, 4))
    pad = [0] * 4
    # Row 0: right padding; row 1: left padding; row 2: three packed conversations (segments 1, 2, 3).
    rows = [a + pad, pad + a, b + a[:4] + c]
    masks = [[1] * 9 + [0] * 4, [0] * 4 + [1] * 9, [1] * 5 + [2] * 4 + [3] * 4]
    with torch.no_grad():
        logits = model(torch.tensor(rows), attention_mask=torch.tensor(masks)).logits.double()
    assert (logits[0, :9] - ref_logits(model, a)).abs().max() < TOL
    assert (logits[1, 4:] - ref_logits(model, a)).abs().max() < TOL
    assert (logits[2, :5] - ref_logits(model, b)).abs().max() < TOL
    assert (logits[2, 5:9] - ref_logits(model, a[:4])).abs().max() < TOL
    assert (logits[2, 9:] - ref_logits(model, c)).abs().max() < TOL
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("position_embedding", ["rope", "alibi"])
def test_greedy_generate_same_with_and_without_cache_and_with_left_padding(position_embedding):
    model = random_model(tiny_config(position_embedding, 4))
    model.generation_config.pad_token_id = 0
    long_prompt = [5, 17, 42, 99, 7, 150]
    short_prompt = [33, 8, 61]
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None)
    alone = []
    for prompt in (long_prompt, short_prompt):
        ids = torch.tensor([prompt])
        with_cache = model.generate(ids, use_cache=True, **kwargs)
        without_cache = model.generate(ids, use_cache=False, **kwargs)
        assert with_cache.tolist() == without_cache.tolist()
        alone.append(with_cache[0, len(prompt) :].tolist())
    batch = torch.tensor([long_prompt, [0, 0, 0] + short_prompt])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    out = model.generate(batch, attention_mask=mask, **kwargs)
    assert out[0, 6:].tolist() == alone[0]
    assert out[1, 6:].tolist() == alone[1]


def naive_loss(model, ids, labels, z_weight):
    hidden = model.model(ids).last_hidden_state
    w = F.normalize(model.lm_head.weight, dim=-1)
    logits = (hidden @ w.T).float()[:, :-1].reshape(-1, model.config.vocab_size)
    target = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(logits, target, ignore_index=-100)
    return loss + z_weight * logits.max(-1).values.pow(2).mean()


@pytest.mark.parametrize("z_weight", [0.0, 1e-3])
def test_chunked_loss_and_grads_equal_naive(monkeypatch, z_weight):
    monkeypatch.setattr(modeling_baichuan, "LOSS_CHUNK_SIZE", 7)  # many chunks, one ragged
    config = tiny_config("rope", 4, z_loss_weight=z_weight)
    model = random_model(config).train()
    ids = torch.randint(3, 211, (3, 20), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :6] = -100
    labels[2, 10:] = -100

    loss = model(ids, labels=labels).loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref = naive_loss(model, ids, labels, z_weight)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert abs(loss.item() - ref.item()) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() < 1e-5


def test_the_cache_is_only_passed_as_cache():
    model = random_model(tiny_config("rope"))
    with pytest.raises(TypeError, match="`cache`"):
        model(torch.tensor([[5, 6]]), past_key_values=object())


def test_all_masked_batch_gives_zero_loss_not_nan():
    model = random_model(tiny_config("rope"))
    ids = torch.randint(3, 211, (2, 8))
    loss = model(ids, labels=torch.full_like(ids, -100)).loss
    assert loss.item() == 0.0


def test_normhead_weight_stays_unnormalised_and_cache_never_stale():
    model = random_model(tiny_config("rope"))
    before = model.lm_head.weight.detach().clone()
    ids = torch.randint(3, 211, (1, 5))
    with torch.no_grad():
        first = model(ids).logits
        assert torch.equal(model.lm_head.weight, before)
        model.lm_head.weight.mul_(2.0)  # in-place update (as an optimizer step does)
        model.lm_head.weight[3].add_(1.0)
        second = model(ids).logits
    expected = F.linear(model.model(ids).last_hidden_state, F.normalize(model.lm_head.weight, dim=-1))
    assert torch.allclose(second, expected, atol=1e-6)
    assert not torch.allclose(first, second)


def test_gradient_checkpointing_with_input_require_grads_same_grads():
    config = tiny_config("alibi", 4)
    ids = torch.randint(3, 211, (2, 12), generator=torch.Generator().manual_seed(4))
    results = []
    for checkpointing in (False, True):
        model = random_model(config).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
            for p in model.parameters():  # as with LoRA: the base is frozen
                p.requires_grad_(False)
            model.model.layers[0].self_attn.o_proj.weight.requires_grad_(True)
        else:
            for p in model.parameters():
                p.requires_grad_(False)
            model.model.layers[0].self_attn.o_proj.weight.requires_grad_(True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.item(), model.model.layers[0].self_attn.o_proj.weight.grad.clone()))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_close_to_fp32(dtype):
    model = random_model(tiny_config("alibi", 4))
    ids = torch.randint(3, 211, (2, 10))
    mask = torch.tensor([[1] * 10, [0] * 3 + [1] * 7])
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        half = model.to(dtype)(ids, attention_mask=mask).logits.float()
    assert torch.isfinite(half).all()
    assert (half - ref).abs().max() < 0.1


class CharTokenizer:
    """Enough of a tokenizer for chat(): one id per character, ids decoded as numbers."""

    def encode_plain_text(self, text):
        return [ord(ch) for ch in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"{i} " for i in ids)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_sends_the_chat_prompt_within_the_budget_and_decodes_the_reply(stream):
    from transformers import GenerationConfig

    model = random_model(tiny_config("rope", model_max_length=30))
    gen = GenerationConfig(max_new_tokens=18, do_sample=False, eos_token_id=None, pad_token_id=0)
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "aaaa"},
        {"role": "assistant", "content": "bbbb"},
        {"role": "user", "content": "cc"},
    ]
    # Budget 30 - 18 = 12: the oldest round (10 tokens) no longer fits after system + newest round.
    s, c = ord("S"), ord("c")
    prompt = [s, 195, c, c, 196]
    expected = model.generate(torch.tensor([prompt]), generation_config=gen)[0, len(prompt) :].tolist()
    if stream:
        replies = list(model.chat(CharTokenizer(), messages, stream=True, generation_config=gen))
        assert len(replies) > 1 and all(b.startswith(a) for a, b in zip(replies, replies[1:]))
        reply = replies[-1]
    else:
        reply = model.chat(CharTokenizer(), messages, generation_config=gen)
    assert reply == CharTokenizer().decode(expected)
    # Without max_new_tokens in the given config, the model's own generation config sets the budget.
    seen = []
    model.generate = lambda input_ids, **kwargs: seen.append(input_ids[0].tolist()) or input_ids
    model.generation_config.max_new_tokens = 10  # budget 20: every round fits
    model.chat(CharTokenizer(), messages, generation_config=GenerationConfig(do_sample=False))
    a, b = ord("a"), ord("b")
    assert seen == [[s, 195, a, a, a, a, 196, b, b, b, b, 195, c, c, 196]]


def test_loss_gradients_scale_with_the_upstream_gradient_and_frozen_head():
    model = random_model(tiny_config("rope", 4))
    ids = torch.randint(3, 211, (2, 9), generator=torch.Generator().manual_seed(5))
    (model(ids, labels=ids).loss * 3.0).backward()
    scaled = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    for s, p in zip(scaled, model.parameters()):
        assert torch.allclose(s, 3.0 * p.grad, atol=1e-6)
    # A frozen head (LoRA) still passes gradients to the layers below it.
    model.zero_grad()
    model.lm_head.weight.requires_grad_(False)
    model(ids, labels=ids).loss.backward()
    assert model.lm_head.weight.grad is None
    assert torch.allclose(model.model.norm.weight.grad, scaled[-2] / 3.0, atol=1e-6)
