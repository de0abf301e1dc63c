"""Memory and launch planner: does a fine-tuning run fit, per device and per node, before launch?

`plan()` predicts, for each DeepSpeed option (ZeRO-2, ZeRO-3, ZeRO-3 + optimizer offload, ZeRO-3 +
optimizer and parameter offload), the peak memory of one device as a sum of named terms, and the CPU
memory per node that offload needs. It reads only the model's ``config.json`` (never weights), so it
answers in well under a second. `scripts/plan.py` is the command line; `fine-tune.py` prints one
plan line for the configuration it launches (`launch_line`) before loading the model.

The model is a sum of byte counts derived from the code that runs (docs/planning.md lists every
term and where its constant comes from; ``benchmarks/memory.py`` checks it against measured
CPU runs). Peak = the largest of three moments of a step, each a sum of what is alive then:
end of forward (activations + loss head), end of backward (gradients, the largest unreduced
gradient) and the optimizer step (fp32 step temporaries).
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UsageFault
from ..core.json_files import JSONObjectError, read_json_object
from ..model.specs_baichuan import ALIBI, ALL_LINEAR, LINEAR_LAYER_NAMES, RELEASED, ROPE, position_embedding_of, shape_problem

GIB = 1024**3
# The shipped DeepSpeed configs as package data: copies of the repository's root ds_config*.json (the official
# command line's), which tests/options/test_plan.py checks equal.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "assets"

# Names users bring from other model families, and Baichuan2's module that plays their part: its
# attention projects q, k and v with one fused W_pack, so q_proj/k_proj/v_proj have no module of their own.
OTHER_MODEL_NAMES = {"q_proj": "W_pack", "k_proj": "W_pack", "v_proj": "W_pack", "qkv_proj": "W_pack",
                     "query_key_value": "W_pack", "c_attn": "W_pack", "Wqkv": "W_pack", "out_proj": "o_proj"}
# Modules LoRA must not wrap here: the NormHead lm_head is no nn.Linear, and the planner and the adapter
# saving cover decoder-layer linears only.
NOT_LORA_TARGETS = ("lm_head", "embed_tokens")
# Largest accepted model dimension (vocabulary, hidden, intermediate, layers, heads): far above any
# released model, low enough that every byte count below stays an exact, finite number.
MAX_DIMENSION = 2**20
# Largest accepted count of nodes, GPUs, tokens or sequences in a plan (same reason).
MAX_COUNT = 2**31

# The DeepSpeed options, fastest first (each one moves more to slower memory or communicates more).
OPTIONS = ("zero2", "zero3", "zero3_offload_optimizer", "zero3_offload_all")
OPTION_TITLES = {
    "zero2": "ZeRO-2",
    "zero3": "ZeRO-3",
    "zero3_offload_optimizer": "ZeRO-3 + optimizer offload",
    "zero3_offload_all": "ZeRO-3 + optimizer and parameter offload",
}
SHORT_TITLES = {"zero2": "ZeRO-2", "zero3": "ZeRO-3", "zero3_offload_optimizer": "Z3+opt offload",
                "zero3_offload_all": "Z3+all offload"}
# The one dtype map: each training precision (the flag that selects it: --bf16, --fp16, neither), its torch
# dtype's name and bytes per value. This planner, train.torch_dtype and loading.DTYPES (the tools' --dtype) read it.
PRECISIONS = {"fp32": ("float32", 4), "bf16": ("bfloat16", 2), "fp16": ("float16", 2)}


def precision_of(training) -> str:
    """The `PRECISIONS` name of a run's training arguments (``bf16``/``fp16`` flags; fp32 otherwise)."""
    return "bf16" if training.bf16 else "fp16" if training.fp16 else "fp32"


# Shipped configs each option starts from (the optimizer-offload one is ds_config.json + offload_optimizer).
SHIPPED_CONFIG = {
    "zero2": "ds_config_zero2.json",
    "zero3": "ds_config.json",
    "zero3_offload_optimizer": "ds_config.json",
    "zero3_offload_all": "ds_config_zero3_offload.json",
}

# ----- constants (docs/planning.md says where each comes from) -----
# Tokens per chunk of the loss head (losses.CausalLMLoss.chunk_size).
LOSS_CHUNK = 256
# float32 [chunk, vocab] tensors alive at once inside NormHeadLoss.forward, read off losses.py and
# measured (RSS steps of 3 and 4 x 122.7 MiB at chunk 256, V 125,696): within the first chunk its
# logits, softmax gradient and one product temporary ((grad * logits) or (grad * inv_norm)); from the
# second chunk on, the previous chunk's logits and gradient are still bound to their names while the
# next chunk's linear output and its scaled copy are made: two of each size.
LOSS_CHUNK_TENSORS = 3
LOSS_NEXT_CHUNK_TENSORS = 2
# CUDA context + cuBLAS/NCCL workspaces, not seen by torch's allocator (typical H100/A100 figure).
CUDA_CONTEXT_BYTES = int(1.0 * GIB)
# Caching-allocator fragmentation on top of the allocated peak (PyTorch's CUDA allocator, typical).
CUDA_FRAGMENTATION = 0.10
# CPU runs: growth of a rank's RSS besides tensors (DeepSpeed engine, gloo, autograd bookkeeping):
# measured at the start of the first step of LoRA runs, where no optimizer or gradient state hides it:
# 7 MiB over the weights under ZeRO-2, 79 MiB over the weight partition under ZeRO-3.
CPU_RUNTIME_BYTES = int(64 * 2**20)
# CPU runs: the forward's freed temporaries per token per layer that stay resident (in units of b*H),
# measured: 62.7 KB per token per layer (fp32, H 512, I 1376) against 48.6 KB of saved tensors.
CPU_FORWARD_TEMPORARIES_H = 7
# Safety margin for the recommendation: a plan "fits with margin" under this share of device memory.
SAFETY_MARGIN = 0.10
# Host memory per node besides offloaded states: the processes' own CPU memory (weights read while
# loading, Python, the data) per rank.
CPU_PER_RANK_BYTES = int(4 * GIB)


