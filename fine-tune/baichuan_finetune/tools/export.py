"""Export a model directory to one GGUF file for llama.cpp (and Ollama, LM Studio built on it), quantized.

The GGUF is written here with the ``gguf`` library (the format's reference package), not through
llama.cpp's converter, whose Baichuan class recurses forever (``modify_tensors`` calls itself) and
which knows nothing of NormHead. What llama.cpp's loader needs, and what we write:

- **Architecture.** llama.cpp's ``baichuan`` graph decides the position scheme from the layer count
  alone: 32 layers is RoPE (7B), 40 is ALiBi with max bias 8 (13B), any other depth gets no
  positions at all and talks nonsense. A model whose depth and scheme agree with that rule is written
  as ``baichuan``; any other is written as the architecture whose graph is the same computation:
  ``llama`` for RoPE (RMSNorm, SwiGLU, the same rotation) and ``refact`` for ALiBi (RMSNorm, SwiGLU,
  ALiBi with max bias 8, whose slopes are Baichuan2's for every head count). `gguf_architecture`.
- **Head.** Baichuan2 normalises ``lm_head`` rows at run time; llama.cpp has a plain linear output,
  so ``output.weight`` is the row-normalised head (``tools/convert.py``'s conversion).
- **Attention.** ``W_pack`` is split into q/k/v. llama.cpp rotates adjacent channel pairs (2i, 2i+1)
  where our RoPE rotates (i, i + d/2), so q and k rows are permuted per head for RoPE models.
- **Context length** is always written (the 13B config has ``model_max_length`` but no
  ``max_position_embeddings``, and llama.cpp refuses a file without ``context_length``).
- **Tokenizer.** The sentencepiece pieces, scores and types (``llama`` tokenizer model; role pieces
  195/196 are user-defined pieces, which llama.cpp, like sentencepiece, always matches in text), bos
  1, eos 2, unk/pad 0, no bos added (the official prompt has none), no space prefix (Baichuan2's
  tokenizer adds none), the chat template (`tokenization_baichuan.chat_template`) and the directory's
  generation config as ``general.sampling.*`` defaults.

``f32``, ``f16`` and ``bf16`` are written directly; the other types (``QUANT_TYPES``) through
llama.cpp's own quantizer (``llama_model_quantize`` of llama-cpp-python) from a bf16/f16 GGUF.
Every file is written under a temporary name next to the output and renamed into place once whole,
so a killed export never leaves a partial file under the final name. An Ollama Modelfile is
written next to the GGUF (``NAME.Modelfile``, `modelfile_text`).
"""

from __future__ import annotations

import difflib
import glob
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..core.errors import RunFault, UsageFault
from ..core.processes import pid_running
from ..core.json_files import JSONObjectError, read_json_object
from ..model.configuration_baichuan import CHAT_GENERATION_CONFIG
from ..model.specs_baichuan import ALIBI, ASSISTANT_ID, BOS_ID, EOS_ID, PAD_ID, ROPE, USER_ID, position_embedding_of
from ..model.tokenization_baichuan import chat_template
from .convert import load_weights
from .loading import (GENERATION_CONFIG, TOKENIZER_FILE, ModelDirError, check_model_dir, creation_problem,
                      load_model, read_adapter_config, resolve_base_dir)
from ..checkpoints.saving import fault
from ..checkpoints.weight_files import WeightFilesError, check_weights

# --quant name -> llama.cpp's llama_ftype (include/llama.h). The i-quants are left out: they need an
# importance matrix, which this export does not compute.
QUANT_TYPES = {
    "f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q6_k": 18, "q5_k_m": 17, "q5_k_s": 16, "q5_0": 8, "q5_1": 9,
    "q4_k_m": 15, "q4_k_s": 14, "q4_0": 2, "q4_1": 3, "q3_k_l": 13, "q3_k_m": 12, "q3_k_s": 11, "q2_k": 10,
}
WRITTEN_DIRECTLY = ("f32", "f16", "bf16")
FORMATS = ("gguf", "gptq")
# llama.cpp's baichuan graph: layer count -> position scheme (src/models/baichuan.cpp), and the ALiBi
# max bias it (and refact) hard-code.
BAICHUAN_DEPTHS = {32: ROPE, 40: ALIBI}
FALLBACK_ARCH = {ROPE: "llama", ALIBI: "refact"}
ALIBI_MAX_BIAS = 8.0
MODELFILE_SUFFIX = ".Modelfile"  # model-q4_k_m.gguf -> model-q4_k_m.Modelfile: one per export, side by side
# ``$BAICHUAN_FINETUNE_FAULT`` point (``saving.fault``: kill, enospc, pause) half-way through writing the tensors.
EXPORT_FAULT_POINT = "export_mid_write"


