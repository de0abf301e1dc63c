"""`pip install .` (not editable) works: a wheel is built and installed into a new virtual environment,
and from an empty directory outside the repository the installed `baichuan-finetune` builds the tiny
model, plans, trains a 2-process ZeRO-3 LoRA run from a YAML config, chats with the result and reports
its environment. Nothing may be read from the repository: the package data has to be in the wheel.

Slow (a wheel, a venv, a 2-process DeepSpeed run): marked `install`; `pytest -m install tests/cli/test_install.py`.
Offline and without copying the dependencies: the new venv sees this venv's site-packages through a .pth
file, and pip installs only the wheel (--no-deps --no-index; --ignore-installed so that the editable
install of this checkout is neither seen nor touched).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.install

REPO = Path(__file__).resolve().parents[2]


def run(*cmd, cwd: Path, env: dict, timeout: int = 600, stdin: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          input=stdin)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """(the new venv's bin/, an environment for it) with the wheel of this checkout installed."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"  # built from a copy: setuptools writes build/ and egg-info next to the sources
    (source / "fine-tune").mkdir(parents=True)
    shutil.copy(REPO / "pyproject.toml", source)
    shutil.copytree(REPO / "fine-tune" / "baichuan_finetune", source / "fine-tune" / "baichuan_finetune",
                    ignore=shutil.ignore_patterns("__pycache__"))
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(wheels)], check=True, cwd=root, timeout=300)
    wheel = next(wheels.glob("baichuan_finetune-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # this venv's packages
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}:/usr/bin:/bin", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               WANDB_MODE="disabled", PYTHONNOUSERSITE="1")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
                    "--quiet", str(wheel)], check=True, env=env, cwd=root, timeout=300)
    return venv / "bin", env


def test_installed_command_works_outside_the_repository(installed, tmp_path):
    bin_dir, env = installed
    command = bin_dir / "baichuan-finetune"
    assert command.is_file()
    work = tmp_path / "work"  # an empty directory, outside the repository
    work.mkdir()

    report = json.loads(run(command, "env", "--json", cwd=work, env=env).stdout)
    location = report["baichuan-finetune"]
    assert str(bin_dir.parent) in location and str(REPO) not in location, location  # the installed copy runs

    run(command, "make-tiny", cwd=work, env=env)
    assert (work / "tiny-baichuan2" / "tokenizer.model").is_file()

    plan = run(command, "plan", "--model", "tiny-baichuan2", "--method", "lora", "--device", "cpu", "--nproc", "2",
               "--zero", "3", "--write_ds_config", "ds_zero3.json", cwd=work, env=env)
    assert "wrote ds_zero3.json" in plan.stdout
    zero = json.loads((work / "ds_zero3.json").read_text())["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"]  # the shipped ds_config.json's

    shutil.copy(REPO / "data" / "quickstart.json", work / "data.json")  # the user's own data
    (work / "run.yaml").write_text(yaml.safe_dump({
        "model_name_or_path": "tiny-baichuan2", "data_path": "data.json", "output_dir": "out",
        "model_max_length": 64, "use_lora": True, "lora_r": 4, "max_steps": 2, "per_device_train_batch_size": 2,
        "learning_rate": 5.0e-3, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "deepspeed": "ds_zero3.json"}))
    run(command, "train", "run.yaml", "--num_gpus", "2", "--master_port", str(29500 + os.getpid() % 1000),
        cwd=work, env=env, timeout=900)
    assert (work / "out" / "adapter_config.json").is_file()
    recorded = yaml.safe_load((work / "out" / "run_config.yaml").read_text())
    assert recorded["deepspeed"] == "ds_zero3.json" and recorded["max_steps"] == 2

    chat = run(command, "chat", "--model", "out", "--max_new_tokens", "8", "--no_stream", cwd=work, env=env,
               stdin="你好\nexit\n", timeout=300)
    assert "Commands:" in chat.stdout or chat.stdout.strip(), chat.stdout

    # the planner reads the training config itself
    run(command, "plan", "run.yaml", "--device", "cpu", "--nproc", "2", cwd=work, env=env)
