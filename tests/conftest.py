"""Shared fixtures: the tiny model directories and the read-only ../shared material."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
REAL_TOKENIZER = SHARED_DIR / "baichuan2" / "tokenizer.model"

# No hub here, DeepSpeed on its CPU accelerator, one thread per process on 2 cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The team's read-only ../shared folder (real tokenizer, configs, datasets)."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"{SHARED_DIR} is absent: it holds the real Baichuan2 tokenizer, configs and datasets")
    return SHARED_DIR


@pytest.fixture(scope="session")
def real_tokenizer_model(shared_dir: Path) -> Path:
    if not REAL_TOKENIZER.is_file():
        pytest.skip(f"{REAL_TOKENIZER} is absent")
    return REAL_TOKENIZER


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Tiny RoPE Baichuan2 (tokenizer trained on data/), built once per test session."""
    from baichuan_finetune.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "rope", position_embedding="rope")


@pytest.fixture(scope="session")
def tiny_alibi_model_dir(tmp_path_factory) -> Path:
    """Tiny ALiBi (13B-style) Baichuan2, built once per test session."""
    from baichuan_finetune.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "alibi", position_embedding="alibi")


@pytest.fixture(scope="session")
def tiny_real_vocab_model_dir(tmp_path_factory, real_tokenizer_model: Path) -> Path:
    """Tiny RoPE Baichuan2 with the real 125,696-piece tokenizer."""
    from baichuan_finetune.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "realvocab", tokenizer_model=real_tokenizer_model)
