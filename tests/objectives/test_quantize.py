"""bitsandbytes quantization on CPU (bitsandbytes >= 0.49 runs int8 and NF4 on CPU) and the QLoRA helpers."""

import sys
from pathlib import Path

import pytest
import torch
from tools_helpers import generate_reply, greedy_token_ids, make_lora_dir

from baichuan_finetune.objectives import quantize as q

needs_bnb = pytest.mark.skipif(not q.bitsandbytes_available(),
                               reason="bitsandbytes is not installed (optional: pip install -r requirements-quant.txt)")


@pytest.fixture(scope="module")
def quant_model_dir(tmp_path_factory):
    """The tiny model with shapes every bitsandbytes backend accepts: each linear's output a multiple of
    32 and input even (bitsandbytes' CPU 4-bit kernel on AVX512-BF16 CPUs packs blocks of 32 rows), so
    the outcome does not depend on the CPU. The default tiny model (intermediate 344) is refused."""
    from baichuan_finetune.builder.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("quant") / "tiny", intermediate_size=512)


@pytest.fixture(scope="module")
def reference(quant_model_dir):
    from baichuan_finetune.tools.loading import load_model

    model, tokenizer = load_model(quant_model_dir, dtype="float32")
    ids = torch.tensor([tokenizer.encode("你好，请介绍一下北京。Hello!")])
    with torch.no_grad():
        return ids, model(input_ids=ids).logits


def load(model_dir, **kwargs):
    from baichuan_finetune.tools.loading import load_model

    return load_model(model_dir, dtype="float32", **kwargs)


def quantized_linears(model):
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, kinds)}, sum(
        isinstance(m, kinds) for m in model.modules())


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@needs_bnb
@pytest.mark.parametrize("bits, weight_dtype, min_cosine", [(8, torch.int8, 0.999), (4, torch.uint8, 0.9)])
def test_quantize_replaces_linears_and_runs(quant_model_dir, reference, bits, weight_dtype, min_cosine):
    import bitsandbytes as bnb

    from baichuan_finetune.tools.generation import build_prompt_ids, make_generation_config
    from baichuan_finetune.model.modeling_baichuan import LINEAR_LAYER_NAMES

    model, tokenizer = load(quant_model_dir)
    assert model.quantize(bits) is model
    names, count = quantized_linears(model)
    assert names == set(LINEAR_LAYER_NAMES) and count == 5 * model.config.num_hidden_layers
    w_pack = model.model.layers[0].self_attn.W_pack
    assert isinstance(w_pack, bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit)
    assert w_pack.weight.dtype == weight_dtype
    assert isinstance(model.lm_head, type(load(quant_model_dir)[0].lm_head))  # the NormHead stays as it is
    ids, ref_logits = reference
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == ref_logits.shape and torch.isfinite(logits).all()
    assert cosine(logits, ref_logits) > min_cosine
    # The quantized model generates: generate's greedy reply is the argmax continuation of plain
    # forward passes through the quantized layers.
    messages = [{"role": "user", "content": "你好"}]
    config = make_generation_config(model, max_new_tokens=4, greedy=True)
    config.repetition_penalty = 1.0  # the reference applies none
    reply = generate_reply(model, tokenizer, messages, config)
    expected = greedy_token_ids(model, build_prompt_ids(model, tokenizer, messages, 4), 4)
    assert reply.token_ids == expected
    assert reply.completion_tokens == len(expected) + (len(expected) < 4)  # the eos counts when it came


@needs_bnb
def test_quantize_a_lora_directory_merges_first(quant_model_dir, tmp_path, reference):
    # An adapter large enough that the base model's logits are far from the adapted ones, so a
    # quantized model that dropped it (peft's unload instead of merge_and_unload) cannot pass.
    lora = make_lora_dir(quant_model_dir, tmp_path / "adapter", scale=2.0)
    ids, base_logits = reference
    with torch.no_grad():
        adapted = load(lora)[0](input_ids=ids).logits  # peft's unmerged float32 forward: the oracle
    assert cosine(base_logits, adapted) < 0.99
    model, _ = load(lora, quantization_bits=8)
    assert not hasattr(model, "peft_config")  # merged, then quantized
    assert quantized_linears(model)[1] == 5 * model.config.num_hidden_layers
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert cosine(logits, adapted) > 0.995  # int8 error grows with the merged weights' size
    assert (logits - adapted).norm() < 0.1 * (base_logits - adapted).norm()  # measured 0.04


@needs_bnb
def test_from_pretrained_with_qlora_config(quant_model_dir, reference):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    config = q.quantization_config_for_qlora(compute_dtype=torch.float32)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    model = AutoModelForCausalLM.from_pretrained(str(quant_model_dir), quantization_config=config, dtype=torch.float32)
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    with torch.no_grad():
        assert cosine(model(input_ids=reference[0]).logits, reference[1]) > 0.9


def test_check_qlora_available_explains_what_is_missing(monkeypatch):
    monkeypatch.setattr(q, "bitsandbytes_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs bitsandbytes"):
        q.check_qlora_available()
    monkeypatch.setattr(q, "bitsandbytes_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU") as info:
        q.check_qlora_available()
    assert "\n" not in str(info.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    q.check_qlora_available()


def test_quantize_errors_without_bitsandbytes(tiny_model_dir, monkeypatch):
    model, _ = load(tiny_model_dir)
    with pytest.raises(ValueError, match="8 or 4"):
        model.quantize(3)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        q.quantize(model, 8)


@needs_bnb
def test_4bit_on_a_shape_the_cpu_kernel_refuses_names_the_layer(tiny_model_dir, tmp_path):
    """The default tiny model (gate/up 128->344): refused in one line on every CPU, nothing replaced."""
    model, _ = load(tiny_model_dir)
    with pytest.raises(ValueError) as info:
        model.quantize(4)
    message = str(info.value)
    assert "\n" not in message and "model.layers.0.mlp.gate_proj is 128->344" in message
    assert "multiple of 32" in message
    assert quantized_linears(model)[1] == 0
    # --quantize 4 of every tool loads through load_model: the same error.
    with pytest.raises(ValueError, match="gate_proj is 128->344"):
        load(tiny_model_dir, quantization_bits=4)


@needs_bnb
def test_importing_bitsandbytes_says_nothing_after_quiet(tmp_path):
    """bitsandbytes warns at import about an optional CPU kernel on avx512_bf16 CPUs (every tool imports
    it through transformers -> peft): after quiet.install() a process that imports it prints nothing."""
    import subprocess

    script = ("import sys; sys.path.insert(0, sys.argv[1])\n"
              "from baichuan_finetune.core import quiet\n"
              "quiet.install()\n"
              "import bitsandbytes, peft\n")
    proc = subprocess.run([sys.executable, "-c", script, str(Path(q.__file__).parents[2])], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == "", proc.stderr
