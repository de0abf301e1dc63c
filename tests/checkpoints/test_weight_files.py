"""weight_files: which files a loader reads from a directory, and the structural check of each."""

import json

import pytest
import torch
from safetensors.torch import save_file

from baichuan_finetune.checkpoints.weight_files import (ADAPTER_WEIGHT_FILES, WeightFilesError, check_weights, weight_files,
                                            weights_entry, weights_file_problem)


def test_transformers_order_of_preference(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00001.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"w": "pytorch_model-00001-of-00001.bin"}}))
    assert weight_files(tmp_path) == [tmp_path / "pytorch_model-00001-of-00001.bin"]
    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))  # safetensors wins, as in transformers
    assert weight_files(tmp_path) == [tmp_path / "model.safetensors"]
    assert check_weights(tmp_path) == [tmp_path / "model.safetensors"]


def test_shards_of_an_index_sorted_once_each(tmp_path):
    for n in (1, 2):
        save_file({f"w{n}": torch.ones(2)}, str(tmp_path / f"model-0000{n}.safetensors"))
    weight_map = {"a": "model-00002.safetensors", "b": "model-00001.safetensors", "c": "model-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert check_weights(tmp_path) == [tmp_path / "model-00001.safetensors", tmp_path / "model-00002.safetensors"]


@pytest.mark.parametrize("weight_map, problem", [
    ({"a": "model-00009.safetensors"}, "names shard 'model-00009.safetensors', which is not in"),
    ({"a": "../model.safetensors"}, "names shard '../model.safetensors'"),
    ({}, "not a weight index"),
    ([], "not a weight index"),
])
def test_bad_index_names_the_index(tmp_path, weight_map, problem):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map} if isinstance(weight_map, dict) else weight_map))
    with pytest.raises(WeightFilesError, match="^" + str(index).replace(".", r"\.") + ": ") as e:
        weight_files(tmp_path)
    assert problem in str(e.value)


def test_no_weights_lists_what_was_looked_for(tmp_path):
    with pytest.raises(WeightFilesError, match=r"no LoRA adapter weights \(adapter_model\.safetensors, adapter_model\.bin\)"):
        weights_entry(tmp_path, ADAPTER_WEIGHT_FILES, "LoRA adapter")


def test_check_weights_names_the_first_damaged_file(tmp_path):
    save_file({"w": torch.ones(64)}, str(tmp_path / "model.safetensors"))
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(WeightFilesError, match=r"model\.safetensors: not a complete safetensors file \(truncated: "
                                               r"its tensors need 256 bytes of data, the file holds \d+\)"):
        check_weights(tmp_path)


def test_weights_file_problem_passes_whole_files_and_names_unreadable_ones(tmp_path):
    save_file({"w": torch.ones(3)}, str(tmp_path / "whole.safetensors"))
    torch.save({"w": torch.ones(3)}, tmp_path / "whole.bin")
    assert weights_file_problem(tmp_path / "whole.safetensors") is None
    assert weights_file_problem(tmp_path / "whole.bin") is None
    (tmp_path / "dir.safetensors").mkdir()
    assert weights_file_problem(tmp_path / "dir.safetensors") == "cannot read: Is a directory"
    (tmp_path / "empty.bin").write_bytes(b"")
    assert weights_file_problem(tmp_path / "empty.bin").startswith("not a complete torch checkpoint")
    (tmp_path / "list.safetensors").write_bytes((2).to_bytes(8, "little") + b"[]")
    assert weights_file_problem(tmp_path / "list.safetensors") == \
        "not a complete safetensors file (its header is not a JSON object)"
