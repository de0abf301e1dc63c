"""fine-tune.py's options: every bad flag is a UsageError naming it, config files, --local_rank, z-loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from baichuan_finetune.options.arguments import (
    DataArguments,
    LoraArguments,
    UsageError,
    is_config_file,
    parse_args,
    pop_local_rank,
    validate,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def base(tmp_path: Path) -> list[str]:
    return ["--data_path", "x.json", "--output_dir", str(tmp_path / "out"), "--report_to", "none"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--bogus_flag", "1"], "Some specified arguments are not used by the HfArgumentParser: ['--bogus_flag', '1']"),
        (["--padding", "sideways"], "argument --padding: invalid choice: 'sideways'"),
        (["--truncation", "tail"], "argument --truncation: invalid choice: 'tail'"),
        (["--on_bad_record", "fix"], "argument --on_bad_record/--on-bad-record: invalid choice: 'fix'"),
        (["--val_size", "-1"], "--val_size -1.0: must be a fraction in [0, 1) or a whole count >= 1"),
        (["--val_size", "2.5"], "--val_size 2.5: must be a fraction in [0, 1) or a whole count >= 1"),
        (["--preprocessing_num_workers", "0"], "--preprocessing_num_workers 0: must be at least 1"),
        (["--warmup_ratio", "2"], "--warmup_ratio 2.0: must be in [0, 1)"),
        (["--warmup_ratio", "0.1", "--warmup_steps", "5"], "--warmup_ratio and --warmup_steps: give only one"),
        (["--model_max_length", "2"], "--model_max_length 2: must be at least 8"),
        (["--z_loss_weight", "-1"], "--z_loss_weight -1.0: must be a finite number >= 0"),
        (["--z_loss_weight", "nan"], "--z_loss_weight nan: must be a finite number >= 0"),
        (["--use_lora", "True", "--lora_r", "0"], "--lora_r 0: must be at least 1"),
        (["--use_lora", "True", "--lora_dropout", "1"], "--lora_dropout 1.0: must be in [0, 1)"),
        (["--use_lora", "True", "--lora_target_modules", ","],
         "--lora_target_modules: give module names (e.g. W_pack,o_proj) or all-linear"),
        (["--q_lora", "True"], "--q_lora True trains LoRA adapters on a 4-bit base: add --use_lora True"),
    ],
)
def test_bad_flag_is_a_usage_error_naming_it(extra, message, tmp_path):
    with pytest.raises(UsageError) as e:
        parse_args(base(tmp_path) + extra)
    assert str(e.value) == message or str(e.value).startswith(message), str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only messages")
def test_cpu_only_flags(tmp_path):
    with pytest.raises(UsageError, match=r"^--fp16 True needs a GPU; use --bf16 True or fp32 on CPU$"):
        parse_args(base(tmp_path) + ["--fp16", "True"])
    with pytest.raises(UsageError, match=r"^QLoRA \(--q_lora True\) needs "):
        parse_args(base(tmp_path) + ["--use_lora", "True", "--q_lora", "True"])
    assert parse_args(base(tmp_path)).training.use_cpu is True  # set for you without CUDA


def test_lora_options_are_checked_only_with_use_lora(tmp_path):
    args = parse_args(base(tmp_path) + ["--lora_r", "0", "--lora_target_modules", ","])
    assert args.lora.use_lora is False and args.lora.lora_r == 0


def test_lora_target_modules():
    assert LoraArguments(use_lora=True, lora_target_modules=" all-linear ").target_modules == "all-linear"
    assert LoraArguments(use_lora=True, lora_target_modules="W_pack, o_proj,").target_modules == ["W_pack", "o_proj"]


@pytest.mark.parametrize(
    "fields, flag",
    [
        (dict(data_path=""), "--data_path: required"),
        (dict(padding="sideways"), "--padding 'sideways': not one of longest, max_length"),
        (dict(truncation="tail"), "--truncation 'tail': not one of head, rounds"),
        (dict(on_bad_record="fix"), "--on_bad_record 'fix': not one of error, skip"),
    ],
)
def test_data_arguments_built_in_code_are_checked_too(fields, flag):
    """Config files and library callers skip argparse's choices; the dataclass checks them."""
    with pytest.raises(UsageError) as e:
        DataArguments(**{"data_path": "x.json", **fields})
    assert str(e.value).startswith(flag), str(e.value)


def test_z_loss_weight(tmp_path):
    assert parse_args(base(tmp_path)).training.z_loss_weight is None  # the base model config's value
    assert parse_args(base(tmp_path) + ["--z_loss_weight", "1e-4"]).training.z_loss_weight == pytest.approx(1e-4)
    assert parse_args(base(tmp_path) + ["--z_loss_weight", "0"]).training.z_loss_weight == 0.0


