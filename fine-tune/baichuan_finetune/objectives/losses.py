"""Losses computed inside the NormHead, never materialising the ``[tokens, vocab]`` logits.

A head loss is a callable ``(hidden [N, H], weight [V, H], labels [N]) -> loss``, passed to
``BaichuanForCausalLM.forward(..., labels=labels, head_loss=loss)``. The model calls it inside the
head's forward with the stored (unnormalised) head weight and the labels already shifted by one, so
under ZeRO-3 the weight is gathered while the loss reads it.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.modeling_baichuan import IGNORE_INDEX, supervised_rows


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
    Without z-loss only the supervised tokens go through the head (same loss and gradients).
    """

    z_loss_weight: float = 0.0
    chunk_size: int = 256

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scalar loss of ``hidden [N, H]`` against ``labels [N]`` under the head ``weight [V, H]``."""
        if not torch.is_grad_enabled():
            # Evaluation: a parameter that requires grad would still make the function fold gradients.
            hidden, weight = hidden.detach(), weight.detach()
        if self.z_loss_weight == 0:
            # Only supervised tokens reach the head: a prompt token's logits would only be ignored
            # (18% of the tokens on medicalgpt, about half on short multi-turn chat). The z-loss, when
            # on, averages over every token, so then all of them go through.
            hidden, labels = supervised_rows(hidden, labels)
        return NormHeadLoss.apply(hidden, weight, labels, self.z_loss_weight, self.chunk_size)


class NormHeadLogProbs(torch.autograd.Function):
    """Per-token ``log p(label_t)`` under ``hidden @ normalize(W).T`` (0 where the label is ignored),
    a chunk of tokens at a time: the ``[tokens, vocab]`` logits never exist.

    ``d logp_t / d h_t`` depends on token t alone, so it is made in forward (``[N, H]``, like the
    hidden states) and backward only scales it by the incoming per-token gradient; the weight is not
    needed again unless it is trained. Its gradient depends on the incoming gradient of every token,
    so backward remakes each chunk's logits (a float32 ``[V, H]`` accumulator, as ``NormHeadLoss``).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        inv_norm = 1.0 / torch.linalg.vector_norm(weight, dim=-1, dtype=torch.float32).clamp_min(1e-12)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        out = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
        dlogp_dh = torch.empty_like(hidden) if need_hidden else None
        for start in range(0, hidden.shape[0], chunk_size):
            h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
            logits = F.linear(h, weight).float() * inv_norm
            valid = y != IGNORE_INDEX
            log_probs = torch.log_softmax(logits, dim=-1)
            out[start : start + chunk_size] = log_probs.gather(1, y.clamp(min=0)[:, None])[:, 0] * valid
            if need_hidden:
                # d logp / d logits = onehot(y) - softmax, on valid rows only.
                grad = log_probs.exp_().mul_(-valid.float()[:, None])
                rows = torch.arange(h.shape[0], device=h.device)[valid]
                grad[rows, y[valid]] += 1.0
                dlogp_dh[start : start + chunk_size] = (grad * inv_norm).to(weight.dtype) @ weight
        ctx.dlogp_dh, ctx.chunk_size = dlogp_dh, chunk_size
        if need_weight:
            ctx.save_for_backward(hidden, weight, labels, inv_norm)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden = grad_weight = None
        if ctx.dlogp_dh is not None:
            grad_hidden = ctx.dlogp_dh * grad_output[:, None].to(ctx.dlogp_dh.dtype)
        ctx.dlogp_dh = None
        if ctx.needs_input_grad[1]:
            hidden, weight, labels, inv_norm = ctx.saved_tensors
            weighted_hidden = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            logit_coef = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                h, y = hidden[start : start + ctx.chunk_size], labels[start : start + ctx.chunk_size]
                g = grad_output[start : start + ctx.chunk_size].float() * (y != IGNORE_INDEX)
                logits = F.linear(h, weight).float() * inv_norm
                grad = torch.softmax(logits, dim=-1).mul_(-g[:, None])
                rows = torch.arange(h.shape[0], device=h.device)
                grad[rows, y.clamp(min=0)] += g
                weighted_hidden.addmm_(grad.T, h.float())
                logit_coef += (grad * logits).sum(dim=0)
            # Same rule as NormHeadLoss: s_v sum_t g_tv h_t - s_v^2 (sum_t g_tv logit_tv) W_v.
            grad_weight = weighted_hidden.mul_(inv_norm[:, None])
            grad_weight.addcmul_(weight.float(), (-(inv_norm**2) * logit_coef)[:, None])
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


@dataclass
class SequenceLogProbs:
    """Head loss of preference training: summed log-probabilities of each sequence's label tokens.

    Returns ``[num_sequences]`` float32 sums (the model's ``output.loss``) of ``log p(label)`` over
    the supervised (shifted) labels of each row, so that chosen and rejected answers are scored in
    one forward; with ``num_sequences=None`` the per-token values ``[N]`` (0 where ignored). Token
    counts are ``(labels[:, 1:] != IGNORE_INDEX).sum(-1)`` of the batch. Chunked like
    ``CausalLMLoss`` (see ``NormHeadLogProbs``); no z-loss.
    """

    num_sequences: int | None = None
    chunk_size: int = 256

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-sequence (or per-token) log-probs of ``labels [N]`` given ``hidden [N, H]`` and ``weight [V, H]``."""
        if not torch.is_grad_enabled():
            hidden, weight = hidden.detach(), weight.detach()
        token_logps = NormHeadLogProbs.apply(hidden, weight, labels, self.chunk_size)
        if self.num_sequences is None:
            return token_logps
        return token_logps.view(self.num_sequences, -1).sum(dim=-1)


def training_objective(z_loss_weight: float | None, model_config) -> CausalLMLoss:
    """The head loss a supervised run trains with: cross-entropy plus z-loss weighted by
    ``--z_loss_weight``, or when that is None by the base model config's ``z_loss_weight``.

    The one place that maps the training flags to a loss object: a new objective is a class above,
    a branch here and the flag that selects it in ``arguments.py``.
    """
    return CausalLMLoss(z_loss_weight=model_config.z_loss_weight if z_loss_weight is None else z_loss_weight)
