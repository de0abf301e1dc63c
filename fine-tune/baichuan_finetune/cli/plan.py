"""Memory and launch planner: which DeepSpeed config fits, per GPU and per node, before launch.

    baichuan-finetune plan --model 13b --method full --nodes 2 --gpus_per_node 8 --gpu_memory_gb 80 \\
        --cpu_memory_gb 1024 --model_max_length 4096 --per_device_train_batch_size 1 \\
        [--packing True] [--gradient_checkpointing True] [--precision bf16] [--zero auto|2|3|3_offload|3_offload_all] \\
        [--json] [--write_ds_config PATH]
    baichuan-finetune plan examples/lora-7b.yaml      (a training config: the planner's options are read from it)
    python scripts/plan.py ...                        (the same)

Reads only ``config.json`` (``--model 7b``/``13b`` need nothing); see docs/planning.md for the
memory model. ``--device cpu --nproc N`` predicts per-process RSS growth of a CPU run (float32),
as measured by benchmarks/memory.py. Bad inputs: one line on stderr, exit code 2.
Imports neither torch nor transformers (scripts/plan.py loads it without the package's __init__).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Sequence

from ..options import plan
from ..core.errors import exit_code
from ..core.json_files import JSONObjectError, read_json_object
from .config import ConfigError, apply_config, is_config_path, read_config

ZERO_CHOICES = {"auto": plan.OPTIONS, "2": ("zero2",), "3": ("zero3",), "3_offload": ("zero3_offload_optimizer",),
                "3_offload_all": ("zero3_offload_all",)}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def build_parser(prog: str | None = "plan.py") -> _Parser:
    p = _Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="7b, 13b, or a model directory with config.json (required)")
    p.add_argument("--readme_table", action="store_true",
                   help="print the README's DeepSpeed table (7B/13B full/LoRA on 8 x 80/40/24 GB) and exit")
    p.add_argument("--method", default="full", choices=["full", "lora", "qlora"])
    p.add_argument("--lora_r", type=int, default=1, help="LoRA rank (training default 1)")
    p.add_argument("--lora_target_modules", default="W_pack", help="as in training (default W_pack)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--gpu_memory_gb", type=float, default=80.0, help="memory of one GPU, GB (1e9 bytes)")
    p.add_argument("--cpu_memory_gb", type=float, default=None, help="host memory per node, GB (for offload)")
    p.add_argument("--model_max_length", type=int, default=512)
    p.add_argument("--per_device_train_batch_size", type=int, default=1)
    p.add_argument("--packing", type=_bool, default=False)
    p.add_argument("--gradient_checkpointing", type=_bool, default=False)
    p.add_argument("--precision", default="bf16", choices=sorted(plan.PRECISIONS))
    p.add_argument("--zero", default="auto", choices=list(ZERO_CHOICES))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: predict per-process RSS growth of a CPU run (float32)")
    p.add_argument("--nproc", type=int, default=None, help="with --device cpu: processes on this machine")
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    p.add_argument("--write_ds_config", metavar="PATH", help="write the recommended DeepSpeed config here")
    return p


# A training config (baichuan-finetune train's) names the model and method differently; these keys are
# read from it, the rest of its options (learning rate, data ...) do not change the memory plan.
TRAINING_KEYS = {"model_name_or_path": "model", "lora_r": "lora_r", "lora_target_modules": "lora_target_modules",
                 "model_max_length": "model_max_length", "gradient_checkpointing": "gradient_checkpointing",
                 "per_device_train_batch_size": "per_device_train_batch_size", "packing": "packing"}


def training_config_options(config: dict) -> dict:
    """The planner's options implied by a training config: its model (a directory, or a released size
    named in a hub id), method (``use_lora``/``q_lora``), precision, sequence length, batch, and the ZeRO
    option of its ``deepspeed`` file when that is readable (else the planner compares them all)."""
    options = {TRAINING_KEYS[k]: v for k, v in config.items() if k in TRAINING_KEYS}
    model = str(options.get("model", ""))
    if model and not Path(model).expanduser().is_dir():
        size = re.search(r"(?<![0-9])(7|13)b", model, re.IGNORECASE)
        if size:
            options["model"] = f"{size.group(1)}b"
    if str(config.get("use_lora", False)).lower() == "true":
        options["method"] = "qlora" if str(config.get("q_lora", False)).lower() == "true" else "lora"
    options["precision"] = ("bf16" if str(config.get("bf16", False)).lower() == "true"
                            else "fp16" if str(config.get("fp16", False)).lower() == "true" else "fp32")
    ds = config.get("deepspeed")
    try:
        ds_config = ds if isinstance(ds, dict) else read_json_object(ds) if ds else None
    except JSONObjectError:  # unreadable: plan every ZeRO option instead
        ds_config = None
    if isinstance(ds_config, dict):
        option = plan.option_of_ds_config(ds_config)
        options["zero"] = next((z for z, opts in ZERO_CHOICES.items() if opts == (option,)), "auto")
    return {k: (str(v) if isinstance(v, bool) else v) for k, v in options.items()}


def parse(argv: Sequence[str] | None = None, prog: str | None = "plan.py") -> argparse.Namespace:
    """The planner's options: flags, or a planner config file, or a training config file (then flags)."""
    parser = build_parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and is_config_path(argv[0]):
        config = read_config(argv[0])
        if not set(config) <= {a.dest for a in parser._actions}:  # a training config: what the planner needs
            config = training_config_options(config)
        apply_config(parser, config, argv[0])
        argv = argv[1:]
    return parser.parse_args(argv)


