"""Load any model directory the toolkit reads or writes, for the tools (chat, server, evaluation, merge).

Three kinds of directory, told apart by their files:

- a base model or a full fine-tune: ``config.json`` + weights, loaded by ``AutoModelForCausalLM``
  (our native classes, registered by importing this package);
- a LoRA adapter: ``adapter_config.json`` present, loaded by ``peft.AutoPeftModelForCausalLM`` on
  top of the base named in ``base_model_name_or_path``.

`check_model_dir` checks a directory before anything is loaded (valid JSON configs, weights present
and structurally whole, a tokenizer, an adapter's base), so the tools fail in one line naming the
file instead of in a traceback from deep inside a loader.

No code from a directory ever runs: every transformers call passes ``trust_remote_code=False`` (left
out, transformers asks on stdin, and a "yes" piped into a tool would run the directory's module), and
a directory whose config names code that is not ours (`preflight.foreign_code`) is refused in one
line by `check_model_dir` and by `load_model` itself.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import baichuan_finetune  # noqa: F401  (registers our Auto classes)

from ..core import json_files
from ..objectives.attention import check_available, kernel_name
from ..model.configuration_baichuan import chat_generation_config
from ..options.plan import PRECISIONS
from ..options.arguments import UsageError
from ..training.preflight import check_model_dir as check_model_files
from ..training.preflight import foreign_code
from ..checkpoints.weight_files import ADAPTER_WEIGHT_FILES, WeightFilesError, check_weights
from ..core.errors import UsageFault

ADAPTER_CONFIG = "adapter_config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILE = "tokenizer.model"
# The one list of --dtype choices of every tool; "auto" keeps the dtype the weights are stored in.
DTYPES = {"auto": "auto", **{name: getattr(torch, name) for name, _ in PRECISIONS.values()}}
QUANTIZATION_BITS = (8, 4)


# ----- validation before loading: one line naming the file, never a traceback from deep in a loader -----


class ModelDirError(ValueError, UsageFault):
    """A directory a tool cannot load; the message is one line naming the flag or file."""


def one_line(error: BaseException) -> str:
    """``Type: first line of the message``, for errors reported as one line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def creation_problem(path: str | os.PathLike) -> str | None:
    """Why `path` (a file or directory to be made, with any missing parents) cannot be created here:
    its nearest existing ancestor is a file or not writable; None when it can. Checked before loading."""
    ancestor = Path(path).resolve()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable"
    return None


def read_json_object(path: Path) -> dict:
    """A JSON object from `path`, or `ModelDirError` naming the file."""
    try:
        return json_files.read_json_object(path)
    except json_files.JSONObjectError as e:
        raise ModelDirError(str(e)) from None


def resolve_base_dir(name_or_path: str, adapter_dir: Path) -> Path:
    """The local directory of an adapter's base: a path, or a hub name already in the local cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:
        raise ModelDirError(f"{adapter_dir / ADAPTER_CONFIG}: its base model {name_or_path} is not a directory "
                            "here (nor in the local hub cache)") from None


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """``adapter_config.json`` of a LoRA adapter, checked: a JSON object, LoRA, with a base model."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    config = read_json_object(path)
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ModelDirError(f"{path}: no base_model_name_or_path")
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelDirError(f"{path}: peft_type {config.get('peft_type')!r}, not a LoRA adapter")
    return config


def _check_weights(model_dir: Path, names: tuple[str, ...], what: str) -> None:
    try:
        check_weights(model_dir, names, what)
    except WeightFilesError as e:
        raise ModelDirError(str(e)) from None


def _check_code(config_dir: Path, tokenizer_dir: Path | None = None) -> None:
    """Refuse `config_dir` when its config.json, or the tokenizer_config.json of `tokenizer_dir` (default:
    the same directory), names model code that is not ours: one line naming the file."""
    config_file = config_dir / "config.json"
    config = read_json_object(config_file)
    tokenizer_file = (tokenizer_dir or config_dir) / "tokenizer_config.json"
    tokenizer_config = read_json_object(tokenizer_file) if tokenizer_file.is_file() else None
    problem = foreign_code(config, tokenizer_config)
    if problem:
        raise ModelDirError(f"{config_file}: {problem}")


