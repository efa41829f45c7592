"""BIMT: brain-inspired modular training (Liu, Gan & Tegmark 2023) for wbscale models.

- :mod:`.geometry`: where neurons sit; which weights connect which groups; what a swap permutes.
- :mod:`.cost`: connection cost, its closed-form gradient, lambda schedule, modularity metrics.
- :mod:`.swaps`: function-preserving swap rounds decided in closed form (two GEMMs per map).
- :mod:`.callback`: all of it as a Lightning callback for ``wbscale fit`` (``bimt.enabled``).
- :mod:`.prune`, :mod:`.plots`, :mod:`.toy`: pruning, connectivity plots, the toy MLP path.

See docs/bimt.md.
"""

from __future__ import annotations

from wbscale.bimt.cost import add_cost_gradient, cost_value, lambda_at, modularity_metrics
from wbscale.bimt.geometry import Connection, Geometry, Group, PermTarget, lm_geometry
from wbscale.bimt.prune import count_above, prune_
from wbscale.bimt.swaps import SwapDecision, apply_permutation, decide_swaps, swap_round

__all__ = [
    "Connection",
    "Geometry",
    "Group",
    "PermTarget",
    "SwapDecision",
    "add_cost_gradient",
    "apply_permutation",
    "cost_value",
    "count_above",
    "decide_swaps",
    "lambda_at",
    "lm_geometry",
    "modularity_metrics",
    "prune_",
    "swap_round",
]
