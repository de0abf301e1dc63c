"""The embedded default: a tiny Baichuan2 built offline from the project's own data.

There is no model hub here, so the quickstart, tests and benchmarks use a model made by
``scripts/make_tiny_model.py``: Baichuan2 architecture, a few layers, and either a sentencepiece
BPE tokenizer trained on ``data/`` with the official id layout or the real Baichuan2 tokenizer.
"""

import io
import json
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch

from ..model.configuration_baichuan import BaichuanConfig, chat_generation_config
from ..model.modeling_baichuan import BaichuanForCausalLM
from ..model.specs_baichuan import ASSISTANT_ID, BOS_ID, EOS_ID, PAD_ID, ROPE, USER_ID
from ..model.tokenization_baichuan import BaichuanTokenizer

# The corpus of the default tokenizer: the source checkout's data/ (only there: an installed package has no
# data/), and the tokenizer trained on it, shipped as package data and used when no data_dir is given.
# tests/builder/test_tiny.py checks that the shipped file is what train_tokenizer(DEFAULT_DATA_DIR) builds today.
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3] / "data"
PREBUILT_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tiny_tokenizer.model"
# The default tokenizer is trained on the supervised example data only: other files in data/ (the
# preference pairs) must not change the embedded model whose quickstart answers are checked.
DEFAULT_CORPUS = ("quickstart.json", "examples")


def _user_defined_symbols() -> list[str]:
    """Pieces for ids 3..196, laid out so that ``<reserved_106>`` is 195 and ``<reserved_107>`` 196."""
    head = ["<SEP>", "<CLS>", "\n", "\t"]  # ids 3-6, as in the official vocabulary
    filler = [f"<unused_{i}>" for i in range(89 - 3 - len(head))]  # ids 7-88
    reserved = [f"<reserved_{i}>" for i in range(108)]  # ids 89-196, as officially
    return head + filler + reserved


def collect_strings(value, out: list[str]) -> list[str]:
    """Append every string inside a JSON value to ``out`` (depth first) and return ``out``."""
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for v in value.values():
            collect_strings(v, out)
    elif isinstance(value, list):
        for v in value:
            collect_strings(v, out)
    return out


def corpus_files(data_dir: Path) -> list[Path]:
    """The JSON/JSONL files the tokenizer learns from: under ``data_dir`` (for the default, its
    ``DEFAULT_CORPUS`` entries only)."""
    data_dir = Path(data_dir)
    roots = [data_dir / name for name in DEFAULT_CORPUS] if data_dir.resolve() == DEFAULT_DATA_DIR else [data_dir]
    files = [p for root in roots for p in ([root] if root.is_file() else root.rglob("*"))]
    return sorted(p for p in files if p.suffix in (".json", ".jsonl"))


def file_strings(path: Path, out: list[str]) -> list[str]:
    """Append every string value of a .json or .jsonl file to ``out`` (other files add nothing)."""
    path = Path(path)
    if path.suffix == ".json":
        collect_strings(json.loads(path.read_text(encoding="utf-8")), out)
    elif path.suffix == ".jsonl":
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                collect_strings(json.loads(line), out)
    return out


def corpus_lines(data_dir: Path) -> list[str]:
    """Every string value in the corpus files (``corpus_files``), one line per text line."""
    texts: list[str] = []
    for path in corpus_files(data_dir):
        file_strings(path, texts)
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"no text found under {data_dir} to train the tiny tokenizer on")
    return lines


def train_tokenizer(data_dir: Path, vocab_size: int = 4096) -> bytes:
    """Train a byte-fallback BPE sentencepiece model with the official Baichuan2 id layout.

    Returns the serialized model. Trained from an iterator into memory, so that no temporary
    path ends up in the model file and the same data always gives the same bytes.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines(data_dir)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=0.995,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=PAD_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        user_defined_symbols=_user_defined_symbols(),
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def make_tiny_model(
    output_dir: str | Path,
    position_embedding: str = ROPE,
    tokenizer_model: str | Path | None = None,
    data_dir: str | Path | None = None,
    hidden_size: int = 128,
    intermediate_size: int = 344,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    model_max_length: int = 512,
    seed: int = 0,
) -> Path:
    """Write a complete HF directory of a tiny random Baichuan2 and return its path.

    Deterministic: the same arguments and data give the same files.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if tokenizer_model is None and data_dir is None:
            sp_file = PREBUILT_TOKENIZER  # = train_tokenizer(DEFAULT_DATA_DIR), without the repository
        elif tokenizer_model is None:
            sp_file = Path(tmp) / "tokenizer.model"
            sp_file.write_bytes(train_tokenizer(Path(data_dir)))
        else:
            sp_file = Path(tokenizer_model)
        tokenizer = BaichuanTokenizer(vocab_file=str(sp_file), model_max_length=model_max_length)
        tokenizer.save_pretrained(output_dir)
    for role_id, piece in ((USER_ID, "<reserved_106>"), (ASSISTANT_ID, "<reserved_107>")):
        if tokenizer.sp_model.id_to_piece(role_id) != piece:
            raise ValueError(f"{sp_file}: id {role_id} is not {piece}; not a Baichuan2 id layout")

    config = BaichuanConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=model_max_length if position_embedding == ROPE else None,
        model_max_length=model_max_length,
        position_embedding=position_embedding,
        architectures=["BaichuanForCausalLM"],
        tokenizer_class="BaichuanTokenizer",
    )
    torch.manual_seed(seed)
    model = BaichuanForCausalLM(config)
    # The official chat config, except max_new_tokens, which must fit the tiny context.
    model.generation_config = chat_generation_config(max_new_tokens=min(2048, model_max_length // 4))
    model.save_pretrained(output_dir)
    return output_dir
