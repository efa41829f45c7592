"""The dispatch's choices (no Triton import): which kernel runs, what it keeps for backward,
whether the Triton interpreter was asked for.

Kernels: ``auto`` (triton on CUDA tensors, eager elsewhere), ``triton``, ``eager``, ``compile``.
Save modes:

    "all"  x and every code (1.0x eager's activations; the fastest backward)
    "x_u"  x and u (square: x and r); the backward recomputes the codes (+2 GEMMs, square +1)
    "x"    x only; the backward recomputes the whole forward (+3 GEMMs, square +2)

``True`` means "all" and ``False`` means "x": the old boolean ``save_activations``.
"""

from __future__ import annotations

import os

KERNELS = ("auto", "triton", "eager", "compile")
SAVE_MODES = ("all", "x_u", "x")


def interpreter_requested() -> bool:
    """``TRITON_INTERPRET=1`` now: Triton kernels decorated from here on run on CPU tensors.

    Triton reads it once, when a kernel is decorated (:data:`.common._INTERPRET` keeps that
    first answer); a check before the kernels are imported asks here.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_kernel(kernel: str, device_type: str) -> str:
    """Map ``auto`` to a concrete kernel for tensors on ``device_type``."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown ISTA kernel {kernel!r}; choose one of {KERNELS}")
    if kernel == "auto":
        return "triton" if device_type == "cuda" else "eager"
    return kernel


def normalize_save(save: bool | str) -> str:
    """``True`` / ``False`` (the old ``save_activations``) or a mode name -> a mode name."""
    if save is True:
        return "all"
    if save is False:
        return "x"
    if save not in SAVE_MODES:
        raise ValueError(
            f"ISTA save mode {save!r}: choose one of {', '.join(map(repr, SAVE_MODES))} "
            "(or true = 'all', false = 'x')"
        )
    return save
