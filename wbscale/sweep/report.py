"""``wbscale sweep report DIR``: a folder of runs -> scaling plot, Markdown table, JSON.

Every sub-folder of DIR holding a ``recipe.yaml`` is a run (a sweep's points, or any runs
put side by side). Per run: the model's parameters (rebuilt on the ``meta`` device from
the saved recipe), the tokens it trained on (steps reached x tokens per step), training
compute (FLOPs/token x tokens) and the final val loss from ``summary.json``. Written to
``--out`` (default DIR):

- ``scaling.png``: val loss against non-embedding parameters and against training compute,
  CRATE and GPT-2 as two series;
- ``scaling.md``: the table, CRATE next to GPT-2 at equal shape, the budget, the device and
  the command that reproduces the sweep;
- ``scaling.json``: the same numbers, machine-readable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from wbscale.config import recipe_from_dict
from wbscale.errors import UserError
from wbscale.io import atomic_write_json, atomic_write_text
from wbscale.sizing import tokens_per_step
from wbscale.sweep.facts import human_count, human_flops, recipe_facts
from wbscale.sweep.grid import SWEEP_FILE

ARCH_LABEL = {"crate": "CRATE", "gpt2": "GPT-2"}
ARCH_STYLE = {"crate": ("tab:blue", "o"), "gpt2": ("tab:orange", "s")}


# ---------------------------------------------------------------------------- collect


def collect_runs(sweep_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per run folder under ``sweep_dir``, and the sweep's ``sweep.json`` (or {})."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir}: no such folder (give the sweep folder, e.g. runs/sweeps/<name>)")
    sweep: dict[str, Any] = {}
    if (sweep_dir / SWEEP_FILE).is_file():
        sweep = json.loads((sweep_dir / SWEEP_FILE).read_text())
    records = {p["name"]: p for p in sweep.get("points", [])}
    rows = []
    for run in sorted(p for p in sweep_dir.iterdir() if (p / "recipe.yaml").is_file()):
        recipe = recipe_from_dict(yaml.safe_load((run / "recipe.yaml").read_text()))
        facts = recipe_facts(recipe)
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        step = int(summary.get("step") or 0)
        tokens = step * tokens_per_step(recipe)
        m = recipe.model
        record = records.get(run.name, {})
        rows.append({
            "run": run.name,
            "arch": m.arch,
            "n_layer": m.n_layer,
            "n_embd": m.n_embd,
            "n_head": m.n_head,
            "block_size": m.block_size,
            "ista": f"{m.ista_variant}x{m.ista_expansion}" if m.arch == "crate" else None,
            "vocab_size": facts.vocab_size,
            "params": facts.params,
            "non_embedding_params": facts.non_embedding_params,
            "flops_per_token": facts.flops_per_token,
            "steps": step,
            "max_steps": recipe.train.max_steps,
            "tokens_per_step": tokens_per_step(recipe),
            "tokens": tokens,
            "compute_flops": float(facts.flops_per_token) * tokens,
            "val_loss": summary.get("val_loss"),
            "unigram_entropy": summary.get("unigram_entropy"),
            "seconds": record.get("seconds"),
            "status": "done" if summary.get("val_loss") is not None and step >= recipe.train.max_steps
            else ("failed" if record.get("status") == "failed" else "incomplete"),
            "data": recipe.data.source,
            "seed": recipe.train.seed,
        })
    if not rows:
        raise UserError(f"{sweep_dir}: no run folders (sub-folders with a recipe.yaml) to report on")
    return rows, sweep


def equal_shape_pairs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CRATE and GPT-2 runs of the same (layers, width, heads, context): side by side."""
    by_shape: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        key = (r["n_layer"], r["n_embd"], r["n_head"], r["block_size"], r["max_steps"])
        by_shape.setdefault(key, {})[r["arch"]] = r
    pairs = []
    for (n_layer, n_embd, n_head, block, _), runs in sorted(by_shape.items()):
        crate, gpt2 = runs.get("crate"), runs.get("gpt2")
        if not crate or not gpt2 or crate["val_loss"] is None or gpt2["val_loss"] is None:
            continue
        pairs.append({
            "shape": f"{n_layer}L-{n_embd}d-{n_head}h",
            "block_size": block,
            "crate_val_loss": crate["val_loss"],
            "gpt2_val_loss": gpt2["val_loss"],
            "delta": crate["val_loss"] - gpt2["val_loss"],
            "non_embedding_params_ratio": crate["non_embedding_params"] / gpt2["non_embedding_params"],
            "flops_per_token_ratio": crate["flops_per_token"] / gpt2["flops_per_token"],
            "seconds_ratio": (crate["seconds"] / gpt2["seconds"]) if crate["seconds"] and gpt2["seconds"] else None,
        })
    return pairs


