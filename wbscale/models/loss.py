"""The LM head and its loss, without the full logits.

``F.cross_entropy(lm_head(h).float(), y)`` keeps a (tokens, vocab) fp32 tensor alive for the
backward pass: 3.1 GiB for GPT-2's 50,257-token vocabulary at 16K tokens per micro-batch,
more than the whole 124M model with its AdamW state. :func:`linear_cross_entropy` computes
the same loss a chunk of tokens at a time and, when gradients are needed, the gradients of
the hidden states and of the head's weight in the same pass, so only one chunk of logits
exists at a time and the backward pass is a scale of what the forward pass stored (the
Liger-Kernel / Apple CCE approach, in plain PyTorch matmuls: the FLOPs are those of the
unfused head). The eager reference is :func:`linear_cross_entropy_reference`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -1) -> Tensor:
    """Mean next-token cross-entropy of (..., vocab) logits; ``ignore_index`` targets skipped.
    Upcast: a bf16 log-softmax over a 50K vocabulary loses ~3 digits of the loss."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=ignore_index)


def linear_cross_entropy_reference(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -1) -> Tensor:
    """:func:`cross_entropy` of the full logits ``hidden @ weight.T``."""
    return cross_entropy(F.linear(hidden, weight), targets, ignore_index)


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss (and, in the same pass, both gradients) of a linear head, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, ignore_index: int) -> Tensor:
        # matmuls in the dtype autocast would pick (the input's own outside autocast), by hand
        kind = hidden.device.type
        has_autocast = torch.amp.is_autocast_available(kind)  # not on meta
        compute = torch.get_autocast_dtype(kind) if has_autocast and torch.is_autocast_enabled(kind) else hidden.dtype
        with torch.autocast(kind, enabled=False) if has_autocast else contextlib.nullcontext():
            h = hidden.to(compute)
            w = weight.to(compute)
            valid = targets != ignore_index
            count = valid.sum()
            want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if want_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
            # 1 / count as a tensor: no host sync; 0 valid targets give nan, as F.cross_entropy does
            scale = 1.0 / count.to(torch.float32)
            for start in range(0, h.size(0), chunk):
                hc, yc, vc = h[start:start + chunk], targets[start:start + chunk], valid[start:start + chunk]
                logits = (hc @ w.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                safe = torch.where(vc, yc, torch.zeros_like(yc))
                picked = logits.gather(1, safe[:, None]).squeeze(1)
                total = total + torch.where(vc, lse - picked, torch.zeros_like(lse)).sum()
                if want_h or want_w:
                    # d loss / d logits = (softmax - onehot) / count on valid rows, 0 elsewhere
                    g = torch.exp(logits - lse[:, None])
                    g.scatter_add_(1, safe[:, None], -torch.ones_like(lse)[:, None])
                    g = (g * (vc.to(g.dtype) * scale)[:, None]).to(compute)
                    if want_h:
                        grad_h[start:start + chunk] = (g @ w).to(hidden.dtype)
                    if want_w:
                        grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(
            grad_h if want_h else torch.empty(0), grad_w if want_w else torch.empty(0)
        )
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, chunk_tokens: int, ignore_index: int = -1
) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` (hidden: (..., d), weight: (vocab, d),
    targets: (...)) computed ``chunk_tokens`` rows at a time; the logits of one chunk, in
    fp32, are the largest temporary. Gradients match :func:`linear_cross_entropy_reference`."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be > 0 (got {chunk_tokens})")
    h = hidden.reshape(-1, hidden.size(-1))
    return _LinearCrossEntropy.apply(h, weight, targets.reshape(-1), int(chunk_tokens), int(ignore_index))


class LMHead(nn.Linear):
    """The output projection, which can also return the loss without the full logits.

    ``head(h)`` is the logits; ``head(h, targets, chunk_tokens=n)`` the mean cross-entropy
    by :func:`linear_cross_entropy`. The loss goes through ``forward`` so that ZeRO-3 gathers
    the (tied) weight for it as it does for any module's forward."""

    def forward(self, hidden: Tensor, targets: Tensor | None = None, chunk_tokens: int = 0) -> Tensor:  # type: ignore[override]
        if targets is None:
            return super().forward(hidden)
        return linear_cross_entropy(hidden, self.weight, targets, chunk_tokens=chunk_tokens)
