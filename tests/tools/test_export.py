"""GGUF export (tools/export.py) checked against llama.cpp itself, through llama-cpp-python.

The oracle is llama.cpp's own loader and graph: each exported file is loaded by ``llama_cpp.Llama``
and must greedy-decode the quickstart prompts to the same tokens as our model, with the same last
logits of a fixed prompt; its tokenizer must encode real texts to sentencepiece's ids. The tiny
models are 32-layer RoPE and 40-layer ALiBi (llama.cpp's baichuan graph picks the position scheme by
depth), plus 2-layer ones written as llama/refact. Hidden size 64 keeps 40 layers fast.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="pip install -r requirements-export.txt (llama-cpp-python)")

from tools_helpers import SCRIPTS, make_lora_dir, script_env  # noqa: E402

from baichuan_finetune.tools import export  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = REPO_ROOT / "data" / "quickstart.json"
GREEDY_TOKENS = 20
SHAPE = dict(hidden_size=64, intermediate_size=192, num_attention_heads=4)


def quickstart_chats() -> list[list[dict]]:
    """The prompts scripts/quickstart.sh asks: its two conversations (3 and 2 rounds, no greeting), each
    question with the data's earlier answers as history."""
    chats: dict[int, list] = {3: None, 2: None}
    for record in json.loads(QUICKSTART.read_text(encoding="utf-8")):
        turns = record["conversations"]
        rounds = list(zip((t["value"] for t in turns[0::2]), (t["value"] for t in turns[1::2])))
        if not rounds[0][0].startswith(("Hello", "你好")) and chats.get(len(rounds), ()) is None:
            chats[len(rounds)] = rounds
    prompts = []
    for rounds in chats.values():
        history: list[dict] = []
        for question, answer in rounds:
            prompts.append(history + [{"role": "user", "content": question}])
            history = prompts[-1] + [{"role": "assistant", "content": answer}]
    return prompts


def make_model(root: Path, name: str, position_embedding: str, layers: int) -> Path:
    """A tiny Baichuan2 with decisive, position-dependent predictions.

    At init every logit is near 0 and f16 rounding alone (llama.cpp computes f16 matmuls with f16
    activations: ~4e-4 relative here) could flip a greedy choice. So the residual stream is dominated
    by large embeddings and the head is a permutation of the embeddings: each greedy choice wins by
    about a third of the largest logit. The layers (scaled 1/sqrt(depth)) still move the logits by
    ~20%, positions included, which the every-position logit comparison (1e-3) sees.
    """
    from baichuan_finetune.builder.tiny import make_tiny_model
    from baichuan_finetune.model.modeling_baichuan import BaichuanForCausalLM

    path = make_tiny_model(root / name, position_embedding=position_embedding, num_hidden_layers=layers, **SHAPE)
    model = BaichuanForCausalLM.from_pretrained(str(path))
    generator = torch.Generator().manual_seed(layers)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 1.0 if "embed" in param_name else param.shape[1] ** -0.5, generator=generator)
            if param_name.endswith(("o_proj.weight", "down_proj.weight")):
                param.mul_(layers ** -0.5)
        embeddings = model.model.embed_tokens.weight
        model.lm_head.weight.copy_(embeddings[torch.randperm(embeddings.shape[0], generator=generator)])
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-models")
    return {
        "rope-32": make_model(root, "rope-32", "rope", 32),
        "alibi-40": make_model(root, "alibi-40", "alibi", 40),
        "rope-2": make_model(root, "rope-2", "rope", 2),
        "alibi-2": make_model(root, "alibi-2", "alibi", 2),
    }


def load_ours(model_dir: Path, round_to: torch.dtype | None = None):
    """Our model in float32; `round_to` rounds its weights to that dtype first (what the GGUF stores)."""
    from baichuan_finetune.tools.loading import load_model

    model, tokenizer = load_model(model_dir, dtype="float32")
    if round_to is not None:
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.to(round_to).float())
    return model, tokenizer


def load_gguf(path: Path, **kwargs):
    # float32 KV cache: llama.cpp's default f16 cache alone moves logits by ~1e-3 relative, which would hide
    # what the export does (users keep the default; docs/deploy.md).
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, n_threads=1,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False, **kwargs)


def gguf_greedy(llm, prompt: list[int], n: int, eos: int = 2) -> list[int]:
    """Greedy continuation by llama.cpp (its KV cache, its graph), ending at eos as ours does."""
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token == eos:
            break
        out.append(token)
        llm.eval([token])
    return out