class ExportError(ValueError, UsageFault):
    """An export refused before any weight is read; one line naming the flag, file or field."""


class ExportRunError(RuntimeError, RunFault):
    """An export that failed while working (llama.cpp's quantizer refused, a full disk); one line."""


@dataclass
class ExportPlan:
    """What `check_export` found: where the weights, config, tokenizer and generation defaults come from."""

    model_dir: Path
    kind: str  # "model" or "lora"
    config_dir: Path  # the directory whose config.json describes the weights (an adapter's base)
    tokenizer_file: Path
    config: dict
    generation: dict
    output: Path
    quant: str
    architecture: str
    notes: list[str] = field(default_factory=list)

    @property
    def position_embedding(self) -> str:
        return position_embedding_of(self.config)

    @property
    def context_length(self) -> int:
        return int(self.config.get("max_position_embeddings") or self.config.get("model_max_length") or 4096)


@dataclass
class ExportResult:
    """A finished export: the file, its size in bytes, the seconds it took, the Modelfile next to it."""

    path: Path
    size: int
    seconds: float
    architecture: str
    modelfile: Path | None
    notes: list[str]


def gguf_architecture(num_layers: int, position_embedding: str) -> tuple[str, str | None]:
    """llama.cpp's architecture that runs this model as trained, and a note when it is not ``baichuan``."""
    if BAICHUAN_DEPTHS.get(num_layers) == position_embedding:
        return "baichuan", None
    arch = FALLBACK_ARCH[position_embedding]
    rule = ", ".join(f"{depth} layers = {scheme}" for depth, scheme in BAICHUAN_DEPTHS.items())
    return arch, (f"llama.cpp's baichuan architecture picks positions by depth ({rule}, else none); this "
                  f"{num_layers}-layer {position_embedding} model is written as '{arch}', the same computation")


def _read_json(path: Path) -> dict:
    try:
        return read_json_object(path)
    except JSONObjectError as e:
        raise ExportError(str(e)) from None


def _check_output(output: Path, model_dir: Path, overwrite: bool) -> None:
    if output.is_dir():
        raise ExportError(f"--output {output} is a directory: name the .gguf file to write")
    if output.exists() and not overwrite:
        raise ExportError(f"--output {output} exists: pass --overwrite to replace it")
    if output.resolve().is_relative_to(model_dir.resolve()):
        raise ExportError(f"--output {output}: write the export outside the model directory {model_dir}")
    problem = creation_problem(output.resolve().parent)
    if problem is not None:
        raise ExportError(f"--output {output}: {problem}")


