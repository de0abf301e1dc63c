"""The memory planner: its arithmetic on the released configs, LoRA counts against peft, the CLI's
bad inputs and outputs, the DeepSpeed config it writes, and the plan line training prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from baichuan_finetune.options import plan

REPO_ROOT = Path(__file__).resolve().parents[2]
PLAN = REPO_ROOT / "scripts" / "plan.py"
FINE_TUNE = REPO_ROOT / "fine-tune" / "fine-tune.py"
CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "configs"


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PLAN), *args], capture_output=True, text=True, timeout=60)


def setup(model: str = "7b", **kw) -> plan.Setup:
    return plan.Setup(shape=plan.load_shape(model), **kw)


@pytest.mark.parametrize("name, billions", [("config-7b.json", 7.5), ("config-13b.json", 13.9)])
def test_released_parameter_counts(name, billions):
    # The published config files (fixtures) and the built-in "7b"/"13b" give the same shapes.
    shape = plan.load_shape(str(CONFIGS / name))
    assert round(shape.params / 1e9, 1) == billions
    builtin = plan.load_shape(name.removeprefix("config-").removesuffix(".json"))
    assert builtin.params == shape.params and builtin.alibi == shape.alibi == (billions > 10)


@pytest.mark.parametrize("model", ["7b", "13b"])
@pytest.mark.parametrize("gpus", [8, 16])
def test_mixed_precision_adamw_is_16_bytes_per_parameter_and_zero3_divides_by_gpus(model, gpus):
    s = setup(model, gpus_per_node=gpus)
    P = s.shape.params
    z3 = plan.estimate(s, "zero3").terms
    states = z3["weights"] + z3["gradients"] + z3["optimizer_states"]
    assert abs(states - 16 * P / gpus) <= 3  # integer rounding of three terms
    z2 = plan.estimate(s, "zero2").terms
    assert z2["weights"] == 2 * P  # ZeRO-2 keeps every weight on every GPU
    assert abs(z2["gradients"] + z2["optimizer_states"] - 14 * P / gpus) <= 2
    off = plan.estimate(s, "zero3_offload_all").terms
    assert off["weights"] == off["gradients"] == off["optimizer_states"] == 0


def test_activation_terms_scale_and_alibi_bias_is_counted():
    one = plan.estimate(setup("13b", seq_len=4096), "zero3").terms
    two = plan.estimate(setup("13b", seq_len=4096, micro_batch=2), "zero3").terms
    assert two["activations_no_checkpointing"] == 2 * one["activations_no_checkpointing"]
    assert one["activations_checkpointing"] < one["activations_no_checkpointing"] / 10
    # [batch (padded/packed rows), 40 heads, 4096, 4096] in bf16.
    assert two["attention_buffers"] == 2 * 40 * 4096 * 4096 * 2
    assert plan.estimate(setup("7b", seq_len=4096), "zero3").terms["attention_buffers"] == 0  # RoPE, no mask
    # The loss head of a full run holds the float32 [V, H] weight-gradient accumulator; LoRA's does not.
    full = plan.estimate(setup("7b"), "zero2").terms["loss_head"]
    lora = plan.estimate(setup("7b", method="lora"), "zero2").terms["loss_head"]
    assert full - lora >= 4 * 125696 * 4096


def test_loss_head_chunk_tensors_and_lora_zero3_live_parameters():
    """Terms the LoRA CPU probe measured (docs/benchmarks.md): 3 [chunk, V] fp32 tensors within the
    first loss chunk, 4 once a second full chunk follows; ZeRO-3 LoRA does not keep the frozen
    embedding gathered (no backward use), full training does."""
    V, H = 125696, 512
    shape = plan.ModelShape(V, H, 1376, 8, 8, "rope")

    def head(tokens: int) -> int:
        s = plan.Setup(shape=shape, method="lora", gpus_per_node=2, seq_len=tokens, device="cpu")
        return plan.estimate(s, "zero2").terms["loss_head"] - tokens * H * 4

    assert head(100) == 3 * 100 * V * 4
    assert head(256) == 3 * 256 * V * 4
    assert head(300) == 3 * 256 * V * 4  # a short second chunk: 2 x (256 + 44) < 3 x 256
    assert head(512) == head(2048) == 4 * 256 * V * 4

    def live(method: str) -> int:
        s = plan.Setup(shape=shape, method=method, gpus_per_node=2, seq_len=256, device="cpu")
        return plan.estimate(s, "zero3").terms["zero3_live_parameters"]

    assert live("full") == shape.params * 4
    assert live("full") - live("lora") == V * H * 4


@pytest.mark.parametrize("targets, r", [("W_pack", 1), ("W_pack,o_proj,down_proj", 4), ("all-linear", 8)])
def test_lora_trainable_count_equals_peft(targets, r):
    from peft import LoraConfig, TaskType, get_peft_model

    from baichuan_finetune.model.configuration_baichuan import BaichuanConfig
    from baichuan_finetune.model.modeling_baichuan import BaichuanForCausalLM

    config = BaichuanConfig(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=64)
    names = plan.lora_targets(targets)
    model = get_peft_model(BaichuanForCausalLM(config), LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=r, target_modules=targets if targets == "all-linear" else list(names)))
    trainable, _ = model.get_nb_trainable_parameters()
    assert plan.lora_trainable_params(plan.ModelShape.from_config(config.to_dict()), r, names) == trainable
    assert plan.ModelShape.from_config(config.to_dict()).params == sum(p.numel() for p in model.parameters()) - trainable


VALID_TARGETS = "(valid: W_pack, o_proj, gate_proj, up_proj, down_proj or all-linear)"
LORA = ["--model", "7b", "--method", "lora"]


@pytest.mark.parametrize("args, expected", [
    (["--model", "99b"], "--model 99b: not 7b, 13b or an existing model directory"),
    (["--model", "7b", "--gpus_per_node", "0"], "--gpus_per_node 0: must be at least 1"),
    (["--model", "7b", "--nodes", "0"], "--nodes 0: must be at least 1"),
    (["--model", "7b", "--nodes", str(10**30)], f"--nodes {10**30}: must be at most 2147483648"),
    (["--model", "7b", "--model_max_length", "0"], "--model_max_length 0: must be at least 1"),
    (["--model", "7b", "--gpu_memory_gb", "-1"], "--gpu_memory_gb -1: must be positive"),
    (["--model", "7b", "--gpu_memory_gb", "inf"], "--gpu_memory_gb inf: must be a finite number of GB"),
    (["--model", "7b", "--gpu_memory_gb", "nan"], "--gpu_memory_gb nan: must be positive"),
    (["--model", "7b", "--cpu_memory_gb", "-5"], "--cpu_memory_gb -5: must be positive"),
    (["--model", "7b", "--cpu_memory_gb", "inf"], "--cpu_memory_gb inf: must be a finite number of GB"),
    ([*LORA, "--lora_r", "0"], "--lora_r 0: must be at least 1"),
    ([*LORA, "--lora_r", "1e9"], "argument --lora_r: invalid int value: '1e9'"),
    ([*LORA, "--lora_r", "1000000000"], "--lora_r 1000000000: at most 4096 for this model (the smaller side of "
                                        "W_pack's 4096 x 12288 weight)"),
    ([*LORA, "--lora_target_modules", "q_proj"], "--lora_target_modules q_proj: q_proj is not a Baichuan2 "
                                                 "module (Baichuan2 projects q, k and v with one fused W_pack); "
                                                 f"did you mean W_pack? {VALID_TARGETS}"),
    ([*LORA, "--lora_target_modules", "q_proj,v_proj"], "q_proj, v_proj are not Baichuan2 modules"),
    ([*LORA, "--lora_target_modules", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"],
     "did you mean W_pack,o_proj,gate_proj,up_proj,down_proj?"),
    ([*LORA, "--lora_target_modules", "bogus"], f"--lora_target_modules bogus: no module named bogus in "
                                                f"Baichuan2; {VALID_TARGETS[1:-1]}"),
    ([*LORA, "--lora_target_modules", "w_pack"], "no module named w_pack in Baichuan2 (did you mean W_pack?)"),
    ([*LORA, "--lora_target_modules", "lm_head"], "--lora_target_modules lm_head: lm_head cannot take LoRA adapters"),
    ([*LORA, "--lora_target_modules", "W_pack,embed_tokens"], "embed_tokens cannot take LoRA adapters"),
    ([*LORA, "--lora_target_modules", "all-linear,W_pack"], "all-linear stands alone"),
    ([*LORA, "--lora_target_modules", ","], "--lora_target_modules: give module names"),
    (["--model", "7b", "--zero", "5"], "argument --zero: invalid choice"),
])
def test_bad_inputs_one_line_exit_2(args, expected):
    proc = run_plan(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plan.py: error: ") and expected in lines[0], lines
    assert proc.stdout == ""


SEVEN_B = json.loads((CONFIGS / "config-7b.json").read_text())
WHOLE = "expected a whole number from 1 to 1048576"


@pytest.mark.parametrize("changes, expected", [
    ({"vocab_size": "125696"}, f'"vocab_size" "125696": {WHOLE}'),
    ({"hidden_size": None}, f'"hidden_size" null: {WHOLE}'),
    ({"hidden_size": True}, f'"hidden_size" true: {WHOLE}'),
    ({"intermediate_size": 11008.5}, f'"intermediate_size" 11008.5: {WHOLE}'),
    ({"vocab_size": 10**22}, f'"vocab_size" {10**22}: {WHOLE}'),
    ({"vocab_size": 1e400}, f'"vocab_size" Infinity: {WHOLE}'),
    ({"num_attention_heads": 0}, f'"num_attention_heads" 0: {WHOLE}'),
    ({"num_hidden_layers": -2}, f'"num_hidden_layers" -2: {WHOLE}'),
    ({"hidden_size": -4096}, f'"hidden_size" -4096: {WHOLE}'),
    ({"num_attention_heads": 3}, '"hidden_size" 4096 is not a multiple of "num_attention_heads" 3'),
    ({"hidden_size": 4032, "num_attention_heads": 64}, "head size 63 (hidden_size 4032 / num_attention_heads 64) "
                                                       "is odd; RoPE needs an even head size"),
    ({"position_embedding": "xpos"}, '"position_embedding" "xpos": expected "rope" or "alibi"'),
    ({"vocab_size": "drop"}, "config.json has no vocab_size"),
])
def test_bad_model_config_one_line_exit_2(tmp_path, changes, expected):
    config = {**SEVEN_B, **changes}
    config = {k: v for k, v in config.items() if v != "drop"}
    (tmp_path / "config.json").write_text(json.dumps(config))  # 1e400 is written as Infinity, as Python reads it
    proc = run_plan("--model", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"plan.py: error: {tmp_path}") and expected in lines[0], lines
    assert proc.stdout == ""


def test_odd_head_size_is_refused_for_rope_only():
    from baichuan_finetune.model.configuration_baichuan import BaichuanConfig

    odd = dict(hidden_size=12, num_attention_heads=4, intermediate_size=16, num_hidden_layers=1, vocab_size=300)
    # At config load too (what the tools and a copied model directory use): one line, not a crash at the first reply.
    with pytest.raises(ValueError, match=r"^head size 3 \(hidden_size 12 / num_attention_heads 4\) is odd; RoPE"):
        BaichuanConfig(**odd, max_position_embeddings=64)
    assert BaichuanConfig(**odd, position_embedding="alibi").head_dim == 3  # ALiBi rotates nothing
    config = {**SEVEN_B, "hidden_size": 4032, "num_attention_heads": 64, "position_embedding": "alibi"}
    assert plan.ModelShape.from_config(config).hidden_size == 4032


def test_lora_target_names_are_parsed_in_one_place():
    assert plan.parse_lora_targets(" all-linear ") == "all-linear"
    assert plan.parse_lora_targets("W_pack, o_proj,W_pack,") == ("W_pack", "o_proj")
    assert plan.lora_targets("all-linear") == plan.LINEAR_LAYER_NAMES
    # Training's flags go through the same parser (the planner's message, as a UsageError).
    from baichuan_finetune.options.arguments import LoraArguments, UsageError

    assert LoraArguments(use_lora=True, lora_target_modules="W_pack,o_proj").target_modules == ["W_pack", "o_proj"]
    for text in ("q_proj,v_proj", "lm_head", "bogus"):
        with pytest.raises(plan.PlanError) as planned:
            plan.parse_lora_targets(text)
        with pytest.raises(UsageError) as trained:
            LoraArguments(use_lora=True, lora_target_modules=text)
        assert str(trained.value) == str(planned.value)


def test_model_directory_without_config_json(tmp_path):
    proc = run_plan("--model", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"plan.py: error: --model {tmp_path}: no config.json in that directory"


def test_the_13b_question_answered_without_torch():
    # No weights and no torch import (its speed is a benchmark's concern, not a test's): the planner
    # runs in an interpreter where importing torch fails.
    blocker = f"import runpy, sys; sys.modules['torch'] = None; sys.argv[0] = {str(PLAN)!r}; " \
              f"runpy.run_path({str(PLAN)!r}, run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", blocker, "--model", "13b", "--method", "full", "--nodes", "2",
                           "--gpus_per_node", "8", "--gpu_memory_gb", "80", "--cpu_memory_gb", "1024",
                           "--model_max_length", "4096", "--per_device_train_batch_size", "1",
                           "--gradient_checkpointing", "True"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "recommended: ZeRO-" in proc.stdout
    for row in ("weights", "optimizer states", "activations (checkpointed)", "loss head",
                "zero3 live parameters", "communication buffers", "runtime reserve", "host memory per node", "fits"):
        assert row in proc.stdout, row


def test_json_shape_and_levers_when_nothing_fits():
    proc = run_plan("--model", "13b", "--gpus_per_node", "8", "--gpu_memory_gb", "24", "--model_max_length", "4096",
                    "--per_device_train_batch_size", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out["per_device_peak_bytes"]) == set(plan.OPTIONS)
    assert all(isinstance(v, int) and v > 0 for v in out["per_device_peak_bytes"].values())
    # Each option's peak is its terms' peak, and offloading more never needs more GPU memory.
    peaks = [out["per_device_peak_bytes"][o] for o in plan.OPTIONS]
    assert peaks == sorted(peaks, reverse=True)
    assert out["recommended"] is None
    assert out["levers"][0].startswith("--per_device_train_batch_size 1")
    assert out["levers"][1].startswith("--gradient_checkpointing True")
    assert out["options"]["zero3"]["terms"]["weights"] == 2 * out["model"]["params"] // 8


def test_levers_include_checkpointing_lora_and_qlora_with_their_planned_peak():
    # 13B full fine-tuning on 8 x 24 GB: nothing fits; QLoRA (4-bit base, ZeRO-2) with checkpointing does.
    s = setup("13b", gpus_per_node=8, gpu_memory_bytes=24 * 10**9, seq_len=4096, micro_batch=4)
    p = plan.plan(s)
    assert p.recommended is None

    def planned(**kw) -> tuple[str, str]:
        """The fastest option that fits with the margin and its peak, for the lever's own full setup."""
        options = ("zero2",) if kw.get("method") == "qlora" else plan.OPTIONS
        trial = setup("13b", gpus_per_node=8, gpu_memory_bytes=24 * 10**9, seq_len=4096, **kw)
        fit = next(o for o in options if plan.estimate(trial, o).fits_with_margin)
        return plan.OPTION_TITLES[fit], plan.gib(plan.estimate(trial, fit).peak)

    ckpt = next(lever for lever in p.levers if lever.startswith("--gradient_checkpointing True"))
    title, peak = planned(checkpointing=True)
    assert ckpt.endswith(f": fits with {title}, peak {peak} of 22.4 GiB"), ckpt
    qlora = next(lever for lever in p.levers if lever.startswith("--use_lora True --q_lora True"))
    title, peak = planned(method="qlora", checkpointing=True)
    assert "--gradient_checkpointing True" in qlora and "ds_config_zero2.json" in qlora
    assert title == "ZeRO-2" and qlora.endswith(f": fits with ZeRO-2, peak {peak} of 22.4 GiB"), qlora
    lora = next(lever for lever in p.levers if lever.startswith("--use_lora True --gradient_checkpointing True"))
    title, peak = planned(method="lora", checkpointing=True)
    assert lora.endswith(f": fits with {title}, peak {peak} of 22.4 GiB"), lora
    # A lever that still does not fit says so, with its lowest planned peak.
    tiny_gpu = plan.plan(setup("13b", gpus_per_node=8, gpu_memory_bytes=4 * 10**9, seq_len=4096))
    assert any("still does not fit (lowest: " in lever for lever in tiny_gpu.levers)
    # The formatted plan lists them.
    text = plan.format_plan(p)
    assert "--use_lora True --q_lora True" in text and "--gradient_checkpointing True" in text