def prompts_of(tokenizer) -> list[list[int]]:
    return [tokenizer.build_chat_input(messages) for messages in quickstart_chats()]


def gguf_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `ids` (one batch)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


@torch.no_grad()
def our_logits(model, ids: list[int]) -> np.ndarray:
    return model(input_ids=torch.tensor([ids])).logits[0].double().numpy()


def is_our_greedy(ours: np.ndarray, prompt: list[int], continuation: list[int], eos: int = 2) -> bool:
    """Whether `continuation` is what our greedy decoding of `prompt` gives, from our logits at every
    position of ``prompt + continuation`` (one forward): each token is our argmax, and eos is not
    (a causal model's greedy output is fixed by these argmaxes)."""
    chosen = ours[len(prompt) - 1 : len(prompt) + len(continuation) - 1].argmax(-1)
    return chosen.tolist() == continuation and eos not in continuation


def relative_error(theirs: np.ndarray, ours: np.ndarray) -> float:
    """Largest difference over the largest logit, at the worst position."""
    return float((np.abs(theirs - ours).max(-1) / np.abs(ours).max(-1)).max())


@pytest.mark.parametrize("name, architecture", [("rope-32", "baichuan"), ("alibi-40", "baichuan"),
                                                ("rope-2", "llama"), ("alibi-2", "refact")])
def test_llama_cpp_decodes_as_we_do(name, architecture, models, tmp_path):
    """f16 GGUF in llama.cpp: the quickstart prompts' greedy tokens are ours, and the logits at every
    position of each prompt and its continuation agree within 1e-3 of the largest logit. Our side runs
    the same f16-rounded weights in float32."""
    result = export.export_gguf(models[name], tmp_path / "model-f16.gguf", quant="f16", modelfile=False)
    assert result.architecture == architecture
    model, tokenizer = load_ours(models[name], round_to=torch.float16)
    llm = load_gguf(result.path)
    prompts = prompts_of(tokenizer)
    assert len(prompts) == 5
    worst = 0.0
    for prompt in prompts:
        theirs = gguf_greedy(llm, prompt, GREEDY_TOKENS)
        ours = our_logits(model, prompt + theirs)
        assert len(theirs) == GREEDY_TOKENS and is_our_greedy(ours, prompt, theirs)
        worst = max(worst, relative_error(gguf_logits(llm, prompt + theirs), ours))
    print(f"{name} ({architecture}) f16: 5/5 greedy equal, logits relative error <= {worst:.2e}")
    assert worst < 1e-3


def test_llama_cpp_f32_matches_the_unrounded_model(models, tmp_path):
    """An f32 export agrees with our float32 model itself (no rounding on either side)."""
    result = export.export_gguf(models["rope-32"], tmp_path / "model-f32.gguf", quant="f32", modelfile=False)
    model, tokenizer = load_ours(models["rope-32"])
    prompt = prompts_of(tokenizer)[-1]
    error = relative_error(gguf_logits(load_gguf(result.path), prompt), our_logits(model, prompt))
    print(f"rope-32 f32: logits relative error {error:.2e}")
    assert error < 1e-5


@pytest.mark.parametrize("name", ["rope-32", "alibi-40"])
def test_q8_0_and_q4_k_m_through_llama_cpp_quantizer(name, models, tmp_path, capsys):
    """q8_0 (llama.cpp's quantizer) still answers the quickstart prompts greedily as we do; q4_k_m loads
    and its agreement is reported (4 bits change answers of a model this small)."""
    model, tokenizer = load_ours(models[name])
    prompts = prompts_of(tokenizer)
    sizes = {}
    for quant in ("q8_0", "q4_k_m"):
        result = export.export_gguf(models[name], tmp_path / f"model-{quant}.gguf", quant=quant, modelfile=False)
        llm = load_gguf(result.path)
        assert llama_cpp.llama_model_ftype(llm.model) == export.QUANT_TYPES[quant]
        same = 0
        for prompt in prompts:
            theirs = gguf_greedy(llm, prompt, GREEDY_TOKENS)
            same += is_our_greedy(our_logits(model, prompt + theirs), prompt, theirs)
        sizes[quant] = (result.size, same)
    assert sizes["q8_0"][1] == len(prompts)
    print(f"{name}: " + ", ".join(f"{q} {s} bytes, greedy equal on {n}/{len(prompts)}" for q, (s, n) in sizes.items()))
    assert sizes["q4_k_m"][0] < sizes["q8_0"][0]


