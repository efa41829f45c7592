"""Where the neurons of a network sit, and which linear maps connect them (BIMT geometry).

Liu, Gan & Tegmark, "Seeing is Believing: Brain-Inspired Modular Training for Mechanistic
Interpretability" (2023): every layer of neurons is laid out on the line [0, 1], neuron ``p``
of a layer of ``n`` at ``(p + 0.5) / n``; consecutive layers are ``layer_distance`` apart.

A :class:`Geometry` is a description, not a copy of the weights: it names

- :class:`Group`: a layer of ``units`` units of ``block`` neurons each (an MLP layer: block 1;
  attention heads: block = head dim). A swap moves whole units between slots; the tensors
  listed in ``targets`` are permuted along with them so the network computes the same function.
- :class:`Connection`: a weight matrix (R, C) whose rows are neurons of one group and whose
  columns are neurons of another; its connection cost is ``sum |w| (A |x_row - x_col| + l0)``.

Positions are fixed per slot; a swap permutes the weights instead of moving coordinates, so
the distance matrices are the same for every layer of the same shape and are computed once.

Builders: :func:`lm_geometry` (GPT-2 and CRATE, from the model's ``layer_roles()``) and
``wbscale.bimt.toy.mlp_geometry`` (the toy MLP). Residual-stream dimensions are ONE group
shared by every layer: embeddings, every LayerNorm, every reader and writer of the stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from wbscale.errors import UserError


@dataclass(frozen=True)
class PermTarget:
    """A tensor that follows a group's permutation along ``dim``.

    ``tile``: the dim holds ``tile`` consecutive copies of the group (GPT-2's q|k|v rows of
    ``c_attn``: 3). The tensor is a parameter (its optimizer moments follow too) or a buffer.
    """

    name: str
    dim: int
    tile: int = 1


@dataclass(frozen=True)
class Group:
    """A layer of neurons: ``units`` units of ``block`` neurons, at (p + 0.5) / size."""

    name: str
    kind: str  # residual | hidden | heads | vocab | input | output
    units: int
    block: int = 1
    swappable: bool = True
    targets: tuple[PermTarget, ...] = ()
    layer: int | None = None

    @property
    def size(self) -> int:
        return self.units * self.block

    def coordinates(self, device: Any = None, dtype: torch.dtype = torch.float32) -> Tensor:
        return (torch.arange(self.size, device=device, dtype=dtype) + 0.5) / self.size


@dataclass(frozen=True)
class Connection:
    """Weight matrix ``name`` (R, C): rows in group ``rows`` (tiled ``row_tile`` times),
    columns in group ``cols``. ``plot``: (panel, y of the rows, y of the columns)."""

    name: str
    rows: str
    cols: str
    row_tile: int = 1
    col_tile: int = 1
    layer: int | None = None
    bias: str | None = None  # penalised with |b| * l0 when bias_penalty is on
    plot: tuple[int, float, float] = (0, 1.0, 0.0)
    label: str = ""


@dataclass
class Geometry:
    """Groups, connections and the cost's constants for one model."""

    groups: dict[str, Group]
    connections: list[Connection]
    locality: float = 1.0  # A
    layer_distance: float = 0.1  # l0
    reduction: str = "sum"
    bias_penalty: bool = False
    panels: list[str] = field(default_factory=list)  # plot panel titles
    _factors: dict[tuple, Tensor] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ distances
    def distances(self, conn: Connection, device: Any = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """|x_row - x_col| for every entry of the connection's weight (R, C)."""
        rows = self.groups[conn.rows].coordinates(device, dtype).repeat(conn.row_tile)
        cols = self.groups[conn.cols].coordinates(device, dtype).repeat(conn.col_tile)
        return (rows[:, None] - cols[None, :]).abs()

    def factors(self, conn: Connection, device: Any = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """A |x_row - x_col| + l0 for every entry (R, C); cached per shape, shared by layers."""
        rows, cols = self.groups[conn.rows], self.groups[conn.cols]
        key = (rows.size, conn.row_tile, cols.size, conn.col_tile, str(device), dtype)
        found = self._factors.get(key)
        if found is None:
            found = self.distances(conn, device, dtype).mul_(self.locality).add_(self.layer_distance)
            self._factors[key] = found
        return found

    def clear_cache(self) -> None:
        self._factors.clear()

    # ------------------------------------------------------------------ bookkeeping
    def num_weights(self, model: nn.Module) -> int:
        return sum(tensor(model, c.name).numel() for c in self.connections)

    def scale(self, model: nn.Module) -> float:
        """1 for ``sum``; 1 / (weights in the cost) for ``mean``."""
        return 1.0 if self.reduction == "sum" else 1.0 / max(1, self.num_weights(model))

    def swappable(self) -> list[Group]:
        return [g for g in self.groups.values() if g.swappable]

    def incident(self, group: str) -> list[tuple[Connection, str]]:
        """Connections touching ``group``, each with the side ("rows" | "cols" | "both")."""
        out = []
        for conn in self.connections:
            if conn.rows == group and conn.cols == group:
                out.append((conn, "both"))
            elif conn.rows == group:
                out.append((conn, "rows"))
            elif conn.cols == group:
                out.append((conn, "cols"))
        return out


def tensor(model: nn.Module, name: str) -> Tensor:
    """The parameter or buffer ``name`` of ``model``."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)


def check_geometry(model: nn.Module, geom: Geometry) -> None:
    """Every named tensor exists and has the size its group says (a bug otherwise)."""
    for conn in geom.connections:
        w = tensor(model, conn.name)
        rows, cols = geom.groups[conn.rows], geom.groups[conn.cols]
        expected = (rows.size * conn.row_tile, cols.size * conn.col_tile)
        if tuple(w.shape) != expected:
            raise ValueError(f"BIMT geometry: {conn.name} is {tuple(w.shape)}, expected {expected}")
    for group in geom.groups.values():
        for t in group.targets:
            w = tensor(model, t.name)
            if w.shape[t.dim] != group.size * t.tile:
                raise ValueError(
                    f"BIMT geometry: {t.name} has {w.shape[t.dim]} entries on dim {t.dim}, "
                    f"group {group.name} needs {group.size * t.tile}"
                )


# ---------------------------------------------------------------------------- language models


def lm_geometry(
    model: nn.Module,
    maps: list[str] | tuple[str, ...] = ("hidden", "attention"),
    units: list[str] | tuple[str, ...] = ("hidden", "heads", "residual"),
    locality: float = 1.0,
    layer_distance: float = 0.1,
    reduction: str = "sum",
    bias_penalty: bool = False,
) -> Geometry:
    """The geometry of a wbscale language model, from its ``layer_roles()`` (which parameter
    is which map; ``wbscale.models.base.LayerRoles``). ``maps`` selects the weights in the
    cost, ``units`` the groups that swap.

    Per layer i the plot panel stacks: residual (y=0) -> heads (1) -> residual (2) ->
    MLP neurons / ISTA atoms (3) -> residual (4).
    """
    if not callable(getattr(model, "layer_roles", None)):
        raise UserError(
            f"BIMT needs a wbscale language model (model.arch gpt2 or crate), got {type(model).__name__}"
        )
    cfg = model.config
    d, n_head, n_layer = cfg.n_embd, cfg.n_head, cfg.n_layer

    # The shared skeleton (wbscale.models.base): embeddings and the final norm.
    residual_targets = [
        PermTarget("transformer.wte.weight", 1),  # the tied LM head is the same tensor
        PermTarget("transformer.wpe.weight", 1),
        PermTarget("transformer.ln_f.weight", 0),
        PermTarget("transformer.ln_f.bias", 0),
    ]
    groups: dict[str, Group] = {}
    conns: list[Connection] = []
    for i, roles in enumerate(model.layer_roles()):
        for norm in roles.norms:
            residual_targets += [PermTarget(f"{norm}.weight", 0), PermTarget(f"{norm}.bias", 0)]
        attn_in, attn_out, qkv = roles.attn_in, roles.attn_out, roles.qkv_slices
        residual_targets += [PermTarget(attn_in.weight, 1), PermTarget(attn_out.weight, 0)]
        if attn_out.bias is not None:
            residual_targets.append(PermTarget(attn_out.bias, 0))
        # heads as blocks of head_dim neurons: each slice's rows of attn_in, attn_out's columns
        head_targets = [PermTarget(attn_in.weight, 0, qkv), PermTarget(attn_out.weight, 1)]
        if attn_in.bias is not None:
            head_targets.append(PermTarget(attn_in.bias, 0, qkv))
        groups[f"heads.{i}"] = Group(
            f"heads.{i}", "heads", n_head, d // n_head, swappable="heads" in units,
            targets=tuple(head_targets), layer=i,
        )
        if "attention" in maps:
            conns += [
                Connection(attn_in.weight, f"heads.{i}", "residual", row_tile=qkv, layer=i,
                           bias=attn_in.bias, plot=(i, 1, 0), label=attn_in.label),
                Connection(attn_out.weight, "residual", f"heads.{i}", layer=i,
                           bias=attn_out.bias, plot=(i, 2, 1), label=attn_out.label),
            ]

        # Hidden units read rows of hidden_in and write columns of hidden_out. CRATE's ISTA
        # dictionary is both (no hidden_out): one matrix, counted once in the cost. A separate
        # ISTA decoder is stored (m, d) like the dictionary (hidden_out_rows_are_units): unit j
        # writes row j, so its dims are swapped against GPT-2's c_proj (d, m).
        hidden_in, hidden_out = roles.hidden_in, roles.hidden_out
        out_unit_dim = 0 if roles.hidden_out_rows_are_units else 1
        residual_targets.append(PermTarget(hidden_in.weight, 1))
        if hidden_out is not None:
            residual_targets.append(PermTarget(hidden_out.weight, 1 - out_unit_dim))
            if hidden_out.bias is not None:
                residual_targets.append(PermTarget(hidden_out.bias, 0))
        hidden_side = [PermTarget(hidden_in.weight, 0)]
        if hidden_in.bias is not None:
            hidden_side.append(PermTarget(hidden_in.bias, 0))
        if hidden_out is not None:
            hidden_side.append(PermTarget(hidden_out.weight, out_unit_dim))
        hidden_side += [PermTarget(name, 0) for name in roles.hidden_vectors]  # per-atom lambda
        if roles.hidden_is_residual:
            # Unit k IS residual dimension k (square ISTA: the code replaces x), so the
            # units move only with the residual stream (rows and columns together).
            residual_targets += hidden_side
            hidden = "residual"
        else:
            hidden = f"hidden.{i}"
            groups[hidden] = Group(
                hidden, "hidden", roles.hidden_units, swappable="hidden" in units, layer=i,
                targets=tuple(hidden_side),
            )
        if "hidden" in maps:
            conns.append(Connection(hidden_in.weight, hidden, "residual", layer=i, bias=hidden_in.bias,
                                    plot=(i, 3, 2), label=hidden_in.label))
            if hidden_out is not None and roles.hidden_out_rows_are_units:
                # (m, d): rows are the units (y = 3), columns the stream after the block (y = 4)
                conns.append(Connection(hidden_out.weight, hidden, "residual", layer=i, bias=hidden_out.bias,
                                        plot=(i, 3, 4), label=hidden_out.label))
            elif hidden_out is not None:
                conns.append(Connection(hidden_out.weight, "residual", hidden, layer=i, bias=hidden_out.bias,
                                        plot=(i, 4, 3), label=hidden_out.label))
    groups["residual"] = Group(
        "residual", "residual", d, swappable="residual" in units, targets=tuple(residual_targets)
    )
    if "embeddings" in maps:
        vocab = model.get_parameter("transformer.wte.weight").shape[0]
        groups["vocab"] = Group("vocab", "vocab", vocab, swappable=False)
        conns.append(Connection("transformer.wte.weight", "vocab", "residual", plot=(-1, 0, 1), label="wte"))
    geom = Geometry(
        groups=groups, connections=conns, locality=locality, layer_distance=layer_distance,
        reduction=reduction, bias_penalty=bias_penalty,
        panels=[f"layer {i}" for i in range(n_layer)],
    )
    check_geometry(model, geom)
    return geom


def geometry_from_config(model: nn.Module, cfg: Any) -> Geometry:
    """:func:`lm_geometry` from a recipe's ``bimt`` section (a ``BIMTConfig``)."""
    return lm_geometry(
        model, maps=cfg.maps, units=cfg.units, locality=cfg.locality,
        layer_distance=cfg.layer_distance, reduction=cfg.reduction, bias_penalty=cfg.bias_penalty,
    )
