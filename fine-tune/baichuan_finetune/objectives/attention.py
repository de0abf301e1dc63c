"""Optional attention kernels for packed rows and ALiBi: FlexAttention, FlashAttention-2 varlen, xFormers.

``--attn_implementation`` (training) and ``load_model(attn_implementation=...)`` (the tools) take
one of ``IMPLEMENTATIONS``. ``sdpa`` and ``eager`` live in the self-contained model file; the three
others live here, are registered with transformers' ``AttentionInterface`` when this module is
imported, and are selected through ``kernel_name`` (our registered names avoid transformers' own
"flash"/"flex_attention" names, whose checks would refuse a model that does not declare them).
Saved directories never depend on this module: ``config.json`` does not record the kernel, and the
model file alone runs ``sdpa`` and ``eager``.

The model gives these kernels no dense mask: they read the packed row's boundaries from the
``segment_ids`` keyword (0 padding, equal values one sequence) and ALiBi from ``alibi_slopes``
(float32), so neither the ``[batch, 1, L, L]`` mask nor the ``[batch, heads, L, L]`` bias is made.
When a cache holds past keys (decoding) the model builds the dense mask again and the kernels hand
the call to SDPA, said once in the log.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from typing import Callable

import torch
from transformers import AttentionInterface

from ..model.configuration_baichuan import ALIBI
from ..model.modeling_baichuan import sdpa_attention

logger = logging.getLogger("baichuan_finetune")

IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "xformers")
# Flag value -> the name registered with transformers (what config._attn_implementation holds).
KERNEL_NAMES = {
    "sdpa": "sdpa",
    "eager": "eager",
    "flex_attention": "baichuan_flex",
    "flash_attention_2": "baichuan_fa2_varlen",
    "xformers": "baichuan_xformers",
}


def kernel_name(implementation: str | None) -> str:
    """The ``attn_implementation`` to give ``from_pretrained`` for a flag value (None: sdpa)."""
    if implementation is None:
        return "sdpa"
    if implementation not in KERNEL_NAMES:
        raise ValueError(f"attn_implementation {implementation!r}: not one of {', '.join(IMPLEMENTATIONS)}")
    return KERNEL_NAMES[implementation]


def check_available(implementation: str, device: str, training: bool = True) -> None:
    """Raise ``ValueError`` (one line) when ``implementation`` cannot run on ``device`` ("cuda"/"cpu") here.

    Checked before any model is loaded: the name, the device it needs, then the package.
    """
    kernel_name(implementation)
    if implementation in ("sdpa", "eager"):
        return
    if implementation == "flex_attention":
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            raise ValueError(f"flex_attention needs torch >= 2.5 with FlexAttention (this is torch {torch.__version__})")
        if training and device != "cuda":
            raise ValueError("flex_attention trains only on a CUDA GPU (FlexAttention has no backward on CPU): "
                             "use --attn_implementation sdpa on CPU")
        return
    package, pip = {"flash_attention_2": ("flash_attn", "pip install flash-attn --no-build-isolation"),
                    "xformers": ("xformers", "pip install xformers")}[implementation]
    if device != "cuda":
        raise ValueError(f"{implementation} needs a CUDA GPU (running on {device}): use sdpa on CPU")
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"{implementation} needs the {package} package, which is not installed: {pip}")


def check_model(implementation: str, config) -> None:
    """Raise ``ValueError`` (one line) when ``implementation`` cannot compute this model's attention."""
    if implementation == "xformers" and getattr(config, "position_embedding", None) == ALIBI:
        raise ValueError("xformers has no ALiBi kernel for packed rows (13B): use flash_attention_2 or "
                         "flex_attention for ALiBi models")


# ----- shared pieces -----

_fallback_said: set[str] = set()


def _fallback(name: str, module, query, key, value, attention_mask, scaling, dropout):
    """SDPA with the model's dense mask, for calls these kernels do not cover (decoding with a cache)."""
    if name not in _fallback_said:
        _fallback_said.add(name)
        logger.info("%s: decoding with a key/value cache runs on sdpa (the kernel covers full sequences)", name)
    return sdpa_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout)


class _LastSegments:
    """What was derived from the last ``segment_ids`` tensor: every layer (and a checkpointed
    recomputation) gets the same tensor object in one forward, so it is derived once."""

    def __init__(self, build: Callable):
        self.build = build
        self.key: tuple | None = None
        self.segments: torch.Tensor | None = None
        self.value = None

    def get(self, segments: torch.Tensor | None, batch: int, length: int, device: torch.device):
        key = (batch, length, str(device))
        if self.key != key or self.segments is not segments:
            self.value = self.build(segments, batch, length, device)
            self.key, self.segments = key, segments
        return self.value


def sequence_lengths(segments: torch.Tensor | None, batch: int, length: int, device: torch.device):
    """Padding-free layout of a batch: (indices of the real tokens in the flattened ``[batch * length]``,
    int32 cumulative sequence lengths, longest sequence). A sequence is a run of equal non-zero ids."""
    if segments is None:
        indices = torch.arange(batch * length, device=device)
        cu = torch.arange(0, (batch + 1) * length, length, device=device, dtype=torch.int32)
        return indices, cu, length
    flat = segments.reshape(-1)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    indices = (flat != 0).nonzero().squeeze(1)
    first = starts.reshape(-1)[indices].nonzero().squeeze(1)
    cu = torch.cat([first, first.new_tensor([indices.numel()])]).to(torch.int32)
    return indices, cu, int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0