def readme_table(seq_len: int) -> str:
    """The README's table: recommended option and predicted peak per GPU, bf16, micro-batch 1,
    activation checkpointing, 8 GPUs, `seq_len` tokens."""
    files = {option: f"`{name}`" for option, name in plan.SHIPPED_CONFIG.items()}
    files["zero3_offload_optimizer"] += " + optimizer offload"
    gpus = (80, 40, 24)
    rows = [f"| per GPU (8 GPUs, {seq_len} tokens, micro-batch 1, checkpointing, bf16) | "
            + " | ".join(f"8 x {g} GB" for g in gpus) + " |", "|---" * (len(gpus) + 1) + "|"]
    for model, method in (("7b", "full"), ("13b", "full"), ("7b", "lora"), ("13b", "lora")):
        cells = []
        for g in gpus:
            s = plan.Setup(shape=plan.load_shape(model), method=method, gpus_per_node=8, gpu_memory_bytes=g * 10**9,
                           seq_len=seq_len, checkpointing=True)
            p = plan.plan(s)
            if p.recommended:
                e = p.estimates[p.recommended]
                host = f", {e.cpu_per_node / plan.GIB:.0f} GiB host RAM per node" if "offload" in p.recommended else ""
                cells.append(f"{files[p.recommended]} ({e.peak / plan.GIB:.0f} GiB{host})")
            else:
                cells.append("nothing fits: " + p.levers[0].split(":")[0])
        label = f"{model.upper()} {'full' if method == 'full' else 'LoRA (r 1, W_pack)'}"
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None, prog: str | None = "plan.py") -> int:
    try:
        args = parse(argv, prog)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return exit_code(e)
    if args.readme_table:
        print(readme_table(args.model_max_length if args.model_max_length != 512 else 4096))
        return 0
    if not args.model:
        print(f"{prog}: error: --model is required (7b, 13b or a model directory)", file=sys.stderr)
        return 2
    try:
        shape = plan.load_shape(args.model)
        targets = plan.lora_targets(args.lora_target_modules) if args.method != "full" else ("W_pack",)
        if args.nproc is not None and args.device != "cpu":
            raise plan.PlanError("--nproc: only with --device cpu (GPUs: --nodes and --gpus_per_node)")
        if args.nproc is not None and args.nproc < 1:
            raise plan.PlanError(f"--nproc {args.nproc}: must be at least 1")
        for flag in ("gpu_memory_gb", "cpu_memory_gb"):
            value = getattr(args, flag)
            if value is not None and not value > 0:
                raise plan.PlanError(f"--{flag} {value:g}: must be positive")
            if value is not None and not math.isfinite(value):
                raise plan.PlanError(f"--{flag} {value:g}: must be a finite number of GB")
        setup = plan.Setup(
            shape=shape, method=args.method, lora_r=args.lora_r, lora_targets=targets,
            nodes=1 if args.device == "cpu" else args.nodes,
            gpus_per_node=(args.nproc or 1) if args.device == "cpu" else args.gpus_per_node,
            gpu_memory_bytes=int(args.gpu_memory_gb * 1e9),
            cpu_memory_bytes=int(args.cpu_memory_gb * 1e9) if args.cpu_memory_gb else None,
            seq_len=args.model_max_length, micro_batch=args.per_device_train_batch_size, packing=args.packing,
            checkpointing=args.gradient_checkpointing, precision=args.precision, device=args.device)
        options = ZERO_CHOICES[args.zero]
        if args.device == "cpu":
            options = tuple(o for o in options if o in ("zero2", "zero3"))  # what the CPU benchmark measures
            if not options:
                raise plan.PlanError(f"--zero {args.zero}: with --device cpu only 2, 3 or auto")
        result = plan.plan(setup, options)
    except plan.PlanError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return exit_code(e)
    if args.write_ds_config:
        try:
            plan.write_ds_config(result, args.write_ds_config)
        except OSError as e:
            print(f"{prog}: error: --write_ds_config {args.write_ds_config}: {e.strerror or e}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(plan.format_plan(result))
        if args.write_ds_config:
            print(f"wrote {args.write_ds_config}")
    return 0
