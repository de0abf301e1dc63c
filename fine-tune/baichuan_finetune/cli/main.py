"""``baichuan-finetune``: the toolkit's one command. Each subcommand's module is imported only when it
runs, so ``--help`` and a mistyped command answer at once."""

from __future__ import annotations

import difflib
import sys
from importlib import import_module
from typing import Sequence

from ..core.errors import ToolkitError, exit_code

PROG = "baichuan-finetune"
# Subcommand -> (module under baichuan_finetune.cli, one line of help). Order: as listed in --help.
COMMANDS = {
    "train": ("train", "fine-tune: SFT, DPO or continued pre-training (pt), LoRA/QLoRA/full, here or on N GPUs/nodes"),
    "plan": ("plan", "which DeepSpeed config fits: memory per GPU and node, before launch (no torch)"),
    "inspect": ("inspect", "statistics and a preview of training data as the model sees it"),
    "merge": ("merge", "merge a LoRA adapter into its base model"),
    "chat": ("chat", "chat in the terminal with a model or adapter"),
    "serve": ("serve", "OpenAI-compatible chat API"),
    "web": ("web", "browser chat (the API plus a page)"),
    "eval": ("eval", "k-shot multiple-choice evaluation (C-Eval, CMMLU, MMLU), or --perplexity of raw text"),
    "predict": ("predict", "batched generation on held-out prompts, BLEU/ROUGE, side-by-side report of models"),
    "export": ("export", "GGUF (llama.cpp, Ollama, LM Studio), quantized, or GPTQ for vLLM"),
    "convert": ("convert", "normalise lm_head.weight offline (the official conversion)"),
    "quantize": ("quantize", "8/4-bit quantization: how to use it, and whether it runs here"),
    "make-tiny": ("make_tiny", "build the tiny Baichuan2 model (quickstart, tests, smoke runs)"),
    "env": ("env", "versions, CUDA, attention kernels, optional extras (for bug reports)"),
}
SERVERS = ("serve", "web")


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} COMMAND [CONFIG.yaml|.json] [--option value ...]", "",
             "Fine-tune, plan, inspect, merge, chat with, serve, evaluate, predict with and export Baichuan2 "
             "models.", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Every command takes an optional YAML or JSON file of its options first; flags after it",
              "override the file. `baichuan-finetune COMMAND --help` lists a command's options.",
              f"Examples: {PROG} make-tiny;  {PROG} train examples/lora-7b.yaml --learning_rate 1e-4"]
    return "\n".join(lines)


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version(PROG)
    except PackageNotFoundError:
        return "source checkout (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"{PROG} {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else f" (one of: {', '.join(COMMANDS)})"
        print(f"{PROG}: error: unknown command {name!r}{hint}", file=sys.stderr)
        return 2
    prog = f"{PROG} {name}"
    try:
        if name == "make-tiny":
            code = import_module(".make_tiny", __package__).main(rest, prog=prog, output_required=False)
        else:
            code = import_module(f".{COMMANDS[name][0]}", __package__).main(rest, prog=prog)
    except ToolkitError as e:  # every error the toolkit raises on purpose: one line, its kind's exit code
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return exit_code(e)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    if name in SERVERS:
        from ..tools.serve import exit_now

        exit_now()
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