def check_export(model: str | Path, output: str | Path, quant: str = "f16", overwrite: bool = False) -> ExportPlan:
    """Every check of a GGUF export that reads no weights; raises `ExportError` (one line)."""
    model_dir, output = Path(model), Path(output)
    quant = quant.lower()  # llama.cpp spells them Q4_K_M
    if quant not in QUANT_TYPES:
        close = difflib.get_close_matches(quant, list(QUANT_TYPES), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ExportError(f"--quant {quant!r}: unknown type{hint}; one of {', '.join(QUANT_TYPES)}")
    try:
        kind = check_model_dir(model_dir, flag="--model")
        config_dir = model_dir
        if kind == "lora":
            config_dir = resolve_base_dir(read_adapter_config(model_dir)["base_model_name_or_path"], model_dir)
    except ModelDirError as e:
        raise ExportError(str(e)) from None
    _check_output(output, model_dir, overwrite)
    config = _read_json(config_dir / "config.json")
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int) or layers <= 0:
        raise ExportError(f"{config_dir / 'config.json'}: \"num_hidden_layers\" {layers!r} is not a layer count")
    scheme = position_embedding_of(config)
    if scheme not in FALLBACK_ARCH:
        raise ExportError(f"{config_dir / 'config.json'}: \"position_embedding\" {scheme!r}: expected rope or alibi")
    architecture, note = gguf_architecture(layers, scheme)
    tokenizer_file = model_dir / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        tokenizer_file = config_dir / TOKENIZER_FILE
    generation_dir = model_dir if (model_dir / GENERATION_CONFIG).is_file() else config_dir
    generation = dict(CHAT_GENERATION_CONFIG)
    if (generation_dir / GENERATION_CONFIG).is_file():
        generation.update(_read_json(generation_dir / GENERATION_CONFIG))
    proto = read_sentencepiece(tokenizer_file)
    if len(proto.pieces) <= ASSISTANT_ID:
        raise ExportError(f"{tokenizer_file}: {len(proto.pieces)} pieces, no role pieces {USER_ID}/{ASSISTANT_ID}: "
                          "not a Baichuan2 tokenizer")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ExportError("export needs the gguf package: pip install -r requirements-export.txt") from None
    if quant not in WRITTEN_DIRECTLY:
        require_llama_cpp()  # before any work when the quantizer is missing
    return ExportPlan(model_dir, kind, config_dir, tokenizer_file, config, generation, output, quant,
                      architecture, [note] if note else [])


def require_llama_cpp() -> None:
    """Raise `ExportError` when llama-cpp-python (llama.cpp's quantizer) cannot be imported here."""
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError) as e:  # OSError: the package is there but its libllama does not load
        raise ExportError(f"quantizing needs llama-cpp-python ({type(e).__name__}): pip install -r "
                          "requirements-export.txt, or export --quant f16 and run llama.cpp's llama-quantize") from None


# ----- weights -----


