"""Dispatch of the general ISTA block: the CRATE block options (docs/architecture.md).

:func:`ista_general` runs K ISTA steps with an optional separate decoder, a per-atom
lambda and a tensor (learnable) step size; the math is
:func:`wbscale.kernels.reference.ista_general_reference`. The model calls it only when an
option changes the block's function; the published block keeps :func:`wbscale.kernels.ista`.

``kernel`` as in :func:`wbscale.kernels.ista`: ``eager`` (the reference), ``compile``
(``torch.compile`` of it), ``triton`` (:mod:`.ista_general`: fused Triton GEMMs forward and
backward; CPU tensors need ``TRITON_INTERPRET=1``), ``auto`` (triton on CUDA, eager elsewhere).
No Triton import here: an eager-only install never needs it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import Tensor

from .modes import resolve_kernel
from .reference import ista_general_reference, published_steps

__all__ = ["ista_general", "published_steps"]


@functools.cache
def _compiled() -> Callable:
    import torch

    return torch.compile(ista_general_reference, dynamic=False)


def ista_general(
    x: Tensor,
    weight: Tensor,
    *,
    variant: str = "overcomplete",
    steps: int | None = None,
    decoder: Tensor | None = None,
    eta: float | Tensor = 0.1,
    lam: float | Tensor = 0.1,
    kernel: str = "auto",
    return_code: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """One general ISTA block on x (..., d); with ``return_code`` also the last code z_K.

    ``weight`` (m, d) (square: (d, d)); ``decoder`` (m, d) or None (tied); ``eta`` a float or
    a one-element tensor (> 0); ``lam`` a float, a one-element tensor or an (m,) tensor.
    Gradients reach ``x``, ``weight``, ``decoder`` and tensor ``eta`` / ``lam``.
    """
    impl = resolve_kernel(kernel, x.device.type)
    if impl == "triton":
        from . import ista_general as triton_general

        return triton_general.ista_general_triton(
            x, weight, variant=variant, steps=steps, decoder=decoder, eta=eta, lam=lam,
            return_code=return_code,
        )  # fmt: skip
    fn = _compiled() if impl == "compile" else ista_general_reference
    return fn(x, weight, eta, lam, return_code, steps=steps, decoder=decoder, variant=variant)
