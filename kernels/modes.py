"""What the ISTA kernels keep for backward (no Triton import: the dispatch validates with it).

    "all"  x and every code (1.0x eager's activations; the fastest backward)
    "x_u"  x and u (square: x and r); the backward recomputes the codes (+2 GEMMs, square +1)
    "x"    x only; the backward recomputes the whole forward (+3 GEMMs, square +2)

``True`` means "all" and ``False`` means "x": the old boolean ``save_activations``.
"""

from __future__ import annotations

SAVE_MODES = ("all", "x_u", "x")


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
