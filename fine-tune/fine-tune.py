"""Fine-tune Baichuan2: `python fine-tune/fine-tune.py --help`, or a launcher (deepspeed, torchrun,
scripts/train.sh) running it once per process. All the logic lives in the package:
`baichuan_finetune.arguments` (the options) and `baichuan_finetune.train` (the run)."""

import os
import sys

# Works from a source checkout too, without `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from baichuan_finetune.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
