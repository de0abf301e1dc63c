"""Data mixing: --data_path sources and weights, and mix_order against datasets.interleave_datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from datasets import Dataset, interleave_datasets

from baichuan_finetune.data.mixing import MixError, Source, mix_order, parse_data_sources, probabilities
from baichuan_finetune.data.preprocess import prepare_data
from baichuan_finetune.options.arguments import DataArguments

from conftest import FIXTURE_DATA

STOPPING = {"interleave_under": "first_exhausted", "interleave_over": "all_exhausted"}


def _oracle(sizes: list[int], weights: list[float] | None, strategy: str, seed: int) -> list[tuple[int, int]]:
    """What datasets.interleave_datasets gives on datasets of (source, index) rows."""
    parts = [Dataset.from_dict({"s": [s] * n, "i": list(range(n))}) for s, n in enumerate(sizes)]
    if strategy == "concat":
        return [(s, i) for p in parts for s, i in zip(p["s"], p["i"])]
    mixed = interleave_datasets(parts, probabilities=probabilities(weights), seed=seed,
                                stopping_strategy=STOPPING[strategy])
    return list(zip(mixed["s"], mixed["i"]))


@pytest.mark.parametrize("sizes, weights, strategy, seed", [
    ([5, 3, 7], None, "interleave_under", 0),
    ([5, 3, 7], None, "interleave_over", 0),
    ([300, 120], [0.7, 0.3], "interleave_under", 1),
    ([300, 120], [0.7, 0.3], "interleave_over", 1),
    ([50, 2000, 10], [1, 2, 3], "interleave_under", 42),
    ([50, 2000, 10], [1, 2, 3], "interleave_over", 7),
    ([4, 6], None, "concat", 0),
])
def test_mix_order_is_interleave_datasets(sizes, weights, strategy, seed):
    assert mix_order(sizes, weights, strategy, seed) == _oracle(sizes, weights, strategy, seed)


@pytest.mark.parametrize("strategy", ["interleave_under", "interleave_over"])
def test_realised_proportions_within_2_percent(strategy):
    weights = [0.6, 0.3, 0.1]
    # Sources big enough that either strategy mixes more than 10,000 examples.
    sizes = [12000, 6000, 2000] if strategy == "interleave_under" else [6000, 3000, 1000]
    shares = {}
    for seed in (0, 1):
        order = mix_order(sizes, weights, strategy, seed)
        assert len(order) >= 10_000
        counts = np.bincount([s for s, _ in order], minlength=3) / len(order)
        assert np.all(np.abs(counts - weights) < 0.02), (seed, counts)
        shares[seed] = order
    # The seed changes the order, not the proportions (above) nor what each source gives in turn.
    assert shares[0] != shares[1]
    for s in range(3):
        firsts = [i for src, i in shares[0] if src == s][:100]
        assert firsts == list(range(100))


def test_over_sees_every_example_and_under_stops_at_the_first_exhausted():
    over = mix_order([10, 1000], [0.5, 0.5], "interleave_over", 3)
    assert {i for s, i in over if s == 1} == set(range(1000))
    assert {i for s, i in over if s == 0} == set(range(10))
    under = mix_order([10, 1000], [0.5, 0.5], "interleave_under", 3)
    assert sum(1 for s, _ in under if s == 0) == 10 and under[-1][0] == 0


def test_mix_order_is_a_pure_function():
    """Every rank computes the mix alone: the same arguments give the same order, with no shared state."""
    first = mix_order([700, 300], [0.7, 0.3], "interleave_under", 5)
    np.random.seed(123)  # the global numpy state plays no part
    assert mix_order([700, 300], [0.7, 0.3], "interleave_under", 5) == first


def test_empty_source():
    assert mix_order([0, 5], None, "interleave_under", 0) == []
    with pytest.raises(MixError, match="could never exhaust"):
        mix_order([0, 5], [1, 1], "interleave_over", 0)


def test_parse_data_sources(tmp_path: Path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b:c.json"
    a.write_text("{}"), b.write_text("{}")
    assert parse_data_sources(f"{a}:0.7,{b}:0.3") == [Source(str(a), 0.7), Source(str(b), 0.3)]
    assert parse_data_sources(f"{a},{b}") == [Source(str(a)), Source(str(b))]  # ':' inside a path stays
    assert parse_data_sources(str(b)) == [Source(str(b))]
    assert parse_data_sources(f"{a}:2, {b}:1") == [Source(str(a), 2.0), Source(str(b), 1.0)]
    for spec, message in [
        (f"{a}:abc,{b}:1", "a.jsonl: weight 'abc' is not a number"),
        (f"{a}:-1,{b}:1", "weight -1: must be a finite number >= 0"),
        (f"{a}:nan,{b}:1", "weight nan: must be a finite number"),
        (f"{a}:0,{b}:0", "the weights sum to 0"),
        (f"{a}:0,{b}:1", "a.jsonl: weight 0 would never draw from it"),
        (f"{a}:1,{b}", "b:c.json: no weight, but other sources have one"),
        (",", "names no source"),
    ]:
        with pytest.raises(MixError, match=message):
            parse_data_sources(spec)


def test_prepare_data_mixes_sources_of_different_formats_and_reports_them(tmp_path: Path):
    """An Alpaca file and a ShareGPT file mixed 1:3 with oversampling: the report's realised shares are
    those of the examples in the cache, counted here from the token ids of each file's examples."""
    sp = spm.SentencePieceProcessor(model_file=str(FIXTURE_DATA.parents[0] / "baichuan2" / "tokenizer.model"))
    alpaca = FIXTURE_DATA / "llamafactory_identity.json"  # 91 records
    sharegpt = FIXTURE_DATA / "fastchat_dummy_conversation.json"  # 100 records
    args = DataArguments(data_path=f"{alpaca}:1,{sharegpt}:3", mix_strategy="interleave_over",
                         data_cache_dir=str(tmp_path))
    report = prepare_data(args, sp, 512, seed=3).report
    by_path = {s["path"]: s for s in report.sources}
    assert by_path[str(alpaca)]["read"] == 91 and by_path[str(sharegpt)]["read"] == 100
    order = mix_order([91, 100], [1, 3], "interleave_over", 3)
    assert by_path[str(alpaca)]["examples"] == sum(1 for s, _ in order if s == 0)  # nothing dropped here
    assert by_path[str(sharegpt)]["examples"] == sum(1 for s, _ in order if s == 1)
    assert by_path[str(alpaca)]["tokens"] + by_path[str(sharegpt)]["tokens"] == report.tokens
    text = report.format()
    assert "mix (interleave_over, seed 3):" in text and "(weight 3): 100 records read" in text
    # The mix seed defaults to --seed; --mix_seed, when given, takes its place.
    again = prepare_data(DataArguments(data_path=args.data_path, mix_strategy="interleave_over", mix_seed=3,
                                       data_cache_dir=str(tmp_path)), sp, 512, seed=9).report
    assert again.sources == report.sources
    json.dumps(report.to_dict())  # the cache stores it


def test_preference_pairs_are_mixed_the_same_way():
    from baichuan_finetune.data.preference_data import read_mixed_pairs, read_pairs

    shipped = FIXTURE_DATA.parents[2] / "data" / "preference_example.json"
    n = len(read_pairs(str(shipped)).pairs)
    args = DataArguments(data_path=f"{shipped}:1,{shipped}:3", mix_strategy="interleave_over")
    read, lines = read_mixed_pairs(args, seed=0)
    order = mix_order([n, n], [1, 3], "interleave_over", 0)
    assert len(read.pairs) == len(order) and lines[0] == "  mix (interleave_over, seed 0):"
    assert f"(weight 3): {n} records read, {sum(1 for s, _ in order if s == 1)} in the mix" in lines[2]
