"""``wbscale sweep report DIR``: a folder of runs -> scaling plot, Markdown table, JSON.

Every sub-folder of DIR holding a ``recipe.yaml`` is a run (a sweep's points, or any runs
put side by side). Per run: the model's parameters (rebuilt on the ``meta`` device from
the saved recipe), the tokens it trained on (steps reached x tokens per step), training
compute (FLOPs/token x tokens) and the final val loss from ``summary.json``.

Runs are then grouped (:func:`summarize`):

- a *configuration* is every recipe value that changes what is computed (the seed and the
  bookkeeping — run name, folders, logging, checkpoint cadence, tracking, SLURM, kernel
  choice — left out): its finished runs are its seeds, reported as mean ± sample std;
- a *variant* is a configuration without its shape (``model.n_layer/n_embd/n_head/
  block_size``), budget (``train.max_steps``) and learning rate (``optim.max_lr/min_lr``):
  GPT-2, CRATE, and every CRATE whose model (or other) fields differ — named after the
  fields that differ, e.g. ``CRATE (ista_expansion=2)``. CRATE-only ``model.ista_*`` /
  ``model.crate_*`` fields of a GPT-2 run are not a variant;
- per variant, shape and budget the learning rate with the lowest mean val loss is its
  *best LR* (flagged when it is the smallest or largest one tried): every comparison uses it;
- comparisons, each variant against GPT-2: at equal shape; at equal non-embedding
  parameters and at equal training FLOPs, where the variant's best-LR means are
  interpolated linearly in log-parameters / log-FLOPs between its two measured points on
  either side of GPT-2's (same context; same steps for parameters), or, outside its
  measured range, its nearest point is taken and the table says so and how far off it is;
- a difference is called only with at least 3 seeds on both sides (``needs 3 seeds``
  otherwise) and when it exceeds twice its standard error, sqrt(s1²/n1 + s2²/n2).

Written to ``--out`` (default DIR):

- ``scaling.png``: val loss against non-embedding parameters and against training compute,
  one series per variant: every run faint, the best-LR mean ± std bold;
- ``scaling.md``: the runs, the learning-rate table, the three comparisons, the budget,
  the device and the command that reproduces the sweep;
- ``scaling.json``: the same numbers, machine-readable (``runs``, ``configurations``,
  ``equal_shape``, ``equal_params``, ``equal_compute``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from wbscale.config import Recipe, recipe_from_dict
from wbscale.errors import UserError
from wbscale.io import atomic_write_json, atomic_write_text
from wbscale.sizing import tokens_per_step
from wbscale.sweep.facts import human_count, human_flops, recipe_facts
from wbscale.sweep.grid import SWEEP_FILE

ARCH_LABEL = {"crate": "CRATE", "gpt2": "GPT-2"}
ARCH_STYLE = {"crate": ("tab:blue", "o"), "gpt2": ("tab:orange", "s")}
OTHER_COLORS = ("tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
MIN_SEEDS = 3  # fewer seeds: no claim

SHAPE_KEYS = ("model.n_layer", "model.n_embd", "model.n_head", "model.block_size")
BUDGET_KEYS = ("train.max_steps",)
LR_KEYS = ("optim.max_lr", "optim.min_lr")
# Recipe keys that say how a run is kept, logged or placed, not what it computes.
BOOKKEEPING = (
    "train.seed", "train.run_name", "train.runs_dir", "train.log_every", "train.val_every", "train.ckpt_every",
    "train.keep_last", "train.exit_interval", "train.sample_", "train.compile", "tracking.", "slurm.",
    "distributed.", "data.out_dir", "data.workers", "model.ista_kernel", "model.ista_save_activations",
    "bimt.toy.", "bimt.metrics_every", "bimt.export_pruned",
)
KEPT = ("distributed.devices", "distributed.nodes")  # they change the tokens per step
CRATE_ONLY = ("model.ista_", "model.crate_")


# ---------------------------------------------------------------------------- collect


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value
    return flat


def _identity(recipe_dict: dict[str, Any]) -> dict[str, Any]:
    """The recipe values that change what a run computes (see the module doc)."""
    flat = _flatten(recipe_dict)
    arch = flat.get("model.arch")
    return {
        k: v for k, v in flat.items()
        if (k in KEPT or not any(k == b or (b.endswith((".", "_")) and k.startswith(b)) for b in BOOKKEEPING))
        and not (arch == "gpt2" and k.startswith(CRATE_ONLY))
    }


def _run_metrics(run: Path) -> dict[str, Any]:
    """From a run's ``metrics.jsonl``: median training tokens/s, and the sparsity (fraction
    of zero codes; GPT-2: of inactive MLP units) of each layer at the last white-box step."""
    from wbscale.track.jsonl_logger import read_metrics

    if not (run / "metrics.jsonl").is_file():
        return {"tokens_per_s": None, "sparsity_layers": None}
    speeds, layers = [], None
    for row in read_metrics(run):
        if row.get("train/tokens_per_second"):
            speeds.append(float(row["train/tokens_per_second"]))
        found = {int(k.split("/")[1][5:]): float(v) for k, v in row.items()
                 if k.startswith("whitebox/layer") and k.endswith("/sparsity")}
        if found:
            layers = [found[i] for i in sorted(found)]
    speeds.sort()
    return {"tokens_per_s": speeds[len(speeds) // 2] if speeds else None, "sparsity_layers": layers}


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
            **_run_metrics(run),
            "status": "done" if summary.get("val_loss") is not None and step >= recipe.train.max_steps
            else ("failed" if record.get("status") == "failed" else "incomplete"),
            "data": recipe.data.source,
            "seed": recipe.train.seed,
            "lr": recipe.optim.max_lr,
            "min_lr": recipe.optim.min_lr,
            "_identity": _identity(recipe.to_dict()),
        })
    if not rows:
        raise UserError(f"{sweep_dir}: no run folders (sub-folders with a recipe.yaml) to report on")
    _label_variants(rows)
    return rows, sweep


def _label_variants(rows: list[dict[str, Any]]) -> None:
    """``variant`` (its name) and ``config`` (its key) of every row."""
    scale = set(SHAPE_KEYS) | set(BUDGET_KEYS) | set(LR_KEYS)
    for r in rows:
        r["_variant"] = {k: v for k, v in r["_identity"].items() if k not in scale}
        r["config"] = json.dumps(r["_identity"], sort_keys=True, default=str)
    defaults = _identity(Recipe().to_dict())
    for arch in {r["arch"] for r in rows}:
        mine = [r for r in rows if r["arch"] == arch]
        keys = sorted({k for r in mine for k in r["_variant"]})
        differ = [k for k in keys if len({json.dumps(r["_variant"].get(k), default=str) for r in mine}) > 1]
        for r in mine:
            parts = [f"{k.removeprefix('model.')}={_value_text(r['_variant'].get(k))}" for k in differ]
            r["variant"] = ARCH_LABEL.get(arch, arch) + (f" ({', '.join(parts)})" if parts else "")
            # the architecture as shipped (default values of the fields that differ): its usual colour
            r["_default_variant"] = all(r["_variant"].get(k) == defaults.get(k) for k in differ)


def _value_text(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------- group


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _shape(c: dict[str, Any]) -> str:
    return f"{c['n_layer']}L-{c['n_embd']}d-{c['n_head']}h"


def configurations(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per configuration: its seeds' val losses, mean ± std, and whether its
    learning rate is the best of its variant at that shape and budget."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["config"], []).append(r)
    configs = []
    for runs in groups.values():
        first = runs[0]
        done = [r for r in runs if r["status"] == "done"]
        losses = [float(r["val_loss"]) for r in done]
        mean, std = _mean_std(losses)
        seconds = [r["seconds"] for r in done if r["seconds"]]
        speeds = [r["tokens_per_s"] for r in done if r["tokens_per_s"]]
        sparse = [min(r["sparsity_layers"]) for r in done if r["sparsity_layers"]]
        configs.append({
            "variant": first["variant"],
            "arch": first["arch"],
            "shape": _shape(first),
            **{k: first[k] for k in ("n_layer", "n_embd", "n_head", "block_size", "max_steps", "lr", "min_lr",
                                     "params", "non_embedding_params", "flops_per_token", "tokens_per_step")},
            "tokens": first["max_steps"] * first["tokens_per_step"],
            "compute_flops": float(first["flops_per_token"]) * first["max_steps"] * first["tokens_per_step"],
            "runs": sorted(r["run"] for r in runs),
            "seeds": sorted(r["seed"] for r in done),
            "n": len(done),
            "val_losses": losses,
            "val_loss_mean": mean,
            "val_loss_std": std,
            "seconds_mean": sum(seconds) / len(seconds) if seconds else None,
            "tokens_per_s_mean": sum(speeds) / len(speeds) if speeds else None,
            # the sparsest-layer target reads off the least sparse layer
            "min_layer_sparsity_mean": sum(sparse) / len(sparse) if sparse else None,
            "needs_seeds": len(done) < MIN_SEEDS,
            "best_lr": False,
            "lr_at_edge": False,
            "_cell": json.dumps({k: v for k, v in first["_identity"].items() if k not in LR_KEYS}, sort_keys=True, default=str),
        })
    cells: dict[str, list[dict[str, Any]]] = {}
    for c in configs:
        cells.setdefault(c["_cell"], []).append(c)
    for cell in cells.values():
        scored = [c for c in cell if c["val_loss_mean"] is not None]
        if not scored:
            continue
        best = min(scored, key=lambda c: c["val_loss_mean"])
        best["best_lr"] = True
        lrs = sorted({c["lr"] for c in cell})
        best["lr_at_edge"] = len(lrs) > 1 and best["lr"] in (lrs[0], lrs[-1])
    configs.sort(key=lambda c: (c["arch"] != "gpt2", c["variant"], c["block_size"], c["max_steps"],
                                c["non_embedding_params"], c["n_layer"], c["lr"]))
    return configs


def _se(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    if a.get("val_loss_std") is None or b.get("val_loss_std") is None:
        return None
    return math.sqrt(a["val_loss_std"] ** 2 / a["n"] + b["val_loss_std"] ** 2 / b["n"])


def verdict(delta: float, se: float | None, n_min: int, other: str = "CRATE") -> str:
    """``needs 3 seeds``, ``within 2 s.e.``, ``<other> lower`` or ``GPT-2 lower``."""
    if n_min < MIN_SEEDS:
        return f"needs {MIN_SEEDS} seeds"
    if se is None or abs(delta) <= 2 * se:
        return "within 2 s.e."
    return f"{other} lower" if delta < 0 else "GPT-2 lower"


def equal_shape_pairs(rows: list[dict[str, Any]], configs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every variant next to GPT-2 at the same (layers, width, heads, context, steps), each
    at its best learning rate (mean over seeds)."""
    configs = configurations(rows) if configs is None else configs
    best = [c for c in configs if c["best_lr"]]
    by_shape: dict[tuple, list[dict[str, Any]]] = {}
    for c in best:
        by_shape.setdefault((c["n_layer"], c["n_embd"], c["n_head"], c["block_size"], c["max_steps"]), []).append(c)
    pairs = []
    for _, group in sorted(by_shape.items()):
        refs = [c for c in group if c["arch"] == "gpt2"]
        if not refs:
            continue
        ref = min(refs, key=lambda c: c["val_loss_mean"])
        for c in group:
            if c["arch"] == "gpt2":
                continue
            pairs.append(_pair(c, ref, c["shape"], "measured at the same shape"))
    return pairs


