"""The connection cost, its closed-form gradient, the lambda schedule, modularity metrics.

Cost of a geometry (docs/architecture.md, BIMT; the published code's ``get_cc``):

    cost = s * sum_conn sum_ij |w_ij| (A |x_i - x_j| + l0)   [+ s * l0 * sum |b| with bias_penalty]

with s = 1 (``sum``) or 1 / (number of weights in the cost) (``mean``). Its gradient is
``s * sign(w) * (A |x_i - x_j| + l0)``: :func:`add_cost_gradient` adds ``lam`` times it to
``.grad`` directly (one fused multiply-add per weight, distance matrices shared by layers),
so neither the model nor the loss changes. :func:`cost_value` is the same cost as a
differentiable tensor, which the tests use to check the closed form against autograd.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor, nn

from wbscale.bimt.geometry import Geometry, tensor


def lambda_at(phases: list[Any], step: int, max_steps: int) -> float:
    """The ``lam`` of the last phase whose ``start`` (fraction of ``max_steps``) is <= ``step``;
    0 before the first phase. The published examples use [0: 1e-3, 1/4: 1e-2, 3/4: 1e-3]."""
    lam = 0.0
    for phase in phases:
        if step >= int(round(phase.start * max_steps)):
            lam = phase.lam
    return lam


@torch.no_grad()
def add_cost_gradient(model: nn.Module, geom: Geometry, lam: float) -> None:
    """``p.grad += lam * d(cost)/dp`` for every weight in the cost (and biases if penalised).

    Parameters without a gradient (frozen, or no backward yet) are skipped.
    """
    if lam == 0.0:
        return
    coef = lam * geom.scale(model)
    for conn in geom.connections:
        w = tensor(model, conn.name)
        if w.grad is None:
            continue
        factors = geom.factors(conn, w.device, w.grad.dtype)
        w.grad.addcmul_(w.sign().to(w.grad.dtype), factors, value=coef)
        if geom.bias_penalty and conn.bias is not None:
            b = tensor(model, conn.bias)
            if b.grad is not None:
                b.grad.add_(b.sign().to(b.grad.dtype), alpha=coef * geom.layer_distance)


def cost_gradient(model: nn.Module, geom: Geometry, name: str, lam: float = 1.0) -> Tensor | None:
    """``lam * d(cost)/d(name)`` for one weight (DeepSpeed's gradient hooks use it); None if
    ``name`` is not in the cost."""
    coef = lam * geom.scale(model)
    for conn in geom.connections:
        if conn.name == name:
            w = tensor(model, name)
            return w.detach().sign() * geom.factors(conn, w.device, w.dtype) * coef
        if geom.bias_penalty and conn.bias == name:
            b = tensor(model, name)
            return b.detach().sign() * (coef * geom.layer_distance)
    return None


def cost_value(model: nn.Module, geom: Geometry) -> Tensor:
    """The cost as a differentiable scalar (reference for :func:`add_cost_gradient`)."""
    total = None
    for conn in geom.connections:
        w = tensor(model, conn.name)
        term = (w.abs() * geom.factors(conn, w.device, w.dtype)).sum()
        if geom.bias_penalty and conn.bias is not None:
            term = term + tensor(model, conn.bias).abs().sum() * geom.layer_distance
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total * geom.scale(model)


@torch.no_grad()
def modularity_metrics(
    model: nn.Module, geom: Geometry, threshold: float, radius: float, prefix: str = "bimt/"
) -> dict[str, float]:
    """Connection cost (total and per layer), the fraction of |w| on connections no longer
    than ``radius``, and the number of weights with |w| > ``threshold`` (total and per layer).

    Per-layer costs are not scaled by the ``mean`` reduction: they add up to the sum cost.
    """
    cost: dict[str, float] = defaultdict(float)
    above: dict[str, int] = defaultdict(int)
    mass = near = 0.0
    total_weights = 0
    for conn in geom.connections:
        w = tensor(model, conn.name).detach()
        a = w.abs().float()
        key = f"layer{conn.layer}" if conn.layer is not None else "embeddings"
        cost[key] += float((a * geom.factors(conn, w.device, torch.float32)).sum())
        dist = geom.distances(conn, w.device, torch.float32)
        mass += float(a.sum())
        near += float(a[dist <= radius].sum())
        above[key] += int((a > threshold).sum())
        total_weights += w.numel()
    scale = geom.scale(model)
    metrics = {f"{prefix}connection_cost": scale * sum(cost.values())}
    metrics.update({f"{prefix}connection_cost/{k}": v for k, v in sorted(cost.items())})
    metrics[f"{prefix}mass_within_radius"] = near / mass if mass > 0 else 0.0
    metrics[f"{prefix}connections_above_threshold"] = float(sum(above.values()))
    metrics.update({f"{prefix}connections_above_threshold/{k}": float(v) for k, v in sorted(above.items())})
    metrics[f"{prefix}connections_total"] = float(total_weights)
    return metrics