class PlanError(ValueError, UsageFault):
    """A bad planner input: printed as one line, exit code 2."""


# ----- the model -----


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that decide memory."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    position_embedding: str = ROPE
    name: str = ""

    @property
    def alibi(self) -> bool:
        return self.position_embedding == ALIBI

    @property
    def layer_params(self) -> int:
        """One decoder layer: W_pack 3H*H, o_proj H*H, gate/up/down 3*H*I, two RMSNorm weights."""
        h, i = self.hidden_size, self.intermediate_size
        return 4 * h * h + 3 * h * i + 2 * h

    @property
    def head_params(self) -> int:
        """The embedding or the lm_head (untied): V*H each."""
        return self.vocab_size * self.hidden_size

    @property
    def params(self) -> int:
        return 2 * self.head_params + self.num_hidden_layers * self.layer_params + self.hidden_size

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of a decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {"W_pack": (h, 3 * h), "o_proj": (h, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def __post_init__(self) -> None:
        where = self.name or "config.json"
        for key in DIMENSIONS:
            _check_dimension(where, key, getattr(self, key))
        problem = shape_problem(self.hidden_size, self.num_attention_heads, self.position_embedding)
        if problem:
            raise PlanError(f"{where}: {problem}")

    @classmethod
    def from_config(cls, config: dict, name: str = "") -> "ModelShape":
        """The shape in a parsed ``config.json``; `PlanError` naming `name` and the field when one is bad."""
        where = name or "config.json"
        values = []
        for key in DIMENSIONS:
            if key not in config:
                raise PlanError(f"{where}: config.json has no {key}")
            values.append(_check_dimension(where, key, config[key]))
        return cls(*values, position_embedding_of(config), name)


DIMENSIONS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _check_dimension(where: str, key: str, value: Any) -> int:
    """`value` as an int when it is a whole number from 1 to `MAX_DIMENSION` (4096.0 counts); `PlanError` if not."""
    whole = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer())
    if not whole or not 1 <= value <= MAX_DIMENSION:
        raise PlanError(f'{where}: "{key}" {json.dumps(value)}: expected a whole number from 1 to {MAX_DIMENSION}')
    return int(value)


def load_shape(model: str) -> ModelShape:
    """``7b``, ``13b`` or a model directory holding ``config.json``; `PlanError` otherwise."""
    key = model.lower().removeprefix("baichuan2-").removesuffix("-base").removesuffix("-chat")
    if key in RELEASED:
        return ModelShape(**RELEASED[key], name=f"Baichuan2-{key.upper()}")
    path = Path(model)
    if not path.exists():
        raise PlanError(f"--model {model}: not 7b, 13b or an existing model directory")
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise PlanError(f"--model {model}: no config.json in that directory")
    try:
        config = read_json_object(config_file)
    except JSONObjectError as e:
        raise PlanError(f"--model {model}: {config_file.name}: {e.reason}") from None
    return ModelShape.from_config(config, name=str(path))


def parse_lora_targets(text: str) -> str | tuple[str, ...]:
    """``--lora_target_modules`` checked: `ALL_LINEAR`, or Baichuan2 linear names (duplicates dropped).

    The one parser of the flag (training's arguments, this planner, and through them lora.py).
    Names from other models are refused with the Baichuan2 name to use (LLaMA's q_proj,v_proj ->
    W_pack): a silent translation would train k as well and change what the user asked for.
    `PlanError` (one line, listing the valid names) otherwise.
    """
    valid = f"valid: {', '.join(LINEAR_LAYER_NAMES)} or {ALL_LINEAR}"
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise PlanError("--lora_target_modules: give module names (e.g. W_pack,o_proj) or all-linear")
    if names == [ALL_LINEAR]:
        return ALL_LINEAR
    bad = [t for t in names if t not in LINEAR_LAYER_NAMES]
    if not bad:
        return tuple(dict.fromkeys(names))
    flag = f"--lora_target_modules {','.join(names)}"
    if ALL_LINEAR in names:
        raise PlanError(f"{flag}: {ALL_LINEAR} stands alone (it already covers every linear layer)")
    foreign = [t for t in bad if t in OTHER_MODEL_NAMES]
    if foreign:
        ours = (OTHER_MODEL_NAMES.get(t, t) for t in names)
        suggestion = ",".join(dict.fromkeys(t for t in ours if t in LINEAR_LAYER_NAMES))
        why = ("Baichuan2 projects q, k and v with one fused W_pack" if
               any(OTHER_MODEL_NAMES[t] == "W_pack" for t in foreign) else "Baichuan2 names it o_proj")
        what = "is not a Baichuan2 module" if len(foreign) == 1 else "are not Baichuan2 modules"
        raise PlanError(f"{flag}: {', '.join(foreign)} {what} ({why}); did you mean {suggestion}? ({valid})")
    excluded = [t for t in bad if t in NOT_LORA_TARGETS]
    if excluded:
        raise PlanError(f"{flag}: {', '.join(excluded)} cannot take LoRA adapters here (decoder-layer linear "
                        f"layers only; {valid})")
    close = {t: next((n for n in LINEAR_LAYER_NAMES if n.lower() == t.lower()), None) or
             next(iter(difflib.get_close_matches(t, LINEAR_LAYER_NAMES, n=1)), None) for t in bad}
    hints = [c for c in close.values() if c]
    raise PlanError(f"{flag}: no module named {', '.join(bad)} in Baichuan2"
                    + (f" (did you mean {', '.join(hints)}?)" if hints else "") + f"; {valid}")


def lora_targets(targets: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The decoder-layer linear names LoRA wraps (``all-linear``: all of them; peft leaves out lm_head)."""
    parsed = parse_lora_targets(targets if isinstance(targets, str) else ",".join(targets))
    return LINEAR_LAYER_NAMES if parsed == ALL_LINEAR else parsed


def check_lora_rank(shape: ModelShape, r: int, targets: tuple[str, ...], model: str = "this model") -> None:
    """`PlanError` when `r` exceeds the smaller side of a targeted weight: such a rank adds parameters
    (and memory: ``--lora_r 1e9`` would ask for petabytes) without adding rank."""
    shapes = shape.linear_shapes()
    limit = min(targets, key=lambda t: min(shapes[t]))
    if r > min(shapes[limit]):
        raise PlanError(f"--lora_r {r}: at most {min(shapes[limit])} for {model} (the smaller side of "
                        f"{limit}'s {' x '.join(map(str, shapes[limit]))} weight)")


def lora_trainable_params(shape: ModelShape, r: int, targets: tuple[str, ...]) -> int:
    """LoRA A [r, in] + B [out, r] per targeted linear per layer (what peft creates, no bias)."""
    shapes = shape.linear_shapes()
    return shape.num_hidden_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


# ----- the run being planned -----


@dataclass
class Setup:
    """One launch: model, method, hardware and the training flags that change memory."""

    shape: ModelShape
    method: str = "full"  # full | lora | qlora
    lora_r: int = 1
    lora_targets: tuple[str, ...] = ("W_pack",)
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_bytes: int = 80 * 10**9
    cpu_memory_bytes: int | None = None
    seq_len: int = 512
    micro_batch: int = 1
    packing: bool = False
    checkpointing: bool = False
    precision: str = "bf16"  # bf16 | fp16 | fp32
    device: str = "cuda"  # cuda | cpu (per-process RSS growth, fp32)
    ds_overrides: dict = field(default_factory=dict)  # zero_optimization keys of a given --deepspeed file

    def __post_init__(self) -> None:
        if self.method not in ("full", "lora", "qlora"):
            raise PlanError(f"--method {self.method}: not full, lora or qlora")
        flags = {"nodes": "nodes", "gpus_per_node": "gpus_per_node", "seq_len": "model_max_length",
                 "micro_batch": "per_device_train_batch_size", "lora_r": "lora_r"}
        for name, flag in flags.items():
            if getattr(self, name) < 1:
                raise PlanError(f"--{flag} {getattr(self, name)}: must be at least 1")
            if getattr(self, name) > MAX_COUNT:
                raise PlanError(f"--{flag} {getattr(self, name)}: must be at most {MAX_COUNT}")
        if self.gpu_memory_bytes <= 0:
            raise PlanError(f"--gpu_memory_gb {self.gpu_memory_bytes / 1e9:g}: must be positive")
        if self.cpu_memory_bytes is not None and self.cpu_memory_bytes <= 0:
            raise PlanError(f"--cpu_memory_gb {self.cpu_memory_bytes / 1e9:g}: must be positive")
        self.lora_targets = lora_targets(self.lora_targets)
        if self.method != "full":
            check_lora_rank(self.shape, self.lora_r, self.lora_targets)
        if self.precision not in PRECISIONS:
            raise PlanError(f"--precision {self.precision}: not {', '.join(PRECISIONS)}")
        if self.device not in ("cuda", "cpu"):
            raise PlanError(f"--device {self.device}: not cuda or cpu")
        if self.device == "cpu":
            self.precision = "fp32"  # the CPU runs this predicts are float32

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dtype_bytes(self) -> int:
        return PRECISIONS[self.precision][1]

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch

    @property
    def trainable_params(self) -> int:
        if self.method == "full":
            return self.shape.params
        return lora_trainable_params(self.shape, self.lora_r, self.lora_targets)


def ds_config(option: str, overrides: dict | None = None) -> dict:
    """The DeepSpeed config of `option`: the shipped file (``auto`` kept: the HF integration fills it)."""
    path = CONFIG_DIR / SHIPPED_CONFIG[option]
    try:
        config = read_json_object(path)
    except JSONObjectError:
        config = {"zero_optimization": {"stage": 3 if option != "zero2" else 2}}
    zero = config.setdefault("zero_optimization", {})
    if option == "zero3_offload_optimizer":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        try:  # the CPU Adam of the offload config
            optimizer = read_json_object(CONFIG_DIR / SHIPPED_CONFIG["zero3_offload_all"]).get("optimizer")
        except JSONObjectError:
            optimizer = None
        zero.pop("offload_param", None)
        if optimizer:
            config["optimizer"] = copy.deepcopy(optimizer)
        else:
            config.pop("optimizer", None)
    for key, value in (overrides or {}).items():
        zero[key] = value
    return config


def _zero_value(zero: dict, key: str, auto: float) -> float:
    """A zero_optimization size, with "auto" resolved as transformers' DeepSpeed integration does."""
    value = zero.get(key, auto)
    return float(auto if value == "auto" else value)


# ----- the estimate -----


@dataclass
class Estimate:
    """Peak memory of one device (bytes) for one option, term by term, and the CPU memory per node."""

    option: str
    terms: dict[str, int]
    peak: int
    phase: str
    cpu_per_node: int
    fits: bool
    fits_with_margin: bool
    cpu_fits: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _activation_bytes_per_token(s: Setup) -> dict[str, float]:
    """Bytes each decoder layer keeps for backward per token, without and with checkpointing.

    Counted from what autograd saves in modeling_baichuan.py (b = compute dtype bytes):
    full training: residual input b*H; each RMSNorm its float32 product 4H and its output b*H (in
    bf16 also the float32 copy of its input 4H and the cast 2H); qkv 3bH (kept whole by the saved
    view of v), the RoPE outputs q, k 2bH, the attention output bH and its contiguous copy bH (o_proj
    input), the mid residual bH; MLP gate, silu, up and product 4bI. LoRA: frozen weights keep no
    inputs, so only what the adapters and the trainable path need: the norms' input (fp32 copy in
    bf16), qkv/RoPE/attention outputs, silu's input and both inputs of the gate product 3bI, plus per
    adapted linear its dropout output (b*in) and the dropout mask (1 byte*in).
    """
    h, i, b = s.shape.hidden_size, s.shape.intermediate_size, s.dtype_bytes
    bf = b == 2
    if s.device == "cpu":
        # Resident memory, not live tensors: glibc's heap keeps the forward's freed temporaries (norm
        # squares, RoPE halves and products, LoRA's unsaved inputs), so full and LoRA grow alike.
        # Measured 62.7 KB per token per layer at H 512, I 1376 in float32 (docs/planning.md).
        return {"layer": (13 + CPU_FORWARD_TEMPORARIES_H) * b * h + 4 * b * i, "checkpoint": b * h}
    if s.method == "full":
        norm = (4 * h + 4 * h + 2 * h if bf else 4 * h) + b * h  # (fp32 copy + product + cast) or product; output
        per = b * h + 2 * norm + 3 * b * h + 2 * b * h + 2 * b * h + b * h + 4 * b * i
    else:
        norm = 4 * h if bf else 0  # the float32 copy of the input (fp32: the input itself, counted below)
        per = b * h + 2 * norm + 3 * b * h + 2 * b * h + b * h + b * h + 3 * b * i
        shapes = s.shape.linear_shapes()
        per += sum((b + 1) * shapes[t][0] for t in s.lora_targets)
    return {"layer": per, "checkpoint": b * h}


def _attention_extra(s: Setup) -> int:
    """The attention implementation's own buffers alive through the forward pass.

    ALiBi (13B): the additive bias [batch or 1, heads, L, L] in the compute dtype (``attention_bias``;
    batch when rows carry padding or packed sequences). RoPE with padding/packing: the bool mask
    [batch, 1, L, L]. SDPA's flash/memory-efficient kernels keep no L x L scores.
    """
    L, B = s.seq_len, s.micro_batch
    segmented = s.packing or B > 1
    rows = B if segmented else 1
    if s.shape.alibi:
        return rows * s.shape.num_attention_heads * L * L * s.dtype_bytes
    return B * L * L if segmented else 0


def estimate(s: Setup, option: str) -> Estimate:
    """Peak bytes per device for `option` (see the module docstring for the three moments)."""
    if option not in OPTIONS:
        raise PlanError(f"--zero {option}: not one of {', '.join(OPTIONS)}")
    shape, n, b = s.shape, s.world, s.dtype_bytes
    P, T = shape.params, s.trainable_params
    V, H = shape.vocab_size, shape.hidden_size
    zero = ds_config(option, s.ds_overrides)["zero_optimization"]
    stage3 = option != "zero2"
    offload_opt = option in ("zero3_offload_optimizer", "zero3_offload_all")
    offload_param = option == "zero3_offload_all"
    full = s.method == "full"
    cpu = s.device == "cpu"
    terms: dict[str, int] = {}

    # Weights: replicated under ZeRO-2, a 1/n partition under ZeRO-3, on the host with parameter offload.
    # QLoRA's frozen base: 4-bit NF4 + one fp32 absmax per 64 weights (0.5625 bytes per weight).
    frozen = P - T if not full else 0
    frozen_bytes = frozen * (0.5625 if s.method == "qlora" else b)
    weight_bytes = P * b if full else T * b + frozen_bytes
    terms["weights"] = 0 if offload_param else int(weight_bytes / (n if stage3 else 1))
    # Gradients: partitioned (ZeRO-2 and 3) in the compute dtype; moved to the host with optimizer offload.
    terms["gradients"] = 0 if offload_opt else int(T * b / n)
    # Optimizer states: fp32 master copy (DeepSpeed clones it even when training in fp32) + Adam m and v.
    terms["optimizer_states"] = 0 if offload_opt else int(12 * T / n)
    # Step temporaries: the fp32 copy of the gradient partition (mixed precision only) and AdamW's
    # foreach sqrt(v) buffer, both partition-sized.
    step_tmp = 0 if offload_opt else int((0 if b == 4 else 4 * T / n) + 4 * T / n)

    # Activations kept for backward, and one layer's recomputed activations with checkpointing.
    per_token = _activation_bytes_per_token(s)
    tokens, layers = s.tokens, shape.num_hidden_layers
    act_full = int(tokens * layers * per_token["layer"])
    act_ckpt = int(tokens * (layers * per_token["checkpoint"] + per_token["layer"]))
    # Embedding output, final norm (input, fp32 product, output) and the hidden fed to the head.
    edges = int(tokens * H * (b + 4 + 2 * b))
    terms["activations_no_checkpointing"] = act_full + edges
    terms["activations_checkpointing"] = act_ckpt + edges
    terms["activations"] = terms["activations_checkpointing" if s.checkpointing else "activations_no_checkpointing"]
    terms["attention_buffers"] = _attention_extra(s)

    # The chunked loss head (losses.NormHeadLoss): float32 [chunk, V] temporaries, the gradient of the
    # hidden states, and for a trainable head its float32 [V, H] weight-gradient accumulator (+ in
    # bf16/fp16 the float32 copy of the weight made at the end and the cast gradient).
    chunk = min(LOSS_CHUNK, tokens)
    next_chunk = min(LOSS_CHUNK, tokens - chunk)
    rows = max(LOSS_CHUNK_TENSORS * chunk, LOSS_NEXT_CHUNK_TENSORS * (chunk + next_chunk))
    head = rows * V * 4 + tokens * H * b
    if full:
        head += 4 * V * H + (4 * V * H + 2 * V * H if b == 2 else 0)
    terms["loss_head"] = head

    # ZeRO-3 gathers each module's weights before use. With stage3_max_reuse_distance 1e9 (shipped) a
    # gathered weight is kept for its reuse in backward once the first step has traced the module
    # order, so up to stage3_max_live_parameters elements stay gathered (the whole model if smaller);
    # at least the largest module (embedding/lm_head, V*H) plus the prefetch bucket. Compute dtype.
    # LoRA/QLoRA: the frozen embedding's output needs no gradient, so it has no backward hook and no
    # reuse in the trace: it is released right after its forward and is not gathered at the loss head
    # (measured: ZeRO-3 LoRA holds one V x H matrix fewer there than full training).
    if stage3:
        prefetch = _zero_value(zero, "stage3_prefetch_bucket_size", 0.9 * H * H)
        max_live = _zero_value(zero, "stage3_max_live_parameters", 1e9)
        reused = P if full else P - V * H
        gathered = max(min(reused, max_live), min(reused, V * H + prefetch))
        terms["zero3_live_parameters"] = int(gathered * b)
    else:
        terms["zero3_live_parameters"] = 0

    # Communication: the gradient reduction bucket (two with overlap_comm) and, for full training,
    # the largest gradient as autograd makes it before reduction (the V x H embedding/head gradient).
    bucket = _zero_value(zero, "reduce_bucket_size", H * H)
    buckets = 2 if zero.get("overlap_comm") else 1
    terms["communication_buffers"] = int(buckets * bucket * b)
    unreduced = V * H * b if full else 0

    # Three moments of a step; the peak is the largest.
    # The gradient partition is one flat buffer that DeepSpeed keeps from step to step (ZeRO-2's
    # contiguous grads_in_partition, ZeRO-3's grad_partitions_flat_buffer), so it is alive throughout.
    states = terms["weights"] + terms["gradients"] + terms["optimizer_states"] + terms["zero3_live_parameters"]
    forward_end = (states + terms["activations"] + terms["attention_buffers"] + terms["loss_head"]
                   + terms["communication_buffers"])
    backward_end = states + terms["communication_buffers"] + unreduced
    step = terms["weights"] + terms["optimizer_states"] + terms["gradients"] + step_tmp
    phases = {"forward": forward_end, "backward": backward_end, "optimizer step": step}
    phase = max(phases, key=phases.get)
    terms["largest_unreduced_gradient"] = unreduced
    terms["optimizer_step_temporaries"] = step_tmp
    dynamic = phases[phase]
    if cpu:
        terms["runtime_reserve"] = CPU_RUNTIME_BYTES
    else:
        terms["runtime_reserve"] = CUDA_CONTEXT_BYTES + int(CUDA_FRAGMENTATION * dynamic)
    peak = dynamic + terms["runtime_reserve"]

    # Host memory per node: offloaded fp32 master + Adam (12 B/param) + fp32 gradients (4) of this
    # node's partitions, the offloaded compute-dtype parameters (pinned), and each rank's own process.
    per_rank_host = 0
    if offload_opt:
        per_rank_host += int(16 * T / n)
    if offload_param:
        per_rank_host += int(weight_bytes / n)
    cpu_per_node = s.gpus_per_node * (per_rank_host + CPU_PER_RANK_BYTES)
    capacity = s.gpu_memory_bytes
    cpu_fits = s.cpu_memory_bytes is None or cpu_per_node <= s.cpu_memory_bytes
    return Estimate(option, terms, peak, phase, cpu_per_node, peak <= capacity and cpu_fits,
                    peak <= (1 - SAFETY_MARGIN) * capacity and cpu_fits, cpu_fits)


@dataclass
class Plan:
    setup: Setup
    estimates: dict[str, Estimate]
    recommended: str | None
    levers: list[str]

    def as_dict(self) -> dict[str, Any]:
        s = self.setup
        return {
            "model": asdict(s.shape) | {"params": s.shape.params},
            "method": s.method,
            "trainable_params": s.trainable_params,
            "world_size": s.world,
            "nodes": s.nodes,
            "gpus_per_node": s.gpus_per_node,
            "device": s.device,
            "device_memory_bytes": s.gpu_memory_bytes,
            "cpu_memory_bytes": s.cpu_memory_bytes,
            "seq_len": s.seq_len,
            "micro_batch": s.micro_batch,
            "packing": s.packing,
            "gradient_checkpointing": s.checkpointing,
            "precision": s.precision,
            "per_device_peak_bytes": {k: e.peak for k, e in self.estimates.items()},
            "options": {k: e.as_dict() for k, e in self.estimates.items()},
            "recommended": self.recommended,
            "safety_margin": SAFETY_MARGIN,
            "levers": self.levers,
        }


def _levers(s: Setup, estimates: dict[str, Estimate]) -> list[str]:
    """What to change when nothing fits, cheapest first: each lever is planned in full (the flags it
    adds to the user's, each kept by the levers after it) and reported with its predicted peak."""
    out = []
    smaller = {"micro_batch": 1} if s.micro_batch > 1 else {}
    smaller_flags = " --per_device_train_batch_size 1" if smaller else ""
    ckpt = {"checkpointing": True, **smaller}
    ckpt_flags = ("" if s.checkpointing else " --gradient_checkpointing True") + smaller_flags

    def outcome(**changes) -> str:
        trial = copy.copy(s)
        for k, v in changes.items():
            setattr(trial, k, v)
        options = ("zero2",) if trial.method == "qlora" else OPTIONS  # as plan(): no ZeRO-3 for 4-bit weights
        trials = {o: estimate(trial, o) for o in options}
        fit = next((o for o in options if trials[o].fits_with_margin), None)
        if fit:
            return f": fits with {OPTION_TITLES[fit]}, peak {gib(trials[fit].peak)} of {gib(s.gpu_memory_bytes)}"
        low = min(trials, key=lambda o: trials[o].peak)
        return f": still does not fit (lowest: {OPTION_TITLES[low]}, peak {gib(trials[low].peak)})"

    if smaller:
        out.append(f"--per_device_train_batch_size 1 with --gradient_accumulation_steps x{s.micro_batch}"
                   + outcome(**smaller))
    if not s.checkpointing:
        out.append(ckpt_flags.strip() + outcome(**ckpt))
    if s.method != "qlora":
        out.append("optimizer/parameter offload (ZeRO-3 offload options above): slower, needs host memory")
    lora = {"lora_r": s.lora_r, "lora_targets": s.lora_targets} if s.method != "full" else {
        "lora_r": 1, "lora_targets": ("W_pack",)}  # training's defaults
    if s.method == "full":
        out.append("--use_lora True" + ckpt_flags + outcome(method="lora", **lora, **ckpt))
    if s.method != "qlora":
        # QLoRA: the frozen base in 4-bit NF4 (0.56 bytes per weight); ZeRO-2 only, a CUDA GPU with bitsandbytes.
        out.append("--use_lora True --q_lora True" + ckpt_flags + f" with {SHIPPED_CONFIG['zero2']}"
                   + outcome(method="qlora", **lora, **ckpt))
    for extra in (2, 4):
        trial = outcome(nodes=s.nodes * extra, **ckpt)
        if "fits with" in trial:
            out.append(f"more GPUs: {s.nodes * extra} nodes" + (f" with{ckpt_flags}" if ckpt_flags else "") + trial)
            break
    else:
        out.append("more GPUs")
    return out


def plan(s: Setup, options: tuple[str, ...] = OPTIONS) -> Plan:
    """Estimates for `options`, the fastest that fits with the safety margin, and levers if none does."""
    if s.method == "qlora":
        options = tuple(o for o in options if o == "zero2")  # 4-bit weights cannot be ZeRO-3-sharded
    estimates = {o: estimate(s, o) for o in options}
    recommended = next((o for o in options if estimates[o].fits_with_margin), None)
    levers = [] if recommended else _levers(s, estimates)
    return Plan(s, estimates, recommended, levers)


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


TERM_ORDER = ("weights", "gradients", "optimizer_states", "activations", "attention_buffers", "loss_head",
              "zero3_live_parameters", "communication_buffers", "largest_unreduced_gradient",
              "optimizer_step_temporaries", "runtime_reserve")


def format_plan(p: Plan) -> str:
    """The human-readable plan: one column per option, a row per term, fit marks, recommendation."""
    s = p.setup
    unit = "per process (RSS growth, fp32)" if s.device == "cpu" else f"per GPU ({s.gpu_memory_bytes / 1e9:g} GB)"
    lines = [f"{s.shape.name or 'model'}: {s.shape.params / 1e9:.2f} B parameters, {s.method}"
             + (f" (r {s.lora_r} on {','.join(s.lora_targets)}: {s.trainable_params:,} trainable)"
                if s.method != "full" else "")
             + f"; {s.nodes} node(s) x {s.gpus_per_node} = {s.world} {'processes' if s.device == 'cpu' else 'GPUs'}; "
             f"{s.seq_len} tokens x micro-batch {s.micro_batch}"
             + (", packing" if s.packing else "") + (", checkpointing" if s.checkpointing else "")
             + f", {s.precision}", f"memory {unit}:"]
    opts = list(p.estimates)
    width = 16
    lines.append(f"  {'':<30}" + "".join(f"{SHORT_TITLES[o]:>{width}}" for o in opts))
    for term in TERM_ORDER:
        if term == "activations":
            label = f"activations ({'checkpointed' if s.checkpointing else 'no checkpointing'})"
        else:
            label = term.replace("_", " ")
        lines.append(f"  {label:<30}" + "".join(f"{gib(p.estimates[o].terms[term]):>{width}}" for o in opts))
    other = "activations_no_checkpointing" if s.checkpointing else "activations_checkpointing"
    lines.append(f"  {'(activations, ' + ('without' if s.checkpointing else 'with') + ' ckpt)':<30}"
                 + "".join(f"{gib(p.estimates[o].terms[other]):>{width}}" for o in opts))
    lines.append(f"  {'PEAK':<30}" + "".join(f"{gib(p.estimates[o].peak):>{width}}" for o in opts))
    lines.append(f"  {'  reached at':<30}" + "".join(f"{p.estimates[o].phase:>{width}}" for o in opts))
    lines.append(f"  {'host memory per node':<30}" + "".join(f"{gib(p.estimates[o].cpu_per_node):>{width}}" for o in opts))
    marks = {o: ("fits" if e.fits_with_margin else "tight" if e.fits else "cpu RAM" if not e.cpu_fits else "no")
             for o, e in p.estimates.items()}
    lines.append(f"  {'fits':<30}" + "".join(f"{marks[o]:>{width}}" for o in opts))
    if s.device == "cpu":
        return "\n".join(lines)
    if p.recommended:
        e = p.estimates[p.recommended]
        lines.append(f"recommended: {OPTION_TITLES[p.recommended]} ({SHIPPED_CONFIG[p.recommended]}"
                     + (" + offload_optimizer" if p.recommended == "zero3_offload_optimizer" else "")
                     + f"): peak {gib(e.peak)} of {gib(s.gpu_memory_bytes)}, "
                     f"{100 * e.peak / s.gpu_memory_bytes:.0f}% (margin {100 * SAFETY_MARGIN:.0f}%)")
        if not s.checkpointing and p.recommended != OPTIONS[0]:
            trial = copy.copy(s)
            trial.checkpointing = True
            faster = next((o for o in OPTIONS[: OPTIONS.index(p.recommended)] if o in p.estimates
                           and estimate(trial, o).fits_with_margin), None)
            if faster:
                lines.append(f"  faster: --gradient_checkpointing True with {OPTION_TITLES[faster]} "
                             f"(peak {gib(estimate(trial, faster).peak)}; recomputes the forward, ~1/3 more "
                             "compute, usually cheaper than offload)")
    else:
        lines.append("nothing fits with a 10% margin; next levers, cheapest first:")
        lines += [f"  {i}. {lever}" for i, lever in enumerate(p.levers, 1)]
    return "\n".join(lines)


def write_ds_config(p: Plan, path: str | Path) -> dict:
    """Write the recommended option's DeepSpeed config (the shipped style, ``auto`` kept) to `path`."""
    option = p.recommended or OPTIONS[-1]
    config = ds_config(option, p.setup.ds_overrides)
    Path(path).write_text(json.dumps(config, indent=2) + "\n")
    return config


# ----- the training-start check -----


def option_of_ds_config(config: dict | None) -> str | None:
    """The planner option a DeepSpeed config dict corresponds to (None: no ZeRO / stage 0-1)."""
    if not config:
        return None
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage == 2:
        return "zero2"
    if stage == 3:
        off_param = (zero.get("offload_param") or {}).get("device", "none") not in ("none", None)
        off_opt = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
        return "zero3_offload_all" if off_param else "zero3_offload_optimizer" if off_opt else "zero3"
    return None


def _free_device_memory() -> tuple[int, int] | None:
    """(free, total) bytes of this process's CUDA device, or None on CPU."""
    try:
        import torch

        if torch.cuda.is_available():
            return tuple(int(x) for x in torch.cuda.mem_get_info())
    except Exception:  # a broken driver must not stop training over a warning
        return None
    return None


def launch_setup(model_path: str, training, lora, data, ds: dict | None) -> Setup | None:
    """The `Setup` of a fine-tune.py launch (None when the model's config.json is not local, or the
    launch is one the planner cannot model: the flags and the config were refused before this if bad)."""
    method = "qlora" if lora.q_lora else "lora" if lora.use_lora else "full"
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)) or world)
    cpu = bool(getattr(training, "use_cpu", False))
    zero = dict((ds or {}).get("zero_optimization") or {})
    try:
        shape = load_shape(model_path)
        free = None if cpu else _free_device_memory()
        return Setup(
            shape=shape, method=method, lora_r=max(lora.lora_r, 1),
            lora_targets=lora_targets(lora.lora_target_modules) if method != "full" else ("W_pack",),
            nodes=max(world // max(local, 1), 1), gpus_per_node=max(local, 1),
            gpu_memory_bytes=free[1] if free else 80 * 10**9,
            seq_len=training.model_max_length, micro_batch=training.per_device_train_batch_size,
            # --stage pt always packs its rows full.
            packing=bool(getattr(data, "packing", False)) or getattr(training, "stage", "sft") == "pt",
            checkpointing=bool(getattr(training, "gradient_checkpointing", False)),
            precision=precision_of(training),
            device="cpu" if cpu else "cuda", ds_overrides={k: v for k, v in zero.items() if not isinstance(v, dict)},
        )
    except PlanError:
        return None


def launch_line(s: Setup, option: str | None, free: tuple[int, int] | None = None) -> tuple[str, str | None]:
    """The one plan line for a launch, and a warning when the prediction exceeds the device memory.

    `free`: (free, total) device bytes; by default asked of CUDA (``torch.cuda.mem_get_info``).
    """
    est = estimate(s, option or "zero2")  # no ZeRO: replicated states, as ZeRO-2 minus its partitioning
    if option is None:
        full_states = (s.trainable_params * (s.dtype_bytes + 12) - est.terms["gradients"] - est.terms["optimizer_states"])
        est.peak += max(full_states, 0)
    what = f"plan: {OPTION_TITLES.get(option, 'no ZeRO')}, {s.method}, {s.world} process(es): predicted peak " + (
        f"{gib(est.peak)} RSS growth per process" if s.device == "cpu" else f"{gib(est.peak)} per GPU")
    if free is None and s.device == "cuda":
        free = _free_device_memory()
    if free:
        what += f"; device memory {gib(free[0])} free of {gib(free[1])}"
        if est.peak > free[0]:
            return what, (f"predicted peak {gib(est.peak)} exceeds the {gib(free[0])} free on this GPU: expect "
                          f"out-of-memory; see `python scripts/plan.py` for options (--skip_memory_check silences this)")
    elif s.device == "cuda":
        what += "; device memory unknown"
    return what, None


def memory_probe_start() -> None:
    """With ``BAICHUAN_FINETUNE_MEMORY_LOG=<dir>``: record this rank's RSS baseline and reset its peak.

    Used by benchmarks/memory.py: called just before the model is loaded; writing 5 to
    /proc/self/clear_refs resets VmHWM, so the peak read later is the peak since this baseline.
    """
    log_dir = os.environ.get("BAICHUAN_FINETUNE_MEMORY_LOG")
    if not log_dir:
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    status = Path("/proc/self/status").read_text()
    rss_kib = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    rank = os.environ.get("RANK", "0")
    Path(log_dir, f"rank{rank}.json").write_text(json.dumps({"pid": os.getpid(), "baseline_kib": rss_kib}))


def report_launch(model_path: str, training, lora, data, ds: dict | None) -> str | None:
    """Print the plan line of a fine-tune.py launch and log a warning when it predicts out-of-memory.

    Returns the line (None when the model's config.json is not local, e.g. a hub id not yet downloaded).
    """
    import logging

    setup = launch_setup(model_path, training, lora, data, ds)
    if setup is None:
        return None
    line, warning = launch_line(setup, option_of_ds_config(ds))
    print(line, flush=True)
    if warning:
        logging.getLogger("baichuan_finetune").warning(warning)
    return line
