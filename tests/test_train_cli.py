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

from baichuan_finetune.train import main

REPO_ROOT = Path(__file__).resolve().parents[1]
FINE_TUNE = REPO_ROOT / "fine-tune" / "fine-tune.py"


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
        (["--fp16", "True"], "--fp16 True needs a GPU"),
        (["--model_max_length", "2"], "--model_max_length 2: must be at least 8"),
        (["--q_lora", "True"], "add --use_lora True"),
        # No CUDA here: QLoRA says so in one line (or that bitsandbytes is missing).
        (["--use_lora", "True", "--q_lora", "True"], "QLoRA (--q_lora True) needs"),
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
        "import sys; sys.path.insert(0, sys.argv[1]); from baichuan_finetune.train import main\n"
        "a = main(['--data_path', 'x.json', '--output_dir', sys.argv[2], '--bogus', '1'])\n"
        "b = main(['--data_path', 'x.json', '--output_dir', sys.argv[2], '--deepspeed', sys.argv[3]])\n"
        "print('codes', a, b)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(FINE_TUNE.parent), str(tmp_path / "o"),
                           str(tmp_path / "ds.json")], env=env, capture_output=True, text=True, timeout=300)
    assert "codes 2 2" in proc.stdout, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # HfArgumentParser reports unknown flags itself (argparse would print the whole usage first).
    assert "fine-tune.py: error: Some specified arguments are not used by the HfArgumentParser: ['--bogus', '1']" \
        in proc.stderr.splitlines(), proc.stderr[-3000:]
    assert "stage3_gather_16bit_weights_on_model_save" in proc.stderr
    proc = subprocess.run([sys.executable, str(FINE_TUNE), "--output_dir", "o", "--nope"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("fine-tune.py:")], proc.stderr


def test_loss_curve_png_or_a_log_line(tmp_path, caplog):
    from baichuan_finetune.trainer import plot_loss_curve

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
