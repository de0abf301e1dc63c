"""Shared fixtures: the tiny model directories and the material under tests/fixtures.

The suite never reads ``../shared``: the real Baichuan2 tokenizer, the official configs and samples
of the permissively licensed data sets are copied into ``tests/fixtures`` (see its SOURCES.md), so a
fresh clone with nothing beside it runs every test except the CUDA-only ones.
"""

import os
import shutil
import signal
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
REAL_TOKENIZER = FIXTURES / "baichuan2" / "tokenizer.model"
FIXTURE_DATA = FIXTURES / "data"
MULTIPLE_CHOICE = FIXTURES / "multiple_choice"

# pytest-xdist's workers (scripts/test.sh runs two) ignore SIGINT, and an ignored signal stays ignored in
# every process they start: the tests that press Ctrl-C on a training run or a chat need it delivered.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# No hub here, DeepSpeed on its CPU accelerator, one thread per process on 2 cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """tests/fixtures: the real tokenizer, official configs, data samples (licences in SOURCES.md)."""
    return FIXTURES


@pytest.fixture(scope="session")
def real_tokenizer_model() -> Path:
    """The real 125,696-piece Baichuan2 tokenizer.model (unmodified, Baichuan 2 Community License)."""
    return REAL_TOKENIZER


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Tiny RoPE Baichuan2 (tokenizer trained on data/), built once per test session."""
    from baichuan_finetune.builder.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "rope", position_embedding="rope")


@pytest.fixture(scope="session")
def tiny_alibi_model_dir(tmp_path_factory) -> Path:
    """Tiny ALiBi (13B-style) Baichuan2, built once per test session."""
    from baichuan_finetune.builder.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "alibi", position_embedding="alibi")


@pytest.fixture(scope="session")
def tiny_real_vocab_model_dir(tmp_path_factory, real_tokenizer_model: Path) -> Path:
    """Tiny RoPE Baichuan2 with the real 125,696-piece tokenizer."""
    from baichuan_finetune.builder.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "realvocab", tokenizer_model=real_tokenizer_model)


CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium driven by playwright (the web demo and the predict report)."""
    from tools_helpers import require

    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed: run scripts/install_browser.sh (Debian chromium + chromium-driver)")
    require("playwright", "the browser tests drive Chromium with playwright (requirements-tools.txt)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def wandb_dir(tmp_path_factory) -> Path:
    """The offline wandb directory of this test process. wandb reads its settings (WANDB_DIR among them) at
    the first run of a process and keeps them, so every wandb test of a process shares this one directory
    (set for the whole session) and finds its own run as the one that appeared during the test."""
    path = tmp_path_factory.mktemp("wandb")
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(path), WANDB_SILENT="true")
    return path


def new_wandb_runs(wandb_dir: Path, before: set[Path]) -> list[Path]:
    """The offline run directories under `wandb_dir` that are not in `before`, once the current run is
    finished (HF's callback leaves its run open, and the next training of this process would join it)."""
    import wandb

    wandb.finish()
    return sorted(set(wandb_dir.rglob("offline-run-*")) - before)
