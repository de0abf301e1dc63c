"""loading.py: the three kinds of model directory, dtypes, the loaders and the shared tool flags."""

import argparse
import json
import shutil

import pytest
import torch
from tools_helpers import make_lora_dir
from transformers import GenerationConfig

from baichuan_finetune.model.configuration_baichuan import chat_generation_config
from baichuan_finetune.tools.loading import (
    DTYPES,
    add_model_arguments,
    adapter_base_dir,
    chat_model,
    load_model,
    load_tokenizer,
    model_kind,
    resolve_dtype,
)


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory):
    return make_lora_dir(tiny_model_dir, tmp_path_factory.mktemp("loading") / "adapter")


@pytest.fixture(scope="module")
def full_dir(tiny_model_dir, tmp_path_factory):
    """A full fine-tune's directory: saved weights and config, no generation_config.json."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("loading") / "full"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model.save_pretrained(out)
    (out / "generation_config.json").unlink(missing_ok=True)
    load_tokenizer(tiny_model_dir).save_pretrained(out)
    return out


def test_model_kind_detection(tiny_model_dir, full_dir, lora_dir, tmp_path):
    assert model_kind(tiny_model_dir) == "model"
    assert model_kind(full_dir) == "model"
    assert model_kind(lora_dir) == "lora"
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        model_kind(tmp_path)


def test_adapter_base_dir(tiny_model_dir, lora_dir, tmp_path):
    assert adapter_base_dir(lora_dir) == str(tiny_model_dir)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(ValueError, match="no base_model_name_or_path"):
        adapter_base_dir(tmp_path)


def test_resolve_dtype():
    assert resolve_dtype("auto") == "auto"
    assert resolve_dtype(None) == "auto"
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="choose from auto, float32, bfloat16, float16"):
        resolve_dtype("fp8")


def test_load_model_of_a_full_directory(tiny_model_dir, full_dir):
    from baichuan_finetune.model.modeling_baichuan import BaichuanForCausalLM

    model, tokenizer = load_model(full_dir, dtype="bfloat16")
    assert type(model) is BaichuanForCausalLM and not model.training
    assert model.dtype == torch.bfloat16
    assert chat_model(model) is model
    # No generation_config.json: the official chat config.
    assert model.generation_config.to_dict() == chat_generation_config().to_dict()
    assert tokenizer.encode("你好") == load_tokenizer(tiny_model_dir).encode("你好")
    # The base directory's own generation config is used where there is one.
    base, _ = load_model(tiny_model_dir)
    assert base.generation_config.to_dict() == GenerationConfig.from_pretrained(str(tiny_model_dir)).to_dict()


def test_load_model_of_an_adapter_directory(tiny_model_dir, lora_dir):
    from peft import PeftModel

    from baichuan_finetune.model.modeling_baichuan import BaichuanForCausalLM

    model, tokenizer = load_model(lora_dir, dtype="float32")
    assert isinstance(model, PeftModel) and not model.training
    base = chat_model(model)
    assert type(base) is BaichuanForCausalLM and base is model.get_base_model()
    assert base.dtype == torch.float32
    # The adapter has no generation_config.json: its base model's.
    assert base.generation_config.to_dict() == GenerationConfig.from_pretrained(str(tiny_model_dir)).to_dict()
    assert tokenizer.encode("你好") == load_tokenizer(tiny_model_dir).encode("你好")


def test_lora_active_in_base_model_chat_path(lora_dir):
    """chat() of the PeftModel's base model runs with the adapter: same logits as the PeftModel."""
    peft_model, tokenizer = load_model(lora_dir, dtype="float32")
    ids = torch.tensor([tokenizer.encode("测试一下")])
    with torch.no_grad():
        torch.testing.assert_close(chat_model(peft_model)(input_ids=ids).logits, peft_model(input_ids=ids).logits)


