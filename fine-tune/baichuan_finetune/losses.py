"""Losses computed inside the NormHead, never materialising the ``[tokens, vocab]`` logits.

A head loss is a callable ``(hidden [N, H], weight [V, H], labels [N]) -> loss``, passed to
``BaichuanForCausalLM.forward(..., labels=labels, head_loss=loss)``. The model calls it inside the
head's forward with the stored (unnormalised) head weight and the labels already shifted by one, so
under ZeRO-3 the weight is gathered while the loss reads it.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .modeling_baichuan import IGNORE_INDEX


class NormHeadLoss(torch.autograd.Function):
    """Cross-entropy (+ z-loss) of ``hidden @ normalize(W).T``, a chunk of tokens at a time.

    The full ``[tokens, vocab]`` logits never exist: each chunk's float32 logits are made, turned
    into their gradient at once, and folded into the gradients of ``hidden`` and ``W`` (the latter
    accumulated in place), then freed. Nothing of the weight is kept for backward, which only
    scales the stored gradients, so ZeRO-3 need not gather the head weight again.
    With ``s_v = 1/|W_v|`` and ``logit_tv = s_v (h_t . W_v)``, the weight gradient is
    ``s_v sum_t g_tv h_t - s_v^2 (sum_t g_tv logit_tv) W_v``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, z_loss_weight, chunk_size):
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        n_supervised = (labels != IGNORE_INDEX).sum().clamp(min=1).float()
        inv_norm = 1.0 / torch.linalg.vector_norm(weight, dim=-1, dtype=torch.float32).clamp_min(1e-12)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        weighted_hidden = hidden.new_zeros(weight.shape, dtype=torch.float32) if need_weight else None
        logit_coef = hidden.new_zeros(vocab, dtype=torch.float32) if need_weight else None
        ce_sum = hidden.new_zeros((), dtype=torch.float32)
        z_sum = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, n_tokens, chunk_size):
            h = hidden[start : start + chunk_size]
            y = labels[start : start + chunk_size]
            logits = F.linear(h, weight).float() * inv_norm
            ce_sum += F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
            if not (need_hidden or need_weight) and z_loss_weight == 0:
                continue
            rows = torch.arange(h.shape[0], device=h.device)
            if z_loss_weight > 0:
                max_logit, argmax = logits.max(dim=-1)
                z_sum += max_logit.pow(2).sum()
            if not (need_hidden or need_weight):
                continue
            # d(mean CE)/d logits = (softmax - onehot) / n_supervised on supervised rows.
            valid = y != IGNORE_INDEX
            grad = torch.softmax(logits, dim=-1).mul_((valid.float() / n_supervised)[:, None])
            grad[rows[valid], y[valid]] -= 1.0 / n_supervised
            if z_loss_weight > 0:
                grad[rows, argmax] += z_loss_weight * 2.0 * max_logit / n_tokens
            if need_weight:
                weighted_hidden.addmm_(grad.T, h.float())
                logit_coef += (grad * logits).sum(dim=0)
            if need_hidden:
                grad_hidden[start : start + chunk_size] = (grad * inv_norm).to(weight.dtype) @ weight
        grad_weight = None
        if need_weight:
            grad_weight = weighted_hidden.mul_(inv_norm[:, None])
            grad_weight.addcmul_(weight.float(), (-(inv_norm**2) * logit_coef)[:, None])
            grad_weight = grad_weight.to(weight.dtype)
        ctx.grads = (grad_hidden, grad_weight)
        # An all-masked batch gives 0, not 0/0 = NaN.
        return ce_sum / n_supervised + z_loss_weight * z_sum / max(n_tokens, 1)

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_output)
        return grad_hidden, grad_weight, None, None, None


@dataclass
class CausalLMLoss:
    """The supervised objective: mean cross-entropy over supervised tokens, plus z-loss.

    ``loss = sum CE(supervised) / n_supervised + z_loss_weight * mean_t(max_v logit_tv ** 2)``
    with ``logits = hidden @ normalize(weight).T`` in float32; an all-masked batch gives 0. The
    gradients are folded in during forward, ``chunk_size`` tokens at a time (see ``NormHeadLoss``).
    """

    z_loss_weight: float = 0.0
    chunk_size: int = 256

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scalar loss of ``hidden [N, H]`` against ``labels [N]`` under the head ``weight [V, H]``."""
        if not torch.is_grad_enabled():
            # Evaluation: a parameter that requires grad would still make the function fold gradients.
            hidden, weight = hidden.detach(), weight.detach()
        return NormHeadLoss.apply(hidden, weight, labels, self.z_loss_weight, self.chunk_size)