def fixture_texts(limit: int = 1000) -> list[str]:
    """The first `limit` distinct non-empty strings of tests/fixtures/data (real chat data, zh and en)."""
    from baichuan_finetune.builder.tiny import file_strings

    texts: list[str] = []
    for path in sorted((REPO_ROOT / "tests" / "fixtures" / "data").iterdir()):
        file_strings(path, texts)
    return list(dict.fromkeys(t for t in texts if t.strip()))[:limit]


def test_gguf_tokenizer_encodes_real_texts_as_sentencepiece(tiny_real_vocab_model_dir, tmp_path):
    """The real 125,696-piece Baichuan2 vocabulary in the GGUF: 1,000 real texts give sentencepiece's ids,
    and the role pieces stay the single ids 195/196."""
    from baichuan_finetune.tools.loading import load_tokenizer

    result = export.export_gguf(tiny_real_vocab_model_dir, tmp_path / "real-vocab.gguf", modelfile=False)
    llm = llama_cpp.Llama(model_path=str(result.path), vocab_only=True, verbose=False)
    sp = load_tokenizer(tiny_real_vocab_model_dir).sp_model
    texts = fixture_texts()
    assert len(texts) == 1000
    differ = [t for t in texts if llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) != sp.encode(t)]
    print(f"GGUF tokenizer: {len(texts) - len(differ)}/{len(texts)} texts encode to sentencepiece's ids")
    assert not differ, differ[:3]
    chat = "<reserved_106>你好<reserved_107>Hello"
    ids = llm.tokenize(chat.encode("utf-8"), add_bos=False, special=False)
    assert ids == sp.encode(chat) and ids[0] == 195 and 196 in ids
    assert llm.detokenize([195, 196]) == b"<reserved_106><reserved_107>"
    assert (llm.token_bos(), llm.token_eos()) == (1, 2)
    assert llm.metadata["tokenizer.ggml.add_bos_token"] == "false"


def test_lora_adapter_export_equals_merged_export(models, tmp_path):
    """An adapter exported with its base gives the tensors and metadata of exporting the merged model."""
    from baichuan_finetune.tools.merge import merge_lora

    adapter = make_lora_dir(models["rope-2"], tmp_path / "adapter")
    from_adapter = export.export_gguf(adapter, tmp_path / "adapter.gguf", modelfile=False)
    merged = merge_lora(adapter, tmp_path / "merged", warn=lambda m: None)
    from_merged = export.export_gguf(merged, tmp_path / "merged.gguf", modelfile=False)
    base = export.export_gguf(models["rope-2"], tmp_path / "base.gguf", modelfile=False)
    a, m, b = (dict(export.gguf_tensor_arrays(r.path)) for r in (from_adapter, from_merged, base))
    assert list(a) == list(m)
    assert all(np.array_equal(a[name], m[name]) for name in a)
    assert not np.array_equal(a["blk.0.attn_q.weight"], b["blk.0.attn_q.weight"])  # the adapter mattered
    import gguf

    fields = [{k: f.contents() for k, f in gguf.GGUFReader(str(r.path)).fields.items() if k != "general.name"}
              for r in (from_adapter, from_merged)]
    assert fields[0] == fields[1]


def test_context_length_written_for_13b_style_configs(models, tmp_path):
    """The 13B config has model_max_length and no max_position_embeddings: context_length comes from it
    (without it llama.cpp refuses the file: "key not found in model: baichuan.context_length")."""
    config = json.loads((models["alibi-40"] / "config.json").read_text())
    assert config.get("max_position_embeddings") is None and config["model_max_length"] == 512
    result = export.export_gguf(models["alibi-40"], tmp_path / "alibi.gguf", modelfile=False)
    assert load_gguf(result.path).metadata["baichuan.context_length"] == "512"


