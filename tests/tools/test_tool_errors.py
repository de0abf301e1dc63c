"""Bad inputs to the tools (cli_demo.py, merge_lora.py, evaluate.py): each is refused before any model
loads, with one line on stderr naming the flag or file, the documented exit code, no traceback, and
nothing written. The table runs the scripts' main() in this process (fast); a few cases also run as
real subprocesses, so that what a user sees (imports, warnings) is checked too."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from functools import cached_property
from pathlib import Path

import pytest
from tools_helpers import SCRIPTS, make_lora_dir, script_env


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def good_lora(tiny_model_dir, tmp_path_factory) -> Path:
    from baichuan_finetune.checkpoints.fingerprint import write_fingerprint

    lora = make_lora_dir(tiny_model_dir, tmp_path_factory.mktemp("errors") / "adapter")
    write_fingerprint(tiny_model_dir, lora)  # as training does
    return lora


class Paths:
    """The inputs of one case, each built on first use under a fresh directory."""

    def __init__(self, root: Path, base: Path, lora: Path):
        self.root, self.base, self.lora = root, base, lora
        self.out = root / "out"  # where a tool would write: must stay untouched

    def _copy(self, src: Path, name: str) -> Path:
        return Path(shutil.copytree(src, self.root / name))

    @cached_property
    def missing(self) -> Path:
        return self.root / "does-not-exist"

    @cached_property
    def a_file(self) -> Path:
        path = self.root / "a-file.txt"
        path.write_text("not a model\n")
        return path

    @cached_property
    def empty_dir(self) -> Path:
        path = self.root / "empty"
        path.mkdir()
        return path

    @cached_property
    def no_weights(self) -> Path:
        path = self._copy(self.base, "no-weights")
        (path / "model.safetensors").unlink()
        return path

    @cached_property
    def truncated_weights(self) -> Path:
        path = self._copy(self.base, "truncated")
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
        return path

    @cached_property
    def random_weights(self) -> Path:
        path = self._copy(self.base, "random")
        (path / "model.safetensors").write_bytes(bytes(range(256)) * 64)
        return path

    @cached_property
    def bad_config(self) -> Path:
        path = self._copy(self.base, "bad-config")
        (path / "config.json").write_text('{"model_type": "baichuan",')
        return path

    @cached_property
    def no_tokenizer(self) -> Path:
        path = self._copy(self.base, "no-tokenizer")
        (path / "tokenizer.model").unlink()
        return path

    @cached_property
    def missing_shard(self) -> Path:
        path = self._copy(self.base, "missing-shard")
        (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
        weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                      "lm_head.weight": "model-00002-of-00002.safetensors"}
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return path

    def _with_config(self, name: str, **changes) -> Path:
        path = self._copy(self.base, name)
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **changes}))
        return path

    @cached_property
    def custom_code(self) -> Path:
        """A model_type of another architecture with its own code (never imported: it is refused)."""
        return self._with_config("custom-code", model_type="evil", auto_map={"AutoModelForCausalLM": "evil.Model"})

    @cached_property
    def foreign_auto_map(self) -> Path:
        return self._with_config("foreign-auto-map", auto_map={"AutoModelForCausalLM": "evil.Model"})

    @cached_property
    def lora_on_custom_code(self) -> Path:
        def edit(path):
            config = json.loads((path / "adapter_config.json").read_text())
            config["base_model_name_or_path"] = str(self.custom_code)
            (path / "adapter_config.json").write_text(json.dumps(config))
        return self._lora_with("lora-on-custom-code", edit)

    def _lora_with(self, name: str, edit) -> Path:
        path = self._copy(self.lora, name)
        edit(path)
        return path

    @cached_property
    def lora_missing_base(self) -> Path:
        def edit(path):
            config = json.loads((path / "adapter_config.json").read_text())
            config["base_model_name_or_path"] = str(self.root / "moved-away")
            (path / "adapter_config.json").write_text(json.dumps(config))
        return self._lora_with("lora-missing-base", edit)

    @cached_property
    def lora_bad_json(self) -> Path:
        return self._lora_with("lora-bad-json", lambda p: (p / "adapter_config.json").write_text("{'r': 4}"))

    @cached_property
    def lora_json_list(self) -> Path:
        return self._lora_with("lora-json-list", lambda p: (p / "adapter_config.json").write_text("[1, 2]"))

    @cached_property
    def lora_no_base_field(self) -> Path:
        def edit(path):
            config = json.loads((path / "adapter_config.json").read_text())
            del config["base_model_name_or_path"]
            (path / "adapter_config.json").write_text(json.dumps(config))
        return self._lora_with("lora-no-base", edit)

    @cached_property
    def lora_truncated(self) -> Path:
        def edit(path):
            data = (path / "adapter_model.safetensors").read_bytes()
            (path / "adapter_model.safetensors").write_bytes(data[:-100])
        return self._lora_with("lora-truncated", edit)

    @cached_property
    def lora_no_weights(self) -> Path:
        return self._lora_with("lora-no-weights", lambda p: (p / "adapter_model.safetensors").unlink())

    @cached_property
    def lora_bad_fingerprint(self) -> Path:
        return self._lora_with("lora-bad-fp", lambda p: (p / "base_model_fingerprint.json").write_text("{"))

    @cached_property
    def nonempty_out(self) -> Path:
        self.out.mkdir()
        (self.out / "keep.txt").write_text("mine\n")
        return self.out

    @cached_property
    def dangling_out(self) -> Path:
        self.out.symlink_to(self.root / "gone")
        return self.out

    @cached_property
    def out_file(self) -> Path:
        self.out.write_text("a file where the output directory would go\n")
        return self.out

    @cached_property
    def task(self) -> Path:
        """A tiny C-Eval-style task: dev/ and test/ for the subject 'arith'."""
        root = self.root / "task"
        for split in ("dev", "test"):
            (root / split).mkdir(parents=True)
            rows = ["question,A,B,C,D,answer"] + [f"{i}+{i}=?,{2 * i},{i},0,1,A" for i in range(3)]
            (root / split / f"arith_{split}.csv").write_text("\n".join(rows) + "\n")
        return root

    @cached_property
    def task_bad_answer(self) -> Path:
        root = Path(shutil.copytree(self.task, self.root / "task-bad-answer"))
        (root / "test" / "arith_test.csv").write_text("question,A,B,C,D,answer\n1+1=?,2,1,0,3,E\n")
        return root

    @cached_property
    def task_no_dev(self) -> Path:
        root = Path(shutil.copytree(self.task, self.root / "task-no-dev"))
        shutil.rmtree(root / "dev")
        return root

    @cached_property
    def task_missing_column(self) -> Path:
        root = Path(shutil.copytree(self.task, self.root / "task-missing-column"))
        (root / "test" / "arith_test.csv").write_text("question,A,B,C,answer\n1+1=?,2,1,0,A\n")
        return root

    @cached_property
    def task_not_utf8(self) -> Path:
        root = Path(shutil.copytree(self.task, self.root / "task-latin1"))
        (root / "test" / "arith_test.csv").write_bytes("question,A,B,C,D,answer\nq\xe9,1,2,3,4,A\n".encode("latin-1"))
        return root

    def _task_with(self, name: str, files: dict) -> Path:
        root = Path(shutil.copytree(self.task, self.root / name))
        for relative, text in files.items():
            (root / relative).write_text(text)
        return root

    @cached_property
    def task_header_only(self) -> Path:
        return self._task_with("task-header-only", {"test/arith_test.csv": "question,A,B,C,D,answer\n"})

    @cached_property
    def task_csv_and_json(self) -> Path:
        record = {"question": "1+1=?", "choices": ["2", "1", "0", "3"], "answer": 0}
        return self._task_with("task-csv-and-json", {"test/arith.json": json.dumps([record])})

    @cached_property
    def task_dev_no_answers(self) -> Path:
        return self._task_with("task-dev-no-answers", {"dev/arith_dev.csv": "question,A,B,C,D\n1+1=?,2,1,0,3\n"})

    @cached_property
    def task_bad_mapping(self) -> Path:
        return self._task_with("task-bad-mapping", {"subject_mapping.json": '{"arith": ["Arithmetic", "算术"],'})


def cli(p: Paths, *flags) -> list:
    """cli_demo on the good base model with `flags`."""
    return ["cli_demo", "--model", p.base, *flags]


def cli_model(model: Path) -> list:
    return ["cli_demo", "--model", model]


# (id, argv builder, exit code, what the one line must contain)
CASES = [
    # --- cli_demo.py: generation flags
    ("cli-max-new-tokens-0", lambda p: cli(p, "--max_new_tokens", "0"), 2, "--max_new_tokens 0"),
    ("cli-max-new-tokens-negative", lambda p: cli(p, "--max_new_tokens", "-5"), 2, "--max_new_tokens -5"),
    ("cli-max-new-tokens-not-int", lambda p: cli(p, "--max_new_tokens", "many"), 2, "--max_new_tokens"),
    ("cli-temperature-negative", lambda p: cli(p, "--temperature", "-1"), 2, "--temperature -1"),
    ("cli-temperature-nan", lambda p: cli(p, "--temperature", "nan"), 2, "--temperature nan"),
    ("cli-top-p-5", lambda p: cli(p, "--top_p", "5"), 2, "--top_p 5"),
    ("cli-top-p-0", lambda p: cli(p, "--top_p", "0"), 2, "--top_p 0"),
    ("cli-unknown-flag", lambda p: cli(p, "--max_tokens", "5"), 2, "--max_tokens"),
    # --- cli_demo.py: the model directory
    ("cli-model-missing", lambda p: cli_model(p.missing), 2, "no such directory"),
    ("cli-model-is-a-file", lambda p: cli_model(p.a_file), 2, "not a directory"),
    ("cli-model-empty-dir", lambda p: cli_model(p.empty_dir), 2, "neither adapter_config.json"),
    ("cli-model-no-weights", lambda p: cli_model(p.no_weights), 2, "no model weights"),
    ("cli-model-truncated-weights", lambda p: cli_model(p.truncated_weights), 2, "model.safetensors: not a complete safetensors file (truncated"),
    ("cli-model-random-weights", lambda p: cli_model(p.random_weights), 2, "model.safetensors: not a complete safetensors file"),
    ("cli-model-bad-config", lambda p: cli_model(p.bad_config), 2, "config.json: not valid JSON"),
    ("cli-model-no-tokenizer", lambda p: cli_model(p.no_tokenizer), 2, "no tokenizer.model"),
    ("cli-model-missing-shard", lambda p: cli_model(p.missing_shard), 2, "model.safetensors.index.json: names shard 'model-00002-of-00002.safetensors', which is not in"),
    ("cli-lora-base-moved", lambda p: cli_model(p.lora_missing_base), 2, "moved-away is not a directory"),
    ("cli-lora-bad-json", lambda p: cli_model(p.lora_bad_json), 2, "adapter_config.json: not valid JSON"),
    ("cli-lora-truncated", lambda p: cli_model(p.lora_truncated), 2, "adapter_model.safetensors: not a complete safetensors file (truncated"),
    ("cli-model-custom-code", lambda p: cli_model(p.custom_code), 2, 'model_type "evil" is not Baichuan2'),
    ("cli-model-foreign-auto-map", lambda p: cli_model(p.foreign_auto_map), 2, 'auto_map names code that is not this toolkit\'s (AutoModelForCausalLM: "evil.Model")'),
    ("cli-lora-on-custom-code", lambda p: cli_model(p.lora_on_custom_code), 2, "custom-code/config.json: model_type"),
    ("merge-adapter-on-custom-code", lambda p: ["merge_lora", p.lora_on_custom_code, p.out], 2, "custom-code/config.json: model_type"),
    ("eval-model-custom-code", lambda p: ["evaluate", "--model", p.custom_code, "--task_dir", p.task], 2, 'model_type "evil"'),
    # --- merge_lora.py
    ("merge-adapter-missing", lambda p: ["merge_lora", p.missing, p.out], 2, "does-not-exist: no such directory"),
    ("merge-adapter-is-a-file", lambda p: ["merge_lora", p.a_file, p.out], 2, "not a directory"),
    ("merge-base-given-as-adapter", lambda p: ["merge_lora", p.base, p.out], 2, "is a model directory (config.json), not a LoRA adapter"),
    ("merge-empty-dir-as-adapter", lambda p: ["merge_lora", p.empty_dir, p.out], 2, "not a LoRA adapter directory"),
    ("merge-output-is-adapter", lambda p: ["merge_lora", p.lora, p.lora], 2, "not over its inputs"),
    ("merge-output-is-base", lambda p: ["merge_lora", p.lora, p.base], 2, "not over its inputs"),
    ("merge-output-is-a-file", lambda p: ["merge_lora", p.lora, p.out_file], 2, "is a file"),
    ("merge-output-not-empty", lambda p: ["merge_lora", p.lora, p.nonempty_out], 2, "is not empty"),
    ("merge-output-dangling-symlink", lambda p: ["merge_lora", p.lora, p.dangling_out], 2,
     "out is a dangling symbolic link (to "),
    ("merge-adapter-config-not-json", lambda p: ["merge_lora", p.lora_bad_json, p.out], 2, "adapter_config.json: not valid JSON"),
    ("merge-adapter-config-a-list", lambda p: ["merge_lora", p.lora_json_list, p.out], 2, "expected a JSON object, found list"),
    ("merge-adapter-config-no-base", lambda p: ["merge_lora", p.lora_no_base_field, p.out], 2, "no base_model_name_or_path"),
    ("merge-adapter-base-moved", lambda p: ["merge_lora", p.lora_missing_base, p.out], 2, "moved-away is not a directory"),
    ("merge-adapter-truncated", lambda p: ["merge_lora", p.lora_truncated, p.out], 2, "adapter_model.safetensors: not a complete safetensors file (truncated"),
    ("merge-adapter-no-weights", lambda p: ["merge_lora", p.lora_no_weights, p.out], 2, "no LoRA adapter weights"),
    ("merge-bad-fingerprint-file", lambda p: ["merge_lora", p.lora_bad_fingerprint, p.out], 2, "base_model_fingerprint.json: unreadable"),
    ("merge-shard-size-unit", lambda p: ["merge_lora", p.lora, p.out, "--max_shard_size", "2XB"], 2, "--max_shard_size '2XB'"),
    ("merge-shard-size-zero", lambda p: ["merge_lora", p.lora, p.out, "--max_shard_size", "0GB"], 2, "larger than 0"),
    ("merge-bad-dtype", lambda p: ["merge_lora", p.lora, p.out, "--dtype", "float8"], 2, "--dtype"),
    # --- evaluate.py
    ("eval-model-missing", lambda p: ["evaluate", "--model", p.missing, "--task_dir", p.task], 2, "--model"),
    ("eval-model-truncated", lambda p: ["evaluate", "--model", p.truncated_weights, "--task_dir", p.task], 2, "truncated"),
    ("eval-task-dir-missing", lambda p: ["evaluate", "--model", p.base, "--task_dir", p.missing], 2, "--task_dir"),
    ("eval-split-missing", lambda p: ["evaluate", "--model", p.base, "--task_dir", p.task, "--split", "val"], 2, "val does not exist"),
    ("eval-shots-negative", lambda p: ["evaluate", "--model", p.base, "--task_dir", p.task, "--shots", "-1"], 2, "--shots -1"),
    ("eval-limit-zero", lambda p: ["evaluate", "--model", p.base, "--task_dir", p.task, "--limit", "0"], 2, "--limit 0"),
    ("eval-batch-size-zero", lambda p: ["evaluate", "--model", p.base, "--task_dir", p.task, "--batch_size", "0"], 2, "--batch_size 0"),
    ("eval-batch-size-not-int", lambda p: ["evaluate", "--model", p.base, "--task_dir", p.task, "--batch_size", "x"], 2, "--batch_size"),
    ("eval-bad-columns", lambda p: ["evaluate", "--model", p.base, "--task_dir", p.task, "--columns", "prompt=Q"], 2, "bad --columns entry"),
    ("eval-unknown-subject", lambda p: ["evaluate", "--model", p.base, "--task_dir", p.task, "--subjects", "arith,poetry"], 2, "--subjects: no test file for poetry"),
    ("eval-no-dev-for-shots", lambda p: ["evaluate", "--model", p.base, "--task_dir", p.task_no_dev], 2, "has no file for arith"),
    ("eval-output-json-under-a-file", lambda p: ["evaluate", "--model", p.base, "--task_dir", p.task, "--output_json",
                                                 f"{p.out_file}/sub/results.json"], 2, "is a file"),
    ("eval-output-json-is-dir", lambda p: ["evaluate", "--model", p.base, "--task_dir", p.task, "--output_json", p.empty_dir], 2, "--output_json"),
    ("eval-bad-answer", lambda p: ["evaluate", "--model", p.base, "--task_dir", p.task_bad_answer], 1, "arith_test.csv:2: answer 'E' is not A-D"),
    ("eval-missing-column", lambda p: ["evaluate", "--model", p.base, "--task_dir", p.task_missing_column,
                                       "--columns", "question=question,A=A,B=B,C=C,D=D,answer=answer"], 1, "no column 'D'"),
    ("eval-unknown-layout", lambda p: ["evaluate", "--model", p.base, "--task_dir", p.task_missing_column], 1,
     "arith_test.csv: unknown multiple-choice layout"),
    ("eval-not-utf8", lambda p: ["evaluate", "--model", p.base, "--task_dir", p.task_not_utf8], 1, "not a UTF-8 CSV"),
    ("eval-header-only-csv", lambda p: ["evaluate", "--model", p.base, "--task_dir", p.task_header_only], 1,
     "arith_test.csv: no questions (an empty or header-only file)"),
    ("eval-csv-and-json-same-subject", lambda p: ["evaluate", "--model", p.base, "--task_dir", p.task_csv_and_json], 1,
     "two files for the subject 'arith': arith.json and arith_test.csv"),
    ("eval-dev-without-answers", lambda p: ["evaluate", "--model", p.base, "--task_dir", p.task_dev_no_answers], 1,
     "arith_dev.csv: dev question 1 has no answer"),
    ("eval-bad-subject-mapping", lambda p: ["evaluate", "--model", p.base, "--task_dir", p.task_bad_mapping], 1,
     "subject_mapping.json: unreadable"),
    # --- predict.py
    ("predict-no-prompts", lambda p: predict(p, prompts_file(p, "blank.txt", "\n  \n")), 1, "blank.txt: no prompts"),
    ("predict-empty-prompt", lambda p: predict(p, prompts_file(p, "p.jsonl", '{"prompt": "1+1?"}\n{"prompt": " "}\n')), 1,
     "p.jsonl line 2: prompt: empty prompt"),
    ("predict-empty-last-user-turn", lambda p: predict(p, prompts_file(p, "c.json", json.dumps(
        [{"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "2"}]}]))), 1,
     "c.json record 0: empty prompt"),
    ("predict-model-not-a-model", lambda p: predict(p, prompts_file(p, "p.txt", "1+1?\n"), model=p.empty_dir), 2,
     "neither adapter_config.json"),
    ("predict-second-model-truncated", lambda p: predict(p, prompts_file(p, "p.txt", "1+1?\n"), "--model",
                                                         p.truncated_weights), 2, "truncated"),
    ("predict-more-processes-than-prompts", lambda p: predict(p, prompts_file(p, "p.txt", "1+1?\n2+2?\n"),
                                                              "--num_gpus", "3"), 2,
     "--num_gpus 3 is more than the 2 prompt(s)"),
    ("predict-batch-size-zero", lambda p: predict(p, prompts_file(p, "p.txt", "1+1?\n"), "--batch_size", "0"), 2,
     "--batch_size 0"),
    ("predict-data-missing", lambda p: predict(p, p.missing), 1, "does-not-exist: no such file"),
    # --- export.py (GGUF)
    ("export-model-missing", lambda p: ["export", "--model", p.missing, "--output", p.out], 2,
     "does-not-exist: no such directory"),
    ("export-model-not-a-model", lambda p: ["export", "--model", p.empty_dir, "--output", p.out], 2,
     "neither adapter_config.json (LoRA adapter) nor config.json (model) found"),
    ("export-model-truncated", lambda p: ["export", "--model", p.truncated_weights, "--output", p.out], 2, "truncated"),
    ("export-adapter-base-moved", lambda p: ["export", "--model", p.lora_missing_base, "--output", p.out], 2,
     "moved-away is not a directory"),
    ("export-unknown-quant", lambda p: ["export", "--model", p.base, "--output", p.out, "--quant", "q4km"], 2,
     "--quant 'q4km': unknown type (did you mean q4_k_m?)"),
    ("export-output-under-a-file", lambda p: ["export", "--model", p.base, "--output", f"{p.out_file}/sub/model.gguf"],
     2, "is a file"),
    ("export-output-exists", lambda p: ["export", "--model", p.base, "--output", p.out_file], 2,
     "exists: pass --overwrite to replace it"),
    ("export-output-is-a-dir", lambda p: ["export", "--model", p.base, "--output", p.nonempty_out], 2,
     "is a directory: name the .gguf file to write"),
    ("export-gptq-refused", lambda p: ["export", "--model", p.base, "--output", p.out, "--format", "gptq"], 2,
     "--format gptq needs gptqmodel"),
]


def prompts_file(p: Paths, name: str, text: str) -> Path:
    path = p.root / name
    path.write_text(text, encoding="utf-8")
    return path


def predict(p: Paths, data: Path, *flags, model: Path | None = None) -> list:
    """predict on the good base model (or `model`) with `data` as the prompts, writing to p.out."""
    return ["predict", "--model", model or p.base, "--data", data, "--output_dir", p.out, *flags]


@pytest.fixture(scope="module")
def scripts():
    return {name: load_script(name) for name in ("cli_demo", "merge_lora", "evaluate", "predict", "export")}


def snapshot(path: Path):
    """What is at `path` (to prove a refused run wrote nothing)."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else None) for p in path.rglob("*"))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case, scripts, tiny_model_dir, good_lora, tmp_path, capsys, monkeypatch):
    import baichuan_finetune.tools.loading as loading

    name, build, code, expected = case
    paths = Paths(tmp_path, tiny_model_dir, good_lora)
    tool, *argv = build(paths)
    argv = [str(a) for a in argv]
    before = {"out": snapshot(paths.out), "lora": snapshot(good_lora), "base": snapshot(tiny_model_dir)}

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    # Refused before loading: any load would fail the test (scripts import load_model by name).
    for module in (loading, scripts[tool], sys.modules.get("baichuan_finetune.tools.merge"),
                   sys.modules.get("baichuan_finetune.tools.evaluate"),
                   sys.modules.get("baichuan_finetune.tools.predict"),
                   sys.modules.get("baichuan_finetune.tools.export")):
        if module is not None and hasattr(module, "load_model"):
            monkeypatch.setattr(module, "load_model", no_loading)
    monkeypatch.setattr(sys, "argv", [f"{tool}.py"])  # argparse's prog, as when run as a script
    with pytest.raises(SystemExit) as exit_info:
        scripts[tool].main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert exit_info.value.code == code, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"{tool}.py: error: "), lines[0]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert snapshot(paths.out) == before["out"]
    assert snapshot(good_lora) == before["lora"] and snapshot(tiny_model_dir) == before["base"]