def _pair(c: dict[str, Any], ref: dict[str, Any], shape: str, method: str) -> dict[str, Any]:
    delta = c["val_loss_mean"] - ref["val_loss_mean"]
    se = _se(c, ref)
    n_min = min(c["n"], ref["n"])
    return {
        "shape": shape,
        "variant": c["variant"],
        "block_size": ref["block_size"],
        "max_steps": ref["max_steps"],
        "crate_val_loss": c["val_loss_mean"],
        "crate_std": c["val_loss_std"],
        "crate_seeds": c["n"],
        "crate_lr": c.get("lr"),
        "gpt2_val_loss": ref["val_loss_mean"],
        "gpt2_std": ref["val_loss_std"],
        "gpt2_seeds": ref["n"],
        "gpt2_lr": ref["lr"],
        "delta": delta,
        "delta_se": se,
        "verdict": verdict(delta, se, n_min, c["variant"]),
        "method": method,
        "non_embedding_params_ratio": c["non_embedding_params"] / ref["non_embedding_params"],
        "flops_per_token_ratio": c["flops_per_token"] / ref["flops_per_token"],
        "compute_ratio": c["compute_flops"] / ref["compute_flops"] if ref["compute_flops"] else None,
        "seconds_ratio": (c["seconds_mean"] / ref["seconds_mean"]) if c.get("seconds_mean") and ref.get("seconds_mean") else None,
    }


