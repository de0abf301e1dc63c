"""The console command `baichuan-finetune` (baichuan_finetune/cli): the dispatcher, config files with
flag overrides for every subcommand, the examples/ configs (each parses and plans), run_config.yaml
repeating a run, the package data the installed command reads, and the one map of errors to exit codes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from baichuan_finetune.options import arguments, plan
from baichuan_finetune.core import errors
from baichuan_finetune.builder import tiny
from baichuan_finetune.options.arguments import UsageError, parse_args
from baichuan_finetune.cli import main as cli_main
from baichuan_finetune.cli import plan as cli_plan

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
CUDA = torch.cuda.is_available()


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "baichuan_finetune.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=600, **kwargs)


# ----- the dispatcher -----


def test_help_lists_every_command():
    proc = cli("--help")
    assert proc.returncode == 0
    for name in cli_main.COMMANDS:
        assert f"\n  {name} " in proc.stdout, name


def test_every_subcommand_has_help(capsys):
    for name in cli_main.COMMANDS:
        if name == "train":
            continue  # below, in its own process (it names its launcher options, then fine-tune.py's)
        with pytest.raises(SystemExit) as e:
            cli_main.main([name, "--help"])
        assert e.value.code == 0, name
        assert f"baichuan-finetune {name}" in capsys.readouterr().out, name


def test_train_help_names_the_launcher_and_the_training_options():
    proc = cli("train", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--num_gpus N" in proc.stdout and "--hostfile FILE" in proc.stdout  # the launcher's
    assert "--learning_rate" in proc.stdout and "--lora_target_modules" in proc.stdout  # fine-tune.py's


def test_unknown_command_is_one_line_with_a_suggestion():
    proc = cli("trian")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "baichuan-finetune: error: unknown command 'trian' (did you mean train?)"


def test_env_names_versions_kernels_and_extras():
    proc = cli("env", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["libraries"]["torch"] == torch.__version__.split("+")[0] or info["libraries"]["torch"] == torch.__version__
    assert info["cuda"]["available"] == CUDA
    assert info["attention kernels (training)"]["sdpa"] == "available"
    assert set(info["optional extras"]) == set(__import__("baichuan_finetune.cli.env", fromlist=["EXTRAS"]).EXTRAS)


# ----- config files for the tools: flags override, unknown keys named -----


def test_a_tool_config_file_and_flag_overrides(tmp_path, capsys):
    config = tmp_path / "plan.yaml"
    config.write_text("model: 7b\nmethod: lora\ngpu_memory_gb: 24\njson: true\n")
    assert cli_plan.main([str(config)]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert cli_plan.main(["--model", "7b", "--method", "lora", "--gpu_memory_gb", "24", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == from_file  # the file is the flags
    assert cli_plan.main([str(config), "--method", "full"]) == 0
    overridden = json.loads(capsys.readouterr().out)
    assert overridden["method"] == "full" and from_file["method"] == "lora"


def test_unknown_key_in_a_tool_config_is_one_line_with_a_suggestion(tmp_path):
    config = tmp_path / "chat.yaml"
    config.write_text("model: out\nmax_new_token: 8\n")
    proc = cli("chat", config)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"baichuan-finetune chat: error: {config}: unknown option 'max_new_token' (did you mean max_new_tokens?)"


def test_a_bad_value_in_a_tool_config_is_refused(tmp_path, capsys):
    config = tmp_path / "plan.yaml"
    config.write_text("model: 7b\nzero: 5\n")
    assert cli_main.main(["plan", str(config)]) == 2
    assert "zero: 5 is not one of auto, 2, 3" in capsys.readouterr().err


# ----- training configs: the file is the flags, flags override, run_config.yaml repeats -----

OPTIONS = {"model_name_or_path": "some-model", "data_path": "x.json", "report_to": "none", "model_max_length": 64,
           "use_lora": True, "lora_r": 4, "lora_target_modules": "W_pack,o_proj", "learning_rate": 3.0e-4,
           "lr_scheduler_type": "cosine", "packing": True, "num_train_epochs": 2, "seed": 7, "z_loss_weight": 0.5}


def as_flags(options: dict) -> list[str]:
    return [part for key, value in options.items() for part in (f"--{key}", str(value))]


def comparable(args: arguments.Arguments) -> dict:
    training = args.training.to_dict()
    training.pop("logging_dir", None)  # a time stamp
    return {"model": dataclasses.asdict(args.model), "data": dataclasses.asdict(args.data),
            "lora": dataclasses.asdict(args.lora), "training": training}


def test_a_yaml_config_and_the_same_flags_give_identical_arguments(tmp_path):
    options = dict(OPTIONS, output_dir=str(tmp_path / "out"))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(options))
    from_file, from_flags = parse_args([str(config)]), parse_args(as_flags(options))
    assert comparable(from_file) == comparable(from_flags)
    assert from_file.resolved == from_flags.resolved == options
    assert from_file.training.learning_rate == 3.0e-4 and from_file.lora.lora_r == 4


def test_a_flag_overrides_the_config_file(tmp_path):
    options = dict(OPTIONS, output_dir=str(tmp_path / "out"))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(options))
    args = parse_args([str(config), "--learning_rate", "1e-4", "--lora_r", "16"])
    assert (args.training.learning_rate, args.lora.lora_r) == (1e-4, 16)
    assert args.training.num_train_epochs == 2 and args.data.packing is True  # the rest from the file
    assert args.resolved == dict(options, learning_rate=1e-4, lora_r=16)
    assert comparable(args) == comparable(parse_args(as_flags(dict(options, learning_rate=1e-4, lora_r=16))))


def test_unknown_training_option_in_a_config_suggests_the_right_one(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"data_path: x.json\noutput_dir: {tmp_path}/o\nlearning_rat: 1.0e-4\n")
    with pytest.raises(UsageError, match=r"run\.yaml: unknown option\(s\): learning_rat \(did you mean learning_rate\?\)"):
        parse_args([str(config)])


def losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_run_config_yaml_repeats_the_run(tiny_model_dir, tmp_path, monkeypatch):
    from baichuan_finetune.training.train import RUN_CONFIG, main

    monkeypatch.setenv("WANDB_MODE", "disabled")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny_model_dir), "data_path": str(REPO / "data" / "quickstart.json"),
        "output_dir": str(tmp_path / "first"), "model_max_length": 64, "use_lora": True, "lora_r": 4,
        "max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 5.0e-3, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "seed": 3}))
    assert main([str(config), "--learning_rate", "1e-2"]) == 0  # a flag over the file: recorded too
    saved = tmp_path / "first" / RUN_CONFIG
    recorded = yaml.safe_load(saved.read_text())
    assert recorded["learning_rate"] == 1e-2 and recorded["max_steps"] == 3 and "use_cpu" not in recorded
    assert main([str(saved), "--output_dir", str(tmp_path / "again")]) == 0
    first, again = losses(tmp_path / "first"), losses(tmp_path / "again")
    assert len(first) == 3 and first == again


# ----- examples/: every config parses and plans -----


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_parses_and_plans(path, tiny_model_dir, capsys):
    text = path.read_text()
    assert text.startswith("# "), "each example starts with a comment saying what it runs and how"
    config = arguments.load_config_file(str(path))
    flags = ["--use_cpu", "True"] + ([] if CUDA else ["--tf32", "False"] * ("tf32" in config))
    parsed, resolved = arguments._parse_with_config(arguments._parser(), config, str(path), flags)
    overridden = {f[2:] for f in flags if f.startswith("--")}
    assert {k: v for k, v in resolved.items() if k in config and k not in overridden} == {
        k: v for k, v in config.items() if k not in overridden}  # every key a real option, as written
    model, data, lora, training = parsed
    assert Path(REPO / data.data_path).is_file(), data.data_path
    if training.deepspeed:
        assert (REPO / training.deepspeed).is_file(), training.deepspeed  # relative to the repository root
    planner = ["--json"]
    if not Path(config["model_name_or_path"]).is_absolute() and "/" not in config["model_name_or_path"]:
        planner += ["--model", str(tiny_model_dir), "--device", "cpu", "--nproc", "2", "--zero", "3"]
    if "multinode" in path.name:
        planner += ["--nodes", "2"]
    assert cli_plan.main([str(path), *planner]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == ("qlora" if config.get("q_lora") else "lora" if config.get("use_lora") else "full")
    assert result["recommended"] is not None, f"{path.name}: nothing fits its planned hardware"


def test_the_multinode_example_launches_on_its_hostfile():
    config = REPO / "examples" / "full-13b-multinode.yaml"
    # --no_ssh: one command per node (a launch over ssh would first check the hosts and pdsh)
    proc = cli("train", config, "--hostfile", REPO / "examples" / "hostfile", "--no_ssh", "--node_rank", "0",
               "--master_addr", "127.0.0.1", "--dry_run", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    launched = proc.stdout.strip().splitlines()[-1]
    assert " -m deepspeed.launcher.runner --hostfile " in launched and "--module baichuan_finetune.cli.rank" in launched
    assert launched.endswith(str(config)) or str(config) in launched


# ----- package data: nothing read from the repository at run time -----


def test_packaged_deepspeed_configs_are_the_root_files():
    for name in set(plan.SHIPPED_CONFIG.values()):
        assert (plan.CONFIG_DIR / name).read_bytes() == (REPO / name).read_bytes(), (
            f"{name}: the package's copy differs; cp {name} fine-tune/baichuan_finetune/assets/")


def test_prebuilt_tiny_tokenizer_is_what_the_data_trains():
    assert tiny.PREBUILT_TOKENIZER.read_bytes() == tiny.train_tokenizer(tiny.DEFAULT_DATA_DIR), (
        "data/ changed: rebuild fine-tune/baichuan_finetune/assets/tiny_tokenizer.model with "
        "tiny.train_tokenizer(tiny.DEFAULT_DATA_DIR)")


# ----- one error hierarchy, one map to exit codes -----


def test_every_error_class_has_a_kind_and_keeps_its_exit_code():
    from baichuan_finetune.tools import evaluate, loading, merge, openai_requests
    from baichuan_finetune.checkpoints import fingerprint, saving, weight_files
    from baichuan_finetune.data import records

    expected = {arguments.UsageError: 2, plan.PlanError: 2, loading.ModelDirError: 2, merge.MergeError: 2,
                openai_requests.RequestError: 2, fingerprint.FingerprintError: 2, records.DataError: 1,
                evaluate.EvalDataError: 1, weight_files.WeightFilesError: 1, saving.RunError: 1,
                saving.DiskFullError: 1, saving.OutputDirInUse: 1}
    for cls, code in expected.items():
        assert issubclass(cls, errors.ToolkitError), cls
        assert errors.exit_code(cls("x")) == code, cls
    assert errors.exit_code(OSError("x")) == 1