@pytest.mark.parametrize("tool, args, expected", [
    ("cli_demo.py", ["--max_new_tokens", "0"], "--max_new_tokens 0"),
    ("merge_lora.py", ["{base}", "{out}"], "not a LoRA adapter"),
    ("evaluate.py", ["--model", "{base}", "--task_dir", "{missing}"], "--task_dir"),
])
def test_real_process_prints_one_line(tool, args, expected, tiny_model_dir, tmp_path):
    """As a user runs them: nothing else on stderr (no import-time warnings), exit 2."""
    values = {"base": tiny_model_dir, "out": tmp_path / "out", "missing": tmp_path / "missing"}
    argv = [a.format(**values) for a in args]
    if tool == "cli_demo.py":
        argv = ["--model", str(tiny_model_dir), *argv]
    proc = subprocess.run([sys.executable, str(SCRIPTS / tool), *argv], env=script_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and expected in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"{tool}: error: ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn"])
def test_server_without_the_tools_extras_says_what_to_install(missing, tiny_model_dir):
    """requirements-tools.txt not installed (the module made unimportable in the child): one line, exit 1."""
    script = (f"import runpy, sys; sys.modules[{missing!r}] = None\n"  # None in sys.modules: ImportError
              "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", script, str(SCRIPTS / "openai_api.py"), "--model", str(tiny_model_dir)],
                          env=script_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == f"openai_api.py: error: the server needs {missing}: pip install -r requirements-tools.txt\n"
