"""ISTA kernels for CRATE (installed as ``wbscale.kernels``).

The model calls :func:`ista` and nothing else; ``kernel`` picks the implementation:

- ``eager``: the minimal-GEMM PyTorch reference (:mod:`.reference`);
- ``compile``: ``torch.compile`` of that reference;
- ``triton``: the fused Triton forward/backward (:mod:`.ista_triton`); on CPU tensors it needs
  ``TRITON_INTERPRET=1`` (slow, exact: how the tests check it without a GPU);
- ``auto``: triton on CUDA tensors, eager elsewhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import Tensor

from .modes import KERNELS, SAVE_MODES, normalize_save, resolve_kernel
from .reference import (
    ista_overcomplete_published,
    ista_overcomplete_reference,
    ista_square_published,
    ista_square_reference,
)

__all__ = [
    "KERNELS",
    "SAVE_MODES",
    "VARIANTS",
    "ista",
    "ista_overcomplete_published",
    "ista_overcomplete_reference",
    "ista_square_published",
    "ista_square_reference",
    "normalize_save",
    "resolve_kernel",
]

VARIANTS = ("overcomplete", "square")

_REFERENCES: dict[str, Callable] = {
    "overcomplete": ista_overcomplete_reference,
    "square": ista_square_reference,
}


@functools.cache
def _compiled(variant: str) -> Callable:
    import torch

    return torch.compile(_REFERENCES[variant], dynamic=False)


def ista(
    x: Tensor,
    weight: Tensor,
    *,
    variant: str = "overcomplete",
    eta: float = 0.1,
    lam: float = 0.1,
    kernel: str = "auto",
    return_code: bool = False,
    save_activations: bool | str = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Run one ISTA block; with ``return_code`` also return the sparse code z.

    ``save_activations`` (Triton only): what the forward keeps for backward, ``"all"``
    (or True), ``"x_u"`` or ``"x"`` (or False); see :mod:`.modes`. Eager autograd always
    keeps what it needs. The Triton path is a torch custom op: ``torch.compile`` of a model
    that calls this traces through it without a graph break.
    """
    if variant not in _REFERENCES:
        raise ValueError(f"unknown ISTA variant {variant!r}; choose one of {VARIANTS}")
    save = normalize_save(save_activations)
    impl = resolve_kernel(kernel, x.device.type)
    if impl == "triton":
        from . import ista_triton

        return ista_triton.ista_triton(
            x, weight, variant=variant, eta=eta, lam=lam, return_code=return_code,
            save_activations=save,
        )
    fn = _compiled(variant) if impl == "compile" else _REFERENCES[variant]
    return fn(x, weight, eta, lam, return_code)