def test_adapter_without_tokenizer_uses_the_base_tokenizer(tiny_model_dir, lora_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(lora_dir / name, bare / name)
    assert load_tokenizer(bare).encode("你好") == load_tokenizer(tiny_model_dir).encode("你好")


def test_add_model_arguments(capsys):
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args(["--model", "output/lora"])
    assert vars(args) == {"model": "output/lora", "dtype": "auto", "device": None, "quantize": None}
    args = parser.parse_args(["--model", "m", "--dtype", "bfloat16", "--device", "cuda:0", "--quantize", "4"])
    assert (args.dtype, args.device, args.quantize) == ("bfloat16", "cuda:0", 4)
    for bad, error in ((["--dtype", "float32"], "required: --model"),
                       (["--model", "m", "--dtype", "fp8"], "invalid choice: 'fp8'"),
                       (["--model", "m", "--quantize", "3"], "invalid choice: 3")):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
        assert error in capsys.readouterr().err
    dtype_action = next(a for a in parser._actions if a.dest == "dtype")
    assert list(dtype_action.choices) == list(DTYPES)  # the one list of dtypes


# ----- no code from a model directory ever runs -----

EVIL_MODULE = '''from pathlib import Path
Path(__file__).with_name("MARKER").write_text("imported")
from transformers import PretrainedConfig, PreTrainedModel
class EvilConfig(PretrainedConfig):
    model_type = "evil"
class EvilModel(PreTrainedModel):
    config_class = EvilConfig
'''


def custom_code_dir(tiny_model_dir, out, model_type: str):
    """The tiny model's files with a config naming its own module, which writes MARKER when imported."""
    shutil.copytree(tiny_model_dir, out)
    (out / "evil.py").write_text(EVIL_MODULE)
    config = json.loads((out / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig",
                                                   "AutoModelForCausalLM": "evil.EvilModel"})
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("model_type", ["evil", "baichuan"])
@pytest.mark.parametrize("tool", ["chat", "train"])
def test_custom_code_never_runs_with_yes_on_stdin(tool, model_type, tiny_model_dir, tmp_path):
    """A "yes" on stdin answers transformers' trust-remote-code prompt; the prompt must never come."""
    import subprocess
    import sys

    from tools_helpers import REPO_ROOT, SCRIPTS, script_env

    model_dir = custom_code_dir(tiny_model_dir, tmp_path / "custom", model_type)
    if tool == "chat":
        cmd = [sys.executable, str(SCRIPTS / "cli_demo.py"), "--model", str(model_dir)]
    else:
        data = tmp_path / "d.json"
        data.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"},
                                                       {"from": "gpt", "value": "hello"}]}] * 2))
        cmd = [sys.executable, str(REPO_ROOT / "fine-tune" / "fine-tune.py"), "--model_name_or_path", str(model_dir),
               "--data_path", str(data), "--output_dir", str(tmp_path / "out"), "--report_to", "none",
               "--use_cpu", "True"]
    proc = subprocess.run(cmd, input="yes\nyes\nyes\n", capture_output=True, text=True, env=script_env(),
                          timeout=300)
    assert not (model_dir / "MARKER").exists(), "the directory's module was imported"
    prog = "cli_demo.py:" if tool == "chat" else "fine-tune.py:"
    lines = [line for line in proc.stderr.splitlines() if line.startswith(prog)]  # (library noise: issue 16.11)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(model_dir / "config.json") in lines[0]
    assert ("model_type \"evil\"" if model_type == "evil" else "auto_map names code") in lines[0]


def test_own_and_official_code_names_are_accepted(tiny_model_dir, fixtures_dir):
    """Official Baichuan2 configs name modules with our names: accepted (our code is what runs)."""
    from baichuan_finetune.training.preflight import foreign_code

    for name in ("config-7b.json", "config-13b.json"):
        config = json.loads((fixtures_dir / "configs" / name).read_text())
        tokenizer_config = json.loads((fixtures_dir / "baichuan2" / "tokenizer_config.json").read_text())
        assert foreign_code(config, tokenizer_config) is None
    assert "auto_map" in foreign_code({"model_type": "baichuan"}, {"auto_map": {"AutoTokenizer": ["x.Tok", None]}})
    assert "auto_map" in foreign_code({"model_type": "baichuan", "auto_map": {"AutoConfig": "other--mod.C"}})


def test_load_model_refuses_custom_code_without_check_model_dir(tiny_model_dir, tmp_path):
    """evaluate and merge call load_model directly: it refuses by itself, importing nothing."""
    from baichuan_finetune.tools.loading import ModelDirError

    model_dir = custom_code_dir(tiny_model_dir, tmp_path / "custom", "evil")
    with pytest.raises(ModelDirError, match="model_type"):
        load_model(model_dir)
    assert not (model_dir / "MARKER").exists()


@pytest.mark.parametrize("change, message", [
    ({"num_attention_heads": 0}, '"num_attention_heads" 0: expected a whole number >= 1'),
    ({"position_embedding": "xpos"}, '"position_embedding" "xpos": expected "rope" or "alibi"'),
])
def test_tools_and_training_check_a_model_directory_alike(tiny_model_dir, lora_dir, tmp_path, change, message):
    # One check (preflight.check_model_dir): what training refuses, the tools refuse in the same words,
    # for a model directory and for an adapter's base.
    from baichuan_finetune.options.arguments import UsageError
    from baichuan_finetune.tools.loading import ModelDirError, check_model_dir
    from baichuan_finetune.training.preflight import check_model

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UsageError) as training:
        check_model(str(bad))
    with pytest.raises(ModelDirError) as tools:
        check_model_dir(bad)
    assert str(tools.value) == str(training.value).replace("--model_name_or_path", "--model")
    assert message in str(tools.value)
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_dir, adapter)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": str(bad)}))
    with pytest.raises(ModelDirError, match=message.replace('"', '.')):
        check_model_dir(adapter)
    assert check_model_dir(tiny_model_dir) == "model" and check_model_dir(lora_dir) == "lora"
