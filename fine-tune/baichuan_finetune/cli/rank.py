"""What each process runs under ``baichuan-finetune train --num_gpus N | --hostfile F``:
``deepspeed --module baichuan_finetune.cli.rank [options]`` (fine-tune.py's role for the installed command)."""

import sys

if __name__ == "__main__":
    from .train import run_in_process

    sys.exit(run_in_process(sys.argv[1:]))