def equal_budget_pairs(configs: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Each variant against every GPT-2 best-LR point at GPT-2's ``key`` (``non_embedding_params``
    or ``compute_flops``): interpolated in log ``key`` between the variant's measured points
    (same context; same steps for parameters), or its nearest point outside their range."""
    best = [c for c in configs if c["best_lr"] and c["val_loss_mean"] is not None]
    unit = "parameters" if key == "non_embedding_params" else "FLOPs"
    pairs = []
    for ref in (c for c in best if c["arch"] == "gpt2"):
        x = float(ref[key])
        for variant in sorted({c["variant"] for c in best if c["arch"] != "gpt2"}):
            curve = sorted(
                (c for c in best if c["variant"] == variant and c["block_size"] == ref["block_size"]
                 and (key != "non_embedding_params" or c["max_steps"] == ref["max_steps"])),
                key=lambda c: c[key],
            )
            if not curve:
                continue
            point = _at(curve, key, x, unit)
            pair = _pair(point, ref, ref["shape"], point["method"])
            pair[key] = x
            pairs.append(pair)
    return pairs


def _at(curve: list[dict[str, Any]], key: str, x: float, unit: str) -> dict[str, Any]:
    """The curve's mean (and std, seeds) at ``x``: measured, interpolated or nearest."""
    for c in curve:
        if math.isclose(float(c[key]), x, rel_tol=1e-9):
            return {**c, "method": f"measured ({c['shape']}, {c['max_steps']} steps)"}
    below = [c for c in curve if c[key] < x]
    above = [c for c in curve if c[key] > x]
    if below and above:
        a, b = below[-1], above[0]
        t = (math.log(x) - math.log(a[key])) / (math.log(b[key]) - math.log(a[key]))
        std = None
        if a["val_loss_std"] is not None and b["val_loss_std"] is not None:
            std = a["val_loss_std"] + t * (b["val_loss_std"] - a["val_loss_std"])
        return {
            **a,
            "val_loss_mean": a["val_loss_mean"] + t * (b["val_loss_mean"] - a["val_loss_mean"]),
            "val_loss_std": std,
            "n": min(a["n"], b["n"]),
            "non_embedding_params": x if key == "non_embedding_params" else a["non_embedding_params"],
            "compute_flops": x if key == "compute_flops" else a["compute_flops"],
            "lr": None,
            "seconds_mean": None,
            "method": f"interpolated in log-{unit} between {a['shape']} ({a['max_steps']} steps) and "
                      f"{b['shape']} ({b['max_steps']} steps)",
        }
    nearest = min(curve, key=lambda c: abs(math.log(c[key]) - math.log(x)))
    return {**nearest, "method": f"nearest: {nearest['shape']} ({nearest['max_steps']} steps) at "
                                 f"{nearest[key] / x:.2f}x the {unit} (outside the measured range)"}


