"""Official checkpoint layouts load with our code; our saved directories load without our package."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import baichuan_finetune  # noqa: F401  (registers the Auto classes)
from baichuan_finetune.objectives.losses import CausalLMLoss
from baichuan_finetune.model.modeling_baichuan import BaichuanForCausalLM
from test_modeling_baichuan import ref_logits

# The official 7B/13B config.json files (tests/fixtures/configs/SOURCES.md).
CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
# Official directories ship remote code written for transformers 4.29-4.33. Ours must never run it.
BROKEN_REMOTE_CODE = "raise RuntimeError('the official remote code must never be imported')\n"
TINY_SIZES = dict(hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4, vocab_size=211)


def official_dir(tmp_path: Path, which: str, layout: str) -> tuple[Path, dict]:
    """A directory laid out like the official release, with tiny sizes and random weights."""
    config = json.loads((CONFIGS / f"config-{which}.json").read_text())
    config.update(TINY_SIZES)
    out = tmp_path / f"{which}-{layout}"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    for name in ("configuration_baichuan.py", "modeling_baichuan.py", "tokenization_baichuan.py"):
        (out / name).write_text(BROKEN_REMOTE_CODE)

    torch.manual_seed(0)
    state = {
        "model.embed_tokens.weight": torch.randn(211, 32),
        "model.norm.weight": torch.rand(32) + 0.5,
        "lm_head.weight": torch.randn(211, 32),
    }
    for n in range(2):
        p = f"model.layers.{n}."
        state[p + "self_attn.W_pack.weight"] = torch.randn(96, 32)
        state[p + "self_attn.o_proj.weight"] = torch.randn(32, 32)
        state[p + "mlp.gate_proj.weight"] = torch.randn(56, 32)
        state[p + "mlp.up_proj.weight"] = torch.randn(56, 32)
        state[p + "mlp.down_proj.weight"] = torch.randn(32, 56)
        state[p + "input_layernorm.weight"] = torch.rand(32) + 0.5
        state[p + "post_attention_layernorm.weight"] = torch.rand(32) + 0.5
    expected = dict(state)
    if which == "7b":
        # The official 7B code registers its RoPE inv_freq as a persistent buffer.
        for n in range(2):
            state[f"model.layers.{n}.self_attn.rotary_emb.inv_freq"] = torch.rand(4)

    if layout == "sharded-bin":
        keys = sorted(state)
        shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
        weight_map = {}
        for file, shard_keys in shards.items():
            torch.save({k: state[k] for k in shard_keys}, out / file)
            weight_map.update({k: file for k in shard_keys})
        total = sum(t.numel() * 4 for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    elif layout == "single-bin":
        torch.save(state, out / "pytorch_model.bin")
    else:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out, expected


@pytest.mark.parametrize("which", ["7b", "13b"])
@pytest.mark.parametrize("layout", ["sharded-bin", "single-bin", "safetensors"])
def test_official_layouts_load_with_no_missing_or_unexpected_keys(tmp_path, which, layout):
    path, expected = official_dir(tmp_path, which, layout)
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert type(model) is BaichuanForCausalLM
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert model.config.position_embedding == ("rope" if which == "7b" else "alibi")
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key
    assert AutoConfig.from_pretrained(path).model_type == "baichuan"
    # The loaded model computes the published math on the checkpoint's weights: RoPE from positions
    # (the 7B file's random inv_freq buffers are ignored) or the 13B ALiBi slopes.
    checkpoint = type("Checkpoint", (), {"config": model.config, "state_dict": lambda self: expected})()
    ids = [5, 17, 42, 99, 7, 150, 33, 8]
    with torch.no_grad():
        logits = model.eval()(torch.tensor([ids])).logits[0].double()
    assert (logits - ref_logits(checkpoint, ids)).abs().max() < 1e-4


def test_saved_directory_records_resolved_position_embedding(tmp_path):
    path, _ = official_dir(tmp_path, "13b", "safetensors")
    model = AutoModelForCausalLM.from_pretrained(path)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["position_embedding"] == "alibi"
    assert saved["model_type"] == "baichuan"
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_baichuan.BaichuanForCausalLM"
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    for name in ("configuration_baichuan.py", "modeling_baichuan.py"):
        assert "never be imported" not in (tmp_path / "saved" / name).read_text()


FRESH_PROCESS = """
import sys, json, torch
sys.modules["baichuan_finetune"] = None  # this process must not be able to import our package
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
ids = torch.tensor([tok.encode("hello world, 你好")])
with torch.no_grad():
    logits = model(ids).logits
loss = model(ids, labels=ids).loss  # the model file's own loss: our package is not importable here
loss.backward()
print(json.dumps({"ids": ids[0].tolist(), "logits": logits[0, :, :5].tolist(), "loss": loss.item(),
                  "head_grad": model.lm_head.weight.grad.abs().sum().item(),
                  "model_module": type(model).__module__, "tok_module": type(tok).__module__}))
"""


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_alibi_model_dir"])
def test_saved_directory_loads_in_a_process_without_our_package(request, fixture, tmp_path):
    path = request.getfixturevalue(fixture)
    out = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(path)],
        capture_output=True, text=True, cwd=tmp_path, check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["model_module"].startswith("transformers_modules.")
    assert result["tok_module"].startswith("transformers_modules.")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert tok.encode("hello world, 你好") == result["ids"]
    ids = torch.tensor([result["ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0, :, :5]
    assert torch.allclose(logits, torch.tensor(result["logits"]), atol=1e-5)
    # The fallback loss there equals the training loss here, gradients included.
    loss = model(ids, labels=ids, head_loss=CausalLMLoss(model.config.z_loss_weight)).loss
    loss.backward()
    assert loss.item() == pytest.approx(result["loss"], abs=1e-5)
    assert model.lm_head.weight.grad.abs().sum().item() == pytest.approx(result["head_grad"], rel=1e-4)


def test_device_map_loading_in_bfloat16_matches_float32(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, device_map="cpu", dtype=torch.bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert model.dtype == torch.bfloat16
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    # Every saved weight arrived, rounded to bfloat16 (none left at its initial value).
    reference_state = reference.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference_state[name].to(torch.bfloat16)), name
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        logits = model(ids).logits.float()
        expected = reference(ids).logits
    assert (logits - expected).abs().max().item() < 0.1
