"""Normalise lm_head.weight offline: ``baichuan-finetune convert`` (baichuan_finetune/cli/convert.py).

Usage: python scripts/convert_lm_head.py SRC_MODEL_DIR DST_MODEL_DIR
"""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("baichuan_finetune") is None:  # a source checkout without `pip install`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fine-tune"))

from baichuan_finetune.cli.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="convert_lm_head"))
