"""Fine-tune Baichuan2: `python fine-tune/fine-tune.py --help`, or a launcher (deepspeed, torchrun,
scripts/train.sh) running it once per process. All the logic lives in the package:
`baichuan_finetune.arguments` (the options) and `baichuan_finetune.train` (the run)."""

import os
import sys

# Works from a source checkout too, without `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from baichuan_finetune.launch_guard import exit_process  # noqa: E402
from baichuan_finetune.train import main  # noqa: E402

if __name__ == "__main__":
    # Not sys.exit: once main() has destroyed the process group, leave without interpreter teardown,
    # where C++ threads of gloo could abort a finished rank ("terminate called without an active
    # exception"); see baichuan_finetune.launch_guard. Exceptions still end in a traceback as usual.
    exit_process(main())
