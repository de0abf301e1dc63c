"""saving.py: complete checkpoints, finished output directories, the model code, LoRA adapter checks."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import baichuan_finetune
from baichuan_finetune.checkpoints import saving
from baichuan_finetune.model.configuration_baichuan import chat_generation_config

PACKAGE_DIR = Path(baichuan_finetune.__file__).resolve().parent
CODE_FILES = ("configuration_baichuan.py", "modeling_baichuan.py", "tokenization_baichuan.py", "specs_baichuan.py")


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
        assert (tmp_path / name).read_bytes() == (PACKAGE_DIR / "model" / name).read_bytes(), name


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
    for name in ("options/arguments.py", "training/lora.py", "training/trainer.py", "checkpoints/saving.py", "training/train.py", "model/modeling_baichuan.py"):
        assert ".tiny" not in (PACKAGE_DIR / name).read_text(), name


# ----- checkpoints as transactions -----


def _checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    """A checkpoint in the real file formats: safetensors weights, a torch zip optimizer, trainer_state.json."""
    from safetensors.torch import save_file

    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"w": torch.arange(600, dtype=torch.float32).reshape(20, 30)}, path / "model.safetensors")
    torch.save({"state": {0: {"exp_avg": torch.ones(3)}}}, path / "optimizer.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    if complete:
        saving.mark_checkpoint_complete(path, step)
    return path


def test_marker_lists_every_file_with_its_size_and_sha256(tmp_path):
    import hashlib

    path = _checkpoint(tmp_path, 4)
    (path / "global_step4").mkdir()
    (path / "global_step4" / "shard.pt").write_bytes(b"")  # nested files count too
    saving.mark_checkpoint_complete(path, 4)
    marker = json.loads((path / saving.COMPLETE_MARKER).read_text())
    names = ("global_step4/shard.pt", "model.safetensors", "optimizer.pt", "trainer_state.json")
    assert marker["files"] == {name: {"size": (path / name).stat().st_size,
                                      "sha256": hashlib.sha256((path / name).read_bytes()).hexdigest()}
                               for name in names}
    assert marker["total_bytes"] == sum(e["size"] for e in marker["files"].values()) == saving.checkpoint_bytes(path)


def _truncate(path: Path, keep: int | None = None) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2 if keep is None else keep)


@pytest.mark.parametrize("damage, problem", [
    (lambda p: None, None),
    (lambda p: (p / saving.COMPLETE_MARKER).unlink(), "incomplete checkpoint"),
    (lambda p: (p / saving.COMPLETE_MARKER).write_text("{"), "checkpoint_complete.json is unreadable"),
    (lambda p: (p / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    (lambda p: _truncate(p / "model.safetensors"), "model.safetensors has"),
    (lambda p: (p / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    (lambda p: (p / "optimizer.pt").write_bytes(b"Y" + (p / "optimizer.pt").read_bytes()[1:]),
     "optimizer.pt was changed after the checkpoint was completed"),
    (lambda p: (p / "extra.bin").write_bytes(b""), "extra.bin was added after the checkpoint was completed"),
    (lambda p: (p / saving.COMPLETE_MARKER).write_text('{"global_step": 2}'), "lists no files with their size"),
])
def test_validate_checkpoint_against_its_marker(tmp_path, damage, problem):
    path = _checkpoint(tmp_path, 2)
    damage(path)
    found = saving.validate_checkpoint(path)
    assert found == problem if problem is None else problem in found, found


@pytest.mark.parametrize("name, damage, problem", [
    ("model.safetensors", lambda f: _truncate(f), "(truncated: its tensors need"),
    ("model.safetensors", lambda f: _truncate(f, 5), "not a complete safetensors file (5 bytes)"),
    ("model.safetensors", lambda f: f.write_bytes(b"\xff" * 64), "not a complete safetensors file (header of"),
    ("optimizer.pt", lambda f: _truncate(f), "not a complete torch checkpoint (zip archive"),
    ("trainer_state.json", lambda f: f.write_text("{"), "trainer_state.json is not valid JSON"),
    ("trainer_state.json", lambda f: f.write_text("[]"), "trainer_state.json has no global_step"),
])
def test_validate_checkpoint_reads_the_files_themselves(tmp_path, name, damage, problem):
    # Damaged before the marker was written (an old-style marker has no sizes to compare either).
    path = _checkpoint(tmp_path, 2, complete=False)
    damage(path / name)
    saving.mark_checkpoint_complete(path, 2)
    found = saving.validate_checkpoint(path)
    assert found is not None and problem in found and (name in found or name == "trainer_state.json"), found


def test_begin_checkpoint_removes_the_marker_and_old_files_first(tmp_path):
    path = _checkpoint(tmp_path, 8)
    (path / "stale-from-another-run.pt").write_bytes(b"x")
    saving.begin_checkpoint(path, 8)
    assert not path.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    saving.begin_checkpoint(tmp_path / "checkpoint-9", 9)  # nothing to remove: fine


def test_rotation_keeps_the_newest_complete_and_protected_ones(tmp_path):
    for step in (2, 4, 6):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 5, complete=False)  # an interrupted one goes first
    removed = saving.rotate_checkpoints(tmp_path, 2, keep=[tmp_path / "checkpoint-2"])
    assert [p.name for p in removed] == ["checkpoint-5", "checkpoint-4"]
    assert [p.name for p in saving.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-6"]
    # A limit of 1 never deletes the newest complete checkpoint, nor a protected one.
    assert saving.rotate_checkpoints(tmp_path, 1, keep=[tmp_path / "checkpoint-2"]) == []
    assert [p.name for p in saving.rotate_checkpoints(tmp_path, 1)] == ["checkpoint-2"]
    assert saving.rotate_checkpoints(tmp_path, None) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6"]  # nothing set aside is left


def test_remove_leftovers(tmp_path):
    for name in (".deleting-checkpoint-2-123", saving.FINAL_TMP, "checkpoint-4", ".other"):
        (tmp_path / name).mkdir()
    saving.remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other", "checkpoint-4"]


# ----- fault injection and a full disk -----


def test_fault_hook(monkeypatch, tmp_path):
    import errno

    saving.fault("before_save", 4)  # unset: nothing happens
    monkeypatch.setenv(saving.FAULT_ENV, "after_weights:enospc:4, before_marker:pause=0.01")
    saving.fault("after_weights", 2)  # another step
    saving.fault("before_save", 4)  # another point
    with pytest.raises(OSError) as info:
        saving.fault("after_weights", 4, tmp_path / "x")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "x")
    saving.fault("before_marker", 7)  # pauses 10 ms at any step
    monkeypatch.setenv(saving.FAULT_ENV, "before_save:explode")
    with pytest.raises(ValueError, match="unknown action 'explode'"):
        saving.fault("before_save")


def test_is_disk_full(tmp_path):
    import errno

    assert saving.is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert saving.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path)
    # safetensors' and torch's ways of saying it, also as the cause of another error.
    assert saving.is_disk_full(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                            "message: \"No space left on device\" })"), tmp_path)
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
    except RuntimeError as e:
        assert saving.is_disk_full(e, tmp_path)
    # A write failure counts only when the disk is in fact (nearly) full.
    assert not saving.is_disk_full(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
                                   tmp_path, needed=1)
    assert saving.is_disk_full(RuntimeError("file write failed"), tmp_path, needed=saving.free_bytes(tmp_path) + 1)
    assert not saving.is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path)
    assert not saving.is_disk_full(ValueError("bad value"), tmp_path)


# ----- the final output directory as a transaction -----


def _final(out: Path, fail_at: str | None = None, is_adapter: bool = False, monkeypatch=None) -> None:
    loader = saving.loader_file(is_adapter)

    def write_weights(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"new weights")
        (tmp / loader).write_text("{}")

    def finish(tmp: Path) -> None:
        (tmp / "tokenizer.model").write_bytes(b"tok")

    if fail_at:
        monkeypatch.setenv(saving.FAULT_ENV, f"{fail_at}:enospc")
    saving.save_final_output(out, write_weights, finish, is_main=True, is_adapter=is_adapter, needed=11 << 20)


def test_final_output_moves_the_loader_file_last(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old")  # an earlier final output is replaced
    _final(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert (out / "model.safetensors").read_bytes() == b"new weights"
    _final(out, is_adapter=True)
    assert (out / "adapter_config.json").is_file()


@pytest.mark.parametrize("point", saving.FINAL_FAULT_POINTS)
def test_final_output_disk_full_leaves_no_model(point, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _checkpoint(out, 6)
    (out / "config.json").write_text("{}")  # an earlier final output: it stops looking complete or stays
    with pytest.raises(saving.DiskFullError) as info:
        _final(out, fail_at=point, monkeypatch=monkeypatch)
    message = str(info.value)
    assert "\n" not in message and f"while writing the final output to {out}: needs about 11.0 MiB" in message
    assert " free; " in message and f"{out / 'checkpoint-6'} is intact" in message
    assert not (out / saving.FINAL_TMP).exists()
    assert saving.validate_checkpoint(out / "checkpoint-6") is None
    if point == "final_mid_move":
        assert not (out / "config.json").exists()  # some new files are in place: not a model


def test_final_output_other_failures_clean_up_and_propagate(tmp_path):
    out = tmp_path / "out"

    def write_weights(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"x")
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        saving.save_final_output(out, write_weights, lambda tmp: None, is_main=True, is_adapter=False)
    assert sorted(p.name for p in out.iterdir()) == []
    # A finish that forgot the loader file is an error, not a directory that looks complete.
    with pytest.raises(RuntimeError, match="no config.json was written"):
        saving.save_final_output(out, lambda tmp: None, lambda tmp: None, is_main=True, is_adapter=False)
    assert sorted(p.name for p in out.iterdir()) == []


# ----- one writer per output directory -----


def test_output_dir_lock(tmp_path):
    import os
    import socket

    out = tmp_path / "out"
    first = saving.OutputDirLock(out)
    first.acquire()
    info = json.loads((out / saving.LOCK_FILE).read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    # flock is per open file: a second lock in this same process conflicts as another process would.
    with pytest.raises(saving.OutputDirInUse, match=rf"--output_dir {out} is in use by another run "
                                                    rf"\(pid {os.getpid()} on {socket.gethostname()}, started "):
        saving.OutputDirLock(out).acquire()
    first.release()
    assert not (out / saving.LOCK_FILE).exists()
    with saving.lock_output_dir(out, is_global_main=True):  # free again
        assert (out / saving.LOCK_FILE).exists()
    assert not (out / saving.LOCK_FILE).exists()
    # Only the global main process takes it (the others learn the outcome by broadcast).
    saving.lock_output_dir(out, is_global_main=False).release()
    assert not (out / saving.LOCK_FILE).exists()


def test_output_dir_lock_on_a_file_is_a_usage_error(tmp_path):
    from baichuan_finetune.options.arguments import UsageError

    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match=rf"--output_dir {tmp_path / 'file'}: cannot create .fine-tune.lock"):
        saving.lock_output_dir(tmp_path / "file", is_global_main=True)


def test_output_dir_lock_leaves_no_trace_of_a_run_that_wrote_nothing(tmp_path):
    out = tmp_path / "new" / "out"
    saving.lock_output_dir(out, is_global_main=True).release()
    assert not out.exists()  # created for the lock, empty, removed
    lock = saving.lock_output_dir(out, is_global_main=True)
    (out / "model.safetensors").write_bytes(b"x")
    lock.release()
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]

