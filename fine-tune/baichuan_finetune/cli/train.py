"""Fine-tune Baichuan2 (SFT or DPO; LoRA, QLoRA or full; every option of fine-tune.py) from flags or a
YAML/JSON config file whose options the flags override:

    baichuan-finetune train examples/lora-7b.yaml --learning_rate 1e-4
    baichuan-finetune train --model_name_or_path ... --data_path ... --output_dir ... [fine-tune.py flags]
    baichuan-finetune train output/lora/run_config.yaml          (repeat a finished run)

Runs in this process, or, with any of the launcher options below, on several processes or nodes through
DeepSpeed's launcher (as scripts/train.sh):

  --num_gpus N        processes on this node
  --hostfile FILE     nodes as "hostname slots=N" lines; --master_addr ADDR, --master_port PORT
  --no_ssh --node_rank R   one command per node, no pdsh/ssh (same hostfile and --master_addr everywhere)
  --no_ssh_check      skip the hostfile's resolve/ssh checks;   --dry_run   print the launch and exit

`baichuan-finetune train --help` then lists fine-tune.py's options.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

PROG = "baichuan-finetune train"
# scripts/train.sh's launcher options: with a value, and without.
LAUNCHER_VALUE_OPTIONS = ("--hostfile", "--num_gpus", "--master_addr", "--master_port", "--node_rank")
LAUNCHER_SWITCHES = ("--no_ssh", "--no_ssh_check", "--dry_run")
LAUNCH_SCRIPT = Path(__file__).with_name("launch.sh")
RANK_MODULE = "baichuan_finetune.cli.rank"


def wants_launcher(argv: Sequence[str]) -> bool:
    """Whether `argv` has a launcher option (then every rank runs the training under DeepSpeed's launcher)."""
    return any(a in LAUNCHER_SWITCHES or a.split("=", 1)[0] in LAUNCHER_VALUE_OPTIONS for a in argv)


def launch(argv: Sequence[str]) -> int:
    """Run the package's launch.sh (scripts/train.sh's launcher): each rank runs `RANK_MODULE`."""
    env = dict(os.environ, TRAIN_SH_PROG=PROG, TRAIN_SH_MODULE=RANK_MODULE)
    # The ranks import the package from where this one was found (a source checkout needs no install).
    package_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([package_parent, *filter(None, [os.environ.get("PYTHONPATH")])])
    env["TRAIN_SH_PYTHON"] = sys.executable  # the ranks run in this environment, whatever `deepspeed` is on PATH
    try:
        return subprocess.call(["bash", str(LAUNCH_SCRIPT), *argv], env=env)
    except KeyboardInterrupt:
        return 130


def run_in_process(argv: Sequence[str], prog: str = PROG) -> int:
    """The training in this process (one rank), with fine-tune.py's fast first checks and line."""
    from ..core import launch_checks, quiet

    quiet.install()
    launch_checks.PROG = prog  # the messages name the command the user ran
    problem = launch_checks.problem(list(argv))
    if problem is not None:
        if launch_checks.is_main_local_process():
            print(f"{prog}: error: {problem}", file=sys.stderr, flush=True)
        return 2
    launch_checks.announce_start(list(argv))
    from ..training import train
    from ..training.launch_guard import exit_process

    train.PROG = prog
    exit_process(train.main(list(argv)))  # leaves without interpreter teardown (see launch_guard)
    return 0  # not reached


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or PROG
    if argv in (["-h"], ["--help"]):
        print(f"usage: {prog} [CONFIG.yaml] [--launcher options] [fine-tune.py options]\n\n{__doc__}", flush=True)
        # fine-tune.py's own option list follows (transformers' and ours, hundreds)
    if wants_launcher(argv):
        return launch(argv)
    return run_in_process(argv, prog)
