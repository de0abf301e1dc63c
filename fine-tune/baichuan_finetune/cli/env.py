"""What this installation has, paste-able into a bug report: Python and the libraries' versions, CUDA
and its devices, which attention kernels can run here, and what each optional extra enables.

    baichuan-finetune env
    baichuan-finetune env --json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import sys
from typing import Any, Sequence

from .config import parse_with_config

LIBRARIES = ("torch", "transformers", "deepspeed", "peft", "datasets", "accelerate", "sentencepiece",
             "safetensors", "pyyaml", "nltk", "jieba", "rouge-chinese")
# The optional extras (requirements-*.txt in the repository): what each enables, and the packages it needs.
EXTRAS = {
    "tools (requirements-tools.txt)": (
        "serve/web (OpenAI-compatible API and browser chat), their tests, --report_to wandb",
        ("fastapi", "uvicorn", "openai", "pexpect", "playwright", "wandb")),
    "quant (requirements-quant.txt)": (
        "--quantize 8|4 in chat/serve/web/eval, QLoRA training (--q_lora True, CUDA only)",
        ("bitsandbytes",)),
    "export (requirements-export.txt)": (
        "export --format gguf (llama.cpp, Ollama, LM Studio) and its quantized types",
        ("gguf", "llama_cpp")),
    "kernels (pip install flash-attn / xformers)": (
        "--attn_implementation flash_attention_2 / xformers (CUDA only)",
        ("flash_attn", "xformers")),
}


def version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def report() -> dict[str, Any]:
    """Everything `main` prints, as a dict."""
    from pathlib import Path

    where = Path(__file__).resolve().parents[1]
    info: dict[str, Any] = {"baichuan-finetune": f"{version('baichuan-finetune') or 'not installed'} ({where})",
                            "python": sys.version.split()[0], "platform": platform.platform()}
    info["libraries"] = {name: version(name) or "not installed" for name in LIBRARIES}
    try:
        import torch

        cuda = torch.cuda.is_available()
        info["cuda"] = {"available": cuda, "torch built for": torch.version.cuda or "no CUDA (CPU build)",
                        "devices": [f"{i}: {torch.cuda.get_device_name(i)}, "
                                    f"{torch.cuda.get_device_properties(i).total_memory / 2**30:.1f} GiB"
                                    for i in range(torch.cuda.device_count())] if cuda else []}
        from ..objectives.attention import IMPLEMENTATIONS, check_available

        kernels = {}
        for name in IMPLEMENTATIONS:
            try:
                check_available(name, "cuda" if cuda else "cpu", training=True)
                kernels[name] = "available"
            except ValueError as e:
                kernels[name] = f"not available: {e}"
        info["attention kernels (training)"] = kernels
    except ImportError as e:
        info["cuda"] = f"torch cannot be imported: {e}"
    info["optional extras"] = {
        name: {"enables": enables,
               "installed": {m: (version(m.replace("_", "-")) or version(m) or "installed") if installed(m) else "no"
                             for m in modules}}
        for name, (enables, modules) in EXTRAS.items()}
    return info


def format_report(info: dict[str, Any], indent: int = 0) -> str:
    lines = []
    for key, value in info.items():
        if isinstance(value, dict):
            lines.append(" " * indent + f"{key}:")
            lines.append(format_report(value, indent + 2))
        elif isinstance(value, list):
            lines.append(" " * indent + f"{key}: {'none' if not value else ''}")
            lines.extend(" " * (indent + 2) + f"- {v}" for v in value)
        else:
            lines.append(" " * indent + f"{key}: {value}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parse_with_config(parser, sys.argv[1:] if argv is None else argv)
    info = report()
    print(json.dumps(info, indent=2, ensure_ascii=False) if args.json else format_report(info))
    return 0
