"""What fine-tune.py checks and says before it imports torch, transformers or DeepSpeed (10-50 s).

A mistyped flag (with a suggestion), an ``--output_dir`` holding checkpoints, a missing model
directory or DeepSpeed config: each is reported within a second of the launch instead of after the
imports. These checks are a subset of `arguments`/`preflight`/`train.resolve_resume`, which still
run in full afterwards; they only read ``argv`` and the file system.

Standard library only at import: ``fine-tune.py`` loads this file by its path, before the package
(whose ``__init__`` imports transformers to register the model classes).
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import os
import re
from pathlib import Path
from typing import Sequence

PROG = "fine-tune.py"
# The same names saving.list_checkpoints lists (checkpoint-<global step>).
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_NOT_RESUMING = ("", "false", "none")  # as train.resolve_resume reads --resume_from_checkpoint
_FALSE = ("no", "false", "f", "n", "0")  # as transformers' HfArgumentParser reads a boolean


def is_main_local_process() -> bool:
    """Whether this is the first process of its node (or no launcher set LOCAL_RANK): the one that speaks."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0") or 0) <= 0
    except ValueError:
        return True


def _normalize(flag: str) -> str:
    """``--flag-name=value`` -> ``--flag_name`` (argparse takes '-' and '_' alike)."""
    return "--" + flag[2:].split("=", 1)[0].replace("-", "_")


def is_config_file_launch(argv: Sequence[str]) -> bool:
    """``fine-tune.py run.yaml`` (a launcher may add ``--local_rank N``), as `arguments.is_config_file`."""
    rest = [a for i, a in enumerate(argv) if not a.startswith("--local_rank")
            and not (i and argv[i - 1] == "--local_rank")]
    return len(rest) == 1 and rest[0].endswith((".yaml", ".yml", ".json")) and not rest[0].startswith("-")


def flag_values(argv: Sequence[str]) -> dict[str, str | None]:
    """The last value of each ``--flag`` given (None for a flag given without a value)."""
    values: dict[str, str | None] = {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--") or arg == "--":
            continue
        if "=" in arg:
            values[_normalize(arg)] = arg.split("=", 1)[1]
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            values[_normalize(arg)] = argv[i + 1]
        else:
            values[_normalize(arg)] = None
    return values


def _dataclass_fields(source: Path, classes: set[str]) -> set[str]:
    """The annotated field names of `classes` in a Python file (parsed, not imported)."""
    tree = ast.parse(source.read_text(encoding="utf-8"))
    return {statement.target.id
            for node in tree.body if isinstance(node, ast.ClassDef) and node.name in classes
            for statement in node.body
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)}


@functools.lru_cache(maxsize=1)
def known_flags() -> frozenset[str] | None:
    """Every ``--flag`` of fine-tune.py: the fields of our option dataclasses (arguments.py) and of
    transformers' TrainingArguments, read from their source files in about 0.1 s (None when that
    fails: the parser then judges alone). ``--no_<flag>`` (booleans) is accepted separately.
    tests/training/test_train_cli.py checks this against the real parser."""
    try:
        spec = importlib.util.find_spec("transformers")  # finds the package without importing it
        hf_args = Path(spec.submodule_search_locations[0]) / "training_args.py"
        ours = _dataclass_fields(Path(__file__).resolve().parents[1] / "options" / "arguments.py",
                                 {"ModelArguments", "DataArguments", "LoraArguments", "TrainingArguments"})
        names = ours | _dataclass_fields(hf_args, {"TrainingArguments"})
    except (AttributeError, IndexError, TypeError, OSError, SyntaxError, ValueError):
        return None
    return frozenset(f"--{name}" for name in names) | {"--help"}