def test_modelfile_template_is_our_chat_format(models, tmp_path):
    """The Ollama Modelfile next to the GGUF: FROM the file, the chat format with the role pieces, stop
    on the user piece, the generation config's defaults. Ollama is not installed here: its Go template
    is rendered for each quickstart conversation by a reading of the three constructs it uses, and
    must give the text of our chat template, whose ids are build_chat_input's."""
    import re

    from baichuan_finetune.tools.loading import load_tokenizer

    result = export.export_gguf(models["rope-2"], tmp_path / "ft.gguf")
    text = result.modelfile.read_text()
    assert text.splitlines()[1] == "FROM ./ft.gguf"
    for line in ('PARAMETER stop "<reserved_106>"', "PARAMETER temperature 0.3", "PARAMETER top_k 5",
                 "PARAMETER top_p 0.85", "PARAMETER repeat_penalty 1.05", "PARAMETER num_ctx 512"):
        assert line in text.splitlines()
    template = re.search(r'TEMPLATE """(.*)"""', text, re.S).group(1)
    pieces = dict(re.findall(r'if eq \.Role "(\w+)" }}(<reserved_\d+>)?', template))
    after_last = re.search(r'ne \.Role "assistant"\) }}(.*?){{', template).group(1)
    assert pieces == {"system": "", "user": "<reserved_106>", "assistant": "<reserved_107>"}

    def render(messages):  # what the template's range / if / $last produce
        out = "".join(pieces[m["role"]] + m["content"] for m in messages)
        return out + (after_last if messages[-1]["role"] != "assistant" else "")

    tokenizer = load_tokenizer(models["rope-2"])
    for messages in quickstart_chats():
        messages = [{"role": "system", "content": "Answer briefly."}] + messages
        rendered = render(messages)
        assert rendered == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tokenizer.sp_model.encode(rendered) == tokenizer.build_chat_input(messages)


def test_killed_export_leaves_no_file_under_the_final_name(models, tmp_path, monkeypatch, capsys):
    """SIGKILL half-way through the tensors: nothing at --output. The next export removes the remains;
    a full disk there is one line, exit 1, and nothing left at all; then an export finishes."""
    from baichuan_finetune.cli.export import main

    output = tmp_path / "out" / "model.gguf"
    args = ["--model", str(models["rope-2"]), "--output", str(output)]
    env = {**script_env(), "BAICHUAN_FINETUNE_FAULT": f"{export.EXPORT_FAULT_POINT}:kill"}
    killed = subprocess.run([sys.executable, str(SCRIPTS / "export.py"), *args], env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not output.exists()
    remains = list(output.parent.glob(".model.gguf.partial-*"))
    assert len(remains) == 1 and remains[0].stat().st_size > 0

    monkeypatch.setenv("BAICHUAN_FINETUNE_FAULT", f"{export.EXPORT_FAULT_POINT}:enospc")
    with pytest.raises(SystemExit) as exit_info:
        main(args, prog="export")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1
    assert err[0].startswith(f"export: warning: removed {remains[0]}, left by an export that was killed")
    assert len(err) == 2 and err[1].startswith("export: error: ") and "No space left on device" in err[1]
    assert sorted(output.parent.iterdir()) == []

    monkeypatch.delenv("BAICHUAN_FINETUNE_FAULT")
    assert main(args, prog="export") == 0
    assert f"wrote {output} (llama, f16, " in capsys.readouterr().out
    assert sorted(p.name for p in output.parent.iterdir()) == ["model.Modelfile", "model.gguf"]
    assert load_gguf(output).n_vocab() == 1577


@pytest.mark.gptq
def test_gptq_export_answers_as_the_original(models, tmp_path):
    """--format gptq (gptqmodel, calibrated on the quickstart training data): the 4-bit directory loads in
    gptqmodel and greedy-decodes most quickstart prompts as the original does (the count is printed).
    gptqmodel is not in requirements (it pins its own torch/transformers): run where it is installed."""
    pytest.importorskip("gptqmodel", reason="gptqmodel not installed (see docs/deploy.md)")
    from gptqmodel import GPTQModel

    from baichuan_finetune.cli.export import main

    output = tmp_path / "gptq"
    assert main(["--model", str(models["rope-2"]), "--format", "gptq", "--output", str(output), "--group_size", "32",
                 "--calibration_data", str(QUICKSTART), "--max_samples", "64"], prog="export") == 0
    assert json.loads((output / "quantize_config.json").read_text())["bits"] == 4
    quantized = GPTQModel.load(str(output), device="cpu").model
    model, tokenizer = load_ours(models["rope-2"])
    same = 0
    with torch.no_grad():
        for prompt in prompts_of(tokenizer):
            ids = list(prompt)
            for _ in range(GREEDY_TOKENS):
                ids.append(int(quantized(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            same += is_our_greedy(our_logits(model, ids), prompt, ids[len(prompt):])
    print(f"GPTQ 4-bit: greedy equal to the original on {same}/5 quickstart prompts")
    assert same >= 3
