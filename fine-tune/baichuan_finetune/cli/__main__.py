"""``python -m baichuan_finetune.cli`` = ``baichuan-finetune``."""

import sys

from .main import main

sys.exit(main())
