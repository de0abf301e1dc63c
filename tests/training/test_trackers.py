"""--report_to: tensorboard writes the training scalars; wandb works offline; a tracker that is not
installed fails in one line before any data preparation or model loading."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from baichuan_finetune.options.arguments import TRACKER_PACKAGES
from baichuan_finetune.training.train import main

REPO = Path(__file__).resolve().parents[2]


def train_args(model_dir: Path, tmp_path: Path, tracker: str) -> list[str]:
    data = tmp_path / "d.json"
    records = json.loads((REPO / "data" / "quickstart.json").read_text())[:16]
    data.write_text(json.dumps(records))
    return ["--model_name_or_path", str(model_dir), "--data_path", str(data), "--output_dir", str(tmp_path / "out"),
            "--data_cache_dir", str(tmp_path / "cache"), "--model_max_length", "128", "--max_steps", "4",
            "--per_device_train_batch_size", "4", "--logging_steps", "1", "--val_size", "4",
            "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "no", "--use_cpu", "True",
            "--disable_tqdm", "True", "--report_to", tracker]


def test_tensorboard_scalars(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(train_args(tiny_model_dir, tmp_path, "tensorboard")) == 0
    # transformers writes under <output_dir>/runs/ (or $TENSORBOARD_LOGGING_DIR).
    events = sorted((tmp_path / "out" / "runs").rglob("events.out.tfevents.*"))
    assert events, list((tmp_path / "out").rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second", "eval/loss"):
        assert tag in tags, sorted(tags)
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("eval/loss")] == [2, 4]
    assert all(e.value > 0 for e in acc.Scalars("train/tokens_per_second"))


def test_wandb_offline(tiny_model_dir, tmp_path, wandb_dir):
    from conftest import new_wandb_runs

    if importlib.util.find_spec("wandb") is None:
        pytest.skip("wandb is not installed (requirements-tools.txt)")
    before = set(wandb_dir.rglob("offline-run-*"))
    assert main(train_args(tiny_model_dir, tmp_path, "wandb")) == 0
    runs = new_wandb_runs(wandb_dir, before)
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), list(wandb_dir.rglob("*"))


def test_missing_tracker_fails_in_one_line_before_any_work(tiny_model_dir, tmp_path, capsys):
    from transformers.integrations import integration_utils as tracking

    available = set(tracking.get_available_reporting_integrations())
    missing = next(name for name in ("mlflow", "clearml", "neptune", "comet_ml", "dvclive", "swanlab")
                   if name not in available)
    assert main(train_args(tiny_model_dir, tmp_path, missing)) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith(("[", " "))]
    assert len(err) == 1, err
    assert err[0].startswith(f"fine-tune.py: error: --report_to {missing}: not available") and TRACKER_PACKAGES[missing] in err[0]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()  # no data prepared, nothing written
    assert main(train_args(tiny_model_dir, tmp_path, "nosuchtracker")) == 2
    assert "unknown tracker" in capsys.readouterr().err
