"""--streaming (data/streaming.py), in this process: shards without overlap, rows as the non-streaming path
packs them, exact resume from a saved position (with and without dataloader workers, across epochs), bad
records mid-stream, and the estimated summary.

The oracles are independent of the stream: the documents the test wrote, sentencepiece's own encoding of
them, the rows `prepare_data` writes without --streaming, and an uninterrupted read of the same stream.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest
import sentencepiece as spm
import torch

from baichuan_finetune.builder.tiny import PREBUILT_TOKENIZER
from baichuan_finetune.data.records import DataError
from baichuan_finetune.data.streaming import (StreamConfig, StreamingDataset, StreamLoader, WorkerPosition,
                                              estimate_report, load_position, mixed_stream, node_of, save_position,
                                              worker_batches)
from baichuan_finetune.model.tokenization_baichuan import EOS_ID


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(PREBUILT_TOKENIZER))


def documents(n: int, tag: str) -> list[str]:
    # Lengths from 2 to ~60 words: some documents are longer than the rows of 32 tokens used below.
    return [f"document {tag}{i} " + " ".join(["word", "more", "text"][j % 3] for j in range((i * 7) % 57))
            for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, list[str]]:
    """Two raw-text sources: a .txt (one document per line) and a {"text"} JSONL."""
    d = tmp_path_factory.mktemp("stream")
    a, b = documents(130, "a"), documents(70, "b")
    (d / "a.txt").write_text("\n".join(a) + "\n")
    (d / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in b))
    return {str(d / "a.txt"): a, str(d / "b.jsonl"): b}


def pt_config(corpus, **changes) -> StreamConfig:
    (a, _), (b, _) = corpus.items()
    config = StreamConfig(sources=((a, 0.7), (b, 0.3)), stage="pt", mix_strategy="interleave_over", mix_seed=3,
                          model_max_length=32, batch_size=3, packing=True, window=40)
    return replace(config, **changes)


def ids_of(config: StreamConfig, node: int, nodes: int) -> list[str]:
    return [e["id"] for e in mixed_stream(config, node, nodes)]


@pytest.mark.parametrize("strategy", ["concat", "interleave_under", "interleave_over"])
def test_ranks_and_workers_share_the_stream_without_overlap_or_gap(corpus, strategy):
    config = pt_config(corpus, mix_strategy=strategy, sources=tuple((p, None if strategy == "concat" else w)
                                                                   for p, w in pt_config(corpus).sources))
    whole = ids_of(config, 0, 1)
    if strategy == "concat":  # every document of the files, in order
        assert whole == [f"{path}:{i + 1}" for path, docs in corpus.items() for i in range(len(docs))]
    world, workers = 2, 2  # 2 ranks x 2 dataloader workers
    shares = {(r, k): ids_of(config, *node_of(r, world, k, workers)) for r in range(world) for k in range(workers)}
    for r in range(world):  # rank r reads examples i with i % world == r: the ranks split the whole stream
        assert sorted(i for k in range(workers) for i in shares[(r, k)]) == sorted(whole[r::world])
    seen = [i for share in shares.values() for i in share]
    assert sorted(seen) == sorted(whole)  # none twice, none skipped
    if strategy != "interleave_over":  # (oversampling repeats a source's documents on purpose)
        assert len(set(seen)) == len(seen)


def test_every_token_of_every_document_is_in_exactly_one_rows_of_one_rank(corpus, sp):
    """One epoch of 2 ranks' windows, concat: the rows hold the documents' tokens (sentencepiece + eos)."""
    config = pt_config(corpus, mix_strategy="concat", sources=tuple((p, None) for p in corpus))
    expected = sorted(t for docs in corpus.values() for d in docs for t in sp.encode(d) + [EOS_ID])
    got = []
    for rank in range(2):
        ranked = replace(config, rank=rank, world_size=2, batch_size=1)
        for batch in worker_batches(ranked, sp.serialized_model_proto(), 0, 1, WorkerPosition()):
            if batch["stream_position"]["epoch"] > 0:
                break
            mask = batch["attention_mask"][0]
            got += batch["input_ids"][0][mask != 0].tolist()
            # Every non-pad token is a target but the first of each segment (nothing before it predicts it).
            labels = batch["labels"][0][mask != 0]
            first = torch.cat([torch.tensor([True]), mask[mask != 0][1:] != mask[mask != 0][:-1]])
            ids = batch["input_ids"][0][mask != 0]
            assert (labels[first] == -100).all() and torch.equal(labels[~first], ids[~first])
    assert sorted(got) == expected


def test_sft_rows_are_those_the_non_streaming_path_packs(tmp_path, sp):
    """A window holding the whole file packs exactly as prepare_data does (same rows, labels, segments)."""
    from baichuan_finetune.data.preprocess import prepare_data
    from baichuan_finetune.options.arguments import DataArguments

    records = [{"conversations": [{"from": "human", "value": f"question {i} " + "why " * (i % 9)},
                                  {"from": "gpt", "value": f"answer {i} " + "because " * (i % 13)}]}
               for i in range(40)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = DataArguments(data_path=str(data), packing=True, data_cache_dir=str(tmp_path / "cache"))
    reference = prepare_data(args, sp, 64).train_dataset
    config = StreamConfig(sources=((str(data), None),), stage="sft", mix_strategy="concat", mix_seed=0,
                          model_max_length=64, batch_size=1, packing=True)
    rows = []
    for batch in worker_batches(config, sp.serialized_model_proto(), 0, 1, WorkerPosition()):
        if batch["stream_position"]["epoch"] > 0:
            break
        rows.append(batch)
    assert len(rows) == len(reference)
    for batch, row in zip(rows, reference):
        n = len(row["input_ids"])
        assert batch["input_ids"][0, :n].tolist() == row["input_ids"]
        assert batch["labels"][0, :n].tolist() == row["labels"]
        assert batch["attention_mask"][0, :n].tolist() == row["attention_mask"]


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "2-workers"])
def test_resume_from_a_saved_position_gives_the_uninterrupted_batches(corpus, sp, tmp_path, workers):
    config = pt_config(corpus, rank=1, world_size=2)
    loader = StreamLoader(StreamingDataset(config, sp), workers)
    reference, states = [], []
    for batch in itertools.islice(loader, 130):  # a few epochs of this rank's share
        reference.append(batch["input_ids"])
        states.append(json.loads(json.dumps(loader.state())))
    epochs = [max(p["epoch"] for p in state["positions"].values()) for state in states]
    second = epochs.index(1)  # the first batch holding rows of the second epoch
    # Odd cuts rotate the workers; 61 and 101 are mid-window; `second` straddles the epochs.
    for cut in sorted({0, 5, second - 1, second, 61, 101}):
        save_dir = tmp_path / f"checkpoint-{cut}-{workers}"
        save_dir.mkdir()
        loader.positions, loader.batches = states[cut]["positions"], states[cut]["batches"]
        save_position(loader, save_dir)
        resumed = StreamingDataset(config, sp)
        resumed.restore(load_position(save_dir, config))
        after = [b["input_ids"] for b in itertools.islice(StreamLoader(resumed, workers), 12)]
        assert all(torch.equal(a, b) for a, b in zip(after, reference[cut + 1:cut + 13])), cut


def test_a_position_of_another_world_size_is_refused(corpus, sp, tmp_path):
    config = pt_config(corpus, rank=0, world_size=2)
    loader = StreamLoader(StreamingDataset(config, sp), 0)
    next(iter(loader))
    save_position(loader, tmp_path)
    with pytest.raises(DataError, match="written by 2 process\\(es\\), resumed with 1"):
        load_position(tmp_path, replace(config, world_size=1))
    with pytest.raises(DataError, match="not written by a --streaming run"):
        load_position(tmp_path / "nothing", config)
    resumed = StreamingDataset(config, sp)
    resumed.restore(load_position(tmp_path, config))
    with pytest.raises(DataError, match="--dataloader_num_workers 2: the checkpoint's stream was read by 1 worker"):
        StreamLoader(resumed, 2)


def test_a_bad_record_mid_stream_is_one_line_or_counted(tmp_path, sp):
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    lines = [json.dumps(good)] * 30 + ['{"conversations": [{"from": "alien", "value": "x"}]}'] + [json.dumps(good)] * 5
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    config = StreamConfig(sources=((str(data), None),), stage="sft", mix_strategy="concat", mix_seed=0,
                          model_max_length=32, batch_size=2, packing=False, window=10)
    loader = StreamLoader(StreamingDataset(config, sp), 1)  # raised in a worker process, arrives as one line
    with pytest.raises(DataError) as caught:
        list(itertools.islice(loader, 40))
    assert str(caught.value) == (f"bad record in the training data: {data} line 31: conversations[0].from: unknown "
                                 "role 'alien' (expected human, user, gpt, assistant or system) (use "
                                 "on_bad_record='skip' to drop it)")
    loader = StreamLoader(StreamingDataset(replace(config, on_bad_record="skip"), sp), 0)
    list(itertools.islice(loader, 20))  # 35 good records per epoch: a second epoch has begun
    assert loader.counts()["bad/unknown role"] >= 1


def test_the_summary_is_an_estimate_from_a_sample_and_checks_every_file_first(corpus, sp, tmp_path):
    config = pt_config(corpus, mix_strategy="interleave_under")
    text = estimate_report(config, sp, sample=50).format()
    assert text.splitlines()[0].startswith("Data (--streaming: estimated from the first 50 documents of each source")
    assert "mix (interleave_under, seed 3)" in text and "(weight 0.7)" in text
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.txt: empty file"):
        estimate_report(replace(config, sources=((next(iter(corpus)), 0.5), (str(empty), 0.5))), sp)


def test_inspect_streaming_prints_the_estimate(corpus, capsys):
    from baichuan_finetune.cli.inspect import main

    (a, _), (b, _) = corpus.items()
    code = main(["--streaming", "--stage", "pt", "--data_path", f"{a}:0.7,{b}:0.3", "--mix_strategy",
                 "interleave_under", "--tokenizer_path", str(PREBUILT_TOKENIZER), "--model_max_length", "32"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("Data (--streaming: estimated from the first 1000 documents of each source")
    assert f"{a} (weight 0.7): 130 documents read" in out and f"{b} (weight 0.3): 70 documents read" in out