def test_written_ds_config_is_accepted_by_training_and_deepspeed(tmp_path):
    path = tmp_path / "ds.json"
    proc = run_plan("--model", "7b", "--gpu_memory_gb", "40", "--model_max_length", "2048",
                    "--gradient_checkpointing", "True", "--write_ds_config", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    config = json.loads(path.read_text())
    recommended = json.loads(proc.stdout)["recommended"]
    assert plan.option_of_ds_config(config) == recommended
    # What training checks (ZeRO-3 needs the 16-bit gather for the consolidated save) ...
    from baichuan_finetune.options.arguments import parse_args, validate

    (tmp_path / "d.json").write_text("[]")
    args = parse_args(["--data_path", str(tmp_path / "d.json"), "--output_dir", str(tmp_path / "o"),
                       "--report_to", "none"])
    args.training.deepspeed = str(path)  # set afterwards: with the flag, parsing would start torch.distributed
    validate(args)
    # ... and DeepSpeed's own parser, once transformers has filled the "auto" values.
    from deepspeed.runtime.config import DeepSpeedConfig

    filled = json.loads(json.dumps(config).replace('"auto"', "1"))
    for key in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "reduce_bucket_size"):
        if key in filled["zero_optimization"]:
            filled["zero_optimization"][key] = 1000
    filled["bf16"] = {"enabled": True}
    filled.pop("fp16", None)
    ds = DeepSpeedConfig(filled)
    assert ds.zero_optimization_stage == config["zero_optimization"]["stage"]


