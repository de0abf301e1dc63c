"""Data statistics and previews: values computed by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from baichuan_finetune.data.data_stats import DataReport, format_example, length_percentiles, padding_efficiency


def test_length_percentiles_are_actual_lengths():
    assert length_percentiles(np.array([30, 10, 50, 20, 40])) == {"p50": 30, "p90": 50, "p99": 50, "max": 50}
    assert length_percentiles(np.array([7])) == {"p50": 7, "p90": 7, "p99": 7, "max": 7}
    assert length_percentiles(np.array([], dtype=np.int32)) == {}


def test_padding_efficiency_by_hand():
    lengths = np.array([3, 5, 9, 2])  # 19 real tokens
    efficiency, rows = padding_efficiency(lengths, 16, batch_size=1)
    # max_length: 4 rows of 16. longest, batches of one: 8 + 8 + 16 + 8 slots, whatever the order.
    # packing, best-fit-decreasing: [9, 5, 2] and [3] -> 2 rows of 16.
    assert efficiency == pytest.approx({"max_length": 19 / 64, "longest": 19 / 40, "packing": 19 / 32})
    assert rows == 2
    # One batch of all four: padded to 16 (9 rounded up to 8s).
    assert padding_efficiency(lengths, 16, batch_size=4)[0]["longest"] == pytest.approx(19 / 64)
    # Rows counted by the caller (the packing actually done) are taken as given.
    efficiency, rows = padding_efficiency(lengths, 16, batch_size=1, packed_rows=3)
    assert (efficiency["packing"], rows) == (pytest.approx(19 / 48), 3)
    assert padding_efficiency(np.array([], dtype=np.int64), 16) == (
        {"max_length": 0.0, "longest": 0.0, "packing": 0.0}, 0)


class CharDecoder:
    """Decodes id n as chr(n): enough of a sentencepiece processor for format_example."""

    def decode(self, ids):
        return "".join(map(chr, ids))


def ids(text: str) -> list[int]:
    return [ord(ch) for ch in text]


def test_format_example_marks_roles_and_supervised_text():
    # user "hi", assistant "ok", user "no", assistant "yes", eos; official labels.
    input_ids = [195, *ids("hi"), 196, *ids("ok"), 195, *ids("no"), 196, *ids("yes"), 2]
    labels = [2, -100, -100, -100, *ids("ok"), 2, -100, -100, -100, *ids("yes"), 2]
    text = format_example(CharDecoder(), input_ids, labels)
    # Position 0's eos label is never used, so the first user turn shows none.
    assert text == "<user>: hi\n<assistant>: [[ok]][[</s>]]\n<user>: no\n<assistant>: [[yes]][[</s>]]"
    colored = format_example(CharDecoder(), input_ids, labels, color=True)
    assert colored == ("<user>: hi\n<assistant>: \033[32mok\033[0m\033[32m</s>\033[0m\n<user>: no\n"
                       "<assistant>: \033[32myes\033[0m\033[32m</s>\033[0m")


def test_format_example_system_text_and_packed_first_label():
    # A system text is plain; the official eos label on the user token after it is shown.
    input_ids = [*ids("sys"), 195, *ids("q"), 196, *ids("a"), 2]
    labels = [-100, -100, -100, 2, -100, -100, ord("a"), 2]
    assert format_example(CharDecoder(), input_ids, labels) == "sys[[</s>]]\n<user>: q\n<assistant>: [[a]][[</s>]]"
    # A packed row's first label is -100: shown the same as the unused eos label at position 0.
    row = [195, *ids("q"), 196, *ids("a"), 2]
    expected = "<user>: q\n<assistant>: [[a]][[</s>]]"
    assert format_example(CharDecoder(), row, [-100, -100, -100, ord("a"), 2]) == expected
    assert format_example(CharDecoder(), row, [2, -100, -100, ord("a"), 2]) == expected


def test_data_report_round_trip_and_format():
    report = DataReport(
        files={"a.jsonl": "sharegpt"}, records=10, bad_records={"unknown role": 2}, dropped={"no assistant turn": 1},
        examples=7, truncated=1, model_max_length=64, tokens=200, supervised_tokens=50,
        length_percentiles={"p50": 20, "p90": 40, "p99": 70, "max": 70},
        efficiency={"max_length": 0.5, "longest": 0.75, "packing": 0.9}, batch_size=4, packed_rows=4,
        train_examples=6, eval_examples=1, cache_dir="/c/k",
    )
    stored = json.loads(json.dumps(report.to_dict()))
    assert DataReport.from_dict(stored) == report
    assert report.format().splitlines() == [
        "Data:",
        "  file a.jsonl (sharegpt)",
        "  records read: 10; kept examples: 7 (train 6, eval 1)",
        "  skipped bad records: 2 unknown role",
        "  dropped: 1 no assistant turn",
        "  truncated to 64 tokens: 1",
        "  tokens per example (before truncation): p50 20, p90 40, p99 70, max 70",
        "  tokens: 200, supervised: 50 (25.0%)",
        "  real tokens per batch slot: max_length 50.0%, longest (batch 4) 75.0%, packing 90.0% (4 rows)",
        "  cache: /c/k (written)",
    ]
    report.from_cache = True
    assert report.format().splitlines()[-1] == "  cache: /c/k (reused)"
    # Nothing measured yet: no percentile, efficiency or cache lines.
    assert DataReport().format().splitlines() == [
        "Data:",
        "  records read: 0; kept examples: 0 (train 0, eval 0)",
        "  truncated to 0 tokens: 0",
        "  tokens: 0, supervised: 0 (0.0%)",
    ]
