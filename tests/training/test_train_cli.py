"""fine-tune.py's command line: one clear line and exit code 2 for bad flags and impossible combinations,
exit code 1 with a clean message for bad data, existing checkpoints never overwritten, and the loss curve.
Each flag check itself is tested in test_arguments.py, the checkpoint markers in test_saving.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from baichuan_finetune.objectives.quantize import bitsandbytes_available
from baichuan_finetune.training.train import main

REPO_ROOT = Path(__file__).resolve().parents[2]
FINE_TUNE = REPO_ROOT / "fine-tune" / "fine-tune.py"
CUDA = torch.cuda.is_available()
QLORA_RUNS = CUDA and bitsandbytes_available()


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"},
                                                   {"from": "gpt", "value": "hello"}]}] * 4))
    return path


def base_args(data_file: Path, out: Path, model_dir="unused-model-dir") -> list[str]:
    return ["--data_path", str(data_file), "--model_name_or_path", str(model_dir), "--output_dir", str(out),
            "--report_to", "none"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith(("[", " "))]  # ignore library log lines
    assert len(err) == 1, err
    assert err[0].startswith("fine-tune.py: ")
    return err[0]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--bogus_flag", "1"], "--bogus_flag"),
        (["--padding", "sideways"], "argument --padding: invalid choice: 'sideways'"),
        (["--warmup_ratio", "2"], "--warmup_ratio 2.0: must be in [0, 1)"),
        (["--use_lora", "True", "--lora_target_modules", ","], "--lora_target_modules"),
        (["--use_lora", "True", "--lora_r", "0"], "--lora_r 0: must be at least 1"),
        # fp16 is refused on CPU only: on a CUDA host the flag is accepted and the next check (the
        # missing model directory) is the one line.
        (["--fp16", "True"], "--fp16 True needs a GPU" if not CUDA else "--model_name_or_path unused-model-dir"),
        (["--use_cpu", "True", "--fp16", "True"], "--fp16 True needs a GPU"),  # on any host
        (["--model_max_length", "2"], "--model_max_length 2: must be at least 8"),
        (["--q_lora", "True"], "add --use_lora True"),
        # Without CUDA or bitsandbytes QLoRA says which is missing in one line; with both it is accepted
        # and the missing model directory is the one line.
        (["--use_lora", "True", "--q_lora", "True"],
         "QLoRA (--q_lora True) needs" if not QLORA_RUNS else "--model_name_or_path unused-model-dir"),
    ],
)
def test_bad_flags_exit_2_with_one_line(extra, expected, data_file, tmp_path, capsys):
    assert main(base_args(data_file, tmp_path / "out") + extra) == 2
    assert expected in one_line_error(capsys)


def test_bad_config_file(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("data_path: x.json\noutput_dir: o\nno_such_option: 1\n")
    assert main([str(config)]) == 2
    assert "no_such_option" in one_line_error(capsys)
    config.write_text("data_path: [unclosed\n")
    assert main([str(config)]) == 2
    assert "not valid YAML" in one_line_error(capsys)


def test_existing_checkpoints_are_not_overwritten(data_file, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    assert main(base_args(data_file, out, tiny_model_dir)) == 2
    line = one_line_error(capsys)
    assert "already holds checkpoints" in line and "--resume_from_checkpoint True" in line
    # Resuming needs a complete checkpoint: checkpoint-2 has no completion marker.
    assert main(base_args(data_file, out, tiny_model_dir) + ["--resume_from_checkpoint", "True"]) == 2
    assert "no complete checkpoint" in one_line_error(capsys)
    assert main(base_args(data_file, out, tiny_model_dir) + ["--resume_from_checkpoint", str(out / "checkpoint-2")]) == 2
    assert "incomplete checkpoint" in one_line_error(capsys)


def test_bad_data_exits_1_cleanly(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BAICHUAN_FINETUNE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"conversations": [{"from": "robot", "value": "hi"}]}]))
    assert main(base_args(bad, tmp_path / "out", tiny_model_dir)) == 1
    err = capsys.readouterr().err
    assert "fine-tune.py: data error:" in err and "Traceback" not in err and "robot" in err


def test_entry_point_errors_are_one_line_not_a_traceback(tmp_path):
    """Through the real entry point (a fresh process): unknown flag, and a ZeRO-3 config that cannot save."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    ds = json.loads((REPO_ROOT / "ds_config.json").read_text())
    ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    # Both in one process would stop at the first; the unknown flag is found first, so check each alone.
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); from baichuan_finetune.training.train import main\n"
        "a = main(['--data_path', 'x.json', '--output_dir', sys.argv[2], '--bogus', '1'])\n"
        "b = main(['--data_path', 'x.json', '--output_dir', sys.argv[2], '--deepspeed', sys.argv[3]])\n"
        "print('codes', a, b)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(FINE_TUNE.parent), str(tmp_path / "o"),
                           str(tmp_path / "ds.json")], env=env, capture_output=True, text=True, timeout=300)
    assert "codes 2 2" in proc.stdout, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # Unknown flags are found before parsing (argparse would print the whole usage first).
    assert "fine-tune.py: error: unrecognized argument --bogus (see --help)" in proc.stderr.splitlines(), \
        proc.stderr[-3000:]
    assert "stage3_gather_16bit_weights_on_model_save" in proc.stderr
    proc = subprocess.run([sys.executable, str(FINE_TUNE), "--output_dir", "o", "--nope"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("fine-tune.py:")], proc.stderr


def test_loss_curve_png_or_a_log_line(tmp_path, caplog):
    from baichuan_finetune.training.trainer import plot_loss_curve

    history = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.7}]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with caplog.at_level("INFO", logger="baichuan_finetune"):
            assert plot_loss_curve(history, str(tmp_path)) is None
        assert "matplotlib is not installed" in caplog.text
    else:
        path = plot_loss_curve(history, str(tmp_path))
        assert path == tmp_path / "loss_curve.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----- launch checks: before torch, transformers and DeepSpeed are imported -----


