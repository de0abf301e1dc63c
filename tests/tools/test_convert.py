"""scripts/convert_lm_head.py on single-file and sharded checkpoints."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from baichuan_finetune.tools.convert import convert_lm_head, load_weights
from baichuan_finetune.checkpoints.weight_files import weight_files

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("sharded", [False, True])
def test_convert_lm_head_normalises_rows_and_keeps_logits(tmp_path, tiny_model_dir, sharded):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    src = tmp_path / "src"
    model.save_pretrained(src)
    if sharded:  # sharded .bin + index, as the official release ships
        (src / "model.safetensors").unlink()
        state = model.state_dict()
        keys = sorted(state)
        weight_map = {}
        for n, part in enumerate((keys[::2], keys[1::2]), start=1):
            name = f"pytorch_model-0000{n}-of-00002.bin"
            torch.save({k: state[k] for k in part}, src / name)
            weight_map.update({k: name for k in part})
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    dst = tmp_path / "dst"
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "convert_lm_head.py"), str(src), str(dst), "--max_shard_size", "1MB"],
        capture_output=True, text=True, check=True,
    )
    assert "normalised" in out.stdout
    files = weight_files(dst)
    assert all(f.suffix == ".safetensors" for f in files)
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    norms = state["lm_head.weight"].norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    original = load_weights(weight_files(src)[0]) if not sharded else None
    if original is not None:
        assert torch.allclose(state["lm_head.weight"], F.normalize(original["lm_head.weight"], dim=-1))
    converted = AutoModelForCausalLM.from_pretrained(dst).eval()
    ids = torch.tensor([[5, 9, 200, 31]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, converted(ids).logits, atol=1e-5)
    assert json.loads((dst / "config.json").read_text())["model_type"] == "baichuan"


def test_convert_refuses_same_directory(tiny_model_dir):
    with pytest.raises(ValueError, match="must differ"):
        convert_lm_head(tiny_model_dir, tiny_model_dir)


def test_convert_refuses_a_truncated_checkpoint_in_one_line(tmp_path, tiny_model_dir):
    src = tmp_path / "src"
    src.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.is_file():
            (src / f.name).write_bytes(f.read_bytes())
    with open(src / "model.safetensors", "r+b") as f:
        f.truncate((src / "model.safetensors").stat().st_size // 2)
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "convert_lm_head.py"), str(src), str(tmp_path / "dst")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"convert_lm_head: {src / 'model.safetensors'}: not a complete safetensors file (truncated"), proc.stderr
    assert not (tmp_path / "dst").exists()
