"""Checks of the files a run needs, made once before any data is read or model loaded.

`arguments` checks what the flags say; this module checks what they point at on this machine: the
output directory can be written (without creating it: a run that fails a later check must leave no
trace), the model directory is complete (config.json, tokenizer.model, weights whose headers are
intact), and ``--model_name_or_path``'s config allows ``--model_max_length`` (its sizes, head size and
``--lora_r`` checked as the planner checks them). Every failure is a
`UsageError` (one line naming the flag or the file, exit code 2): these are paths given on the
command line. `train.run` calls `check_run` right after the resume checkpoint is chosen and before
old checkpoints are deleted, the data prepared or the model loaded.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from ..options.arguments import Arguments, UsageError
from ..core.json_files import JSONObjectError, read_json_object
from ..options.plan import ModelShape, PlanError, check_lora_rank, lora_targets
from ..model.specs_baichuan import POSITION_EMBEDDINGS, ROPE, position_embedding_of
from ..checkpoints.weight_files import WeightFilesError, check_weights

MODEL_FLAG = "--model_name_or_path"


def check_run(args: Arguments) -> dict[str, Any]:
    """Every check of the output directory and the base model; returns the base model's config.json."""
    check_output_dir(args.training.output_dir)
    config = check_model(args.model.model_name_or_path, args.training.cache_dir)
    check_model_max_length(config, args.training.model_max_length, args.training.allow_longer_than_trained,
                           args.model.model_name_or_path)
    check_shape(config, args)
    return config


def check_shape(config: dict[str, Any], args: Arguments) -> None:
    """The planner's checks of the config's dimensions (whole, sane, an even RoPE head size) and of
    ``--lora_r`` against them: found now, not as a crash at the first step or an out-of-memory."""
    model = args.model.model_name_or_path
    try:
        shape = ModelShape.from_config(config, name=f"{model}/config.json")
        if args.lora.use_lora:
            check_lora_rank(shape, args.lora.lora_r, lora_targets(args.lora.lora_target_modules), model)
    except PlanError as e:
        raise UsageError(str(e)) from None


# ----- output directory -----


def check_output_dir(output_dir: str) -> None:
    """`output_dir` is (or can be made) a writable directory; nothing is left behind by the check.

    An existing directory gets a probe file, created and removed, and its modification time back. A
    missing one is not created: its nearest existing parent gets a probe directory instead.
    """
    flag = f"--output_dir {output_dir}"
    path = Path(output_dir)
    if path.is_symlink() and not path.exists():  # else creating it fails later with a bare "File exists"
        raise UsageError(f"{flag}: a dangling symbolic link (to {os.readlink(path)}): create its target or remove "
                         "the link")
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{flag}: is a file, not a directory")
        _probe(path, flag, f"{flag}: cannot write into it")
        return
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():  # a file above it: exists() is False below a file
        raise UsageError(f"{flag}: cannot be created: {parent} is a file, not a directory")
    _probe(parent, flag, f"{flag}: cannot be created in {parent}")


