"""Training data statistics and preview: ``baichuan-finetune inspect`` (baichuan_finetune/cli/inspect.py)."""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("baichuan_finetune") is None:  # a source checkout without `pip install`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fine-tune"))

from baichuan_finetune.cli.inspect import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
