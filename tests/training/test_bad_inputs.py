"""The bad-input table: every known way to start fine-tune.py wrongly ends in one line, the right exit code,
no traceback, and an output directory left as it was.

Each row builds its inputs in a fresh temporary directory and runs the training entry point: in this
process (`baichuan_finetune.training.train.main`, stderr from capsys) for most rows, which all stop in argument
parsing, preflight or data reading within a second or two, and through ``fine-tune/fine-tune.py`` in a
fresh process for the rows marked ``SUB`` (a representative subset, and every row that would set up
torch.distributed: DeepSpeed configs that transformers accepts). Exit code 2 is a bad flag or a path
given on the command line (``fine-tune.py: error: ...``), 1 bad data (``fine-tune.py: data error: ...``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from baichuan_finetune.checkpoints import saving
from baichuan_finetune.training.train import main

REPO_ROOT = Path(__file__).resolve().parents[2]
FINE_TUNE = REPO_ROOT / "fine-tune" / "fine-tune.py"
GOOD = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
DEEP = "[" * 5000 + "]" * 5000  # far past what Python's JSON reader recurses into
SUB = "subprocess"


@dataclass
class Ctx:
    """What a row builds on: a fresh directory, a good data file, the tiny models and the output path."""

    tmp: Path
    data: Path
    rope: Path
    alibi: Path
    out: Path

    def file(self, name: str, content: str | bytes | object) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:  # ASCII escapes: a lone surrogate stays a "\ud800" escape, as in the campaign's files
            path.write_text(json.dumps(content), encoding="utf-8")
        return path

    def model(self, breaker: Callable[[Path], None]) -> Path:
        """A copy of the tiny RoPE model with `breaker` applied."""
        copy = self.tmp / "model"
        shutil.copytree(self.rope, copy)
        breaker(copy)
        return copy

    def args(self, *extra: object, data: Path | None = None, model: Path | str | None = None) -> list[str]:
        return ["--data_path", str(data or self.data), "--model_name_or_path", str(model or self.rope),
                "--output_dir", str(self.out), "--report_to", "none", *map(str, extra)]

    def ds(self, config: object) -> Path:
        return self.file("ds.json", config if isinstance(config, str) else json.dumps(config))

    def checkpoint(self, name: str = "checkpoint-2", state: str = '{"global_step": 2}',
                   damage: Callable[[Path], None] | None = None) -> Path:
        """A checkpoint in the output directory, marked complete, then damaged."""
        path = self.out / name
        path.mkdir(parents=True)
        shutil.copy(self.rope / "model.safetensors", path / "model.safetensors")
        (path / "trainer_state.json").write_text(state)
        saving.mark_checkpoint_complete(path, 2)
        if damage:
            damage(path)
        return path


def truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def remove(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


def recorded(c: Ctx, *flags: object, model: Path | None = None) -> Path:
    """A complete checkpoint whose run record (resume_checks.py) is that of a run with `flags`."""
    from baichuan_finetune.options.arguments import parse_args
    from baichuan_finetune.checkpoints.resume_checks import run_record, write_run_record

    args = parse_args(c.args(*flags, model=model))
    path = c.checkpoint(damage=lambda p: write_run_record(p, run_record(args, args.model.model_name_or_path)))
    saving.mark_checkpoint_complete(path, 2)  # again, now listing run_record.json
    return path


def ds_with(**changes) -> dict:
    config = json.loads((REPO_ROOT / "ds_config_zero2.json").read_text())
    for key, value in changes.items():
        if key == "stage":
            config["zero_optimization"]["stage"] = value
        else:
            config[key] = value
    return config


def surrogate_record(field: str = "value") -> dict:
    return {"conversations": [{"from": "human", field: "a\ud800b"}, {"from": "gpt", "value": "x"}]}


def shard_missing(d: Path) -> None:
    """A sharded model whose index names a shard that is not there."""
    (d / "model.safetensors").rename(d / "model-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001.safetensors", "b": "model-00002.safetensors"}}))


def write_bin(d: Path) -> None:
    """pytorch_model.bin (a real torch.save zip) instead of safetensors, then cut short."""
    (d / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(4)}, d / "pytorch_model.bin")
    truncate(d / "pytorch_model.bin")


def set_config(**changes) -> Callable[[Path], None]:
    """A breaker that sets fields of the model's config.json (written as Python's json writes them)."""
    def breaker(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, **changes}))
    return breaker


def pairs_identical_after_cut(ctx: Ctx) -> list[str]:
    """Preference pairs whose answers differ only after --model_max_length: nothing left to prefer."""
    same = "The answer is " + "very " * 40
    pairs = [{"prompt": "Which?", "chosen": same + "yes.", "rejected": same + "no."}] * 2
    return ctx.args("--stage", "dpo", "--model_max_length", 32, data=ctx.file("p.json", pairs))


def read_only_output(ctx: Ctx) -> list[str]:
    if os.geteuid() != 0:
        locked = ctx.tmp / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        ctx.out = locked / "out"
    else:  # root writes through mode bits; /sys refuses new entries even to root
        if os.access("/sys", os.W_OK) and Path("/sys/kernel").is_dir() and not _sys_refuses():
            pytest.skip("no read-only directory to test with")
        ctx.out = Path("/sys") / "fine-tune-out"
    return ctx.args()


def _sys_refuses() -> bool:
    probe = Path("/sys") / ".fine-tune-probe"
    try:
        probe.mkdir()
    except OSError:
        return True
    probe.rmdir()
    return False


def output_is_file(ctx: Ctx) -> list[str]:
    ctx.out = ctx.file("out.txt", "not a directory")
    return ctx.args()


def output_under_file(ctx: Ctx) -> list[str]:
    ctx.out = ctx.file("plain", "x") / "out"
    return ctx.args()


def output_dangling_symlink(ctx: Ctx) -> list[str]:
    ctx.out.symlink_to(ctx.tmp / "gone" / "target")  # os.makedirs would say only "File exists"
    return ctx.args()


def data_fifo(ctx: Ctx) -> list[str]:
    """What ``--data_path <(cat x.json)`` gives: a pipe, readable once (refused before anything opens it)."""
    os.mkfifo(ctx.tmp / "fifo")
    return ctx.args(data=ctx.tmp / "fifo")


def hub_id_not_cached(ctx: Ctx) -> list[str]:
    os.environ["HF_HUB_OFFLINE"] = "1"  # the row runners restore the environment
    return ctx.args(model="no-such-org/no-such-model")


# Evaluations during training (what --eval_generation_file and --eval_mc_dir need).
WATCH = ("--eval_strategy", "steps", "--eval_steps", 1, "--val_size", 1)

# (id, exit code, expected text in the one error line, how to build the command line, mode)
ROWS: list[tuple[str, int, str, Callable[[Ctx], list[str]], str]] = [
    # --- flags (today's known bad flags) ---
    ("unknown-flag", 2, "unrecognized argument --bogus_flag (see --help)", lambda c: c.args("--bogus_flag", 1), SUB),
    ("mistyped-flag", 2, "unrecognized argument --learnig_rate (did you mean --learning_rate?)",
     lambda c: c.args("--learnig_rate", "1e-4"), SUB),
    ("padding-choice", 2, "--padding: invalid choice: 'sideways'", lambda c: c.args("--padding", "sideways"), ""),
    ("truncation-choice", 2, "--truncation: invalid choice: 'tail'", lambda c: c.args("--truncation", "tail"), ""),
    ("on-bad-record-choice", 2, "invalid choice: 'fix'", lambda c: c.args("--on_bad_record", "fix"), ""),
    ("val-size-negative", 2, "--val_size -1.0", lambda c: c.args("--val_size", -1), ""),
    ("val-size-fractional-count", 2, "--val_size 2.5", lambda c: c.args("--val_size", 2.5), ""),
    ("workers-zero", 2, "--preprocessing_num_workers 0", lambda c: c.args("--preprocessing_num_workers", 0), ""),
    ("warmup-ratio-2", 2, "--warmup_ratio 2.0", lambda c: c.args("--warmup_ratio", 2), ""),
    ("warmup-both", 2, "--warmup_ratio and --warmup_steps",
     lambda c: c.args("--warmup_ratio", 0.1, "--warmup_steps", 5), ""),
    ("max-length-2", 2, "--model_max_length 2", lambda c: c.args("--model_max_length", 2), ""),
    ("z-loss-negative", 2, "--z_loss_weight -1.0", lambda c: c.args("--z_loss_weight", -1), ""),
    ("z-loss-nan", 2, "--z_loss_weight nan", lambda c: c.args("--z_loss_weight", "nan"), ""),
    ("lora-r-0", 2, "--lora_r 0", lambda c: c.args("--use_lora", True, "--lora_r", 0), ""),
    ("lora-dropout-1", 2, "--lora_dropout 1.0", lambda c: c.args("--use_lora", True, "--lora_dropout", 1), ""),
    ("lora-targets-empty", 2, "--lora_target_modules",
     lambda c: c.args("--use_lora", True, "--lora_target_modules", ","), ""),
    ("lora-targets-llama", 2, "--lora_target_modules q_proj,v_proj: q_proj, v_proj are not Baichuan2 modules "
     "(Baichuan2 projects q, k and v with one fused W_pack); did you mean W_pack?",
     lambda c: c.args("--use_lora", True, "--lora_target_modules", "q_proj,v_proj"), SUB),
    ("lora-targets-bogus", 2, "--lora_target_modules bogus: no module named bogus in Baichuan2; valid: W_pack, "
     "o_proj, gate_proj, up_proj, down_proj or all-linear",
     lambda c: c.args("--use_lora", True, "--lora_target_modules", "bogus"), ""),
    ("lora-targets-lm-head", 2, "--lora_target_modules lm_head: lm_head cannot take LoRA adapters",
     lambda c: c.args("--use_lora", True, "--lora_target_modules", "lm_head"), ""),
    ("lora-targets-embed-tokens", 2, "--lora_target_modules W_pack,embed_tokens: embed_tokens cannot take LoRA",
     lambda c: c.args("--use_lora", True, "--lora_target_modules", "W_pack,embed_tokens"), ""),
    ("lora-r-beyond-model", 2, "--lora_r 1000000000: at most 128 for ",
     lambda c: c.args("--use_lora", True, "--lora_r", 1000000000), ""),
    ("q-lora-without-lora", 2, "add --use_lora True", lambda c: c.args("--q_lora", True), ""),
    ("not-a-number", 2, "--learning_rate", lambda c: c.args("--learning_rate", "fast"), ""),
    # --- counts and rates that used to fail only after loading ---
    ("batch-size-0", 2, "--per_device_train_batch_size 0", lambda c: c.args("--per_device_train_batch_size", 0), ""),
    ("batch-size-negative", 2, "--per_device_train_batch_size -1",
     lambda c: c.args("--per_device_train_batch_size", -1), ""),
    ("eval-batch-size-0", 2, "--per_device_eval_batch_size 0", lambda c: c.args("--per_device_eval_batch_size", 0), ""),
    ("grad-accum-0", 2, "--gradient_accumulation_steps 0", lambda c: c.args("--gradient_accumulation_steps", 0), ""),
    ("epochs-0", 2, "--num_train_epochs 0", lambda c: c.args("--num_train_epochs", 0), ""),
    ("learning-rate-negative", 2, "--learning_rate -1.0", lambda c: c.args("--learning_rate", -1), ""),
    ("learning-rate-inf", 2, "--learning_rate inf", lambda c: c.args("--learning_rate", "inf"), ""),
    ("save-total-limit-0", 2, "--save_total_limit 0", lambda c: c.args("--save_total_limit", 0), ""),
    # --- output directory ---
    ("output-dir-is-a-file", 2, "is a file, not a directory", output_is_file, ""),
    ("output-dir-under-a-file", 2, "is a file, not a directory", output_under_file, ""),
    ("output-dir-not-writable", 2, "--output_dir", read_only_output, ""),
    # --- base model directory ---
    ("model-missing", 2, "--model_name_or_path ./no/such/model: no such directory",
     lambda c: c.args(model="./no/such/model"), ""),
    ("model-hub-id-offline", 2, "--model_name_or_path no-such-org/no-such-model", hub_id_not_cached, ""),
    ("model-is-a-file", 2, "is a file; give the model's directory", lambda c: c.args(model=c.data), ""),
    ("model-no-weights", 2, "no model weights", lambda c: c.args(model=c.model(remove("model.safetensors"))), ""),
    ("model-no-config", 2, "no config.json", lambda c: c.args(model=c.model(remove("config.json"))), ""),
    ("model-custom-code", 2, 'config.json: model_type "evil" is not Baichuan2',
     lambda c: c.args(model=c.model(set_config(model_type="evil", auto_map={"AutoConfig": "evil.Config"}))), ""),
    ("model-foreign-auto-map", 2, "config.json: auto_map names code that is not this toolkit's",
     lambda c: c.args(model=c.model(set_config(auto_map={"AutoModelForCausalLM": "evil.Model"}))), ""),
    ("model-config-invalid-json", 2, "config.json: not valid JSON",
     lambda c: c.args(model=c.model(lambda d: (d / "config.json").write_text("{\"hidden_size\": "))), ""),
    ("model-config-a-list", 2, "config.json: expected a JSON object",
     lambda c: c.args(model=c.model(lambda d: (d / "config.json").write_text("[]"))), ""),
    ("model-config-bad-field", 2, "config.json: \"hidden_size\" \"big\"",
     lambda c: c.args(model=c.model(lambda d: (d / "config.json").write_text(
         (d / "config.json").read_text().replace('"hidden_size": 128', '"hidden_size": "big"')))), ""),
    ("model-config-null-size", 2, "config.json: \"intermediate_size\" null: expected a whole number",
     lambda c: c.args(model=c.model(set_config(intermediate_size=None))), ""),
    ("model-config-text-size", 2, "config.json: \"intermediate_size\" \"big\": expected a whole number",
     lambda c: c.args(model=c.model(set_config(intermediate_size="big"))), ""),
    ("model-config-huge-size", 2, f"config.json: \"vocab_size\" {10**22}: expected a whole number from 1 to",
     lambda c: c.args(model=c.model(set_config(vocab_size=10**22))), ""),
    ("model-config-0-heads", 2, "config.json: \"num_attention_heads\" 0: expected a whole number",
     lambda c: c.args(model=c.model(set_config(num_attention_heads=0))), ""),
    ("model-config-negative-size", 2, "config.json: \"hidden_size\" -128: expected a whole number",
     lambda c: c.args(model=c.model(set_config(hidden_size=-128))), ""),
    ("model-rope-odd-head-size", 2, "head size 1 (hidden_size 128 / num_attention_heads 128) is odd; RoPE needs "
     "an even head size", lambda c: c.args(model=c.model(set_config(num_attention_heads=128))), SUB),
    ("model-no-tokenizer", 2, "no tokenizer.model", lambda c: c.args(model=c.model(remove("tokenizer.model"))), ""),
    ("model-tokenizer-garbage", 2, "tokenizer.model: not a sentencepiece model",
     lambda c: c.args(model=c.model(lambda d: (d / "tokenizer.model").write_bytes(os.urandom(300)))), ""),
    ("safetensors-truncated", 2, "model.safetensors: not a complete safetensors file (truncated",
     lambda c: c.args(model=c.model(lambda d: truncate(d / "model.safetensors"))), SUB),
    ("safetensors-random", 2, "model.safetensors: not a complete safetensors file",
     lambda c: c.args(model=c.model(lambda d: (d / "model.safetensors").write_bytes(os.urandom(4096)))), ""),
    ("safetensors-empty", 2, "model.safetensors: not a complete safetensors file (0 bytes)",
     lambda c: c.args(model=c.model(lambda d: truncate(d / "model.safetensors", 0))), ""),
    ("safetensors-index-missing-shard", 2, "names shard 'model-00002.safetensors'",
     lambda c: c.args(model=c.model(shard_missing)), ""),
    ("torch-bin-truncated", 2, "pytorch_model.bin: not a complete torch checkpoint",
     lambda c: c.args(model=c.model(write_bin)), ""),
    ("max-length-beyond-rope", 2, "--model_max_length 4096: beyond the 512 positions",
     lambda c: c.args("--model_max_length", 4096), ""),
    # --- DeepSpeed config ---
    ("ds-missing", 2, "--deepspeed", lambda c: c.args("--deepspeed", c.tmp / "nope.json"), ""),
    ("ds-invalid-json", 2, "ds.json: not valid JSON", lambda c: c.args("--deepspeed", c.ds("{\"a\": ")), ""),
    ("ds-a-list", 2, "ds.json: expected a JSON object", lambda c: c.args("--deepspeed", c.ds([1, 2])), ""),
    ("ds-stage-7", 2, "ds.json: \"zero_optimization.stage\" 7: must be 0, 1, 2 or 3",
     lambda c: c.args("--deepspeed", c.ds(ds_with(stage=7))), ""),
    ("ds-zero-not-object", 2, "\"zero_optimization\" must be a JSON object",
     lambda c: c.args("--deepspeed", c.ds({"zero_optimization": 3})), ""),
    ("ds-micro-batch-disagrees", 2, "\"train_micro_batch_size_per_gpu\" 4 disagrees with --per_device_train_batch_size 1",
     lambda c: c.args("--per_device_train_batch_size", 1, "--deepspeed",
                      c.ds(ds_with(train_micro_batch_size_per_gpu=4))), ""),
    ("ds-grad-accum-disagrees", 2, "\"gradient_accumulation_steps\" 2 disagrees with --gradient_accumulation_steps 1",
     lambda c: c.args("--deepspeed", c.ds(ds_with(gradient_accumulation_steps=2))), ""),
    ("ds-train-batch-disagrees", 2, "\"train_batch_size\" 16 disagrees with --per_device_train_batch_size 2",
     lambda c: c.args("--per_device_train_batch_size", 2, "--deepspeed", c.ds(ds_with(train_batch_size=16))), ""),
    ("ds-zero3-no-gather", 2, "stage3_gather_16bit_weights_on_model_save",
     lambda c: c.args("--deepspeed", c.ds(ds_with(stage=3))), SUB),
    # --- config files ---
    ("config-unknown-option", 2, "c.yaml: unknown option(s): no_such_option",
     lambda c: [str(c.file("c.yaml", f"data_path: {c.data}\noutput_dir: {c.out}\nno_such_option: 1\n"))], ""),
    ("config-invalid-yaml", 2, "c.yaml: not valid YAML", lambda c: [str(c.file("c.yaml", "data_path: [unclosed\n"))], ""),
    ("config-missing", 2, "missing.yaml: cannot read config file", lambda c: [str(c.tmp / "missing.yaml")], ""),
    # --- existing checkpoints and resuming ---
    ("checkpoints-without-resume", 2, "already holds checkpoints (checkpoint-2)",
     lambda c: (c.checkpoint(), c.args())[1], ""),
    ("resume-nothing-complete", 2, "--resume_from_checkpoint True: no complete checkpoint",
     lambda c: ((c.out / "checkpoint-2").mkdir(parents=True), c.args("--resume_from_checkpoint", True))[1], ""),
    ("resume-no-such-dir", 2, "no such checkpoint directory",
     lambda c: c.args("--resume_from_checkpoint", c.tmp / "checkpoint-9"), ""),
    ("resume-truncated-shard", 2, "model.safetensors has",
     lambda c: (c.checkpoint(damage=lambda p: truncate(p / "model.safetensors")),
                c.args("--resume_from_checkpoint", True))[1], ""),
    ("resume-invalid-trainer-state", 2, "trainer_state.json is not valid JSON",
     lambda c: c.args("--resume_from_checkpoint", c.checkpoint(state="{\"global_step\": ")), ""),
    ("resume-marker-without-file-list", 2, "checkpoint_complete.json lists no files with their size and sha256",
     lambda c: c.args("--resume_from_checkpoint", c.checkpoint(
         damage=lambda p: (p / saving.COMPLETE_MARKER).write_text('{"global_step": 2}'))), ""),
    ("resume-unsafe-pickle", 2, "rng_state.pth: holds pickled objects that are not plain tensors or values",
     lambda c: c.args("--resume_from_checkpoint", c.checkpoint(
         damage=lambda p: (torch.save({"a": Ctx}, p / "rng_state.pth"), saving.mark_checkpoint_complete(p, 2)))), ""),
    ("resume-no-run-record", 2, "no run_record.json (written by an older version)",
     lambda c: c.args("--resume_from_checkpoint", c.checkpoint()), ""),
    ("resume-other-max-length", 2, "--model_max_length was 64 when checkpoint-2 was written, now 512",
     lambda c: c.args("--resume_from_checkpoint", recorded(c, "--model_max_length", 64)), ""),
    ("resume-other-batch-size", 2, "--per_device_train_batch_size was 4 when checkpoint-2 was written, now 8",
     lambda c: c.args("--resume_from_checkpoint", recorded(c, "--per_device_train_batch_size", 4)), ""),
    ("resume-other-data", 2, "--data_path was",
     lambda c: c.args("--resume_from_checkpoint", recorded(c), data=c.file("other.json", [GOOD] * 5)), ""),
    ("resume-without-use-lora", 2, "--use_lora was True when checkpoint-2 was written, now False",
     lambda c: c.args("--resume_from_checkpoint", recorded(c, "--use_lora", True)), ""),
    ("resume-other-lora-rank", 2, "--lora_r was 1 when checkpoint-2 was written, now 8; this changes what",
     lambda c: c.args("--use_lora", True, "--lora_r", 8, "--resume_from_checkpoint", recorded(c, "--use_lora", True)),
     ""),
    ("resume-other-lora-targets", 2, "--lora_target_modules was W_pack when checkpoint-2 was written, now all-linear",
     lambda c: c.args("--use_lora", True, "--lora_target_modules", "all-linear", "--resume_from_checkpoint",
                      recorded(c, "--use_lora", True, "--lora_target_modules", "W_pack")), ""),
    ("resume-other-base-model", 2, "another architecture); resume with the base model it was trained from",
     lambda c: c.args("--resume_from_checkpoint", recorded(c, model=c.alibi)), ""),
    ("resume-streamed-checkpoint-without-streaming", 2, "--streaming was True when checkpoint-2 was written, now (none)",
     lambda c: c.args("--max_steps", 4, "--resume_from_checkpoint", recorded(c, "--streaming", True, "--max_steps", 4)),
     ""),
    ("resume-ignore-unknown-name", 2, "--resume_ignore_mismatch lora_r: 'lora_r' cannot be ignored",
     lambda c: c.args("--resume_ignore_mismatch", "lora_r"), ""),
    # --- data (exit 1) ---
    ("data-lone-surrogate", 1, "record 1: conversations[0].value: invalid Unicode: lone surrogate U+D800",
     lambda c: c.args(data=c.file("s.json", [GOOD, surrogate_record()])), SUB),
    ("data-lone-surrogate-skip", 1, "no example left to train on (1 record(s) read, 1 bad: invalid Unicode)",
     lambda c: c.args("--on_bad_record", "skip", data=c.file("s.json", [surrogate_record()])), ""),
    ("data-surrogate-in-system", 1, "line 1: system: invalid Unicode",
     lambda c: c.args(data=c.file("s.jsonl", json.dumps({**GOOD, "system": "\udfff"}) + "\n")), ""),
    ("data-nested-array", 1, "n.json record 1: JSON nested too deeply",
     lambda c: c.args(data=c.file("n.json", "[" + json.dumps(GOOD) + ", {\"id\": " + DEEP + "}]")), SUB),
    ("data-nested-jsonl", 1, "n.jsonl line 2: JSON nested too deeply",
     lambda c: c.args(data=c.file("n.jsonl", json.dumps(GOOD) + "\n{\"conversations\": " + DEEP + "}\n")), ""),
    ("data-unknown-role", 1, "record 0: conversations[1].from: unknown role 'robot'",
     lambda c: c.args(data=c.file("r.json", [{"conversations": [{"from": "human", "value": "a"},
                                                                 {"from": "robot", "value": "b"}]}])), ""),
    ("data-invalid-json", 1, "bad.json: invalid JSON at line 1", lambda c: c.args(data=c.file("bad.json", "[{")), ""),
    ("data-missing", 1, "nope.json: no such file or directory", lambda c: c.args(data=c.tmp / "nope.json"), ""),
    ("data-empty", 1, "empty.jsonl: empty file", lambda c: c.args(data=c.file("empty.jsonl", "")), ""),
    ("data-not-utf8", 1, "latin.json: not UTF-8 text", lambda c: c.args(data=c.file("latin.json", b"[\"\xe9\"]")), ""),
    ("data-unknown-format", 1, "q.jsonl: unknown format",
     lambda c: c.args(data=c.file("q.jsonl", "{\"question\": \"q\", \"answer\": \"a\"}\n")), ""),
    ("data-dir-without-files", 1, "holds no .json or .jsonl files",
     lambda c: c.args(data=(c.tmp / "empty_dir").mkdir() or c.tmp / "empty_dir"), ""),
    ("data-val-size-too-big", 1, "val_size: 5.0 leaves no training", lambda c: c.args("--val_size", 5), ""),
    ("eval-data-bad-record", 1, "1 bad record in the eval data: ",
     lambda c: c.args("--eval_data_path", c.file("e.json", [{"conversations": [{"from": "bot", "value": "b"}]}])), ""),
    ("eval-data-surrogate", 1, "in the eval data: ",
     lambda c: c.args("--eval_data_path", c.file("e.json", [surrogate_record("value")])), ""),
    ("dpo-pairs-identical-after-truncation", 1, "p.json: no preference pair left to train on (dropped: 2 chosen "
     "and rejected identical after truncation at --model_max_length 32)", pairs_identical_after_cut, ""),
    ("data-bad-record-existing-output", 1, "unknown role 'robot'",
     lambda c: (c.file("out/keep.txt", "previous results"),
                c.args(data=c.file("r.json", [{"conversations": [{"from": "robot", "value": "b"}]}])))[1], ""),
    ("output-dir-dangling-symlink", 2, "out: a dangling symbolic link (to ", output_dangling_symlink, ""),
    ("data-pipe", 1, "fifo: not a regular file (a pipe, e.g. a <(...) process substitution", data_fifo, ""),
    ("data-comma-list-part-missing", 1, "nope.json: no such file or directory (the data path",
     lambda c: c.args(data=f"{c.data},{c.tmp / 'nope.json'}"), ""),
    ("data-openai-weight-half", 1, "w.jsonl line 1: messages[1].weight: weight 0.5: expected 0 (not trained) or 1",
     lambda c: c.args(data=c.file("w.jsonl", json.dumps({"messages": [
         {"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]}))), ""),
    ("data-cache-dir-is-file", 1, "cachefile: not a directory (--data_cache_dir",
     lambda c: c.args("--data_cache_dir", c.file("cachefile", "not a directory")), ""),
    # --- continued pre-training and mixing (docs/pretraining.md) ---
    ("pt-empty-file", 1, "empty.txt: empty file",
     lambda c: c.args("--stage", "pt", data=c.file("empty.txt", "")), ""),
    ("pt-binary-file", 1, "blob.txt: a binary file (a NUL byte at byte 3)",
     lambda c: c.args("--stage", "pt", data=c.file("blob.txt", b"PK\x03\x00\x14\x00binary")), SUB),
    ("pt-text-not-a-string", 1, "t.jsonl:2: text: is a JSON number, expected a string",
     lambda c: c.args("--stage", "pt", data=c.file("t.jsonl", '{"text": "a document"}\n{"text": 42}\n')), ""),
    ("pt-text-field-missing", 1, "t.jsonl:1: body: missing (the record's keys: text",
     lambda c: c.args("--stage", "pt", "--text_field", "body", data=c.file("t.jsonl", '{"text": "a"}\n')), ""),
    ("pt-source-missing", 1, "nope.txt: no such file or directory",
     lambda c: c.args("--stage", "pt", data=f"{c.file('a.txt', 'one document')},{c.tmp / 'nope.txt'}"), ""),
    ("pt-flag-without-stage", 2, "--pt_cross_document: a raw-text flag; add --stage pt",
     lambda c: c.args("--pt_cross_document", True), ""),
    ("mix-weight-not-a-number", 2, "good.json: weight 'lots' is not a number",
     lambda c: c.args("--mix_strategy", "interleave_under", data=f"{c.data}:lots,{c.data}:1"), ""),
    ("mix-weights-sum-to-zero", 2, "the weights sum to 0",
     lambda c: c.args("--mix_strategy", "interleave_under", data=f"{c.data}:0,{c.file('b.json', [GOOD])}:0"), ""),
    ("mix-weight-negative", 2, "weight -1: must be a finite number >= 0",
     lambda c: c.args("--mix_strategy", "interleave_over", data=f"{c.data}:-1,{c.data}:1"), ""),
    ("mix-weights-partial", 2, "no weight, but other sources have one",
     lambda c: c.args("--mix_strategy", "interleave_under", data=f"{c.data}:0.5,{c.file('b.json', [GOOD])}"), ""),
    ("mix-weights-with-concat", 2, "--data_path has weights, but --mix_strategy concat",
     lambda c: c.args(data=f"{c.data}:0.5,{c.file('b.json', [GOOD])}:0.5"), ""),
    ("mix-source-missing", 1, "nope.json: no such file or directory",
     lambda c: c.args("--mix_strategy", "interleave_under", data=f"{c.data}:0.5,{c.tmp / 'nope.json'}:0.5"), ""),
    ("streaming-without-max-steps", 2, "--streaming True: needs --max_steps N",
     lambda c: c.args("--streaming", True), ""),
    ("streaming-with-val-size", 2, "--streaming True: --val_size would hold examples out",
     lambda c: c.args("--streaming", True, "--max_steps", 2, "--val_size", 0.1), ""),
    ("streaming-dpo", 2, "--streaming True: not supported with --stage dpo",
     lambda c: c.args("--streaming", True, "--max_steps", 2, "--stage", "dpo"), ""),
    # Read before the model loads (the summary's sample), not when training reaches the file.
    ("streaming-binary-source", 1, "blob.txt: a binary file (a NUL byte at byte 3)",
     lambda c: c.args("--streaming", True, "--max_steps", 2, "--stage", "pt", "--mix_strategy", "interleave_under",
                      data=f"{c.file('a.txt', 'one document')}:1," + str(c.file("blob.txt", b"PK\x03\x00\x14")) + ":1"),
     ""),
    ("streaming-empty-source", 1, "empty.jsonl: empty file",
     lambda c: c.args("--streaming", True, "--max_steps", 2, data=f"{c.data},{c.file('empty.jsonl', '')}"), ""),
    # --- watching generation and forgetting during training (training/generation_eval.py) ---
    ("eval-generation-file-missing", 2, "--eval_generation_file", lambda c: c.args(*WATCH,
     "--eval_generation_file", c.tmp / "nope.jsonl"), ""),
    ("eval-generation-samples-0", 2, "--eval_generation_samples 0: must be at least 1",
     lambda c: c.args(*WATCH, "--eval_generation_file", c.file("p.txt", "hi"), "--eval_generation_samples", 0), ""),
    ("eval-generation-samples-alone", 2, "--eval_generation_samples: needs --eval_generation_file",
     lambda c: c.args(*WATCH, "--eval_generation_samples", 4), ""),
    ("eval-generation-no-evaluations", 2, "--eval_generation_file: runs at each evaluation; add --eval_strategy",
     lambda c: c.args("--eval_generation_file", c.file("p.txt", "hi")), ""),
    ("eval-generation-no-eval-set", 2, "an evaluation set (--val_size or --eval_data_path)",
     lambda c: c.args("--eval_strategy", "steps", "--eval_generation_file", c.file("p.txt", "hi")), ""),
    ("eval-generation-no-prompts", 1, "--eval_generation_file: ", lambda c: c.args(*WATCH,
     "--eval_generation_file", c.file("p.txt", "\n  \n")), ""),
    ("eval-generation-empty-prompt", 1, "empty prompt", lambda c: c.args(*WATCH,
     "--eval_generation_file", c.file("p.jsonl", '{"prompt": "hi"}\n{"prompt": " "}\n')), ""),
    ("eval-mc-dir-missing", 2, "--eval_mc_dir", lambda c: c.args(*WATCH, "--eval_mc_dir", c.tmp / "nope"), ""),
    ("max-mc-drop-alone", 2, "--max_mc_drop: needs --eval_mc_dir", lambda c: c.args(*WATCH, "--max_mc_drop", 5), ""),
    ("max-mc-drop-negative", 2, "--max_mc_drop -5.0: must be accuracy points in (0, 100]",
     lambda c: c.args(*WATCH, "--eval_mc_dir", c.tmp, "--max_mc_drop", -5), ""),
    ("eval-mc-no-split", 1, "has neither val/ nor test/", lambda c: c.args(*WATCH, "--eval_mc_dir", c.tmp), ""),
    ("eval-mc-bad-answer", 1, "quiz_val.csv:2: answer 'E' is not A-D", lambda c: c.args(*WATCH, "--eval_mc_dir",
     c.file("mc/val/quiz_val.csv", "question,A,B,C,D,answer\nq,a,b,c,d,E\n").parent.parent, "--eval_mc_shots", 0), ""),
    ("eval-mc-shots-without-dev", 1, "has no file for quiz (5-shot needs one)", lambda c: c.args(*WATCH,
     "--eval_mc_dir", c.file("mc/val/quiz_val.csv", "question,A,B,C,D,answer\nq,a,b,c,d,A\n").parent.parent), ""),
]

if torch.cuda.is_available():
    ROWS = [r for r in ROWS if r[0] not in ("q-lora-no-cuda", "fp16-on-cpu")]
else:
    ROWS += [
        ("fp16-on-cpu", 2, "--fp16 True needs a GPU", lambda c: c.args("--fp16", True), ""),
        ("q-lora-no-cuda", 2, "QLoRA (--q_lora True) needs", lambda c: c.args("--use_lora", True, "--q_lora", True), ""),
    ]


def snapshot(path: Path) -> list[tuple[str, bool, int, int]] | None:
    """Every entry under `path` with its size and mtime (None when `path` does not exist). The directory's
    own mtime is left out: the run's lock file comes and goes in it."""
    if not path.exists():
        return None
    if not path.is_dir():
        return [("", False, path.stat().st_size, path.stat().st_mtime_ns)]
    return sorted((str(p.relative_to(path)), p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in path.rglob("*"))


def error_line(stderr: str, code: int) -> str:
    """The one error line; it must be the last thing printed (a message of several lines fails here)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("fine-tune.py:")]
    assert len(ours) == 1, stderr[-3000:]
    assert lines[-1] == ours[0], f"lines after the error:\n{stderr[-3000:]}"
    prefix = "fine-tune.py: error: " if code == 2 else "fine-tune.py: data error: "
    assert ours[0].startswith(prefix), ours[0]
    return ours[0]


@pytest.fixture
def clean_env(tmp_path):
    """The rows' environment: no launcher variables, a private data cache; restored afterwards (main sets
    RANK & co. for DeepSpeed runs without a launcher)."""
    saved = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    os.environ.update(BAICHUAN_FINETUNE_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu",
                      OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_table_has_at_least_50_rows():
    assert len(ROWS) >= 50 and len({r[0] for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row_id, code, expected, build, mode", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(row_id, code, expected, build, mode, tmp_path, tiny_model_dir, tiny_alibi_model_dir,
                   clean_env, capsys):
    work = tmp_path / "work"
    work.mkdir()
    ctx = Ctx(tmp=work, data=work / "good.json", rope=tiny_model_dir, alibi=tiny_alibi_model_dir, out=work / "out")
    ctx.file("good.json", [GOOD] * 4)
    argv = build(ctx)
    before = snapshot(ctx.out)
    if mode == SUB:
        proc = subprocess.run([sys.executable, str(FINE_TUNE), *argv], cwd=work, env=dict(os.environ),
                              capture_output=True, text=True, timeout=240)
        returncode, stderr = proc.returncode, proc.stderr
        assert "Traceback" not in proc.stdout
    else:
        capsys.readouterr()
        returncode = main(argv)
        stderr = capsys.readouterr().err
    line = error_line(stderr, code)
    assert returncode == code, line
    assert expected in line, line
    assert snapshot(ctx.out) == before, f"{ctx.out} changed"


def test_longer_than_trained_is_allowed_with_the_flag_and_for_alibi(tiny_model_dir, tiny_alibi_model_dir, tmp_path):
    """The positions check refuses only RoPE beyond max_position_embeddings without the override."""
    from baichuan_finetune.options.arguments import parse_args
    from baichuan_finetune.training.preflight import check_run

    def run_check(model: Path, *extra: str) -> None:
        check_run(parse_args(["--data_path", "x.json", "--output_dir", str(tmp_path / "o"),
                              "--model_name_or_path", str(model), "--model_max_length", "4096", *extra]))

    run_check(tiny_model_dir, "--allow_longer_than_trained", "True")
    run_check(tiny_alibi_model_dir)
    assert not (tmp_path / "o").exists()  # checking creates nothing


def test_good_model_dirs_pass_preflight(tiny_model_dir, tmp_path):
    """The checks accept what save_pretrained writes: one safetensors file, shards with an index, a torch zip."""
    from transformers import AutoModelForCausalLM

    from baichuan_finetune.training.preflight import check_model_dir

    check_model_dir(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="1MB")
    for name in ("tokenizer.model",):
        shutil.copy(tiny_model_dir / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").exists()
    check_model_dir(sharded)
    as_bin = tmp_path / "bin"
    shutil.copytree(tiny_model_dir, as_bin)
    (as_bin / "model.safetensors").unlink()
    torch.save(model.state_dict(), as_bin / "pytorch_model.bin")
    assert zipfile.is_zipfile(as_bin / "pytorch_model.bin")
    check_model_dir(as_bin)


def test_deepspeed_batch_sizes_that_agree_pass(tmp_path, monkeypatch):
    """"auto" and numbers equal to the flags pass; train_batch_size counts WORLD_SIZE processes."""
    from baichuan_finetune.options.arguments import TrainingArguments, UsageError, check_deepspeed_config

    training = TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=3)
    path = tmp_path / "ds.json"
    for world_size, config, ok in (
        ("1", ds_with(), True),
        ("1", ds_with(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=3, train_batch_size=6), True),
        ("4", ds_with(train_batch_size=24), True),
        ("4", ds_with(train_batch_size=6), False),
        ("1", ds_with(stage=True), False),  # JSON true is not stage 1
    ):
        monkeypatch.setenv("WORLD_SIZE", world_size)
        path.write_text(json.dumps(config))
        training.deepspeed = str(path)
        if ok:
            check_deepspeed_config(training)
        else:
            with pytest.raises(UsageError, match=r"^--deepspeed .*ds\.json: "):
                check_deepspeed_config(training)
