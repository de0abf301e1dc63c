"""Checkpoints that are known complete, and final output directories that load anywhere.

A checkpoint directory ``checkpoint-N`` counts only once its completion marker exists: the marker is
written last, by the main process, after every process has written its shards. A run killed while
writing a checkpoint therefore never resumes from the half-written one.

The final directory of a full fine-tune holds consolidated safetensors (gathered from ZeRO-3, no
``zero_to_fp32.py``); a LoRA run holds exactly the trained adapter weights. Both also get the
tokenizer, the chat generation config and the model code, so ``from_pretrained(dir,
trust_remote_code=True)`` works where this package is not installed, and one ``model_max_length``
in ``config.json`` and ``tokenizer_config.json``. `finish_output_dir` does that, for training runs
and for merged adapters alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

from .configuration_baichuan import chat_generation_config

CHECKPOINT_PREFIX = "checkpoint"
COMPLETE_MARKER = "checkpoint_complete.json"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")

MODEL_CODE_FILES = ("configuration_baichuan.py", "modeling_baichuan.py", "tokenization_baichuan.py")
# What config.json needs so that AutoConfig/AutoModelForCausalLM find MODEL_CODE_FILES.
AUTO_MAP = {
    "AutoConfig": "configuration_baichuan.BaichuanConfig",
    "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
}
DEFAULT_MODEL_MAX_LENGTH = 4096  # BaichuanConfig's default, for a config.json without the field


# ----- checkpoints -----


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Every ``checkpoint-N`` directory in `output_dir`, complete or not, by increasing N."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step whose completion marker exists (HF's get_last_checkpoint
    would also take one whose writing was interrupted)."""
    complete = [p for p in list_checkpoints(output_dir) if is_complete_checkpoint(p)]
    return complete[-1] if complete else None


def mark_checkpoint_complete(path: str | os.PathLike, global_step: int) -> None:
    """Write the completion marker atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path / f".{COMPLETE_MARKER}.tmp"
    with open(tmp, "w") as f:
        json.dump({"global_step": global_step, "time": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / COMPLETE_MARKER)


# ----- final output directory -----


def is_zero3(trainer) -> bool:
    engine = getattr(trainer, "deepspeed", None)
    if engine is None:
        return False
    return engine.zero_optimization_stage() == 3


def trained_lora_state_dict(trainer) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters, gathered from every ZeRO-3 shard, on CPU, by state-dict name.

    Called on every process: gathering is a collective.
    """
    model = trainer.model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if is_zero3(trainer):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
    else:
        gather = contextlib.nullcontext()
    with gather:
        return {n: p.detach().to("cpu", copy=True) for n, p in named}


def save_lora_adapter(trainer, output_dir: str) -> dict[str, torch.Tensor]:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` holding exactly the trained weights.

    Verifies the file against the gathered weights (non-empty, equal) and returns the saved tensors.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    model = trainer.model
    trained = trained_lora_state_dict(trainer)
    expected = get_peft_model_state_dict(model, state_dict=trained)
    if trainer.args.should_save:
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, state_dict=trained, safe_serialization=True)
        saved = load_file(os.path.join(output_dir, "adapter_model.safetensors"))
        problems = []
        if not saved:
            problems.append("no tensor saved")
        if set(saved) != set(expected):
            problems.append(f"saved keys differ from the trained ones: {sorted(set(saved) ^ set(expected))[:4]}")
        for name, tensor in saved.items():
            if tensor.numel() == 0:
                problems.append(f"{name} is empty")
            elif name in expected and not torch.equal(tensor, expected[name].to(tensor.dtype)):
                problems.append(f"{name} differs from the trained weights")
        if problems:
            raise RuntimeError(f"LoRA adapter saved to {output_dir} is wrong: " + "; ".join(problems[:5]))
    return expected


def output_generation_config(base_dir: str | os.PathLike, model_max_length: int | None = None) -> GenerationConfig:
    """The base model's generation config when it is a chat one, else the official chat config.

    The official one gets ``max_new_tokens = min(2048, model_max_length // 2)``; `model_max_length`
    defaults to the base config's.
    """
    try:
        config = GenerationConfig.from_pretrained(base_dir)
        if getattr(config, "user_token_id", None) is not None:
            return config
    except (OSError, ValueError):
        pass
    if model_max_length is None:
        model_max_length = _read_json(Path(base_dir) / "config.json").get("model_max_length", DEFAULT_MODEL_MAX_LENGTH)
    return chat_generation_config(max_new_tokens=min(2048, model_max_length // 2))


def copy_model_code(output_dir: str | os.PathLike) -> None:
    """Copy the self-contained config/model/tokenizer modules into `output_dir` (for ``trust_remote_code``)."""
    here = Path(__file__).resolve().parent
    for name in MODEL_CODE_FILES:
        shutil.copyfile(here / name, Path(output_dir) / name)


def finish_output_dir(output_dir: str | os.PathLike, tokenizer, generation_config: GenerationConfig,
                      model_max_length: int, is_adapter: bool) -> None:
    """Make a directory holding saved weights load anywhere: add the tokenizer, `generation_config`
    and the model code, and (for a full model) ``auto_map`` in ``config.json``.

    `model_max_length` goes to ``tokenizer_config.json`` and, for a full model, ``config.json``, so
    that both say the same. A training run passes the larger of the base config's and the training
    length. Main process only, after the weights are written.
    """
    out = Path(output_dir)
    tokenizer.save_pretrained(out)
    _update_json(out / "tokenizer_config.json", model_max_length=model_max_length)
    generation_config.save_pretrained(out)
    copy_model_code(out)
    if not is_adapter:
        config = _read_json(out / "config.json")
        auto_map = {**AUTO_MAP, **(config.get("auto_map") or {})}
        _update_json(out / "config.json", auto_map=auto_map, model_max_length=model_max_length)
    # Never left in a final directory: the weights there are already consolidated.
    (out / "zero_to_fp32.py").unlink(missing_ok=True)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def _update_json(path: Path, **values) -> None:
    """Set `values` in the JSON object in `path`; rewritten (sorted, as transformers writes configs)
    only when something changes."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if all(key in data and data[key] == value for key, value in values.items()):
        return
    data.update(values)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def remove_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Delete every ``checkpoint-N`` directory in `output_dir`; return the deleted paths."""
    removed = list_checkpoints(output_dir)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