def test_launch_warning_when_prediction_exceeds_free_memory():
    s = setup("13b", gpus_per_node=8, seq_len=4096)
    line, warning = plan.launch_line(s, "zero3", free=(20 * plan.GIB, 80 * 10**9))
    assert line.startswith("plan: ZeRO-3, full, 8 process(es): predicted peak ") and "20.0 GiB free" in line
    assert warning and "exceeds the 20.0 GiB free" in warning and "--skip_memory_check" in warning
    _, fine = plan.launch_line(setup("7b", method="lora", gpus_per_node=8), "zero3", free=(79 * plan.GIB, 80 * 10**9))
    assert fine is None


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan_data") / "d.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"hi {i}"},
                                                   {"from": "gpt", "value": f"hello {i}"}]} for i in range(4)]))
    return path


@pytest.mark.parametrize("skip", [False, True])
def test_training_prints_the_plan_line_before_loading_the_model(skip, tiny_model_dir, tiny_data, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin", "BAICHUAN_FINETUNE_CACHE": str(tmp_path / "cache")}
    args = [sys.executable, str(FINE_TUNE), "--model_name_or_path", str(tiny_model_dir), "--data_path",
            str(tiny_data), "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--report_to", "none",
            "--save_strategy", "no", "--use_cpu", "True", "--per_device_train_batch_size", "2",
            "--model_max_length", "64"]
    if skip:
        args += ["--skip_memory_check", "True"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("plan: ")]
    if skip:
        assert lines == []
        return
    assert len(lines) == 1
    expected, _ = plan.launch_line(plan.Setup(shape=plan.load_shape(str(tiny_model_dir)), gpus_per_node=1,
                                              seq_len=64, micro_batch=2, device="cpu"), None)
    assert lines[0] == expected
    assert lines[0].startswith("plan: no ZeRO, full, 1 process(es): predicted peak ")
    # Printed before the data report, i.e. before the data and the model are loaded.
    assert proc.stdout.index("plan: ") < proc.stdout.index("Data:")
