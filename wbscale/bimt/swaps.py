"""Function-preserving neuron swaps that shorten the wiring, decided in closed form.

For the units of one group (slots fixed, units movable), the cost of unit ``u`` placed at
slot ``v`` is, summed over the unit's neurons ``r`` and every connection touching the group,

    C[u, v] = sum_r ( sum_c |W[u_r, c]| F[v_r, c]  +  sum_k |W[k, u_r]| F[k, v_r] )

with F = A |x - y| + l0 the connection's factor matrix: per connection, two GEMMs with the
(fan x size) factor matrix (docs/architecture.md, BIMT). Swapping units i and j changes the cost by

    delta(i, j) = C[i, pos_j] + C[j, pos_i] - C[i, pos_i] - C[j, pos_j]

(the l0 parts cancel). A round (:func:`decide_swaps`) takes the ``top_k`` units by incident
weight mass, heaviest first, and for each the partner with the most negative delta among
ALL units of the group (no swap when none is negative, so the cost never rises). Only
C[top_k, :], C[:, slots of top_k] and diag C are needed: O(top_k * size * fan) work, not the
published code's full-network cost per candidate.

:func:`apply_permutation` permutes every target tensor of the group, AND the optimizer's
per-parameter state (AdamW ``exp_avg``/``exp_avg_sq``) and gradients, so the next optimizer
step is the one the unswapped network would have taken, permuted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from wbscale.bimt.geometry import Connection, Geometry, Group, tensor
from wbscale.dist import optimizer_moments


@dataclass
class SwapDecision:
    """One group's round: ``perm[q]`` = the unit (before the round) now at slot ``q``."""

    group: str
    perm: Tensor
    accepted: int = 0
    delta: float = 0.0  # predicted change of the cost (unscaled sum form), <= 0
    swaps: list[tuple[int, int, float]] = field(default_factory=list)  # (slot a, slot b, delta)

    @property
    def is_identity(self) -> bool:
        return self.accepted == 0


# ---------------------------------------------------------------------------- closed form