def parser_flag_names() -> list[str]:
    """Every ``--flag`` of fine-tune.py's real parser, '-' spelled '_' (argparse accepts both)."""
    from baichuan_finetune.options.arguments import _parser

    return sorted({"--" + s[2:].replace("-", "_") for s in _parser()._option_string_actions if s.startswith("--")})

HEAVY = ("torch", "transformers", "deepspeed")
# Runs fine-tune.py as `python fine-tune/fine-tune.py ...` does, then says which heavy modules were loaded.
RUN_AND_LIST_IMPORTS = (
    "import atexit, runpy, sys\n"
    "atexit.register(lambda: print('imported:', [m for m in %r if m in sys.modules]))\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n" % (HEAVY,)
)


def run_fine_tune_listing_imports(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-c", RUN_AND_LIST_IMPORTS, str(FINE_TUNE), *argv], env=env,
                          capture_output=True, text=True, timeout=300)


def test_mistyped_flag_suggests_the_right_one(data_file, tmp_path, capsys):
    assert main(base_args(data_file, tmp_path / "out") + ["--learnig_rate", "1e-4"]) == 2
    assert one_line_error(capsys) == \
        "fine-tune.py: error: unrecognized argument --learnig_rate (did you mean --learning_rate?)"
    assert main(base_args(data_file, tmp_path / "out") + ["--per_device_batch_size=4"]) == 2
    assert "--per_device_batch_size (did you mean --per_device_" in one_line_error(capsys)
    # A prefix argparse expands (--learning_r) and '-' for '_' are no mistakes.
    assert main(base_args(data_file, tmp_path / "out") + ["--learning-r", "-1"]) == 2
    assert "--learning_rate -1.0: must be a finite number >= 0" in one_line_error(capsys)


@pytest.mark.parametrize("case", ["typo", "checkpoints", "model_dir", "deepspeed"])
def test_launch_errors_come_before_torch_is_imported(case, data_file, tmp_path):
    """A real fine-tune.py process: one line, exit 2, and torch/transformers/deepspeed never imported."""
    out = tmp_path / "out"
    argv = {"typo": ["--output_dir", str(out), "--data_path", str(data_file), "--num_train_epohcs", "2"],
            "checkpoints": ["--output_dir", str(out), "--data_path", str(data_file)],
            "model_dir": ["--output_dir", str(out), "--data_path", str(data_file),
                          "--model_name_or_path", str(tmp_path / "no-model")],
            "deepspeed": ["--output_dir", str(out), "--data_path", str(data_file),
                          "--deepspeed", str(tmp_path / "ds.json")]}[case]
    expected = {"typo": "unrecognized argument --num_train_epohcs (did you mean --num_train_epochs?)",
                "checkpoints": f"output_dir {out} already holds checkpoints (checkpoint-10): pass "
                               "--resume_from_checkpoint True",
                "model_dir": f"--model_name_or_path {tmp_path / 'no-model'}: no such directory",
                "deepspeed": f"--deepspeed {tmp_path / 'ds.json'}: cannot read: No such file or directory"}[case]
    if case == "checkpoints":
        for step in (2, 10):
            (out / f"checkpoint-{step}").mkdir(parents=True)
    proc = run_fine_tune_listing_imports(*argv)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fine-tune.py: error: {expected}"), proc.stderr
    assert "imported: []" in proc.stdout, proc.stdout