def _unpad(t: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, D]`` -> ``[tokens, H, D]`` (the real tokens only)."""
    b, h, l, d = t.shape
    return t.transpose(1, 2).reshape(b * l, h, d).index_select(0, indices)


def _pad(out: torch.Tensor, indices: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """``[tokens, H, D]`` -> ``[B, L, H, D]``; padding positions get zeros (no real token reads them)."""
    full = out.new_zeros(batch * length, *out.shape[1:]).index_copy(0, indices, out)
    return full.view(batch, length, *out.shape[1:])


# ----- FlexAttention: a block-sparse causal + document mask, ALiBi as a score modification -----

_compiled_flex = None


def _block_mask(segments: torch.Tensor | None, batch: int, length: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    if segments is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx

        return create_block_mask(mask_mod, None, None, length, length, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        same = (segments[b, q_idx] == segments[b, kv_idx]) & (segments[b, kv_idx] != 0)
        # A padding query sees itself only, as in the dense mask (softmax over nothing is NaN).
        return (same & (kv_idx <= q_idx)) | (q_idx == kv_idx)

    return create_block_mask(mask_mod, batch, None, length, length, device=device)


_flex_masks = _LastSegments(_block_mask)


def flex_attention_kernel(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                          segment_ids=None, alibi_slopes=None, **kwargs):
    """FlexAttention over ``[B, H, L, D]``: no dense mask or bias; compiled on CUDA, eager elsewhere."""
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        return _fallback("flex_attention", module, query, key, value, attention_mask, scaling, dropout)
    from torch.nn.attention.flex_attention import flex_attention

    batch, _, length, _ = query.shape
    block_mask = _flex_masks.get(segment_ids, batch, length, query.device)
    score_mod = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(device=query.device, dtype=torch.float32)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - q_idx)  # float32, as the official bias

    if query.is_cuda:
        global _compiled_flex
        if _compiled_flex is None:
            # torch.compile keeps one graph per shape (and turns dynamic after a second length).
            _compiled_flex = torch.compile(flex_attention)
        out = _compiled_flex(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling)
    else:
        # CPU: the eager (reference) path; torch 2.13's compiled CPU FlexAttention gave wrong outputs here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling)
    return out.transpose(1, 2), None


# ----- FlashAttention-2 varlen: padding-free, ALiBi through alibi_slopes -----

_varlen = _LastSegments(sequence_lengths)


def flash_varlen_kernel(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        segment_ids=None, alibi_slopes=None, **kwargs):
    """``flash_attn_varlen_func`` on the real tokens, one sequence per packed conversation."""
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        return _fallback("flash_attention_2", module, query, key, value, attention_mask, scaling, dropout)
    from flash_attn import flash_attn_varlen_func

    batch, _, length, _ = query.shape
    indices, cu, max_len = _varlen.get(segment_ids, batch, length, query.device)
    slopes = None if alibi_slopes is None else alibi_slopes.to(device=query.device, dtype=torch.float32)
    # flash-attn's causal ALiBi adds -slope * (i - j) = slope * (j - i), the official bias.
    out = flash_attn_varlen_func(_unpad(query, indices), _unpad(key, indices), _unpad(value, indices), cu, cu,
                                 max_len, max_len, dropout_p=dropout, softmax_scale=scaling, causal=True,
                                 alibi_slopes=slopes)
    return _pad(out, indices, batch, length), None


# ----- xFormers: memory-efficient attention with a block-diagonal causal mask (RoPE) -----


def xformers_kernel(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    segment_ids=None, alibi_slopes=None, **kwargs):
    """``memory_efficient_attention`` over the real tokens, block-diagonal causal by sequence."""
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        return _fallback("xformers", module, query, key, value, attention_mask, scaling, dropout)
    if alibi_slopes is not None:
        raise ValueError("xformers has no ALiBi kernel for packed rows (13B): use flash_attention_2 or "
                         "flex_attention for ALiBi models")
    from xformers.ops import fmha, memory_efficient_attention

    batch, _, length, _ = query.shape
    indices, cu, _ = _varlen.get(segment_ids, batch, length, query.device)
    bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens((cu[1:] - cu[:-1]).tolist())
    out = memory_efficient_attention(_unpad(query, indices)[None], _unpad(key, indices)[None],
                                     _unpad(value, indices)[None], attn_bias=bias, p=dropout, scale=scaling)
    return _pad(out[0], indices, batch, length), None


# The model builds no dense mask for these (see BaichuanModel.forward).
for _kernel in (flex_attention_kernel, flash_varlen_kernel, xformers_kernel):
    _kernel.takes_segment_ids = True
AttentionInterface.register(KERNEL_NAMES["flex_attention"], flex_attention_kernel)
AttentionInterface.register(KERNEL_NAMES["flash_attention_2"], flash_varlen_kernel)
AttentionInterface.register(KERNEL_NAMES["xformers"], xformers_kernel)