def test_yaml_and_json_config_files_give_the_same_arguments(tmp_path):
    options = {"data_path": "x.json", "output_dir": str(tmp_path / "out"), "report_to": "none",
               "model_max_length": 64, "use_lora": True, "lora_r": 4, "z_loss_weight": 0.5, "packing": True}
    (tmp_path / "run.json").write_text(json.dumps(options))
    (tmp_path / "run.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in options.items()))
    for name in ("run.json", "run.yaml"):
        args = parse_args([str(tmp_path / name)])
        assert (args.data.data_path, args.data.packing) == ("x.json", True)
        assert (args.lora.use_lora, args.lora.lora_r) == (True, 4)
        assert (args.training.model_max_length, args.training.z_loss_weight) == (64, 0.5)
        assert args.training.local_rank == -1


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("c.yaml", "data_path: x.json\noutput_dir: o\nno_such_option: 1\n", "c.yaml: unknown option(s): no_such_option"),
        ("c.yaml", "data_path: [unclosed\n", "c.yaml: not valid YAML: "),
        ("c.json", "{\"data_path\": ", "c.json: not valid JSON: "),
        ("c.yaml", "- data_path\n", "c.yaml: expected a mapping of option names to values"),
        ("c.yaml", "data_path: x.json\noutput_dir: o\npadding: sideways\n", "--padding 'sideways': not one of"),
    ],
)
def test_bad_config_file(name, text, message, tmp_path):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UsageError) as e:
        parse_args([str(path)])
    assert str(e.value).replace(str(tmp_path) + "/", "").startswith(message), str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UsageError, match=r"missing\.yaml: cannot read config file: No such file or directory"):
        parse_args([str(tmp_path / "missing.yaml")])


def test_launcher_local_rank_next_to_a_config_file(tmp_path):
    rest, rank = pop_local_rank(["--local_rank=1", "run.yaml"])
    assert rest == ["run.yaml"] and rank == 1 and is_config_file(rest)
    rest, rank = pop_local_rank(["run.json", "--local_rank", "0"])
    assert rest == ["run.json"] and rank == 0
    assert pop_local_rank(["--data_path", "x.json"]) == (["--data_path", "x.json"], None)
    assert not is_config_file(["--data_path", "x.json"])
    assert not is_config_file(["run.yaml", "run2.yaml"])
    # What a launcher runs: the config file plus --local_rank, which reaches TrainingArguments.
    config = tmp_path / "run.yaml"
    config.write_text(f"data_path: x.json\noutput_dir: {tmp_path / 'out'}\nreport_to: none\n")
    assert parse_args([str(config), "--local_rank=0"]).training.local_rank == 0
    # A value in the file wins over the launcher's.
    config.write_text(f"data_path: x.json\noutput_dir: {tmp_path / 'out'}\nreport_to: none\nlocal_rank: -1\n")
    assert parse_args(["--local_rank", "0", str(config)]).training.local_rank == -1


def _with_deepspeed(tmp_path: Path, ds: dict | str, *extra: str):
    """Parsed arguments with ``--deepspeed`` set afterwards: building TrainingArguments with it would
    set up torch.distributed in this test process."""
    args = parse_args(base(tmp_path) + list(extra))
    if isinstance(ds, dict):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(ds))
        ds = str(path)
    args.training.deepspeed = ds
    return args


def test_deepspeed_config_checks(tmp_path):
    official = json.loads((REPO_ROOT / "ds_config.json").read_text())
    validate(_with_deepspeed(tmp_path, official))  # the official ZeRO-3 config is fine
    validate(_with_deepspeed(tmp_path, str(REPO_ROOT / "ds_config_zero2.json")))
    no_gather = json.loads(json.dumps(official))
    no_gather["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    with pytest.raises(UsageError, match=r"ZeRO-3 needs \"stage3_gather_16bit_weights_on_model_save\": true"):
        validate(_with_deepspeed(tmp_path, no_gather))
    with pytest.raises(UsageError, match=r"^--deepspeed .*nope\.json: cannot read: No such file or directory$"):
        validate(_with_deepspeed(tmp_path, str(tmp_path / "nope.json")))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(UsageError, match=r"^--deepspeed .*broken\.json: not valid JSON"):
        validate(_with_deepspeed(tmp_path, str(tmp_path / "broken.json")))


def test_qlora_refuses_zero3(tmp_path):
    args = _with_deepspeed(tmp_path, str(REPO_ROOT / "ds_config.json"))
    args.lora = LoraArguments(use_lora=True, q_lora=True)
    with pytest.raises(UsageError, match=r"^--q_lora True cannot shard 4-bit weights with ZeRO-3"):
        validate(args)
