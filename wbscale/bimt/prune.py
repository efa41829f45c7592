"""Pruning at the end of BIMT: weights of the cost's maps with |w| < threshold become 0."""

from __future__ import annotations

import torch
from torch import nn

from wbscale.bimt.geometry import Geometry, tensor


@torch.no_grad()
def prune_(model: nn.Module, geom: Geometry, threshold: float) -> dict[str, int]:
    """Zero every weight of the geometry's connections with |w| < ``threshold``, in place.

    Biases are left alone (BIMT prunes connections). Returns ``{"kept", "total"}``.
    """
    kept = total = 0
    for conn in geom.connections:
        w = tensor(model, conn.name)
        keep = w.abs() >= threshold
        w.mul_(keep.to(w.dtype))
        kept += int(keep.sum())
        total += w.numel()
    return {"kept": kept, "total": total}


@torch.no_grad()
def count_above(model: nn.Module, geom: Geometry, threshold: float) -> int:
    """Weights of the geometry's connections with |w| >= ``threshold`` (what pruning keeps)."""
    return sum(int((tensor(model, c.name).abs() >= threshold).sum()) for c in geom.connections)