def summarize(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Configurations and the three comparisons of ``rows`` (see the module doc)."""
    configs = configurations(rows)
    return {
        "configurations": configs,
        "equal_shape": equal_shape_pairs(rows, configs),
        "equal_params": equal_budget_pairs(configs, "non_embedding_params"),
        "equal_compute": equal_budget_pairs(configs, "compute_flops"),
    }


# ---------------------------------------------------------------------------- write


def _variant_styles(rows: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """A colour and marker per variant: the architecture's own for the shipped one."""
    styles: dict[str, tuple[str, str]] = {}
    others = iter(OTHER_COLORS * 4)
    shipped = {r["variant"] for r in rows if r.get("_default_variant")}
    variants = sorted({(r["variant"], r["arch"]) for r in rows}, key=lambda v: (v[1] != "gpt2", v[0] not in shipped, v[0]))
    for variant, arch in variants:
        color, marker = ARCH_STYLE.get(arch, ("tab:gray", "^"))
        if variant not in shipped or color in {s[0] for s in styles.values()}:
            color = next(others)
        styles[variant] = (color, marker)
    return styles


def plot_scaling(rows: list[dict[str, Any]], path: Path, title: str, configs: list[dict[str, Any]] | None = None) -> None:
    """Two panels: val loss vs non-embedding parameters, and vs training compute; per
    variant every run (faint) and the best-LR mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    configs = configurations(rows) if configs is None else configs
    done = [r for r in rows if r["val_loss"] is not None]
    best = [c for c in configs if c["best_lr"] and c["val_loss_mean"] is not None]
    styles = _variant_styles(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    panels = (("non_embedding_params", "non-embedding parameters"), ("compute_flops", "training compute (FLOPs)"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for variant, (color, marker) in styles.items():
            runs = [r for r in done if r.get("variant") == variant]
            ax.scatter([r[key] for r in runs], [r["val_loss"] for r in runs], color=color, marker=marker, s=12,
                       alpha=0.3, zorder=2)
            mine = [c for c in best if c["variant"] == variant]
            # One line per width (points that differ only in depth and the like), so that the
            # lines read as curves instead of zig-zagging between widths.
            for width in sorted({c["n_embd"] for c in mine}):
                line = sorted((c for c in mine if c["n_embd"] == width), key=lambda c: c[key])
                ax.plot([c[key] for c in line], [c["val_loss_mean"] for c in line], color=color, alpha=0.5, linewidth=1)
            if mine:
                ax.errorbar([c[key] for c in mine], [c["val_loss_mean"] for c in mine],
                            yerr=[c["val_loss_std"] or 0.0 for c in mine], color=color, marker=marker, markersize=6,
                            linestyle="none", capsize=3, label=variant + " (best LR, mean ± std)", zorder=3)
            for c in mine:
                ax.annotate(f"{c['n_layer']}L-{c['n_embd']}d", (c[key], c["val_loss_mean"]), fontsize=7,
                            xytext=(4, 3), textcoords="offset points", color=color)
        entropies = {round(r["unigram_entropy"], 6) for r in done if r["unigram_entropy"] is not None}
        if len(entropies) == 1:
            ax.axhline(next(iter(entropies)), color="gray", linestyle="--", linewidth=0.8,
                       label="unigram entropy (no context)")
        ax.set_xscale("log")
        # 1-2-5 ticks, labelled: a sweep often spans less than a decade
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        tick = (lambda v, _: f"{v:.0e}") if key == "compute_flops" else (lambda v, _: human_count(v))
        ax.xaxis.set_major_formatter(FuncFormatter(tick))
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on short ranges
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.25)
    axes[0].set_ylabel("validation loss (nats/token)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def _mean_text(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return "—"
    spread = f" ± {std:.3f}" if std is not None else ""
    return f"{mean:.3f}{spread} ({n})" + ("" if n >= MIN_SEEDS else "*")


def _lr_text(lr: float | None) -> str:
    return "—" if lr is None else f"{lr:g}"


def _comparison_table(pairs: list[dict[str, Any]], first: str) -> list[str]:
    lines = [f"| {first} | variant | variant val loss | GPT-2 val loss | variant − GPT-2 | ± s.e. | verdict | LR variant / GPT-2 | how |",
             "|---|---|--:|--:|--:|--:|---|---|---|"]
    for p in pairs:
        lines.append(
            f"| {p['shape']} | {p['variant']} | {_mean_text(p['crate_val_loss'], p['crate_std'], p['crate_seeds'])} | "
            f"{_mean_text(p['gpt2_val_loss'], p['gpt2_std'], p['gpt2_seeds'])} | {p['delta']:+.3f} | {_fmt(p['delta_se'])} | "
            f"{p['verdict']} | {_lr_text(p['crate_lr'])} / {_lr_text(p['gpt2_lr'])} | {p['method']} |"
        )
    return lines


def markdown(rows: list[dict[str, Any]], pairs: list[dict[str, Any]], sweep: dict[str, Any], env: dict[str, Any], png: str,
             summary: dict[str, list[dict[str, Any]]] | None = None) -> str:
    """The report as Markdown."""
    summary = summary or {"configurations": configurations(rows), "equal_params": [], "equal_compute": []}
    configs = summary["configurations"]
    name = sweep.get("name") or "runs"
    steps = sorted({r["max_steps"] for r in rows})
    tokens = sorted({r["tokens"] for r in rows})
    seeds_per = sorted({c["n"] for c in configs})
    seeds = sorted({r["seed"] for r in rows})
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
                 f"{', '.join(f'{t:,}' for t in tokens)} training tokens; "
                 f"{'/'.join(str(n) for n in seeds_per)} finished seed(s) per configuration (seeds "
                 f"{', '.join(str(s) for s in seeds)}); same data order per seed for every configuration.")
    lrs = sorted({r["lr"] for r in rows})
    if len(lrs) > 1:
        lines.append(f"- Learning rates tried: {', '.join(_lr_text(lr) for lr in lrs)}; every comparison takes each "
                     "variant's best (lowest mean val loss) at each shape and budget.")
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
    lines.append("| run | arch | layers | width | heads | LR | seed | params | non-emb. params | FLOPs/token | tokens | compute | val loss | wall (s) |")
    lines.append("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in sorted(rows, key=lambda r: (r["arch"], r["non_embedding_params"], r["n_layer"], r["lr"], r["seed"], r["run"])):
        loss = _fmt(r["val_loss"]) + ("" if r["status"] == "done" else f" ({r['status']})")
        lines.append(
            f"| {r['run']} | {ARCH_LABEL.get(r['arch'], r['arch'])} | {r['n_layer']} | {r['n_embd']} | {r['n_head']} | "
            f"{_lr_text(r['lr'])} | {r['seed']} | "
            f"{human_count(r['params'])} | {human_count(r['non_embedding_params'])} | {human_count(r['flops_per_token'])} | "
            f"{human_count(r['tokens'])} | {human_flops(r['compute_flops'])} | {loss} | {_fmt(r['seconds'], '.0f')} |"
        )
    entropies = sorted({round(r["unigram_entropy"], 3) for r in rows if r["unigram_entropy"] is not None})
    if entropies:
        lines.append("")
        lines.append(f"Unigram entropy of the training tokens (the loss of a model that ignores context): "
                     f"{', '.join(f'{e:.3f}' for e in entropies)} nats/token.")
    lines += ["", "## Configurations (mean ± std over seeds)", ""]
    lines.append("| variant | shape | steps | LR | seeds | val loss | non-emb. params | compute | least sparse layer | tokens/s | |")
    lines.append("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|")
    for c in configs:
        note = []
        if c["best_lr"]:
            note.append("**best LR**" + (" (at the edge of the grid: try beyond it)" if c["lr_at_edge"] else ""))
        if c["needs_seeds"]:
            note.append(f"needs {MIN_SEEDS} seeds")
        lines.append(
            f"| {c['variant']} | {c['shape']} | {c['max_steps']} | {_lr_text(c['lr'])} | {c['n']} | "
            f"{_mean_text(c['val_loss_mean'], c['val_loss_std'], c['n'])} | {human_count(c['non_embedding_params'])} | "
            f"{human_flops(c['compute_flops'])} | {_fmt(c['min_layer_sparsity_mean'], '.0%')} | "
            f"{_fmt(c['tokens_per_s_mean'], ',.0f')} | {'; '.join(note)} |"
        )
    if pairs:
        lines += ["", "## CRATE vs GPT-2 at equal shape", ""]
        lines.append("Each variant at its best learning rate, mean ± std over seeds (n); * = fewer than "
                     f"{MIN_SEEDS} seeds.")
        lines.append("")
        lines.append("| shape | variant | CRATE val loss | GPT-2 val loss | CRATE − GPT-2 | ± s.e. | verdict | LR CRATE / GPT-2 | non-emb. params CRATE/GPT-2 | FLOPs/token CRATE/GPT-2 |")
        lines.append("|---|---|--:|--:|--:|--:|---|---|--:|--:|")
        for p in pairs:
            lines.append(
                f"| {p['shape']} | {p['variant']} | {_mean_text(p['crate_val_loss'], p['crate_std'], p['crate_seeds'])} | "
                f"{_mean_text(p['gpt2_val_loss'], p['gpt2_std'], p['gpt2_seeds'])} | {p['delta']:+.3f} | {_fmt(p['delta_se'])} | "
                f"{p['verdict']} | {_lr_text(p['crate_lr'])} / {_lr_text(p['gpt2_lr'])} | "
                f"{p['non_embedding_params_ratio']:.2f} | {p['flops_per_token_ratio']:.2f} |"
            )
        crate_better = sum(p["delta"] < 0 for p in pairs)
        lines.append("")
        called = sum(p["verdict"].endswith(" lower") for p in pairs)
        lines.append(f"CRATE has the lower val loss at {crate_better} of {len(pairs)} equal shapes; {called} of the "
                     f"{len(pairs)} differences are beyond 2 s.e. with {MIN_SEEDS}+ seeds on both sides.")
    for key, title in (("equal_params", "At equal non-embedding parameters"), ("equal_compute", "At equal training compute")):
        rows_at = summary.get(key) or []
        if not rows_at:
            continue
        lines += ["", f"## {title}", ""]
        unit = "non-embedding parameters" if key == "equal_params" else "training FLOPs"
        lines.append(f"At each GPT-2 point's {unit} (its shape in the first column), each variant's best-LR mean "
                     "as the *how* column says: measured there, interpolated between two of its measured points, or "
                     "its nearest point when GPT-2's lies outside its range (then it is not a like-for-like comparison).")
        lines.append("")
        lines += _comparison_table(rows_at, "GPT-2 at")
    standard_crate = all(r["ista"] == "overcompletex4" for r in rows if r["arch"] == "crate")
    lines += [
        "",
        "## Reading it",
        "",
        "- *params* counts every parameter (the tied LM head once); *non-emb. params* leaves out "
        "the token and position embeddings (Kaplan et al. 2020's N).",
        "- *FLOPs/token* is training (forward + backward) compute per token from the model's own count "
        "(attention and the LM head included); *compute* = FLOPs/token x tokens.",
        f"- val loss: mean ± sample std over the finished seeds (n); * marks fewer than {MIN_SEEDS} seeds. "
        "s.e. of a difference = sqrt(s1²/n1 + s2²/n2); the verdict names the lower one only when the difference "
        f"is beyond 2 s.e. and both sides have {MIN_SEEDS}+ seeds (else `needs {MIN_SEEDS} seeds` / `within 2 s.e.`).",
        "- *least sparse layer*: the fraction of exact zeros in the sparse codes (GPT-2: of MLP units <= 0) "
        "of the layer with the fewest, at the last white-box measurement, mean over seeds; *tokens/s*: the "
        "median training throughput of a run, mean over seeds (on a shared machine, see wall time below).",
        "- Best LR: per variant, shape and budget, the learning rate with the lowest mean val loss; one at the "
        "edge of the grid may not be the best there is.",
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
            "the two architectures learn in the first steps, not where they end."
        )
    if any(c["n"] < MIN_SEEDS for c in configs):
        lines.append(
            f"- Some configurations have fewer than {MIN_SEEDS} seeds: differences of a few hundredths there are "
            f"within what another seed could change (rerun with `--seeds {MIN_SEEDS}`)."
        )
    lines.append("")
    return "\n".join(lines)


def _public(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if not k.startswith("_")}


def sweep_report(sweep_dir: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Write ``scaling.png``, ``scaling.md`` and ``scaling.json`` for the runs in ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out) if out else sweep_dir
    rows, sweep = collect_runs(sweep_dir)
    summary = summarize(rows)
    pairs = summary["equal_shape"]
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
    plot_scaling(rows, out_dir / "scaling.png", title, summary["configurations"])
    atomic_write_text(out_dir / "scaling.md", markdown(rows, pairs, meta, env, "scaling.png", summary))
    report = {
        "sweep": meta,
        "environment": env,
        "min_seeds": MIN_SEEDS,
        "runs": [_public(r) for r in rows],
        "configurations": [_public(c) for c in summary["configurations"]],
        "equal_shape": pairs,
        "equal_params": summary["equal_params"],
        "equal_compute": summary["equal_compute"],
    }
    atomic_write_json(out_dir / "scaling.json", report)
    return {**report, "files": [str(out_dir / n) for n in ("scaling.png", "scaling.md", "scaling.json")]}