def _work_dtype(w: Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _abs_folded(w: Tensor, side: str, size: int, conn: Connection, dtype: torch.dtype) -> Tensor:
    """|W| summed over the tiles of the group's side: (size, fan) for rows, (fan, size) for cols."""
    a = w.detach().to(dtype).abs()
    if side == "rows":
        return a.view(conn.row_tile, size, a.shape[1]).sum(0) if conn.row_tile > 1 else a
    return a.view(a.shape[0], conn.col_tile, size).sum(1) if conn.col_tile > 1 else a


def unit_scores(model: nn.Module, geom: Geometry, group: str) -> Tensor:
    """Incident weight mass per unit: sum of |w| over every connection touching the group."""
    g = geom.groups[group]
    score = None
    for conn, side in geom.incident(group):
        w = tensor(model, conn.name)
        dtype = _work_dtype(w)
        if side in ("rows", "both"):
            s = _abs_folded(w, "rows", g.size, conn, dtype).sum(1)
            score = s if score is None else score + s
        if side in ("cols", "both"):
            s = _abs_folded(w, "cols", g.size, conn, dtype).sum(0)
            score = s if score is None else score + s
    if score is None:
        return torch.zeros(g.units)
    return score.view(g.units, g.block).sum(1)


def unit_costs(model: nn.Module, geom: Geometry, group: str, units: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form slot costs of the group's units.

    Returns ``rows`` (k, U): C[units[t], v]; ``cols`` (U, k): C[u, units[t]] (the slots of
    ``units`` in the current order); ``diag`` (U,): C[u, u].
    """
    g = geom.groups[group]
    n, b, U = g.size, g.block, g.units
    k = units.numel()
    rows = cols = diag = None
    # a connection inside the group counts from both ends, the other end held at its slot
    # (the pair correction of decide_swaps makes a single swap exact)
    sides = [(conn, s) for conn, side in geom.incident(group) for s in (("rows", "cols") if side == "both" else (side,))]
    for conn, side in sides:
        w = tensor(model, conn.name)
        dtype = _work_dtype(w)
        f = geom.factors(conn, w.device, dtype)
        u = units.to(w.device)
        # neuron positions of the chosen units: unit t covers slots t*b .. t*b + b-1
        p = (u[:, None] * b + torch.arange(b, device=w.device)).reshape(-1)
        a = _abs_folded(w, side, n, conn, dtype)
        if side == "rows":
            fr = f[:n]  # (n, fan): F[q, c] for the group's position q (tiles repeat positions)
            r = a[p] @ fr.T  # (k*b, n)
            c = a @ fr[p].T  # (n, k*b)
            d = (a * fr).sum(1)  # (n,)
        else:
            fc = f[:, :n]  # (fan, n)
            r = a[:, p].T @ fc
            c = a.T @ fc[:, p]
            d = (a * fc).sum(0)
        rows = r if rows is None else rows + r
        cols = c if cols is None else cols + c
        diag = d if diag is None else diag + d
    if rows is None:
        z = torch.zeros(())
        return z.expand(k, U), z.expand(U, k), z.expand(U)
    if b > 1:
        # a unit moved from slot u to v carries neuron r from u*b + r to v*b + r
        rows = torch.diagonal(rows.view(k, b, U, b), dim1=1, dim2=3).sum(-1)
        cols = torch.diagonal(cols.view(U, b, k, b), dim1=1, dim2=3).sum(-1)
        diag = diag.view(U, b).sum(1)
    return rows, cols, diag


def exact_group_cost(model: nn.Module, geom: Geometry, group: str, perm: Tensor | None = None) -> float:
    """Unscaled cost of every connection touching ``group``, optionally after ``perm``
    (computed by permuting copies: the reference for the closed form)."""
    g = geom.groups[group]
    total = 0.0
    for conn, side in geom.incident(group):
        w = tensor(model, conn.name).detach()
        w = w.to(_work_dtype(w))
        if perm is not None:
            if side in ("rows", "both"):
                w = w.index_select(0, neuron_index(perm.to(w.device), g, conn.row_tile))
            if side in ("cols", "both"):
                w = w.index_select(1, neuron_index(perm.to(w.device), g, conn.col_tile))
        total += float((w.abs() * geom.factors(conn, w.device, w.dtype)).sum())
    return total


def decide_swaps(model: nn.Module, geom: Geometry, group: str, top_k: int) -> SwapDecision:
    """One greedy swap round for ``group`` (nothing is changed; see :func:`apply_permutation`).

    A group with connections inside itself (CRATE's square dictionary moves with the
    residual stream at both ends) takes one swap per round, the best of all candidates:
    its other units' costs depend on where the swapped pair went, so only the first swap of
    a round is exact.
    """
    g = geom.groups[group]
    U = g.units
    identity = torch.arange(U)
    incident = geom.incident(group)
    if U < 2 or not incident or top_k < 1:
        return SwapDecision(group, identity)
    score = unit_scores(model, geom, group)
    k = min(top_k, U)
    top = torch.topk(score, k).indices  # heaviest first, ties by index
    rows, cols, diag = unit_costs(model, geom, group, top)
    rows, cols, diag = rows.double().cpu(), cols.double().cpu(), diag.double().cpu()
    top = top.cpu()
    # float32 GEMMs: a swap must beat the rounding error of the costs it compares
    rel = 1e-12 if _group_dtype(model, geom, group) == torch.float64 else 1e-5
    decision = SwapDecision(group, identity)
    if any(side == "both" for _, side in incident):
        return _best_single_swap(model, geom, group, top, rows, cols, diag, rel)

    pos = identity.clone()  # pos[u]: slot of unit u
    col_of_slot = torch.full((U,), -1, dtype=torch.long)
    col_of_slot[top] = torch.arange(k)  # unprocessed top-k units always sit in these slots
    cur = diag.clone()  # cur[u] = C[u, pos[u]]
    for t in range(k):
        i = int(top[t])
        slot_i = int(pos[i])
        ci = int(col_of_slot[slot_i])
        delta = rows[t, pos] + cols[:, ci] - cur[i] - cur
        delta[i] = 0.0
        j = int(torch.argmin(delta))
        best = float(delta[j])
        if best < -rel * (abs(float(cur[i])) + abs(float(cur[j])) + 1e-30):
            cur_i, cur_j = float(rows[t, pos[j]]), float(cols[j, ci])
            slot_j = int(pos[j])
            pos[i], pos[j] = slot_j, slot_i
            cur[i], cur[j] = cur_i, cur_j
            decision.accepted += 1
            decision.delta += best
            decision.swaps.append((slot_i, slot_j, best))
    perm = torch.empty(U, dtype=torch.long)
    perm[pos] = identity
    decision.perm = perm
    return decision


def _best_single_swap(model: nn.Module, geom: Geometry, group: str, top: Tensor, rows: Tensor,
                      cols: Tensor, diag: Tensor, rel: float) -> SwapDecision:
    """The best single swap of a group with internal connections (exact closed form)."""
    g = geom.groups[group]
    U = g.units
    delta = rows + cols.T - diag[top][:, None] - diag[None, :]  # (k, U): swap top[t] <-> u
    x = g.coordinates(dtype=torch.float64)
    for conn, side in geom.incident(group):
        if side != "both":
            continue
        if g.block != 1 or conn.row_tile != 1 or conn.col_tile != 1:
            raise NotImplementedError("internal connections of blocked or tiled groups")
        # Holding the other end fixed counts the four entries between i and j as moving; they
        # do not (|x_i - x_j| stays, the diagonal stays at 0): take that back.
        a = tensor(model, conn.name).detach().double().abs().cpu()
        d = (x[top][:, None] - x[None, :]).abs()
        mix = a.diagonal()[top][:, None] + a.diagonal()[None, :] - a[top] - a[:, top].T
        delta -= 2.0 * geom.locality * d * mix
    delta[torch.arange(top.numel()), top] = 0.0
    t, j = divmod(int(torch.argmin(delta)), U)
    best, i = float(delta[t, j]), int(top[t])
    if not best < -rel * (abs(float(diag[i])) + abs(float(diag[j])) + 1e-30):
        return SwapDecision(group, torch.arange(U))
    perm = torch.arange(U)
    perm[i], perm[j] = j, i
    return SwapDecision(group, perm, accepted=1, delta=best, swaps=[(i, j, best)])


def _group_dtype(model: nn.Module, geom: Geometry, group: str) -> torch.dtype:
    for conn, _ in geom.incident(group):
        return tensor(model, conn.name).dtype
    return torch.float32


# ---------------------------------------------------------------------------- applying


def neuron_index(perm: Tensor, group: Group, tile: int = 1) -> Tensor:
    """Index along a tensor dim for a unit permutation: new[q] = old[index[q]]."""
    b = group.block
    idx = (perm[:, None] * b + torch.arange(b, device=perm.device)).reshape(-1)
    if tile > 1:
        idx = torch.cat([idx + t * group.size for t in range(tile)])
    return idx


@torch.no_grad()
def permute_(t: Tensor, dim: int, index: Tensor) -> None:
    """In place (same storage: DDP buckets, optimizer views and tied weights stay valid)."""
    t.copy_(t.index_select(dim, index.to(t.device)))


@torch.no_grad()
def apply_permutation(
    model: nn.Module,
    geom: Geometry,
    group: str,
    perm: Tensor,
    optimizer: torch.optim.Optimizer | None = None,
    state_fn=None,
) -> None:
    """Permute the group's units in every target tensor, its gradient and its optimizer state.

    ``state_fn(param) -> list[Tensor]`` overrides where the optimizer state of a parameter is
    (default: every tensor in ``optimizer.state[param]`` of the parameter's shape).
    """
    g = geom.groups[group]
    perm = perm.to(torch.long)
    for target in g.targets:
        t = tensor(model, target.name)
        index = neuron_index(perm.to(t.device), g, target.tile)
        permute_(t.data, target.dim, index)
        if isinstance(t, nn.Parameter):
            if t.grad is not None:
                permute_(t.grad, target.dim, index)
            states = state_fn(t) if state_fn is not None else optimizer_moments(optimizer, t)
            for s in states:
                permute_(s, target.dim, index)


def parameter_moves(model: nn.Module, geom: Geometry, group: str, perm: Tensor) -> list[tuple[nn.Parameter, int, Tensor]]:
    """``(parameter, dim, index)`` for every target of ``group`` that is a parameter: how its
    optimizer state must move with the swap (:meth:`wbscale.dist.WeightEditor.permute_optimizer_state`)."""
    g = geom.groups[group]
    perm = perm.to(torch.long)
    moves = []
    for target in g.targets:
        t = tensor(model, target.name)
        if isinstance(t, nn.Parameter):
            moves.append((t, target.dim, neuron_index(perm.to(t.device), g, target.tile)))
    return moves


def compose(total: Tensor, perm: Tensor) -> Tensor:
    """Original unit at each slot after one more round: total[perm]."""
    return total[perm.to(total.device)]


def swap_round(
    model: nn.Module,
    geom: Geometry,
    top_k: int,
    optimizer: torch.optim.Optimizer | None = None,
    groups: list[str] | None = None,
) -> list[SwapDecision]:
    """Decide and apply one round for every swappable group (single process)."""
    decisions = []
    for name in groups or [g.name for g in geom.swappable()]:
        decision = decide_swaps(model, geom, name, top_k)
        if not decision.is_identity:
            apply_permutation(model, geom, name, decision.perm, optimizer)
        decisions.append(decision)
    return decisions