def missing_dirs(output_dir: str) -> list[Path]:
    """`output_dir` and its missing parents, deepest first: what creating it will create."""
    missing, path = [], Path(output_dir).absolute()
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_empty_dirs(dirs: list[Path]) -> None:
    """Remove `dirs` (deepest first) while they are empty: a failed run leaves no directory it created."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:  # not empty (the run wrote something worth keeping) or already gone
            return


def _probe(directory: Path, flag: str, message: str) -> None:
    """Create and remove a uniquely named entry in `directory` and restore its times, or raise `message`."""
    try:
        before = directory.stat()
    except OSError as e:
        raise UsageError(f"{flag}: {e.strerror or e}") from None
    probe = directory / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
    except OSError as e:
        raise UsageError(f"{message}: {e.strerror or e}") from None
    try:
        probe.rmdir()
    finally:
        # The probe changed the directory's mtime; a failing run must leave it as it found it.
        try:
            os.utime(directory, ns=(before.st_atime_ns, before.st_mtime_ns))
        except OSError:
            pass


# ----- base model -----

# The only model code this toolkit runs: its own, registered for model_type "baichuan" when the package
# is imported. These module names are the ones official Baichuan2 checkpoints and our saved directories
# name in ``auto_map``; transformers (called with ``trust_remote_code=False``) ignores them and uses ours.
# Any other model_type or auto_map entry is code we did not write: transformers would run it (after an
# interactive prompt that a "yes" on stdin answers), so such a directory is refused before any load.
OWN_MODEL_TYPE = "baichuan"
OWN_CODE = frozenset({"configuration_baichuan.BaichuanConfig", "modeling_baichuan.BaichuanForCausalLM",
                      "tokenization_baichuan.BaichuanTokenizer", "tokenization_baichuan.BaichuanTokenizerFast"})


def foreign_code(config: dict[str, Any], tokenizer_config: dict[str, Any] | None = None) -> str | None:
    """Why a directory's ``config.json`` (and ``tokenizer_config.json``) would run code that is not
    ours, or None: a model_type other than "baichuan", or an ``auto_map`` naming another module."""
    model_type = config.get("model_type")
    if model_type != OWN_MODEL_TYPE:
        return (f"model_type {json.dumps(model_type)} is not Baichuan2 ({json.dumps(OWN_MODEL_TYPE)}); this "
                "toolkit runs only its own model code, never a directory's")
    for source in (config, tokenizer_config or {}):
        auto_map = source.get("auto_map") or {}
        if not isinstance(auto_map, dict):
            return f"auto_map {json.dumps(auto_map)[:80]}: expected an object"
        for auto_class, target in auto_map.items():
            targets = target if isinstance(target, (list, tuple)) else [target]
            for name in targets:
                if name is not None and name not in OWN_CODE:
                    return (f"auto_map names code that is not this toolkit's ({auto_class}: "
                            f"{json.dumps(name)[:80]}); this toolkit runs only its own model code")
    return None


def _looks_like_hub_id(name: str) -> bool:
    """'org/name' or 'name' (no leading '.', '/', '~', no '..', at most one '/')."""
    return (bool(name) and not name.startswith((".", "/", "~")) and name.count("/") <= 1
            and ".." not in name and not name.endswith("/"))


def check_model(name_or_path: str, cache_dir: str | None = None) -> dict[str, Any]:
    """The model's parsed config.json, after checking a local directory holds a complete model.

    A hub id (not a local directory) only has its config.json resolved (downloaded, or from the cache
    with ``HF_HUB_OFFLINE=1``): its weights are checked when they are downloaded.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return check_model_dir(path)
    if path.exists():
        raise UsageError(f"{MODEL_FLAG} {name_or_path}: is a file; give the model's directory")
    if not _looks_like_hub_id(name_or_path):
        raise UsageError(f"{MODEL_FLAG} {name_or_path}: no such directory")
    try:
        from huggingface_hub import hf_hub_download

        config_file = hf_hub_download(name_or_path, "config.json", cache_dir=cache_dir)
    except Exception as e:  # offline and not cached, unknown repo, no network: all say why in one line
        reason = " ".join(str(e).split())[:300]
        raise UsageError(f"{MODEL_FLAG} {name_or_path}: no such directory, and not a model on the hub "
                         f"(or in its cache): {type(e).__name__}: {reason}") from None
    return _read_config(Path(config_file))


def check_model_dir(directory: Path, flag: str = MODEL_FLAG, tokenizer: bool = True) -> dict[str, Any]:
    """config.json (our model code only), tokenizer.model and the weights of a local model directory;
    returns the config. The one check of a model directory: training (`check_model`) and the tools
    (`loading.check_model_dir`, which adds adapters; `tokenizer=False` for an adapter's base, whose
    tokenizer may be the adapter's) use it. `UsageError` naming `flag` or the file."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UsageError(f"{flag} {directory}: no config.json (not a model directory)")
    config = _read_config(config_file)
    if tokenizer:
        tokenizer_file = directory / "tokenizer.model"
        if not tokenizer_file.is_file():
            raise UsageError(f"{flag} {directory}: no tokenizer.model (the Baichuan2 sentencepiece tokenizer)")
        _check_tokenizer(tokenizer_file)
    try:
        check_weights(directory)  # in transformers' order of preference: the kind that will be loaded
    except WeightFilesError as e:
        raise UsageError(str(e)) from None
    return config


def _read_config(config_file: Path) -> dict[str, Any]:
    try:
        config = read_json_object(config_file, of=" of model settings")
    except JSONObjectError as e:
        raise UsageError(str(e)) from None
    problem = foreign_code(config, _optional_json(config_file.parent / "tokenizer_config.json"))
    if problem:
        raise UsageError(f"{config_file}: {problem}")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{config_file}: \"{key}\" {json.dumps(value)}: expected a whole number >= 1")
    if config.get("position_embedding") not in (None, *POSITION_EMBEDDINGS):
        raise UsageError(f"{config_file}: \"position_embedding\" {json.dumps(config['position_embedding'])}: "
                         "expected \"rope\" or \"alibi\"")
    return config


def _optional_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when it is missing or unreadable (its own check reports that)."""
    try:
        return read_json_object(path)
    except JSONObjectError:
        return {}


def _check_tokenizer(path: Path) -> None:
    # Loading a sentencepiece model takes milliseconds; a corrupt one would fail in the tokenizer later.
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # sentencepiece raises RuntimeError or OSError with a C++ message
        raise UsageError(f"{path}: not a sentencepiece model: {' '.join(str(e).split())[:200]}") from None


# ----- positions -----


def check_model_max_length(config: dict[str, Any], model_max_length: int, allowed: bool, model: str) -> None:
    """A RoPE model was trained on `max_position_embeddings` positions: longer rows need permission."""
    positions = config.get("max_position_embeddings")
    if position_embedding_of(config) != ROPE or not isinstance(positions, int) or model_max_length <= positions or allowed:
        return
    raise UsageError(
        f"--model_max_length {model_max_length}: beyond the {positions} positions {model} was trained on "
        "(RoPE max_position_embeddings in its config.json); lower --model_max_length, or pass "
        "--allow_longer_than_trained True to train on untrained positions"
    )
