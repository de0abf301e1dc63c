"""Export to GGUF (llama.cpp, Ollama, LM Studio): ``baichuan-finetune export`` (baichuan_finetune/cli/export.py; see --help)."""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("baichuan_finetune") is None:  # a source checkout without `pip install`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fine-tune"))

from baichuan_finetune.cli.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
