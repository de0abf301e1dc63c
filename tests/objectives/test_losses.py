"""The head-loss seam (losses.CausalLMLoss, the model's fallback) and the attention-kernel seam."""

import pytest
import torch
import torch.nn.functional as F
from test_modeling_baichuan import random_model, tiny_config
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache

from baichuan_finetune.objectives.losses import CausalLMLoss
from baichuan_finetune.model.modeling_baichuan import IGNORE_INDEX, chunked_causal_lm_loss

VOCAB, HIDDEN = 211, 16


def head_problem(seed: int = 0, n_tokens: int = 40, dtype=torch.float32):
    """Hidden states, an unnormalised head weight (rows of very different norms) and labels."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n_tokens, HIDDEN, generator=g) * 2).to(dtype).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) * (torch.rand(VOCAB, 1, generator=g) * 3 + 0.1))
    weight = weight.to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (n_tokens,), generator=g)
    labels[:7] = IGNORE_INDEX
    labels[20:26] = IGNORE_INDEX
    return hidden, weight, labels


def naive_loss(hidden, weight, labels, z_loss_weight):
    logits = (hidden @ F.normalize(weight, dim=-1).T).float()
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    return loss + z_loss_weight * logits.max(-1).values.pow(2).mean()


def loss_and_grads(loss_fn, hidden, weight, labels):
    loss = loss_fn(hidden, weight, labels)
    return (loss.detach(), *torch.autograd.grad(loss, [hidden, weight]))


def assert_close(a, b, tol=1e-5):
    for x, y in zip(a, b):
        assert (x - y).abs().max().item() < tol


# ----- CausalLMLoss and the fallback -----


@pytest.mark.parametrize("z_loss_weight", [0.0, 1e-3])
@pytest.mark.parametrize("chunk_size", [7, 256])  # many chunks with a ragged last one; one chunk
def test_causal_lm_loss_and_both_gradients_equal_the_naive_full_logits(z_loss_weight, chunk_size):
    hidden, weight, labels = head_problem()
    ours = loss_and_grads(CausalLMLoss(z_loss_weight, chunk_size), hidden, weight, labels)
    ref = loss_and_grads(lambda h, w, y: naive_loss(h, w, y, z_loss_weight), hidden, weight, labels)
    assert_close(ours, ref)
    assert ours[0].item() > 0


@pytest.mark.parametrize("z_loss_weight", [0.0, 1e-3])
def test_fallback_loss_and_gradients_equal_causal_lm_loss(z_loss_weight):
    hidden, weight, labels = head_problem(seed=1)
    ours = loss_and_grads(CausalLMLoss(z_loss_weight, chunk_size=7), hidden, weight, labels)
    fallback = loss_and_grads(
        lambda h, w, y: chunked_causal_lm_loss(h, w, y, z_loss_weight, chunk_size=7), hidden, weight, labels
    )
    assert_close(fallback, ours)


def test_all_masked_labels_give_zero_for_both_losses():
    hidden, weight, labels = head_problem()
    labels = torch.full_like(labels, IGNORE_INDEX)
    assert CausalLMLoss(1e-3)(hidden, weight, labels).item() == pytest.approx(
        chunked_causal_lm_loss(hidden, weight, labels, 1e-3).item(), abs=1e-6
    )
    assert CausalLMLoss()(hidden, weight, labels).item() == 0.0
    assert chunked_causal_lm_loss(hidden, weight, labels).item() == 0.0


@pytest.mark.parametrize("chunk_size", [7, 256])
def test_supervised_only_head_gives_the_loss_and_gradients_of_the_head_over_all_tokens(chunk_size):
    from baichuan_finetune.objectives.losses import NormHeadLoss

    hidden, weight, labels = head_problem(seed=2, n_tokens=60)
    labels[30:50] = IGNORE_INDEX  # a third of the tokens unsupervised, in several runs
    all_tokens = loss_and_grads(lambda h, w, y: NormHeadLoss.apply(h, w, y, 0.0, chunk_size), hidden, weight, labels)
    for loss_fn in (CausalLMLoss(0.0, chunk_size), lambda h, w, y: chunked_causal_lm_loss(h, w, y, 0.0, chunk_size)):
        ours = loss_and_grads(loss_fn, hidden, weight, labels)
        for a, b in zip(ours, all_tokens):
            assert (a - b).abs().max().item() <= 1e-6 * b.abs().max().item()
        assert ours[1][labels == IGNORE_INDEX].abs().max().item() == 0.0


def test_unsupervised_tokens_never_reach_the_head_without_z_loss():
    # A non-finite hidden state on a prompt token poisons the head's logits only if it is computed.
    hidden, weight, labels = head_problem(seed=3)
    hidden = hidden.detach().clone()
    hidden[labels == IGNORE_INDEX] = float("nan")
    hidden.requires_grad_()
    for loss_fn in (CausalLMLoss(0.0, 7), lambda h, w, y: chunked_causal_lm_loss(h, w, y, 0.0, 7)):
        loss, grad_h, grad_w = loss_and_grads(loss_fn, hidden, weight, labels)
        assert torch.isfinite(loss) and torch.isfinite(grad_w).all()
        assert torch.isfinite(grad_h[labels != IGNORE_INDEX]).all()
    # With z-loss every token counts (its mean runs over all of them), so all go through.
    assert not torch.isfinite(CausalLMLoss(1e-3, 7)(hidden, weight, labels))


@pytest.mark.parametrize("z_loss_weight", [0.0, 1e-3])
def test_model_loss_with_causal_lm_loss_equals_the_fallback_in_training_and_evaluation(z_loss_weight):
    model = random_model(tiny_config("alibi", 4, z_loss_weight=z_loss_weight)).train()
    ids = torch.randint(3, VOCAB, (3, 20), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX
    mask = torch.tensor([[1] * 20, [0] * 5 + [1] * 15, [1] * 8 + [2] * 12])
    params = list(model.parameters())
    results = []
    for head_loss in (None, CausalLMLoss(z_loss_weight, chunk_size=7)):
        loss = model(ids, attention_mask=mask, labels=labels, head_loss=head_loss).loss
        results.append((loss.detach(), *torch.autograd.grad(loss, params)))
        with torch.no_grad():  # evaluation: the same value, and no gradients folded in
            assert model(ids, attention_mask=mask, labels=labels, head_loss=head_loss).loss.item() == pytest.approx(
                loss.item(), abs=1e-6
            )
    assert_close(results[0], results[1])


def test_a_custom_head_loss_gets_the_head_weight_and_labels_shifted_by_one():
    model = random_model(tiny_config("rope", 4))
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX
    calls = []

    class PerSequenceLogProbs:
        """A loss that returns something other than a scalar, as a preference loss may."""

        def __call__(self, hidden, weight, y):
            calls.append((hidden, weight, y))
            return torch.arange(2.0)

    out = model(ids, labels=labels, head_loss=PerSequenceLogProbs())
    assert torch.equal(out.loss, torch.arange(2.0))  # passed through as it is
    assert out.logits is None
    (hidden, weight, y), = calls
    assert weight is model.lm_head.weight
    assert torch.equal(y, labels[:, 1:].reshape(-1))
    expected_hidden = model.model(ids).last_hidden_state[:, :-1].reshape(-1, model.config.hidden_size)
    assert torch.allclose(hidden, expected_hidden)


# ----- attention kernels -----


def attention_inputs():
    """Rows with padding on either side and a packed row of three sequences."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (4, 12), generator=g)
    mask = torch.tensor([[1] * 12, [1] * 9 + [0] * 3, [0] * 4 + [1] * 8, [1] * 5 + [2] * 4 + [3] * 3])
    return ids, mask


