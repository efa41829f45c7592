"""Eager PyTorch references for the ISTA blocks (docs/architecture.md, Kernels).

Row form: x is (..., d), the dictionary weight W is (m, d) for ``overcomplete`` and
(d, d) for ``square``. Two spellings of each block live here:

- ``*_reference``: the minimal-GEMM form the Triton kernels implement (overcomplete:
  4 GEMMs, square: 2 GEMMs). This is the eager fallback the model runs on CPU.
- ``*_published``: the spelling of the published CRATE / CRATE-LM code (5 and 3 GEMMs),
  kept only to pin that the two are the same function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ista_overcomplete_reference(
    x: Tensor, weight: Tensor, eta: float, lam: float, return_code: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Two ISTA steps from z = 0 with an over-complete dictionary D = W^T; returns D z2.

    z1 = relu(eta x W^T - eta lam);  z2 = relu(z1 + eta (x - z1 W) W^T - eta lam);  y = z2 W
    """
    z1 = F.relu(eta * (x @ weight.t()) - eta * lam)
    u = x - z1 @ weight
    z2 = F.relu(z1 + eta * (u @ weight.t()) - eta * lam)
    y = z2 @ weight
    return (y, z2) if return_code else y


def ista_square_reference(
    x: Tensor, weight: Tensor, eta: float, lam: float, return_code: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """One ISTA step from z = x with a square dictionary (the original CRATE block).

    out = relu(x + eta (x - x W^T) W - eta lam); the output is itself the sparse code.
    """
    r = x - x @ weight.t()
    out = F.relu(x + eta * (r @ weight) - eta * lam)
    return (out, out) if return_code else out


def ista_overcomplete_published(x: Tensor, weight: Tensor, eta: float, lam: float) -> Tensor:
    """The CRATE-LM spelling: 5 GEMMs, x W^T computed twice."""
    negative_lasso_grad = torch.einsum("md,...d->...m", weight, x)
    z1 = F.relu(eta * negative_lasso_grad - eta * lam)
    dz1 = torch.einsum("md,...m->...d", weight, z1)
    lasso_grad = torch.einsum("md,...d->...m", weight, dz1) - torch.einsum("md,...d->...m", weight, x)
    z2 = F.relu(z1 - eta * lasso_grad - eta * lam)
    return torch.einsum("md,...m->...d", weight, z2)


def ista_square_published(x: Tensor, weight: Tensor, eta: float, lam: float) -> Tensor:
    """The original CRATE spelling: 3 GEMMs (D x, D^T D x, D^T x)."""
    x1 = F.linear(x, weight, bias=None)
    grad_1 = F.linear(x1, weight.t(), bias=None)
    grad_2 = F.linear(x, weight.t(), bias=None)
    grad_update = eta * (grad_2 - grad_1) - eta * lam
    return F.relu(x + grad_update)


# ---------------------------------------------------------------------------- the general block
#
# The CRATE block options (docs/architecture.md, "CRATE block options"): K steps, a separate
# decoder, a per-atom lambda, a learned step size. The two references above are its special
# cases and stay the functions the published configuration runs.

PUBLISHED_STEPS = {"overcomplete": 2, "square": 1}


def published_steps(variant: str) -> int:
    """ISTA iterations of the published block: overcomplete 2 (CRATE-LM), square 1 (CRATE)."""
    return PUBLISHED_STEPS[variant]


def _as_scalar(eta: float | Tensor) -> float | Tensor:
    """A tensor step size as a 0-dim tensor: it then multiplies a bf16 activation like a Python
    float does (no promotion to fp32)."""
    return eta.reshape(()) if isinstance(eta, Tensor) else eta


def _threshold(eta: float | Tensor, lam: float | Tensor, like: Tensor) -> float | Tensor:
    """eta * lam, in ``like``'s dtype when it is a tensor (a per-atom lambda: (m,))."""
    thr = eta * lam
    if isinstance(thr, Tensor):
        thr = thr.to(like.dtype)
        return thr.reshape(()) if thr.numel() == 1 else thr
    return thr


def ista_general_reference(
    x: Tensor,
    weight: Tensor,
    eta: float | Tensor,
    lam: float | Tensor,
    return_code: bool = False,
    *,
    steps: int | None = None,
    decoder: Tensor | None = None,
    variant: str = "overcomplete",
    masks: list[Tensor] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """K ISTA steps, optionally with a separate decoder, a per-atom lambda, a tensor step size.

    overcomplete (W: m x d, from z0 = 0), with W_out = ``decoder`` (m x d) or W when tied:

        z1 = relu(eta x W^T - eta lam)
        z_k+1 = relu(z_k + eta (x - z_k W) W^T - eta lam)         k = 1 .. K-1
        y = z_K W_out

    square (W: d x d, from z0 = x, no decoder: the output is the code):

        z_k+1 = relu(z_k + eta (x - z_k W^T) W - eta lam)         k = 0 .. K-1;  y = z_K

    ``eta``: a float or a one-element tensor; ``lam``: a float, a one-element tensor or a
    per-atom (m,) tensor. ``steps``: K (None: :func:`published_steps`). The code returned is
    the last one, z_K. With K = 2 (overcomplete) / 1 (square), tied and float eta, lam this
    performs exactly the operations of ``ista_overcomplete_reference`` /
    ``ista_square_reference`` (the same bits). ``masks`` (tests): K tensors shaped like the
    codes that replace each ReLU by a fixed 0/1 pattern, z_k = p_k * mask_k (the gradient on
    a given active set).
    """
    if variant not in PUBLISHED_STEPS:
        raise ValueError(f"unknown ISTA variant {variant!r}; choose one of {tuple(PUBLISHED_STEPS)}")
    k_steps = published_steps(variant) if steps is None else int(steps)
    if k_steps < 1:
        raise ValueError(f"ISTA needs at least one step, got steps={steps}")
    square = variant == "square"
    if square and decoder is not None:
        raise ValueError("ISTA square: the output is the code itself, there is no decoder")
    eta = _as_scalar(eta)

    def act(p: Tensor, k: int) -> Tensor:
        return F.relu(p) if masks is None else p * masks[k]

    def encode(u: Tensor) -> Tensor:  # u D: the correlation of u with every atom
        return u @ weight if square else u @ weight.t()

    def decode(z: Tensor) -> Tensor:  # z D^T: the reconstruction from the code
        return z @ weight.t() if square else z @ weight

    if square:
        z = x
        for k in range(k_steps):
            u = x - decode(z)
            a = encode(u)
            z = act(z + eta * a - _threshold(eta, lam, a), k)
        return (z, z) if return_code else z
    a = encode(x)
    z = act(eta * a - _threshold(eta, lam, a), 0)
    for k in range(1, k_steps):
        u = x - decode(z)
        a = encode(u)
        z = act(z + eta * a - _threshold(eta, lam, a), k)
    y = z @ (weight if decoder is None else decoder)
    return (y, z) if return_code else y