def test_checkpoint_refusal_is_the_same_line_later(data_file, tiny_model_dir, tmp_path, capsys):
    """The early check and resolve_resume (after parsing) refuse an output_dir with checkpoints alike."""
    from baichuan_finetune.core import launch_checks
    from baichuan_finetune.options.arguments import parse_args
    from baichuan_finetune.training.train import resolve_resume

    out = tmp_path / "out"
    (out / "checkpoint-7").mkdir(parents=True)
    argv = base_args(data_file, out, tiny_model_dir)
    early = launch_checks.problem(argv)
    with pytest.raises(Exception) as later:
        resolve_resume(parse_args(argv).training)
    assert early == str(later.value) == launch_checks.checkpoints_refusal(str(out), "checkpoint-7")


def test_a_good_launch_says_so_before_the_imports(data_file, tmp_path):
    """Flags that pass the early checks: our first line comes before the imports (a bad value is then
    found by the full parser, after torch is imported)."""
    proc = run_fine_tune_listing_imports("--output_dir", str(tmp_path / "out"), "--data_path", str(data_file),
                                         "--padding", "sideways")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "fine-tune.py: flags checked; loading PyTorch, transformers and DeepSpeed ...", lines[:3]
    assert "'torch'" in lines[-1]  # it was printed before these imports
    assert "argument --padding: invalid choice: 'sideways'" in proc.stderr


def test_known_flags_are_the_parsers():
    """The flags read from the dataclasses' source files (no import) are exactly the parser's, but for the
    --no_<flag> negations argparse adds, which the check accepts for every flag."""
    from baichuan_finetune.core.launch_checks import known_flags

    real = parser_flag_names()
    assert sorted(known_flags()) == [f for f in real if not f.startswith("--no_")]
    assert all(f"--{f[5:]}" in known_flags() for f in real if f.startswith("--no_"))


def test_deepspeed_op_builds_are_announced(tmp_path, monkeypatch, capsys):
    """The shared-memory op DeepSpeed's CPU accelerator compiles on first use, found (or not) where the
    JIT loader puts it; an offloaded optimizer adds cpu_adam."""
    from baichuan_finetune.core import launch_checks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    assert launch_checks.ops_to_build({}, cpu=True) == ["deepspeed_shm_comm"]
    assert launch_checks.ops_to_build(offload, cpu=True) == ["deepspeed_shm_comm", "cpu_adam"]
    assert launch_checks.ops_to_build({}, cpu=False) == []
    (tmp_path / "deepspeed_shm_comm").mkdir(exist_ok=True)
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    assert launch_checks.ops_to_build(offload, cpu=True) == ["cpu_adam"]
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(offload))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    launch_checks.announce_op_builds(["--deepspeed", str(ds), "--output_dir", "o"])
    assert capsys.readouterr().out == "fine-tune.py: building DeepSpeed op cpu_adam once (about a minute) ...\n"


def test_short_run_logs_about_ten_loss_lines_and_a_loss_curve(tiny_model_dir, tmp_path, monkeypatch):
    """Without --logging_steps, 12 steps log a loss at least every 10% of the run (here every step)."""
    monkeypatch.setenv("BAICHUAN_FINETUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"question {i}"},
                                                   {"from": "gpt", "value": f"answer {i}"}]} for i in range(24)]))
    assert main(["--data_path", str(data), "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out),
                 "--report_to", "none", "--per_device_train_batch_size", "2", "--num_train_epochs", "1",
                 "--model_max_length", "64", "--save_strategy", "no", "--disable_tqdm", "True"]) == 0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == list(range(1, 13))
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_loss_logged_means_no_loss_curve(tmp_path, caplog):
    from baichuan_finetune.training.trainer import default_logging_steps, plot_loss_curve

    with caplog.at_level("INFO", logger="baichuan_finetune"):
        assert plot_loss_curve([{"step": 3, "train_runtime": 1.0}], str(tmp_path)) is None
    assert not (tmp_path / "loss_curve.png").exists() and "no loss_curve.png" in caplog.text
    # At least every 10% of the run, whatever its length.
    assert [default_logging_steps(n) for n in (1, 9, 12, 25, 1000)] == [1, 1, 1, 2, 100]