def suggest(name: str, known: Sequence[str] | frozenset[str]) -> str | None:
    """The known name closest to a mistyped `name`, or None when nothing is close."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
    return close[0] if close else None


def _is_known(flag: str, known: frozenset[str]) -> bool:
    if flag.startswith("--no_") and f"--{flag[5:]}" in known:
        return True  # argparse's negation of a boolean that defaults to True
    # Exact, or a prefix argparse expands (--learning_r); it reports ambiguous prefixes itself.
    return any(k.startswith(flag) for k in known)


def unknown_flag_problem(argv: Sequence[str]) -> str | None:
    """One line for the first flag fine-tune.py does not know, with the closest known one."""
    known = known_flags()
    if not known:
        return None
    for arg in argv:
        if not arg.startswith("--") or arg == "--":
            continue
        flag = _normalize(arg)
        if _is_known(flag, known):
            continue
        close = suggest(flag, known)
        hint = f" (did you mean {close}?)" if close else " (see --help)"
        return f"unrecognized argument {arg.split('=', 1)[0]}{hint}"
    return None


def checkpoints_refusal(output_dir: str, newest: str) -> str:
    """The one line refusing to start over an `output_dir` that holds checkpoints (newest: its name)."""
    return (f"output_dir {output_dir} already holds checkpoints ({newest}): pass --resume_from_checkpoint True "
            "to continue, or --overwrite_output_dir True to delete them and start over, or choose another "
            "--output_dir")


def output_dir_problem(values: dict[str, str | None]) -> str | None:
    """Checkpoints in ``--output_dir`` while neither resuming nor overwriting."""
    output_dir = values.get("--output_dir")
    if not output_dir or not Path(output_dir).is_dir():
        return None
    if (values.get("--resume_from_checkpoint") or "").lower() not in _NOT_RESUMING:
        return None
    if "--overwrite_output_dir" in values and (values["--overwrite_output_dir"] or "true").lower() not in _FALSE:
        return None
    try:
        steps = [(int(m.group(1)), p.name) for p in Path(output_dir).iterdir()
                 if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    except OSError:
        return None  # preflight says what is wrong with it
    return checkpoints_refusal(output_dir, max(steps)[1]) if steps else None


def _looks_like_hub_id(name: str) -> bool:
    """As preflight: 'org/name' or 'name' (no leading '.', '/', '~', no '..', at most one '/')."""
    return (bool(name) and not name.startswith((".", "/", "~")) and name.count("/") <= 1
            and ".." not in name and not name.endswith("/"))


def path_problem(values: dict[str, str | None]) -> str | None:
    """A model path that is a file or no directory (and no hub id), an unreadable DeepSpeed config."""
    model = values.get("--model_name_or_path")
    if model:
        path = Path(model).expanduser()
        if path.is_file():
            return f"--model_name_or_path {model}: is a file; give the model's directory"
        if not path.exists() and not _looks_like_hub_id(model):
            return f"--model_name_or_path {model}: no such directory"
    ds = values.get("--deepspeed")
    if ds and not ds.lstrip().startswith("{"):
        try:
            with open(ds, "rb"):
                pass
        except OSError as e:
            return f"--deepspeed {ds}: cannot read: {e.strerror or e}"
    return None


def wants_help(argv: Sequence[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def problem(argv: Sequence[str]) -> str | None:
    """The first problem found without importing anything heavy, as one line (None: nothing found)."""
    if is_config_file_launch(argv) or wants_help(argv):
        return None  # a config file is checked key by key by arguments.parse_args; help is argparse's
    values = flag_values(argv)
    return unknown_flag_problem(argv) or output_dir_problem(values) or path_problem(values)


def announce_start(argv: Sequence[str]) -> None:
    """Our first line, before the imports (the first process of each node only; not for --help)."""
    if is_main_local_process() and not wants_help(argv):
        print(f"{PROG}: flags checked; loading PyTorch, transformers and DeepSpeed ...", flush=True)


# ----- DeepSpeed's ops built on first use -----


def _offloads_optimizer(config: dict) -> bool:
    zero = config.get("zero_optimization") or {}
    offload = zero.get("offload_optimizer") or {} if isinstance(zero, dict) else {}
    return isinstance(offload, dict) and offload.get("device") == "cpu"


def ops_to_build(config: dict, cpu: bool) -> list[str]:
    """Names of the DeepSpeed ops this run will JIT-compile because no build of them exists yet.

    On CPU (DeepSpeed's CPU accelerator) every run builds the shared-memory collectives op; an
    optimizer offloaded to the CPU needs cpu_adam. A build is found where torch's extension loader
    puts it, or among the ops installed with DeepSpeed (``DS_BUILD_OPS=1``).
    """
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops import __compatible_ops__ as compatible  # what DeepSpeed would try to build here
    from torch.utils.cpp_extension import _get_build_directory  # private, but what the JIT loader uses

    wanted = (["ShareMemCommBuilder"] if cpu else []) + (["CPUAdamBuilder"] if _offloads_optimizer(config) else [])
    missing = []
    for class_name in wanted:
        builder = get_accelerator().create_op_builder(class_name)
        if builder is None or not compatible.get(builder.NAME, False) or installed_ops.get(builder.name, False):
            continue
        built = Path(_get_build_directory(builder.name, verbose=False)) / f"{builder.name}.so"
        if not built.is_file():
            missing.append(builder.name)
    return missing


def _deepspeed_config(argv: Sequence[str]) -> dict | None:
    """The ``--deepspeed`` JSON of a command line or config file; None without one or when unreadable
    (arguments.parse_args then says why)."""
    import json

    try:
        if is_config_file_launch(argv):
            path = next(a for a in argv if a.endswith((".yaml", ".yml", ".json")))
            text = Path(path).read_text()
            if path.endswith(".json"):
                ds = json.loads(text).get("deepspeed")
            else:
                import yaml

                ds = yaml.safe_load(text).get("deepspeed")
        else:
            ds = flag_values(argv).get("--deepspeed")
        if isinstance(ds, str) and ds:
            ds = json.loads(ds) if ds.lstrip().startswith("{") else json.loads(Path(ds).read_text())
        return ds if isinstance(ds, dict) else None
    except Exception:  # unreadable, not JSON/YAML, not a mapping (yaml.YAMLError too): parse_args says why
        return None


def announce_op_builds(argv: Sequence[str]) -> None:
    """One line per DeepSpeed op that this launch is about to compile (a minute or so, once per
    machine), printed before the silent build starts; nothing without ``--deepspeed``."""
    config = _deepspeed_config(argv)
    if config is None or not is_main_local_process():
        return
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as parse_args does next; before DeepSpeed picks one
        cpu = os.environ.get("DS_ACCELERATOR") == "cpu"
        names = ops_to_build(config, cpu)
    except Exception:  # a DeepSpeed without these internals: no line, the build itself still works
        return
    for name in names:
        print(f"{PROG}: building DeepSpeed op {name} once (about a minute) ...", flush=True)