# ---------------------------------------------------------------------------- write


def plot_scaling(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Two panels: val loss vs non-embedding parameters, and vs training compute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    done = [r for r in rows if r["val_loss"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    panels = (("non_embedding_params", "non-embedding parameters"), ("compute_flops", "training compute (FLOPs)"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for arch in sorted({r["arch"] for r in done}):
            runs = [r for r in done if r["arch"] == arch]
            color, marker = ARCH_STYLE.get(arch, ("tab:gray", "^"))
            # One line per width (runs that differ only in depth and the like), so that the
            # lines read as curves instead of zig-zagging between widths.
            for width in sorted({r["n_embd"] for r in runs}):
                line = sorted((r for r in runs if r["n_embd"] == width), key=lambda r: r[key])
                ax.plot([r[key] for r in line], [r["val_loss"] for r in line], color=color, alpha=0.4, linewidth=1)
            ax.scatter([r[key] for r in runs], [r["val_loss"] for r in runs], color=color, marker=marker, s=36,
                       label=ARCH_LABEL.get(arch, arch), zorder=3)
            for r in runs:
                ax.annotate(f"{r['n_layer']}L-{r['n_embd']}d", (r[key], r["val_loss"]), fontsize=7,
                            xytext=(4, 3), textcoords="offset points", color=color)
        entropies = {round(r["unigram_entropy"], 6) for r in done if r["unigram_entropy"] is not None}
        if len(entropies) == 1:
            ax.axhline(next(iter(entropies)), color="gray", linestyle="--", linewidth=0.8,
                       label="unigram entropy (no context)")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on short ranges
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.25)
    axes[0].set_ylabel("validation loss (nats/token)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def markdown(rows: list[dict[str, Any]], pairs: list[dict[str, Any]], sweep: dict[str, Any], env: dict[str, Any], png: str) -> str:
    """The report as Markdown."""
    name = sweep.get("name") or "runs"
    steps = sorted({r["max_steps"] for r in rows})
    tokens = sorted({r["tokens"] for r in rows})
    lines = [f"# Sweep `{name}`: CRATE vs GPT-2", ""]
    lines.append(f"![val loss vs non-embedding parameters and vs training compute]({png})")
    lines.append("")
    lines.append("## Setup")
    lines.append("")
    data = sorted({r["data"] for r in rows})
    lines.append(f"- Data: {', '.join(f'`{d}`' for d in data)}; vocabulary {', '.join(str(v) for v in sorted({r['vocab_size'] for r in rows}))}"
                 f" (padded), context {', '.join(str(b) for b in sorted({r['block_size'] for r in rows}))} tokens.")
    lines.append(f"- Budget per run: {', '.join(str(s) for s in steps)} optimizer steps of "
                 f"{', '.join(f'{t:,}' for t in sorted({r['tokens_per_step'] for r in rows}))} tokens = "
                 f"{', '.join(f'{t:,}' for t in tokens)} training tokens; one seed "
                 f"({', '.join(str(s) for s in sorted({r['seed'] for r in rows}))}) per point, same seed, data order and "
                 "optimizer settings for every point.")
    if env:
        lines.append(f"- Device: {env.get('device', '?')}; torch {env.get('torch', '?')}; "
                     f"commit `{env.get('commit') or '?'}`; date {env.get('date', '?')}.")
    if sweep.get("command"):
        report_cmd = f"wbscale sweep report {sweep.get('out_dir', 'runs/sweeps/' + name)}"
        if sweep.get("report_out"):
            report_cmd += f" --out {sweep['report_out']}"
        lines += ["- Reproduce:", "", "  ```bash", f"  {sweep['command']}", f"  {report_cmd}", "  ```"]
    lines.append("")
    lines.append("## Runs")
    lines.append("")
    lines.append("| run | arch | layers | width | heads | params | non-emb. params | FLOPs/token | tokens | compute | val loss | wall (s) |")
    lines.append("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in sorted(rows, key=lambda r: (r["arch"], r["non_embedding_params"], r["n_layer"])):
        loss = _fmt(r["val_loss"]) + ("" if r["status"] == "done" else f" ({r['status']})")
        lines.append(
            f"| {r['run']} | {ARCH_LABEL.get(r['arch'], r['arch'])} | {r['n_layer']} | {r['n_embd']} | {r['n_head']} | "
            f"{human_count(r['params'])} | {human_count(r['non_embedding_params'])} | {human_count(r['flops_per_token'])} | "
            f"{human_count(r['tokens'])} | {human_flops(r['compute_flops'])} | {loss} | {_fmt(r['seconds'], '.0f')} |"
        )
    entropies = sorted({round(r["unigram_entropy"], 3) for r in rows if r["unigram_entropy"] is not None})
    if entropies:
        lines.append("")
        lines.append(f"Unigram entropy of the training tokens (the loss of a model that ignores context): "
                     f"{', '.join(f'{e:.3f}' for e in entropies)} nats/token.")
    if pairs:
        lines += ["", "## CRATE vs GPT-2 at equal shape", ""]
        lines.append("| shape | CRATE val loss | GPT-2 val loss | CRATE − GPT-2 | non-emb. params CRATE/GPT-2 | FLOPs/token CRATE/GPT-2 |")
        lines.append("|---|--:|--:|--:|--:|--:|")
        for p in pairs:
            lines.append(
                f"| {p['shape']} | {p['crate_val_loss']:.3f} | {p['gpt2_val_loss']:.3f} | {p['delta']:+.3f} | "
                f"{p['non_embedding_params_ratio']:.2f} | {p['flops_per_token_ratio']:.2f} |"
            )
        crate_better = sum(p["delta"] < 0 for p in pairs)
        lines.append("")
        lines.append(f"CRATE has the lower val loss at {crate_better} of {len(pairs)} equal shapes.")
    standard_crate = all(r["ista"] == "overcompletex4" for r in rows if r["arch"] == "crate")
    lines += [
        "",
        "## Reading it",
        "",
        "- *params* counts every parameter (the tied LM head once); *non-emb. params* leaves out "
        "the token and position embeddings (Kaplan et al. 2020's N).",
        "- *FLOPs/token* is training (forward + backward) compute per token from the model's own count "
        "(attention and the LM head included); *compute* = FLOPs/token x tokens.",
    ]
    if standard_crate:
        lines.append(
            "- At equal shape CRATE (over-complete ISTA, 4x dictionary) has half of GPT-2's non-embedding "
            "parameters per layer (2d² for MSSA + 4d² for the dictionary, against 12d²) but spends more "
            "FLOPs per token: its one dictionary enters four GEMMs, 18d² multiply-adds per layer and token "
            "against GPT-2's 12d²."
        )
    lines.append(
        "- Wall time is each point's `fit` call on the device above (the first point also pays the "
        "imports), with whatever else ran on that machine at the time: on a shared machine it says "
        "little about the architectures; `wbscale bench train` measures throughput."
    )
    if all(r["max_steps"] < 5000 for r in rows):
        lines.append(
            "- This is a small budget: every model is far from converged, so the curves compare how fast "
            "the two architectures learn in the first steps, not where they end. One seed per point: "
            "differences of a few hundredths are within what another seed could change (not measured here)."
        )
    lines.append("")
    return "\n".join(lines)


def sweep_report(sweep_dir: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Write ``scaling.png``, ``scaling.md`` and ``scaling.json`` for the runs in ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out) if out else sweep_dir
    rows, sweep = collect_runs(sweep_dir)
    pairs = equal_shape_pairs(rows)
    env = sweep.get("environment", {})
    name = sweep.get("name") or sweep_dir.name
    meta = {k: v for k, v in sweep.items() if k not in ("points", "environment")}
    meta.setdefault("name", name)
    meta["out_dir"] = str(sweep_dir)
    meta["report_out"] = str(out) if out else None
    steps = sorted({r["max_steps"] for r in rows})
    tokens = sorted({r["tokens"] for r in rows})
    title = (f"{name}: val loss after {'/'.join(str(s) for s in steps)} steps "
             f"({'/'.join(human_count(t) for t in tokens)} tokens per run)" + (f" — {env['device']}" if env.get("device") else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_scaling(rows, out_dir / "scaling.png", title)
    atomic_write_text(out_dir / "scaling.md", markdown(rows, pairs, meta, env, "scaling.png"))
    report = {"sweep": meta, "environment": env, "runs": rows, "equal_shape": pairs}
    atomic_write_json(out_dir / "scaling.json", report)
    return {**report, "files": [str(out_dir / n) for n in ("scaling.png", "scaling.md", "scaling.json")]}
