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
