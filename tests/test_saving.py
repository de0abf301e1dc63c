"""saving.py: complete checkpoints, finished output directories, the model code, LoRA adapter checks."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import baichuan_finetune
from baichuan_finetune import saving
from baichuan_finetune.configuration_baichuan import chat_generation_config

PACKAGE_DIR = Path(baichuan_finetune.__file__).resolve().parent
CODE_FILES = ("configuration_baichuan.py", "modeling_baichuan.py", "tokenization_baichuan.py")


# ----- checkpoints -----


def test_last_complete_checkpoint_skips_interrupted_ones(tmp_path):
    for step in (2, 4, 10, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-x").mkdir()
    assert saving.last_complete_checkpoint(tmp_path) is None
    saving.mark_checkpoint_complete(tmp_path / "checkpoint-4", 4)
    saving.mark_checkpoint_complete(tmp_path / "checkpoint-10", 10)
    # checkpoint-12 was being written when the run died: numerically last, but not complete.
    assert saving.last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert [p.name for p in saving.list_checkpoints(tmp_path)] == [f"checkpoint-{s}" for s in (2, 4, 10, 12)]
    assert json.loads((tmp_path / "checkpoint-10" / saving.COMPLETE_MARKER).read_text())["global_step"] == 10


def test_checkpoint_listing_and_markers(tmp_path):
    assert saving.list_checkpoints(tmp_path / "absent") == []
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-20").write_text("a file, not a checkpoint directory")
    (tmp_path / "checkpoint-007").mkdir()  # numbered like one: sorted by number, not by name
    assert [p.name for p in saving.list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-007"]
    assert not saving.is_complete_checkpoint(tmp_path / "checkpoint-3")
    saving.mark_checkpoint_complete(tmp_path / "checkpoint-3", 3)
    assert saving.is_complete_checkpoint(tmp_path / "checkpoint-3")
    # Written atomically: only the marker is left, no temporary file.
    assert sorted(p.name for p in (tmp_path / "checkpoint-3").iterdir()) == [saving.COMPLETE_MARKER]
    assert saving.last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-3"


def test_remove_checkpoints_removes_only_checkpoints(tmp_path):
    for name in ("checkpoint-1", "checkpoint-2", "checkpoint-final", "logs"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-2" / "weights.bin").write_bytes(b"x")
    removed = saving.remove_checkpoints(tmp_path)
    assert [p.name for p in removed] == ["checkpoint-1", "checkpoint-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-final", "logs"]


# ----- finished output directories -----


def test_copy_model_code(tmp_path):
    saving.copy_model_code(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(CODE_FILES)
    for name in CODE_FILES:
        assert (tmp_path / name).read_bytes() == (PACKAGE_DIR / name).read_bytes(), name


def _weights_dir(tiny_model_dir: Path, out: Path, **config_changes) -> Path:
    """What save_pretrained leaves before finishing: config.json (and weights), plus a stray zero_to_fp32.py."""
    out.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config.pop("auto_map", None)
    config.update(config_changes)
    (out / "config.json").write_text(json.dumps(config))
    (out / "zero_to_fp32.py").write_text("# written by DeepSpeed\n")
    return out


def test_finish_full_output_dir(tiny_model_dir, tmp_path):
    out = _weights_dir(tiny_model_dir, tmp_path / "out", auto_map={"AutoTokenizer": ["x.Tok", None]})
    # The training run's tokenizer carries the training length (128), the base config 512.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, model_max_length=128, use_fast=False)
    generation = saving.output_generation_config(tiny_model_dir)
    saving.finish_output_dir(out, tokenizer, generation, model_max_length=512, is_adapter=False)
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json", *CODE_FILES):
        assert (out / name).is_file(), name
    assert not (out / "zero_to_fp32.py").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                                  "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
                                  "AutoTokenizer": ["x.Tok", None]}  # entries already there are kept
    assert config["model_max_length"] == 512
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 512
    assert AutoTokenizer.from_pretrained(out).model_max_length == 512
    assert json.loads((out / "generation_config.json").read_text())["user_token_id"] == 195


def test_finish_output_dir_writes_a_longer_training_length_to_both(tiny_model_dir, tmp_path):
    out = _weights_dir(tiny_model_dir, tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, model_max_length=1024, use_fast=False)
    saving.finish_output_dir(out, tokenizer, saving.output_generation_config(tiny_model_dir), 1024, is_adapter=False)
    assert json.loads((out / "config.json").read_text())["model_max_length"] == 1024
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 1024


def test_finish_adapter_output_dir(tiny_model_dir, tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, model_max_length=128, use_fast=False)
    saving.finish_output_dir(out, tokenizer, saving.output_generation_config(tiny_model_dir), 512, is_adapter=True)
    assert not (out / "config.json").exists()  # an adapter has its base's config
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 512
    for name in ("adapter_config.json", "tokenizer.model", "generation_config.json", *CODE_FILES):
        assert (out / name).is_file(), name


def test_output_generation_config(tiny_model_dir, tmp_path):
    # The tiny base has a chat generation config (max_new_tokens 512 // 4): it is kept as is.
    kept = saving.output_generation_config(tiny_model_dir, model_max_length=128)
    assert (kept.user_token_id, kept.max_new_tokens) == (195, 128)
    # A base without one gets the official chat config, replies up to half the length (at most 2048).
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_max_length": 512}))
    official = saving.output_generation_config(base, model_max_length=128)
    assert official.to_diff_dict() == chat_generation_config(max_new_tokens=64).to_diff_dict()
    assert (official.user_token_id, official.assistant_token_id, official.top_k) == (195, 196, 5)
    assert saving.output_generation_config(base).max_new_tokens == 256  # the base config's length
    (base / "config.json").write_text("{}")
    assert saving.output_generation_config(base).max_new_tokens == 2048  # BaichuanConfig's 4096 // 2
    assert saving.output_generation_config(base, model_max_length=8192).max_new_tokens == 2048


# ----- LoRA adapters -----


@pytest.fixture
def lora_trainer(tiny_model_dir):
    """What save_lora_adapter reads of a Trainer, around a LoRA model with non-zero lora_B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["W_pack"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return SimpleNamespace(model=model, args=SimpleNamespace(should_save=True), deepspeed=None)


def test_save_lora_adapter_writes_exactly_the_trained_weights(lora_trainer, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "adapter"
    expected = saving.save_lora_adapter(lora_trainer, str(out))
    saved = load_file(out / "adapter_model.safetensors")
    hidden = 128
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        f"base_model.model.model.layers.{i}.self_attn.W_pack.lora_{ab}.weight": shape
        for i in range(2) for ab, shape in (("A", (2, hidden)), ("B", (3 * hidden, 2)))
    }
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    trained = {n: p for n, p in lora_trainer.model.named_parameters() if p.requires_grad}
    assert len(trained) == 4 and all(torch.equal(trained[n], saved[n.replace(".default", "")]) for n in trained)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2


def test_save_lora_adapter_refuses_a_wrong_file(lora_trainer, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    model = lora_trainer.model
    save_pretrained = model.save_pretrained

    def save_then_corrupt(output_dir, **kwargs):
        save_pretrained(output_dir, **kwargs)
        path = Path(output_dir) / "adapter_model.safetensors"
        tensors = load_file(path)
        first = sorted(tensors)[0]
        tensors[first] = tensors[first] + 1
        save_file(tensors, path)

    monkeypatch.setattr(model, "save_pretrained", save_then_corrupt)
    with pytest.raises(RuntimeError, match=r"LoRA adapter saved to .* is wrong: .*differs from the trained weights"):
        saving.save_lora_adapter(lora_trainer, str(tmp_path / "adapter"))


def test_save_lora_adapter_writes_only_on_the_saving_process(lora_trainer, tmp_path):
    lora_trainer.args.should_save = False
    expected = saving.save_lora_adapter(lora_trainer, str(tmp_path / "adapter"))
    assert len(expected) == 4 and not (tmp_path / "adapter").exists()


def test_nothing_in_training_or_saving_imports_tiny():
    for name in ("arguments.py", "lora.py", "trainer.py", "saving.py", "train.py", "modeling_baichuan.py"):
        assert ".tiny" not in (PACKAGE_DIR / name).read_text(), name
