"""PNG plots of a run, drawn from ``metrics.jsonl`` so they exist without wandb.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend, no
display needed); every PNG is rendered in memory and written atomically.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from wbscale.io import atomic_write_bytes
from wbscale.track.jsonl_logger import latest_values, read_metrics

LAYER_KEY = re.compile(r"^whitebox/layer(\d+)/(\w+)$")
# metric name -> axis label, in plotting order
WHITEBOX_PLOTTED = {
    "sparsity": "sparsity (fraction of inactive units)",
    "coding_rate": "coding rate of head projections (nats)",
    "compression_gain": "compression gain of MSSA (nats)",
}


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _rows(metrics: str | os.PathLike[str] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return metrics if isinstance(metrics, list) else read_metrics(metrics)


def plot_loss_curves(
    metrics_path: str | os.PathLike[str] | list[dict[str, Any]],
    out_png: str | os.PathLike[str],
    *,
    log_y: bool = True,
    title: str = "loss",
    unigram_entropy: float | None = None,
) -> Path:
    """Train and validation loss vs step into ``out_png``; returns its path.

    ``unigram_entropy`` (the loss of a model that ignores context) is drawn as a dashed
    line: a trained model must end clearly below it.
    """
    rows = _rows(metrics_path)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    plotted = False
    for key, style in (("train/loss", dict(lw=1.0, alpha=0.8)), ("val/loss", dict(lw=2.0, marker="o", ms=3))):
        steps, values = latest_values(rows, key)
        if steps:
            ax.plot(steps, values, label=key, **style)
            plotted = True
    if plotted:
        if unigram_entropy is not None:
            ax.axhline(unigram_entropy, color="gray", ls="--", lw=1.0,
                       label=f"unigram entropy {unigram_entropy:.2f} (no context)")
        positive = all(v > 0 for r in rows for k, v in r.items() if k in ("train/loss", "val/loss") and isinstance(v, (int, float)))
        if log_y and positive:
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis)
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, Path(out_png))


def _plain_log_ticks(axis: Any) -> None:
    """Label a log axis with plain numbers (1.5, 2, 3, …) instead of 10^x powers."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    fmt = FuncFormatter(lambda v, _: f"{v:.3g}")
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_minor_locator(LogLocator(base=10, subs=(1.5, 3.0, 4.0, 7.0)))
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(fmt)


def whitebox_table(rows: list[dict[str, Any]]) -> dict[str, dict[int, dict[int, float]]]:
    """``{metric: {step: {layer: value}}}`` from metrics rows (last value wins)."""
    table: dict[str, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        step = row.get("step")
        if step is None:
            continue
        for key, value in row.items():
            m = LAYER_KEY.match(key)
            if m and isinstance(value, (int, float)) and not isinstance(value, bool):
                table[m.group(2)][int(step)][int(m.group(1))] = float(value)
    return table


def plot_whitebox(
    metrics_path: str | os.PathLike[str] | list[dict[str, Any]],
    out_dir: str | os.PathLike[str],
) -> list[Path]:
    """White-box metrics vs layer (latest step) and vs step (one line per layer).

    Writes ``whitebox_layers.png`` and ``whitebox_steps.png`` under ``out_dir`` and returns
    their paths; returns ``[]`` when no white-box metrics were logged.
    """
    table = whitebox_table(_rows(metrics_path))
    names = [n for n in WHITEBOX_PLOTTED if n in table]
    if not names:
        return []
    out_dir = Path(out_dir)
    paths: list[Path] = []

    fig = Figure(figsize=(4.2 * len(names), 3.8))
    for j, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), j + 1)
        last = max(table[name])
        layers = sorted(table[name][last])
        ax.plot(layers, [table[name][last][i] for i in layers], marker="o")
        ax.set_xlabel("layer")
        ax.set_ylabel(WHITEBOX_PLOTTED[name])
        ax.set_title(f"{name} at step {last}")
        ax.set_xticks(layers)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "whitebox_layers.png"))

    fig = Figure(figsize=(4.2 * len(names), 3.8))
    for j, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), j + 1)
        steps = sorted(table[name])
        layers = sorted({i for s in steps for i in table[name][s]})
        cmap = _viridis()
        for i in layers:
            xs = [s for s in steps if i in table[name][s]]
            color = cmap(i / max(1, len(layers) - 1))
            ax.plot(xs, [table[name][s][i] for s in xs], color=color, label=f"layer {i}", marker="." if len(xs) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(WHITEBOX_PLOTTED[name])
        ax.set_title(f"{name} vs step")
        ax.grid(True, alpha=0.3)
        if len(layers) <= 12:
            ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "whitebox_steps.png"))
    return paths


def _viridis() -> Any:
    from matplotlib import colormaps

    return colormaps["viridis"]


def plot_run(
    run_dir: str | os.PathLike[str],
    metrics_path: str | os.PathLike[str] | None = None,
    unigram_entropy: float | None = None,
) -> list[Path]:
    """All plots of a run under ``<run_dir>/plots/``; returns the written paths.

    The unigram entropy line comes from ``unigram_entropy`` or the run's ``summary.json``.
    """
    run_dir = Path(run_dir)
    rows = read_metrics(metrics_path if metrics_path is not None else run_dir)
    out = run_dir / "plots"
    if unigram_entropy is None and (run_dir / "summary.json").is_file():
        try:
            unigram_entropy = json.loads((run_dir / "summary.json").read_text()).get("unigram_entropy")
        except (OSError, json.JSONDecodeError):
            unigram_entropy = None
    loss = plot_loss_curves(rows, out / "loss_curve.png", title=f"{run_dir.name}: loss",
                            unigram_entropy=unigram_entropy)
    return [loss, *plot_whitebox(rows, out)]
