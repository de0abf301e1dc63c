#!/usr/bin/env bash
# scripts/train.sh with --use_lora True: same launcher options, same fine-tune.py options.
set -euo pipefail
TRAIN_SH_PROG="$(basename "$0")" exec bash "$(dirname "${BASH_SOURCE[0]}")/train.sh" "$@" --use_lora True
