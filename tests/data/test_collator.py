"""Batching: dynamic and official padding, packing, and their losses on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from baichuan_finetune.options.arguments import DataArguments
from baichuan_finetune.data.collator import DataCollator, pack_arrays, pack_examples, padded_length
from baichuan_finetune.data.data_stats import padding_efficiency
from baichuan_finetune.data.preprocess import prepare_data

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
# Multi-turn Chinese chat (Apache-2.0 sample; see tests/fixtures/SOURCES.md).
CHAT_SAMPLE = FIXTURES / "data" / "chatglm_eft_oaast_sft_zh.json"
TOKENIZER = FIXTURES / "baichuan2" / "tokenizer.model"


def example(ids, labels):
    return {"input_ids": ids, "labels": labels, "length": len(ids)}


def official_batch(examples, max_len, pad_id=0):
    """Baichuan2 fine-tune.py: pad input ids with pad id, labels with -100, mask = input_ids != pad id."""
    input_ids = torch.LongTensor([e["input_ids"] + [pad_id] * (max_len - len(e["input_ids"])) for e in examples])
    labels = torch.LongTensor([e["labels"] + [-100] * (max_len - len(e["labels"])) for e in examples])
    return {"input_ids": input_ids, "labels": labels, "attention_mask": input_ids.ne(pad_id)}


EXAMPLES = [example([195, 5, 6, 196, 7, 2], [2, -100, -100, -100, 7, 2]), example([195, 9, 196, 10, 11, 12, 13, 14, 15, 2],
                                                                                  [2, -100, -100, 10, 11, 12, 13, 14, 15, 2])]


def test_max_length_reproduces_official_batches():
    batch = DataCollator(model_max_length=16, padding="max_length")(EXAMPLES)
    expected = official_batch(EXAMPLES, 16)
    for key in ("input_ids", "labels"):
        assert torch.equal(batch[key], expected[key])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"].long())


def test_longest_pads_to_multiple_of_8_capped():
    batch = DataCollator(model_max_length=64)(EXAMPLES)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum().item() == 16
    assert (batch["labels"][0, 6:] == -100).all() and (batch["input_ids"][0, 6:] == 0).all()
    assert padded_length(10, 12) == 12 and padded_length(17, 4096) == 24 and padded_length(16, 4096) == 16


def test_pack_examples_best_fit_decreasing():
    bins = pack_examples([5, 3, 8, 2, 6, 4], 10)
    assert bins == [[2, 3], [4, 5], [0, 1]]
    # Best fit, not first fit: the 1 joins the row with 1 token left, not the first row it fits (3 left).
    assert pack_examples([7, 5, 4, 1], 10) == [[0], [1, 2, 3]]
    assert pack_examples([5, 3, 8, 2, 6, 4], 10) == bins  # deterministic
    with pytest.raises(ValueError):
        pack_examples([11], 10)


def test_pack_examples_places_every_example_once_within_capacity():
    lengths = np.random.default_rng(0).integers(1, 65, size=500)
    bins = pack_examples(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(lengths[b].sum() <= 64 for b in bins)
    assert all(list(lengths[b]) == sorted(lengths[b], reverse=True) for b in bins)


def test_pack_arrays_segments_and_first_labels():
    ids = np.concatenate([np.array(e["input_ids"]) for e in EXAMPLES]).astype(np.int32)
    labels = np.concatenate([np.array(e["labels"]) for e in EXAMPLES]).astype(np.int32)
    packed = pack_arrays(ids, labels, np.array([6, 10]), 16)
    assert packed.row_lengths.tolist() == [16]
    assert packed.input_ids.tolist() == EXAMPLES[1]["input_ids"] + EXAMPLES[0]["input_ids"]
    assert packed.segment_ids.tolist() == [1] * 10 + [2] * 6
    assert packed.labels.tolist() == [-100] + EXAMPLES[1]["labels"][1:] + [-100] + EXAMPLES[0]["labels"][1:]
    row = {"input_ids": packed.input_ids.tolist(), "labels": packed.labels.tolist(),
           "attention_mask": packed.segment_ids.tolist()}
    batch = DataCollator(model_max_length=24, padding="max_length")([row])
    assert batch["attention_mask"][0].tolist() == [1] * 10 + [2] * 6 + [0] * 8


def test_packing_efficiency_on_benchmark_data():
    import sentencepiece as spm

    from baichuan_finetune.data.encoding import encode_conversations
    from baichuan_finetune.data.records import read_records

    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    chunk = encode_conversations(sp, read_records(str(CHAT_SAMPLE)).conversations, 2048)
    efficiency, rows = padding_efficiency(chunk.lengths, 2048)
    assert efficiency["packing"] >= 0.95
    assert rows == len(pack_examples(chunk.lengths, 2048))


# ---- with the tiny model --------------------------------------------------------------------


def _model_and_data(tiny_model_dir, tmp_path, packing):
    from baichuan_finetune.model.modeling_baichuan import BaichuanForCausalLM
    from baichuan_finetune.model.tokenization_baichuan import BaichuanTokenizer

    torch.manual_seed(0)
    model = BaichuanForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    tokenizer = BaichuanTokenizer.from_pretrained(tiny_model_dir)
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "d.json"
    records = json.loads((REPO / "data" / "quickstart.json").read_text())[:12]
    data.write_text(json.dumps(records))
    args = DataArguments(data_path=str(data), data_cache_dir=str(tmp_path / "cache"), packing=packing)
    return model, prepare_data(args, tokenizer, 256)


def test_dynamic_padding_loss_equals_official_max_length(tiny_model_dir, tmp_path):
    model, prepared = _model_and_data(tiny_model_dir, tmp_path, packing=False)
    examples = [prepared.train_dataset[i] for i in range(8)]
    with torch.no_grad():
        dynamic = model(**DataCollator(model_max_length=256)(examples)).loss
        official = official_batch(examples, 256)
        official["attention_mask"] = official["attention_mask"].long()
        padded = model(**official).loss
    assert torch.allclose(dynamic, padded, atol=1e-5), (dynamic, padded)


def test_packed_loss_equals_unpacked(tiny_model_dir, tmp_path):
    model, unpacked = _model_and_data(tiny_model_dir, tmp_path / "u", packing=False)
    _, packed = _model_and_data(tiny_model_dir, tmp_path / "p", packing=True)
    assert sum(packed.train_dataset["length"]) == sum(unpacked.train_dataset["length"])
    assert len(packed.train_dataset) < len(unpacked.train_dataset)
    unpacked_rows = [unpacked.train_dataset[i] for i in range(len(unpacked.train_dataset))]
    packed_rows = [packed.train_dataset[i] for i in range(len(packed.train_dataset))]
    with torch.no_grad():
        loss_unpacked = model(**DataCollator(model_max_length=256)(unpacked_rows)).loss
        loss_packed = model(**DataCollator(model_max_length=256)(packed_rows)).loss
        assert torch.allclose(loss_packed, loss_unpacked, atol=1e-5), (loss_packed, loss_unpacked)

        # Per token: each conversation's logits inside a packed row equal its logits alone.
        alone = {tuple(r["input_ids"]): model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in unpacked_rows}
        row = packed_rows[0]
        batch = DataCollator(model_max_length=256)([row])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0]
        segments = np.asarray(row["attention_mask"])
        for s in range(1, segments.max() + 1):
            where = np.flatnonzero(segments == s)
            ids = tuple(row["input_ids"][where[0] : where[-1] + 1])
            assert torch.allclose(logits[where[0] : where[-1] + 1], alone[ids], atol=1e-5)
