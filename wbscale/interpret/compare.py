"""``wbscale interpret compare A B``: two collections side by side (e.g. CRATE vs GPT-2).

Reads each collection's ``summary.json`` (nothing is recomputed) and writes, under the
output folder, ``compare.json``, ``compare.md`` (the table, also returned) and
``compare.png``: dead fraction and mean top-context token entropy per layer, and the
pooled activation-frequency histograms. Layers are matched by index.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from wbscale.interpret.collect import SUMMARY_FILE, load_collection
from wbscale.io import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["compare", "compare_table"]


def _label(manifest: dict[str, Any], tag: str) -> str:
    return f"{tag}: {manifest['arch']} ({Path(manifest['ckpt']).name})"


def _overall(layers: list[dict[str, Any]]) -> dict[str, Any]:
    atoms = sum(s["atoms"] for s in layers)
    ent = [(s["mean_token_entropy"], s["entropy_atoms"]) for s in layers if s["mean_token_entropy"] is not None]
    n_ent = sum(n for _, n in ent)
    return {
        "layer": "all", "atoms": atoms, "dead": sum(s["dead"] for s in layers),
        "dead_fraction": sum(s["dead"] for s in layers) / atoms,
        "median_frequency": float(np.median([s["median_frequency"] for s in layers])),
        "mean_token_entropy": sum(e * n for e, n in ent) / n_ent if n_ent else None,
    }


def compare_table(a: dict[str, Any], b: dict[str, Any], label_a: str, label_b: str) -> tuple[list[dict[str, Any]], str]:
    """Rows (one per layer index, then ``all``) and the same as a Markdown table."""
    by_a = {s["layer"]: s for s in a["layers"]}
    by_b = {s["layer"]: s for s in b["layers"]}
    rows = []
    for layer in [*sorted(set(by_a) | set(by_b)), "all"]:
        sa = _overall(a["layers"]) if layer == "all" else by_a.get(layer)
        sb = _overall(b["layers"]) if layer == "all" else by_b.get(layer)
        row: dict[str, Any] = {"layer": layer}
        for tag, s in (("a", sa), ("b", sb)):
            for key in ("atoms", "dead_fraction", "median_frequency", "mean_token_entropy"):
                row[f"{tag}_{key}"] = None if s is None else s[key]
        rows.append(row)

    def cell(v: Any, kind: str) -> str:
        if v is None:
            return "-"
        return {"pct": f"{100 * v:.1f}%", "freq": f"{v:.3g}", "ent": f"{v:.2f}", "int": f"{v}"}[kind]

    head = ("| layer | A units | B units | A dead | B dead | A median freq | B median freq "
            "| A token entropy (bits) | B token entropy (bits) |")
    lines = [f"A = {label_a}  \nB = {label_b}", "", head, "|" + "---|" * 9]
    for r in rows:
        lines.append("| " + " | ".join([
            str(r["layer"]), cell(r["a_atoms"], "int"), cell(r["b_atoms"], "int"),
            cell(r["a_dead_fraction"], "pct"), cell(r["b_dead_fraction"], "pct"),
            cell(r["a_median_frequency"], "freq"), cell(r["b_median_frequency"], "freq"),
            cell(r["a_mean_token_entropy"], "ent"), cell(r["b_mean_token_entropy"], "ent"),
        ]) + " |")
    lines += ["", "Token entropy: of the activating tokens of each unit's top contexts "
              "(units with a full top-k); lower = more specific."]
    return rows, "\n".join(lines) + "\n"


def _plot(a: dict[str, Any], b: dict[str, Any], label_a: str, label_b: str, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4))
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    for s, label in ((a, label_a), (b, label_b)):
        layers = [x["layer"] for x in s["layers"]]
        axes[0].plot(layers, [100 * x["dead_fraction"] for x in s["layers"]], marker="o", label=label)
        ent = [(x["layer"], x["mean_token_entropy"]) for x in s["layers"] if x["mean_token_entropy"] is not None]
        if ent:
            axes[1].plot(*zip(*ent, strict=True), marker="o", label=label)
        edges = np.asarray(s["hist_edges_log10"])
        counts = np.sum([x["frequency_hist"] for x in s["layers"]], axis=0)
        total = sum(x["atoms"] for x in s["layers"])
        axes[2].stairs(counts / max(total, 1), edges, label=label)
    for ax, (xlabel, ylabel, title) in zip(axes, [
        ("layer", "dead units (%)", "dead units per layer"),
        ("layer", "bits", "top-context token entropy (lower = more specific)"),
        ("log10(activation frequency)", "fraction of units", "activation frequency, all layers"),
    ], strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    from matplotlib.ticker import MaxNLocator

    for ax in axes[:2]:  # layers are integers; percentages and entropies are never negative
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def compare(a: str | Path, b: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Compare collections ``a`` and ``b``; returns the rows, the Markdown and output paths."""
    ma, mb = load_collection(a), load_collection(b)
    sa = json.loads((Path(a) / SUMMARY_FILE).read_text())
    sb = json.loads((Path(b) / SUMMARY_FILE).read_text())
    label_a, label_b = _label(ma, "A"), _label(mb, "B")
    rows, markdown = compare_table(sa, sb, label_a, label_b)
    out = Path(out_dir) if out_dir is not None else Path(a).parent / f"compare-{Path(a).name}-vs-{Path(b).name}"
    result = {"a": str(a), "b": str(b), "label_a": label_a, "label_b": label_b, "rows": rows}
    atomic_write_json(out / "compare.json", result)
    atomic_write_text(out / "compare.md", markdown)
    _plot(sa, sb, label_a, label_b, out / "compare.png")
    return {**result, "markdown": markdown, "out_dir": str(out),
            "files": [str(out / n) for n in ("compare.json", "compare.md", "compare.png")]}
