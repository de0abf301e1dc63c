"""Browser chat: ``baichuan-finetune web`` (baichuan_finetune/cli/web.py; see --help)."""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("baichuan_finetune") is None:  # a source checkout without `pip install`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fine-tune"))

from baichuan_finetune.cli.web import main  # noqa: E402
from baichuan_finetune.tools.serve import exit_now  # noqa: E402

if __name__ == "__main__":
    main()
    exit_now()
