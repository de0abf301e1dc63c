"""resume_checks.data_content: what a resume compares of the data. A cached data set counts by its whole
content; a streamed corpus (read lazily, possibly terabytes) by size, first and last MiB, so a launch does
not read it all once more just to fingerprint it."""

import hashlib
from types import SimpleNamespace

from baichuan_finetune.checkpoints.resume_checks import SAMPLED_BYTES, data_content, file_digest


def run_args(data_path: str, streaming: bool) -> SimpleNamespace:
    """The fields of `Arguments` that data_content reads."""
    return SimpleNamespace(data=SimpleNamespace(data_path=data_path, eval_data_path=None, streaming=streaming),
                           training=SimpleNamespace(stage="pt"))


def test_streamed_files_count_by_size_head_and_tail(tmp_path):
    corpus = tmp_path / "corpus.txt"
    lines = b"".join(b"document %08d\n" % i for i in range(400_000))  # 7.2 MB
    corpus.write_bytes(lines)
    size = len(lines)
    expected = hashlib.sha256(str(size).encode() + lines[:SAMPLED_BYTES] + lines[size - SAMPLED_BYTES:]).digest()
    assert file_digest(corpus, sampled=True) == expected
    assert file_digest(corpus) == hashlib.sha256(lines).digest()

    streamed, cached = data_content(run_args(str(corpus), True)), data_content(run_args(str(corpus), False))
    middle = bytearray(lines)
    middle[size // 2] = ord("X")
    corpus.write_bytes(bytes(middle))
    assert data_content(run_args(str(corpus), True)) == streamed  # not read: the price of not reading it all
    assert data_content(run_args(str(corpus), False)) != cached
    for changed in (b"X" + lines[1:], lines[:-1] + b"X", lines + b"document 99999999\n"):
        corpus.write_bytes(changed)
        assert data_content(run_args(str(corpus), True)) != streamed


def test_a_small_streamed_file_counts_whole(tmp_path):
    corpus = tmp_path / "small.jsonl"
    corpus.write_text('{"text": "a"}\n{"text": "b"}\n')
    before = data_content(run_args(str(corpus), True))
    corpus.write_text('{"text": "a"}\n{"text": "c"}\n')
    assert data_content(run_args(str(corpus), True)) != before
