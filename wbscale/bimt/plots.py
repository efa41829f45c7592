"""Connectivity plots: neurons as dots, connections as lines (width ~ |w|, blue > 0, red < 0).

One panel per plot panel of the geometry (per layer for a language model: residual ->
heads -> residual -> MLP neurons / ISTA atoms -> residual), drawing only the ``top``
strongest connections of each panel so a 12-layer GPT-2 stays readable. matplotlib's
object API with the Agg canvas (no pyplot state), written atomically like wbscale.track.plots.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from torch import nn

from wbscale.bimt.geometry import Geometry, tensor
from wbscale.io import atomic_write_bytes

POSITIVE, NEGATIVE = "#1f4fd1", "#d62728"
LM_LEVELS = {0: "residual", 1: "heads", 2: "residual", 3: "MLP / atoms", 4: "residual"}


def save_figure(fig: Figure, path: str | Path, dpi: int = 130) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


@torch.no_grad()
def draw_panel(ax: Axes, model: nn.Module, geom: Geometry, panel: int, top: int | None = None,
               max_width: float = 2.0, dot_size: float | None = None) -> None:
    """Draw the connections of one panel on ``ax`` (x in [0, 1], y = the connection's levels)."""
    conns = [c for c in geom.connections if c.plot[0] == panel]
    segments, widths, colors = [], [], []
    picked = []
    for conn in conns:
        w = tensor(model, conn.name).detach().float().cpu()
        rows = geom.groups[conn.rows].coordinates().repeat(conn.row_tile)
        cols = geom.groups[conn.cols].coordinates().repeat(conn.col_tile)
        flat = w.abs().flatten()
        n = flat.numel() if top is None else min(top, flat.numel())
        idx = torch.topk(flat, n).indices
        picked.append((conn, w.flatten()[idx], rows[idx // w.shape[1]], cols[idx % w.shape[1]]))
    scale = max((float(v.abs().max()) for _, v, _, _ in picked if v.numel()), default=0.0)
    for conn, values, xr, xc in picked:
        _, y_rows, y_cols = conn.plot
        for v, a, b in zip(values.tolist(), xr.tolist(), xc.tolist(), strict=True):
            if scale == 0.0 or v == 0.0:
                continue
            segments.append(((b, y_cols), (a, y_rows)))
            widths.append(max_width * abs(v) / scale)
            colors.append(POSITIVE if v > 0 else NEGATIVE)
    if segments:
        ax.add_collection(LineCollection(segments, linewidths=widths, colors=colors, alpha=0.8))
    levels: dict[float, str] = {}
    for conn in conns:
        levels[conn.plot[1]] = conn.rows
        levels[conn.plot[2]] = conn.cols
    for y, group in levels.items():
        xs = geom.groups[group].coordinates().numpy()
        size = dot_size if dot_size is not None else max(0.5, min(20.0, 400.0 / len(xs)))
        ax.scatter(xs, np.full_like(xs, y), s=size, c="black", zorder=3, linewidths=0)
    ax.set_xlim(-0.02, 1.02)
    if levels:
        ax.set_ylim(min(levels) - 0.3, max(levels) + 0.3)
    ax.set_xticks([])
    ax.set_yticks(sorted(levels))
    ax.set_yticklabels([LM_LEVELS.get(int(y), "") if float(y).is_integer() else "" for y in sorted(levels)], fontsize=6)
    for spine in ax.spines.values():
        spine.set_visible(False)


def plot_lm_connectivity(model: nn.Module, geom: Geometry, out_png: str | Path, top: int = 200,
                         title: str | None = None, columns: int = 4) -> Path:
    """One panel per layer with the ``top`` strongest connections of each of its weight
    matrices (line width relative to the panel's largest |w|); returns the PNG path."""
    panels = sorted({c.plot[0] for c in geom.connections if c.plot[0] >= 0})
    if not panels:
        raise ValueError("the geometry has no connections to draw (bimt.maps is empty?)")
    cols = min(columns, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows))
    fig.subplots_adjust(wspace=0.08, hspace=0.35)
    for k, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        draw_panel(ax, model, geom, panel, top=top)
        if k % cols:
            ax.set_yticklabels([])
        name = geom.panels[panel] if panel < len(geom.panels) else f"panel {panel}"
        ax.set_title(name, fontsize=8)
    fig.suptitle(title or f"strongest {top} connections per weight matrix (width ~ |w|; blue > 0, red < 0)",
                 fontsize=9, y=1.0 + 0.04 / rows)
    return save_figure(fig, out_png)


def plot_checkpoint(ckpt: str | Path, out_png: str | Path, top: int = 200) -> dict[str, float | str]:
    """``wbscale bimt plot``: connectivity PNG + modularity metrics of a checkpoint or export
    folder (geometry from its recipe's ``bimt`` section)."""
    from wbscale.bimt.cost import modularity_metrics
    from wbscale.bimt.geometry import geometry_from_config
    from wbscale.ckpt.load import load_for_inference

    model, recipe, _ = load_for_inference(ckpt)
    geom = geometry_from_config(model, recipe.bimt)
    path = plot_lm_connectivity(
        model, geom, out_png, top=top,
        title=f"{Path(ckpt).name}: strongest {top} connections per weight matrix (width ~ |w|; blue > 0, red < 0)",
    )
    metrics = modularity_metrics(model, geom, recipe.bimt.prune_threshold, recipe.bimt.mass_radius)
    return {"plot": str(path), **metrics}
