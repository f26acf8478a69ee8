"""Per-position scores over a vocabulary-sized softmax, a few hundred positions at a time, in float32.

The log-prob of each chosen token (with its gradient), the entropy and the log-prob under the engine's top-k / top-p
filter, computed chunk by chunk from logits of any dtype: no float32 copy of the whole (rows, columns, vocabulary)
tensor is ever made, kept for backward, or returned as a temporary (with a 128k vocabulary one such copy is 8.4 GB at
32 x 512 tokens; TRL's ``selective_log_softmax`` has the same aim). The entropy comes out of the same pass as the
log-probs, and the backward works in place on one float32 chunk.
"""

from __future__ import annotations

import torch

from trl_stepwise.engines.base import filter_logits

FILTERED_LOGP_FLOOR = -100.0  # a token outside the trainer's top-k / top-p set: finite, so differences stay finite
CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MB in float32


def selective_log_softmax(logits: torch.Tensor, targets: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``log_softmax(scale * logits)`` at ``targets`` (float32, with gradient): the same numbers and gradients as
    ``(scale * logits.float()).log_softmax(-1).gather(...)``."""
    return _SelectiveLogSoftmax.apply(logits, targets, scale, False)[0]


def log_softmax_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``selective_log_softmax`` and the entropy of ``softmax(scale * logits)`` per position (no gradient), from one
    pass over the logits instead of two."""
    return _SelectiveLogSoftmax.apply(logits, targets, scale, True)


@torch.no_grad()
def filtered_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, scale: float, top_k: int, top_p: float
) -> torch.Tensor:
    """Log-probs of ``targets`` under the top-k / top-p truncated, renormalised tempered softmax (no gradient)."""
    flat, flat_targets = _flat(logits), targets.reshape(-1)
    out = torch.empty(flat_targets.shape, dtype=torch.float32, device=logits.device)
    for part in _chunks(flat):
        filtered = filter_logits(flat[part].float() * scale, top_k, top_p)
        out[part] = filtered.log_softmax(-1).gather(-1, flat_targets[part, None]).squeeze(-1)
    return out.view(targets.shape).clamp(min=FILTERED_LOGP_FLOOR)


def _flat(logits: torch.Tensor) -> torch.Tensor:
    """(positions, vocabulary): a view of contiguous logits, so chunks cut across rows."""
    return logits.reshape(-1, logits.shape[-1])


def _scaled(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * logits`` as a new float32 tensor (a copy even of float32 logits: the caller works on it in place)."""
    return logits.to(torch.float32, copy=True).mul_(scale)


def _chunks(flat: torch.Tensor) -> list[slice]:
    """Slices of about ``CHUNK_ELEMENTS`` logits (whole positions), views with no copy."""
    positions, vocab = flat.shape
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return [slice(start, start + step) for start in range(0, positions, step)]


class _SelectiveLogSoftmax(torch.autograd.Function):
    """Forward and backward chunk by chunk; only the (already alive) logits and one float per position are saved."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, scale: float, with_entropy: bool):
        flat, flat_targets = _flat(logits), targets.reshape(-1)
        lse = torch.empty(flat_targets.shape, dtype=torch.float32, device=logits.device)
        picked = torch.empty_like(lse)
        entropy = torch.empty_like(lse) if with_entropy else None
        for part in _chunks(flat):
            chunk = _scaled(flat[part], scale)
            lse[part] = torch.logsumexp(chunk, dim=-1)
            picked[part] = chunk.gather(-1, flat_targets[part, None]).squeeze(-1)
            if entropy is not None:  # -sum p log p, with log p = x - logsumexp(x)
                log_p = chunk.sub_(lse[part, None])
                entropy[part] = -log_p.exp().mul_(log_p).sum(-1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.scale = scale
        logps = (picked - lse).view(targets.shape)
        if entropy is None:
            return logps, None
        entropy = entropy.view(targets.shape)
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps: torch.Tensor, grad_entropy: torch.Tensor | None):
        logits, targets, lse = ctx.saved_tensors
        scale = ctx.scale
        flat, flat_targets = _flat(logits), targets.reshape(-1)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        flat_grad, flat_g = _flat(grad), grad_logps.reshape(-1).float() * scale
        for part in _chunks(flat):
            g = flat_g[part, None]
            # d/dx [s * x_t - logsumexp(s * x)] = s * (onehot_t - softmax(s * x)), in place on one float32 chunk
            chunk = _scaled(flat[part], scale).sub_(lse[part, None]).exp_().mul_(-g)
            chunk.scatter_add_(-1, flat_targets[part, None], g)
            flat_grad[part] = chunk
        return grad, None, None, None