@pytest.mark.parametrize("position_embedding", ["rope", "alibi"])
def test_eager_attention_equals_sdpa(position_embedding):
    model = random_model(tiny_config(position_embedding, 4))
    assert model.config._attn_implementation == "sdpa"
    ids, mask = attention_inputs()
    outputs = {}
    for name in ("sdpa", "eager"):
        model.set_attn_implementation(name)
        assert model.config._attn_implementation == name
        with torch.no_grad():
            plain = model(ids[:1]).logits  # no mask at all: the kernel's own causal masking
            padded = model(ids, attention_mask=mask).logits
            # A cached prefix and then several new tokens at once (a mask over past + new keys).
            cache = DynamicCache(config=model.config)
            model(ids[:, :7], attention_mask=mask[:, :7], cache=cache, use_cache=True)
            continued = model(ids[:, 7:], attention_mask=mask, cache=cache, use_cache=True).logits
        outputs[name] = (plain, padded, continued)
    for sdpa, eager in zip(outputs["sdpa"], outputs["eager"]):
        assert (sdpa - eager).abs().max().item() < 1e-5
    # And the continuation matches the one-shot forward on the real (non-padding) positions.
    padded, continued = outputs["sdpa"][1], outputs["sdpa"][2]
    assert (continued - padded[:, 7:]).masked_select(mask[:, 7:, None] != 0).abs().max().item() < 1e-5


@pytest.fixture
def recording_attention():
    """A kernel registered in transformers' AttentionInterface that records its kwargs, then runs sdpa."""
    from baichuan_finetune.model.modeling_baichuan import sdpa_attention

    calls = []

    def recording(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        calls.append(dict(kwargs, layer=module.layer_idx, scaling=scaling, dropout=dropout))
        return sdpa_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout)

    AttentionInterface.register("recording_test_attention", recording)
    yield "recording_test_attention", calls
    AttentionInterface._global_mapping.pop("recording_test_attention")


@pytest.mark.parametrize("position_embedding", ["rope", "alibi"])
def test_a_registered_attention_function_gets_the_packed_sequence_boundaries(
    recording_attention, position_embedding
):
    name, calls = recording_attention
    config = tiny_config(position_embedding, 4, attn_implementation=name)
    model = random_model(config)
    assert model.config._attn_implementation == name
    ids, mask = attention_inputs()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    assert [c["layer"] for c in calls] == [0, 1]
    for call in calls:
        assert torch.equal(call["segment_ids"], mask)
        assert call["position_ids"][3].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]  # restart per sequence
        assert call["position_ids"][2, 4:].tolist() == list(range(8))  # left padding: real tokens from 0
        assert call["scaling"] == pytest.approx(model.config.head_dim**-0.5)
        if position_embedding == "alibi":
            assert call["alibi_slopes"].dtype == torch.float32
            assert call["alibi_slopes"].shape == (model.config.num_attention_heads,)
        else:
            assert call["alibi_slopes"] is None
    # It replaced the default kernel and gives the same logits as it.
    model.set_attn_implementation("sdpa")
    calls.clear()
    with torch.no_grad():
        assert torch.allclose(model(ids, attention_mask=mask).logits, logits, atol=1e-6)
    assert not calls
    # Plain causal rows have no segment ids.
    model.set_attn_implementation(name)
    with torch.no_grad():
        model(ids[:1])
    assert calls[0]["segment_ids"] is None
    assert calls[0]["position_ids"].tolist() == [list(range(12))]
