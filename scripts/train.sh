#!/usr/bin/env bash
# Launch fine-tune/fine-tune.py with DeepSpeed on one node or on the nodes of a hostfile: the launcher
# lives in the package (fine-tune/baichuan_finetune/cli/launch.sh, also run by `baichuan-finetune train
# --num_gpus N | --hostfile F`); `scripts/train.sh --help` lists its options.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Messages name the script the user ran: train_lora.sh execs this one and says so.
export TRAIN_SH_PROG="${TRAIN_SH_PROG:-$(basename "$0")}"
export TRAIN_SH_SCRIPT="$ROOT/fine-tune/fine-tune.py" TRAIN_SH_VENV="$ROOT/.venv"
exec bash "$ROOT/fine-tune/baichuan_finetune/cli/launch.sh" "$@"