def check_own_code(model_dir: str | Path) -> None:
    """Refuse (`ModelDirError`, one line) a model or adapter directory, or an adapter's base, whose files
    name model code that is not this toolkit's: nothing of it is imported."""
    model_dir = Path(model_dir)
    if (model_dir / ADAPTER_CONFIG).is_file():
        base_dir = resolve_base_dir(read_adapter_config(model_dir)["base_model_name_or_path"], model_dir)
        _check_code(base_dir)
        _check_code(base_dir, tokenizer_dir=model_dir)
    else:
        _check_code(model_dir)


def _check_full_model(model_dir: Path, flag: str, tokenizer: bool) -> None:
    """`preflight.check_model_dir` (training's check: config, our code only, tokenizer, weights) as `ModelDirError`."""
    try:
        check_model_files(model_dir, flag=flag, tokenizer=tokenizer)
    except UsageError as e:
        raise ModelDirError(str(e)) from None


def check_model_dir(path: str | os.PathLike, flag: str = "--model") -> str:
    """Check that `path` is a directory the tools can load, before loading it; its kind (`model_kind`).

    Config files must be valid JSON, weights present and structurally whole (shards of an index
    included), a tokenizer at hand; for an adapter, its base model too. Raises `ModelDirError`.
    """
    model_dir = Path(path)
    if not model_dir.exists():
        raise ModelDirError(f"{flag} {path}: no such directory")
    if not model_dir.is_dir():
        raise ModelDirError(f"{flag} {path}: not a directory")
    if (model_dir / ADAPTER_CONFIG).is_file():
        config = read_adapter_config(model_dir)
        _check_weights(model_dir, ADAPTER_WEIGHT_FILES, "LoRA adapter")
        base_dir = resolve_base_dir(config["base_model_name_or_path"], model_dir)
        if (base_dir / ADAPTER_CONFIG).is_file():
            raise ModelDirError(f"{model_dir / ADAPTER_CONFIG}: its base model {base_dir} is itself an adapter")
        if not (base_dir / "config.json").is_file():
            raise ModelDirError(f"{model_dir / ADAPTER_CONFIG}: its base model {base_dir} has no config.json")
        _check_full_model(base_dir, flag, tokenizer=False)
        _check_code(base_dir, tokenizer_dir=model_dir)
        if not (model_dir / TOKENIZER_FILE).is_file() and not (base_dir / TOKENIZER_FILE).is_file():
            raise ModelDirError(f"{flag} {path}: no {TOKENIZER_FILE} here nor in its base model {base_dir}")
        return "lora"
    if (model_dir / "config.json").is_file():
        _check_full_model(model_dir, flag, tokenizer=True)
        return "model"
    raise ModelDirError(f"{flag} {path}: neither {ADAPTER_CONFIG} (LoRA adapter) nor config.json (model) found")


class ToolArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``prog: error: ...``), exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")

    def fail(self, message: str, code: int = 1):
        """A fault found while working (the flags were fine): one line, exit `code`."""
        self.exit(code, f"{self.prog}: error: {message}\n")


def load_model_or_exit(parser: ToolArgumentParser, model_dir: str | Path, **kwargs):
    """`load_model` for a tool: a failure that survived `check_model_dir` is one line, exit 1."""
    try:
        return load_model(model_dir, **kwargs)
    except Exception as e:  # loaders raise OSError, ValueError, SafetensorError, RuntimeError...
        parser.fail(f"cannot load {model_dir}: {one_line(e)}")


def model_kind(model_dir: str | Path) -> str:
    """``"lora"`` for a PEFT adapter directory, ``"model"`` for a base model or full fine-tune."""
    model_dir = Path(model_dir)
    if (model_dir / ADAPTER_CONFIG).is_file():
        return "lora"
    if (model_dir / "config.json").is_file():
        return "model"
    raise FileNotFoundError(f"{model_dir}: neither {ADAPTER_CONFIG} (LoRA adapter) nor config.json (model) found")