def model_state(plan: ExportPlan) -> dict[str, torch.Tensor]:
    """The tensors to export: read from the weight files, or for an adapter its base with it merged."""
    if plan.kind == "lora":
        model, _ = load_model(plan.model_dir, dtype="auto")
        # The same merge as `baichuan-finetune merge`, so both routes export the same tensors.
        merged = model.merge_and_unload()
        return {name: tensor.detach() for name, tensor in merged.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    try:
        files = check_weights(plan.model_dir)
    except WeightFilesError as e:
        raise ExportError(str(e)) from None
    for file in files:
        state.update(load_weights(file))
    return state


def rope_pair_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows of a q or k projection reordered per head from rotate-half pairs (i, i + d/2) to the
    adjacent pairs (2i, 2i + 1) that llama.cpp's "normal" RoPE rotates."""
    rows, cols = weight.shape
    head_dim = rows // num_heads
    return weight.reshape(num_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


TensorSource = Callable[[], torch.Tensor]


def gguf_tensors(state: dict[str, torch.Tensor], config: dict) -> list[tuple[str, tuple[int, ...], TensorSource]]:
    """``(GGUF name, shape, function giving the tensor)`` in llama.cpp's layout, in file order.

    Functions rather than tensors: the file is written one tensor at a time, so at most one converted
    tensor is alive besides the model's own.
    """
    import gguf

    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    rope = position_embedding_of(config) == ROPE
    names, T = gguf.TENSOR_NAMES, gguf.MODEL_TENSOR

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise ExportError(f"the weights have no {key}")
        return state[key]

    def stored(name: str, key: str) -> tuple[str, tuple[int, ...], TensorSource]:
        return name, tuple(take(key).shape), lambda: state[key]

    def qkv(name: str, layer: int, part: int) -> tuple[str, tuple[int, ...], TensorSource]:
        key = f"model.layers.{layer}.self_attn.W_pack.weight"
        rows, cols = take(key).shape

        def source() -> torch.Tensor:
            block = state[key].chunk(3, dim=0)[part]
            return rope_pair_rows(block, heads) if rope and part < 2 else block

        return name, (rows // 3, cols), source

    def head() -> torch.Tensor:
        return torch.nn.functional.normalize(state["lm_head.weight"].float(), dim=-1)

    out = [
        stored(names[T.TOKEN_EMBD] + ".weight", "model.embed_tokens.weight"),
        stored(names[T.OUTPUT_NORM] + ".weight", "model.norm.weight"),
        (names[T.OUTPUT] + ".weight", tuple(take("lm_head.weight").shape), head),
    ]
    per_layer = [
        (T.ATTN_NORM, "input_layernorm"), (T.ATTN_Q, 0), (T.ATTN_K, 1), (T.ATTN_V, 2),
        (T.ATTN_OUT, "self_attn.o_proj"), (T.FFN_NORM, "post_attention_layernorm"),
        (T.FFN_GATE, "mlp.gate_proj"), (T.FFN_UP, "mlp.up_proj"), (T.FFN_DOWN, "mlp.down_proj"),
    ]
    for i in range(layers):
        for tensor, source in per_layer:
            name = names[tensor].format(bid=i) + ".weight"
            out.append(qkv(name, i, source) if isinstance(source, int)
                       else stored(name, f"model.layers.{i}.{source}.weight"))
    return out


def _stored_as(shape: tuple[int, ...], quant: str):
    """``(numpy dtype, ggml type, shape as given to the writer, bytes)`` of a tensor of `shape` in `quant`:
    1-D tensors (the norms) stay float32, as llama.cpp keeps them."""
    import gguf

    count = int(np.prod(shape))
    if len(shape) == 1 or quant == "f32":
        return np.dtype(np.float32), gguf.GGMLQuantizationType.F32, shape, 4 * count
    if quant == "f16":
        return np.dtype(np.float16), gguf.GGMLQuantizationType.F16, shape, 2 * count
    # bf16 goes in as raw bytes: the writer takes their byte shape.
    return np.dtype(np.uint8), gguf.GGMLQuantizationType.BF16, (*shape[:-1], 2 * shape[-1]), 2 * count


def _encode(tensor: torch.Tensor, quant: str) -> np.ndarray:
    import gguf

    data = tensor.detach().to(torch.float32).cpu().numpy()
    if data.ndim == 1 or quant == "f32":
        return data
    if quant == "f16":
        return data.astype(np.float16)
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16)


# ----- tokenizer and metadata -----


def read_sentencepiece(tokenizer_file: Path):
    """The parsed ``ModelProto`` of a sentencepiece ``tokenizer.model``."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(tokenizer_file.read_bytes())
    except Exception as e:  # protobuf's DecodeError, or an unreadable file
        raise ExportError(f"{tokenizer_file}: not a sentencepiece model ({type(e).__name__})") from None
    return proto


def sentencepiece_vocab(proto, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """Pieces, scores and token types of a sentencepiece model, padded to the model's ``vocab_size``."""
    import gguf

    pieces = list(proto.pieces)
    if len(pieces) > vocab_size:
        raise ExportError(f"the tokenizer has {len(pieces)} pieces, more than the model's vocab_size {vocab_size}")
    # sentencepiece's piece types are GGUF's token types, value for value (NORMAL 1 ... BYTE 6).
    tokens = [p.piece.encode("utf-8") for p in pieces]
    scores = [p.score for p in pieces]
    types = [int(p.type) for p in pieces]
    for i in range(len(pieces), vocab_size):  # embedding rows without a piece: never produced by text
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    return tokens, scores, types


def role_pieces(proto) -> tuple[str, str]:
    """The user and assistant pieces (ids 195 and 196) of a Baichuan2 sentencepiece model."""
    return proto.pieces[USER_ID].piece, proto.pieces[ASSISTANT_ID].piece


def write_metadata(writer, plan: ExportPlan, file_type: int) -> None:
    """The hyper-parameters, tokenizer, chat template and sampling defaults llama.cpp reads."""
    c = plan.config
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    writer.add_name(plan.model_dir.resolve().name)
    writer.add_file_type(file_type)
    writer.add_context_length(plan.context_length)
    writer.add_embedding_length(c["hidden_size"])
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(c["num_attention_heads"])
    writer.add_head_count_kv(c["num_attention_heads"])
    writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(c["vocab_size"])
    if plan.position_embedding == ROPE:
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(c.get("rope_theta", 10000.0)))
    else:
        writer.add_max_alibi_bias(ALIBI_MAX_BIAS)

    proto = read_sentencepiece(plan.tokenizer_file)
    tokens, scores, types = sentencepiece_vocab(proto, c["vocab_size"])
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(PAD_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(False)  # the official prompt starts with the first turn, no <s>
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(bool(proto.normalizer_spec.add_dummy_prefix))
    writer.add_remove_extra_whitespaces(bool(proto.normalizer_spec.remove_extra_whitespaces))
    writer.add_chat_template(chat_template(*role_pieces(proto)))

    g = plan.generation
    if g.get("temperature") is not None:
        writer.add_sampling_temp(float(g["temperature"]))
    if g.get("top_k") is not None:
        writer.add_sampling_top_k(int(g["top_k"]))
    if g.get("top_p") is not None:
        writer.add_sampling_top_p(float(g["top_p"]))
    if g.get("repetition_penalty") is not None:
        writer.add_sampling_penalty_repeat(float(g["repetition_penalty"]))


def write_gguf(path: Path, plan: ExportPlan, state: dict[str, torch.Tensor], quant: str) -> None:
    """Write the GGUF of `state` to `path` in `quant` (f32, f16 or bf16), one tensor at a time."""
    import gguf

    tensors = gguf_tensors(state, plan.config)
    writer = gguf.GGUFWriter(path, plan.architecture)
    write_metadata(writer, plan, QUANT_TYPES[quant])
    # The tensor directory comes first in the file: shapes and types only, nothing converted yet.
    for name, shape, _ in tensors:
        dtype, kind, given_shape, nbytes = _stored_as(shape, quant)
        writer.add_tensor_info(name, given_shape, dtype, nbytes, raw_dtype=kind)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for index, (_, _, source) in enumerate(tensors):
        if index == len(tensors) // 2:
            fault(EXPORT_FAULT_POINT, path=path)  # tests: a kill or a full disk half-way through the file
        writer.write_tensor_data(_encode(source(), quant))
    writer.close()


# ----- quantization through llama.cpp -----


def quantize_gguf(source: Path, target: Path, quant: str, threads: int = 0) -> list[str]:
    """llama.cpp's ``llama_model_quantize`` from `source` (f16/bf16 GGUF) to `target` in `quant`.

    llama.cpp logs a line per tensor; they are collected instead of printed. Returns the notes worth a
    user's eye (tensors that fell back to another type); raises `ExportRunError` with llama.cpp's last
    lines when it fails.
    """
    import ctypes

    import llama_cpp

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    previous, previous_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(previous_data))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[quant]
    params.nthread = threads
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    finally:
        llama_cpp.llama_log_set(previous, previous_data)
    log = [line.strip() for line in "".join(lines).splitlines() if line.strip()]
    if status != 0:
        raise ExportRunError(f"llama.cpp's quantizer failed ({quant}, status {status}): "
                             f"{log[-1] if log else 'no message'}")
    return [f"llama.cpp: {line.partition('WARNING: ')[2]} (their rows are not a multiple of the {quant} block, "
            "so another type holds them)" for line in log if "required fallback quantization" in line]


# ----- the Ollama Modelfile -----


def modelfile_text(gguf_name: str, plan: ExportPlan, user_piece: str, assistant_piece: str) -> str:
    """An Ollama Modelfile for the GGUF: the chat format as a Go template, the stop piece, the defaults.

    The template is the chat format of `tokenization_baichuan.build_chat_input` (system text first,
    then each turn as its role piece and its text, the assistant piece to ask for a reply), written
    with Ollama's ``.Messages``; the user piece is a stop, so a reply never runs into a next turn it
    invents (eos ends a reply too; llama.cpp stops on it).
    """
    g = plan.generation
    template = (
        "{{- range $i, $_ := .Messages }}"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
        '{{- if eq .Role "system" }}{{ .Content }}'
        '{{- else if eq .Role "user" }}' + user_piece + "{{ .Content }}"
        '{{- else if eq .Role "assistant" }}' + assistant_piece + "{{ .Content }}"
        "{{- end }}"
        '{{- if and $last (ne .Role "assistant") }}' + assistant_piece + "{{- end }}"
        "{{- end }}"
    )
    lines = [
        f"# Ollama: ollama create NAME -f {Path(gguf_name).with_suffix(MODELFILE_SUFFIX)}   "
        "(written by baichuan-finetune export; docs/deploy.md)",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template}"""',
        f'PARAMETER stop "{user_piece}"',
        f"PARAMETER num_ctx {plan.context_length}",
    ]
    parameters = [("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"),
                  ("repeat_penalty", "repetition_penalty"), ("num_predict", "max_new_tokens")]
    for ollama_name, ours in parameters:
        if g.get(ours) is not None:
            lines.append(f"PARAMETER {ollama_name} {g[ours]}")
    return "\n".join(lines) + "\n"


# ----- the export as a transaction -----


def temporary_path(output: Path, what: str) -> Path:
    """A name next to `output` for a file being written by this process (``.NAME.WHAT-PID``)."""
    return output.parent / f".{output.name}.{what}-{os.getpid()}"


def remove_stale_partials(output: Path) -> list[str]:
    """Remove the temporary files of exports to `output` that were killed (their PID runs no more)."""
    notes = []
    for path in sorted(output.parent.glob(f".{glob.escape(output.name)}.*-*")):
        pid = path.name.rpartition("-")[2]
        if pid.isdigit() and not pid_running(int(pid)):
            path.unlink(missing_ok=True)
            notes.append(f"removed {path}, left by an export that was killed (PID {pid})")
    return notes


def _fsync_and_replace(source: Path, target: Path) -> None:
    with open(source, "rb") as f:
        os.fsync(f.fileno())
    os.replace(source, target)
    try:
        directory = os.open(target.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def export_gguf(model: str | Path, output: str | Path, quant: str = "f16", overwrite: bool = False,
                modelfile: bool = True, warn: Callable[[str], None] | None = None) -> ExportResult:
    """Export `model` (a model, checkpoint or LoRA adapter directory) to the GGUF file `output`.

    Raises `ExportError` (one line) before reading weights when `check_export` refuses. ``modelfile``
    writes an Ollama Modelfile next to the GGUF, ``NAME.Modelfile`` for ``NAME.gguf`` (replacing one only with
    `overwrite`).
    """
    start = time.monotonic()
    plan = check_export(model, output, quant, overwrite)
    output, quant = plan.output, plan.quant
    modelfile_path = output.with_suffix(MODELFILE_SUFFIX) if modelfile else None
    if modelfile_path is not None and modelfile_path.exists() and not overwrite:
        raise ExportError(f"{modelfile_path} exists: pass --overwrite to replace it, or --no_modelfile")
    say = warn or (lambda m: print(f"warning: {m}", file=sys.stderr, flush=True))
    output.parent.mkdir(parents=True, exist_ok=True)
    for message in remove_stale_partials(output):
        say(message)
    state = model_state(plan)
    partial = temporary_path(output, "partial")
    unquantized = temporary_path(output, "unquantized")
    try:
        if quant in WRITTEN_DIRECTLY:
            write_gguf(partial, plan, state, quant)
        else:
            bf16 = any(t.dtype == torch.bfloat16 for t in state.values())
            # From bf16 weights bf16 loses nothing; from float32/float16 weights f16 keeps more bits.
            write_gguf(unquantized, plan, state, "bf16" if bf16 else "f16")
            del state
            plan.notes.extend(quantize_gguf(unquantized, partial, quant))
        _fsync_and_replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
        unquantized.unlink(missing_ok=True)
    if modelfile_path is not None:
        text = modelfile_text(output.name, plan, *role_pieces(read_sentencepiece(plan.tokenizer_file)))
        staged = temporary_path(modelfile_path, "partial")
        staged.write_text(text, encoding="utf-8")
        _fsync_and_replace(staged, modelfile_path)
    return ExportResult(output, output.stat().st_size, time.monotonic() - start, plan.architecture,
                        modelfile_path, plan.notes)


def gguf_tensor_arrays(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, data)`` of each tensor of a GGUF file as stored (for comparing two exports)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    for tensor in reader.tensors:
        yield tensor.name, np.array(tensor.data)


# ----- GPTQ (vLLM, TGI) -----

GPTQ_BITS = (4, 8)


def gptq_problem() -> str | None:
    """Why ``--format gptq`` cannot run here (one line), or None: it needs the gptqmodel package."""
    try:
        import gptqmodel  # noqa: F401
    except ImportError:
        return ("--format gptq needs gptqmodel (pip install gptqmodel; it asks for its own torch and transformers "
                "versions, so use a separate environment: docs/deploy.md)")
    except Exception as e:  # a broken install (missing CUDA libraries, a kernel that fails to load)
        return f"--format gptq: gptqmodel does not import here ({type(e).__name__}: {str(e).splitlines()[0]})"
    return None


def calibration_examples(data_path: str, tokenizer, model_max_length: int, limit: int) -> list[dict]:
    """Up to `limit` conversations of training data, as the model saw them in training (input ids)."""
    from ..data.encoding import encode_conversations
    from ..data.records import read_records

    records = read_records(data_path, what="calibration data")  # DataError: one line naming file and record
    chunk = encode_conversations(tokenizer, records.conversations[:limit], model_max_length)
    examples = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids, _ in chunk.examples()]
    if not examples:
        raise ExportError(f"--calibration_data {data_path}: no conversation with an assistant turn")
    return examples


def _check_output_dir(output_dir: Path, model_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ExportError(f"--output {output_dir} is a file: name a new directory for the GPTQ model")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ExportError(f"--output {output_dir} is not empty: name a new directory, or pass --overwrite")
    if output_dir.resolve().is_relative_to(model_dir.resolve()):
        raise ExportError(f"--output {output_dir}: write the export outside the model directory {model_dir}")


def export_gptq(model: str | Path, output: str | Path, calibration_data: str, bits: int = 4, group_size: int = 128,
                max_samples: int = 256, overwrite: bool = False) -> ExportResult:
    """Quantize `model` (a LoRA adapter is merged with its base first) to a GPTQ directory with gptqmodel,
    calibrated on `calibration_data` (training data, any format `records` reads)."""
    import shutil
    import tempfile

    start = time.monotonic()
    model_dir, output = Path(model), Path(output)
    problem = gptq_problem()
    if problem:
        raise ExportError(problem)
    if bits not in GPTQ_BITS:
        raise ExportError(f"--bits {bits}: GPTQ export writes {' or '.join(map(str, GPTQ_BITS))} bits")
    try:
        kind = check_model_dir(model_dir, flag="--model")
    except ModelDirError as e:
        raise ExportError(str(e)) from None
    _check_output_dir(output, model_dir, overwrite)
    config_dir = model_dir if kind == "model" else resolve_base_dir(
        read_adapter_config(model_dir)["base_model_name_or_path"], model_dir)
    config = _read_json(config_dir / "config.json")
    for field_name in ("hidden_size", "intermediate_size"):
        if config[field_name] % group_size:
            raise ExportError(f"--group_size {group_size} does not divide {field_name} {config[field_name]} "
                              f"({config_dir / 'config.json'})")
    # gptqmodel sizes its CPU thread pools from the core count and refuses fewer than 2 workers.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    from gptqmodel import GPTQModel, QuantizeConfig

    from .loading import load_tokenizer
    from .merge import merge_lora

    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.gptq-", dir=output.parent))
    try:
        source = model_dir
        if kind == "lora":
            source = merge_lora(model_dir, work / "merged", warn=lambda m: None)
        tokenizer = load_tokenizer(source)
        examples = calibration_examples(calibration_data, tokenizer, int(config.get("model_max_length", 4096)),
                                        max_samples)
        quantized = GPTQModel.load(str(source), QuantizeConfig(bits=bits, group_size=group_size),
                                   device="cuda" if torch.cuda.is_available() else "cpu")
        quantized.quantize(examples, batch_size=1)
        quantized.save(str(work / "gptq"))
        if output.is_dir():
            shutil.rmtree(output)  # empty, or --overwrite
        os.replace(work / "gptq", output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    return ExportResult(output, size, time.monotonic() - start, "gptq", None,
                        [f"calibrated on {len(examples)} conversations of {calibration_data}"])
