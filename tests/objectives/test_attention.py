"""The optional attention kernels (baichuan_finetune.objectives.attention) and the float32 ALiBi bias, on CPU.

FlexAttention runs forward on CPU (eager); FlashAttention-2 and xFormers need CUDA, so here they are
tested for their one-line errors and, for the varlen layout they share, against per-sequence SDPA.
On a GPU `benchmarks/gpu.py` checks every kernel's outputs and gradients.
"""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from test_modeling_baichuan import random_model, tiny_config

from baichuan_finetune.objectives import attention
from baichuan_finetune.model import modeling_baichuan
from baichuan_finetune.options.arguments import UsageError, parse_args
from baichuan_finetune.objectives.attention import KERNEL_NAMES, check_available, check_model, kernel_name, sequence_lengths
from baichuan_finetune.model.modeling_baichuan import alibi_slopes, attention_bias

VOCAB = 211


def packed_inputs(length: int = 12):
    """A full row, right padding, left padding, and a packed row of three sequences."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (4, length), generator=g)
    n = length
    mask = torch.tensor([[1] * n, [1] * (n - 3) + [0] * 3, [0] * 4 + [1] * (n - 4),
                         [1] * 5 + [2] * 4 + [3] * (n - 9)])
    return ids, mask


@pytest.mark.parametrize("heads", [8, 40])
@pytest.mark.parametrize("position_embedding", ["rope", "alibi"])
def test_flex_attention_forward_equals_sdpa_on_packed_rows_with_padding(position_embedding, heads):
    model = random_model(tiny_config(position_embedding, heads))
    ids, mask = packed_inputs()
    with torch.no_grad():
        ref, ref_plain = model(ids, attention_mask=mask).logits, model(ids[:2]).logits
        model.set_attn_implementation(kernel_name("flex_attention"))
        flex, flex_plain = model(ids, attention_mask=mask).logits, model(ids[:2]).logits
    assert model.config._attn_implementation == "baichuan_flex"
    real = mask[:, :, None] != 0
    assert (flex - ref).masked_select(real).abs().max().item() < 1e-5
    assert (flex_plain - ref_plain).abs().max().item() < 1e-5  # no mask: plain causal (+ ALiBi)


def test_kernels_that_take_segment_ids_get_no_dense_mask_until_a_cache_holds_past_keys(monkeypatch):
    built = []
    real_bias = modeling_baichuan.attention_bias
    monkeypatch.setattr(modeling_baichuan, "attention_bias", lambda *a: built.append(a[1:3]) or real_bias(*a))
    model = random_model(tiny_config("alibi", 8, attn_implementation=kernel_name("flex_attention")))
    ids, mask = packed_inputs()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert built == []
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert built == [(12, 12)]


@pytest.mark.parametrize("position_embedding", ["rope", "alibi"])
def test_generation_with_flex_equals_sdpa_and_decoding_falls_back_to_sdpa_once(position_embedding, caplog):
    model = random_model(tiny_config(position_embedding, 8))
    model.generation_config.pad_token_id = 0
    batch = torch.tensor([[5, 17, 42, 99, 7, 150], [0, 0, 0, 33, 8, 61]])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    expected = model.generate(batch, **kwargs)
    model.set_attn_implementation(kernel_name("flex_attention"))
    attention._fallback_said.discard("flex_attention")
    with caplog.at_level(logging.INFO, logger="baichuan_finetune"):
        got = model.generate(batch, **kwargs)
    assert got.tolist() == expected.tolist()
    said = [r.getMessage() for r in caplog.records if "decoding with a key/value cache runs on sdpa" in r.getMessage()]
    assert said == ["flex_attention: decoding with a key/value cache runs on sdpa (the kernel covers full sequences)"]


def test_the_varlen_layout_with_per_sequence_sdpa_equals_the_dense_mask():
    """What the FlashAttention/xFormers kernels compute, with SDPA per sequence in place of flash-attn."""
    heads, dim = 4, 8
    _, mask = packed_inputs()
    indices, cu, longest = sequence_lengths(mask, *mask.shape, torch.device("cpu"))
    assert cu.dtype == torch.int32
    assert (cu[1:] - cu[:-1]).tolist() == [12, 9, 8, 5, 4, 3] and longest == 12
    assert indices.tolist() == [i for i, m in enumerate(mask.flatten().tolist()) if m]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, heads, 12, dim, generator=g) for _ in range(3))
    slopes = torch.tensor(alibi_slopes(heads))
    pieces = []
    uq, uk, uv = (attention._unpad(t, indices) for t in (q, k, v))
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        n = end - start
        bias = slopes[:, None, None] * (torch.arange(n)[None, :] - torch.arange(n)[:, None]).float()
        bias = bias.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        one = F.scaled_dot_product_attention(*(t[start:end].transpose(0, 1) for t in (uq, uk, uv)), attn_mask=bias)
        pieces.append(one.transpose(0, 1))
    varlen = attention._pad(torch.cat(pieces), indices, 4, 12)
    dense_mask = attention_bias(mask, 12, 12, torch.float32, torch.device("cpu"), slopes)
    dense, _ = modeling_baichuan.sdpa_attention(None, q, k, v, dense_mask)
    real = mask[:, :, None, None] != 0
    assert (varlen - dense).masked_select(real).abs().max().item() < 1e-6
    assert varlen.masked_select(~real).abs().max().item() == 0  # padding rows are zeros
    # Plain causal rows (no segment ids): one sequence per row.
    indices, cu, longest = sequence_lengths(None, 2, 5, torch.device("cpu"))
    assert cu.tolist() == [0, 5, 10] and longest == 5 and indices.tolist() == list(range(10))


def test_alibi_bias_is_float32_rounded_once():
    heads, length = 40, 300
    slopes = torch.tensor(alibi_slopes(heads), dtype=torch.float32)
    bias = attention_bias(None, length, length, torch.bfloat16, torch.device("cpu"), slopes)[0]
    distance = (torch.arange(length)[None, :] - torch.arange(length)[:, None]).double()
    exact = torch.tensor(alibi_slopes(heads), dtype=torch.float64)[:, None, None] * distance
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    err_new = (bias.double() - exact).abs().masked_select(causal)
    old = slopes.to(torch.bfloat16)[:, None, None] * distance.to(torch.bfloat16)  # the former rounding
    err_old = (old.double() - exact).abs().masked_select(causal)
    # The float32 product rounded once to bf16, and on average closer to exact than the former rounding.
    once = (slopes[:, None, None] * distance.float()).to(torch.bfloat16)
    assert torch.equal(bias.masked_select(causal), once.masked_select(causal))
    assert err_new.mean() < 0.8 * err_old.mean() and err_new.max() < 0.5 * err_old.max()
    assert (bias.masked_select(~causal) == torch.finfo(torch.bfloat16).min).all()


# ----- one-line errors, before model loading -----


@pytest.mark.parametrize("name,message", [
    ("flash_attention_2", "flash_attention_2 needs a CUDA GPU (running on cpu): use sdpa on CPU"),
    ("xformers", "xformers needs a CUDA GPU (running on cpu): use sdpa on CPU"),
    ("flex_attention", "flex_attention trains only on a CUDA GPU (FlexAttention has no backward on CPU): "
                       "use --attn_implementation sdpa on CPU"),
])
def test_gpu_only_kernels_fail_in_one_line_on_cpu(name, message, tmp_path):
    with pytest.raises(ValueError) as err:
        check_available(name, "cpu")
    assert str(err.value) == message
    check_available("sdpa", "cpu")
    check_available("flex_attention", "cpu", training=False)  # forward (the tools) runs on CPU
    # The training flag: a UsageError naming the flag, before any model or data is touched.
    argv = ["--model_name_or_path", str(tmp_path / "absent"), "--data_path", "x.jsonl",
            "--output_dir", str(tmp_path / "out"), "--use_cpu", "True", "--attn_implementation", name]
    with pytest.raises(UsageError) as err:
        parse_args(argv)
    assert str(err.value) == f"--attn_implementation {name}: {message}"
    assert "\n" not in str(err.value)


def test_package_check_names_the_package(monkeypatch):
    monkeypatch.setattr(attention.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"^flash_attention_2 needs the flash_attn package, which is not installed"):
        check_available("flash_attention_2", "cuda")
    with pytest.raises(ValueError, match=r"^xformers needs the xformers package"):
        check_available("xformers", "cuda")


def test_unknown_name_and_xformers_with_alibi_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not one of sdpa, eager, flex_attention, flash_attention_2, xformers"):
        kernel_name("flash")
    with pytest.raises(UsageError, match="invalid choice"):
        parse_args(["--data_path", "x.jsonl", "--output_dir", str(tmp_path), "--attn_implementation", "flash"])
    with pytest.raises(ValueError, match="^xformers has no ALiBi kernel"):
        check_model("xformers", tiny_config("alibi"))
    check_model("xformers", tiny_config("rope"))


def test_loading_with_a_kernel_and_the_saved_config_does_not_name_it(tiny_alibi_model_dir, tmp_path):
    from baichuan_finetune.tools.loading import load_model

    with pytest.raises(ValueError, match="^flash_attention_2 needs a CUDA GPU"):
        load_model(tiny_alibi_model_dir, attn_implementation="flash_attention_2")
    model, _ = load_model(tiny_alibi_model_dir, attn_implementation="flex_attention")
    assert model.config._attn_implementation == KERNEL_NAMES["flex_attention"]
    model.save_pretrained(tmp_path / "saved")
    # A saved directory must load where this package (and its kernels) is absent.
    assert "baichuan_flex" not in (tmp_path / "saved" / "config.json").read_text()
    assert "attn_implementation" not in json.loads((tmp_path / "saved" / "config.json").read_text())


def test_the_training_flag_reaches_the_loaded_model(tiny_model_dir, tmp_path):
    from baichuan_finetune.training.train import training_method

    args = parse_args(["--model_name_or_path", str(tiny_model_dir), "--data_path", "x.jsonl",
                       "--output_dir", str(tmp_path / "out"), "--attn_implementation", "eager"])
    model = training_method(args.lora).load_model(args)
    assert model.config._attn_implementation == "eager"
    assert parse_args(["--model_name_or_path", str(tiny_model_dir), "--data_path", "x.jsonl",
                       "--output_dir", str(tmp_path / "out")]).model.attn_implementation == "sdpa"