def adapter_base_dir(adapter_dir: str | Path) -> str:
    """``base_model_name_or_path`` of a LoRA adapter directory."""
    config = read_json_object(Path(adapter_dir) / ADAPTER_CONFIG)
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir}/{ADAPTER_CONFIG} has no base_model_name_or_path")
    return base


def resolve_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype:
    """The ``dtype`` argument for ``from_pretrained``: a ``DTYPES`` name, a torch dtype, or None for "auto"."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_tokenizer(model_dir: str | Path):
    """The tokenizer saved with ``model_dir``; for an adapter without one, its base model's."""
    model_dir = Path(model_dir)
    source = model_dir
    if model_kind(model_dir) == "lora" and not (model_dir / TOKENIZER_FILE).is_file():
        source = adapter_base_dir(model_dir)
    return AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)


def load_model(
    model_dir: str | Path,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = None,
    quantization_bits: int | None = None,
    attn_implementation: str | None = None,
):
    """Model (a ``PeftModel`` for an adapter directory) and tokenizer, in eval mode.

    ``attn_implementation`` is one of ``attention.IMPLEMENTATIONS`` (None: sdpa); one that cannot run
    on ``device`` here raises ``ValueError`` (one line) before anything is loaded. Decoding with a
    cache runs on sdpa for the kernels that cover only full sequences.

    ``quantization_bits`` (8 or 4) quantizes the linear layers with bitsandbytes after loading
    (LoRA adapters are merged first: quantized weights cannot take a LoRA delta).
    """
    model_dir = Path(model_dir)
    kind = model_kind(model_dir)
    check_own_code(model_dir)  # callers that skipped check_model_dir too
    dtype = resolve_dtype(dtype)
    # Without a device the weights stay where from_pretrained puts them: the CPU.
    check_available(attn_implementation or "sdpa", torch.device(device or "cpu").type, training=False)
    attention = {"attn_implementation": kernel_name(attn_implementation)}
    if kind == "lora":
        from peft import AutoPeftModelForCausalLM
        from peft.auto import get_default_import_allowlist

        # An adapter saved without task_type names its base class by module: allow ours.
        allowlist = [*get_default_import_allowlist(), "baichuan_finetune"]
        model = AutoPeftModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, import_allowlist=allowlist,
                                                         trust_remote_code=False, **attention)
        has_own = (model_dir / GENERATION_CONFIG).is_file()
        generation_source = model_dir if has_own else Path(adapter_base_dir(model_dir))
        model.get_base_model().generation_config = _load_generation_config(generation_source)
        if quantization_bits:
            model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, trust_remote_code=False,
                                                     **attention)
        model.generation_config = _load_generation_config(model_dir)
    if device:
        model.to(device)
    if quantization_bits:
        from ..objectives.quantize import quantize

        model = quantize(model, quantization_bits)
    model.eval()
    return model, load_tokenizer(model_dir)


def _load_generation_config(model_dir: Path) -> GenerationConfig:
    """The saved generation config, or the official chat one where the directory has none."""
    if (Path(model_dir) / GENERATION_CONFIG).is_file():
        return GenerationConfig.from_pretrained(str(model_dir))
    return chat_generation_config()


def chat_model(model):
    """The model whose ``chat()``/``generate()`` to call: for a ``PeftModel`` its base model.

    PEFT injects the LoRA layers into the base model's modules in place, so the base model's
    forward (hence ``chat``) runs with the adapter active.
    """
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every tool that loads a model shares: ``--model``, ``--dtype``, ``--device``, ``--quantize``.

    Their values go to ``load_model(args.model, dtype=args.dtype, device=args.device,
    quantization_bits=args.quantize)``.
    """
    parser.add_argument("--model", required=True, help="model directory: base, full fine-tune or LoRA adapter")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES),
                        help="weights dtype (auto: as the checkpoint is stored)")
    parser.add_argument("--device", default=None, help="e.g. cuda, cuda:0, cpu (default: where it loads)")
    parser.add_argument("--quantize", type=int, choices=QUANTIZATION_BITS, default=None,
                        help="bitsandbytes 8/4-bit (GPU)")
