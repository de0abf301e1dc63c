"""Memory and launch planner (``baichuan-finetune plan``; see baichuan_finetune/cli/plan.py or --help).

Loads the planner without the package's ``__init__`` (which imports torch and transformers, seconds):
the planner imports neither, so the answer comes in a fraction of a second, even from a source checkout.
"""

import sys
import types
from pathlib import Path

if "baichuan_finetune" not in sys.modules:
    import importlib.util

    _spec = importlib.util.find_spec("baichuan_finetune")
    _dirs = list(_spec.submodule_search_locations) if _spec else [str(Path(__file__).resolve().parents[1] / "fine-tune" / "baichuan_finetune")]
    _package = types.ModuleType("baichuan_finetune")  # the package's modules, without running its __init__
    _package.__path__ = _dirs
    sys.modules["baichuan_finetune"] = _package

from baichuan_finetune.cli.plan import main, readme_table  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
