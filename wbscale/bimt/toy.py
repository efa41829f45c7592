"""The BIMT toy path: a small MLP on a task of the BIMT paper, in a plain PyTorch loop.

Same cost, gradient, swap and prune code as the language-model callback (one
implementation); only the loop is different. ``wbscale bimt toy RECIPE`` trains the MLP
with BIMT and (``bimt.toy.baseline``) the same MLP plainly, prunes both at
``bimt.prune_threshold``, and writes ``toy.json`` (the numbers) and ``connectivity.png``
(both networks side by side) into ``bimt.toy.out_dir``. A few seconds to a minute on a CPU.

Tasks (Liu, Gan & Tegmark 2023, sections 3.1 and 3.2):
- ``two-moons``: 2 inputs -> 2 classes, cross-entropy; the score is test accuracy.
- ``independence``: (x1..x4) in [-1, 1]^4 -> ((x1 + x3)^3, x2^2 + sin(pi x4)), MSE; two
  independent outputs, so BIMT should find two separate modules.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wbscale.bimt.cost import add_cost_gradient, lambda_at, modularity_metrics
from wbscale.bimt.geometry import Connection, Geometry, Group, PermTarget, check_geometry
from wbscale.bimt.plots import draw_panel, save_figure
from wbscale.bimt.prune import count_above, prune_
from wbscale.bimt.swaps import swap_round
from wbscale.io import atomic_write_json

TASKS = {"two-moons": (2, 2), "independence": (4, 2)}


class ToyMLP(nn.Module):
    """An MLP with SiLU whose input and output neurons can move too: ``in_perm[q]`` is the
    input feature at input slot q, ``out_perm[q]`` the output at output slot q (as in the
    published BioMLP), so swapping them preserves the function seen from outside."""

    def __init__(self, shape: list[int]):
        super().__init__()
        self.shape = list(shape)
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(shape[:-1], shape[1:], strict=True))
        self.register_buffer("in_perm", torch.arange(shape[0]))
        self.register_buffer("out_perm", torch.arange(shape[-1]))

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, self.in_perm]
        for linear in self.linears[:-1]:
            x = F.silu(linear(x))
        y = self.linears[-1](x)
        return y[:, torch.argsort(self.out_perm)]


def mlp_geometry(model: ToyMLP, locality: float = 1.0, layer_distance: float = 0.1,
                 reduction: str = "sum", bias_penalty: bool = False) -> Geometry:
    """Layer l of neurons is group ``layer{l}``; every layer (inputs and outputs too) swaps."""
    depth = len(model.linears)
    groups: dict[str, Group] = {}
    for l, width in enumerate(model.shape):
        targets = []
        if l > 0:
            targets += [PermTarget(f"linears.{l - 1}.weight", 0), PermTarget(f"linears.{l - 1}.bias", 0)]
        if l < depth:
            targets.append(PermTarget(f"linears.{l}.weight", 1))
        if l == 0:
            targets.append(PermTarget("in_perm", 0))
        if l == depth:
            targets.append(PermTarget("out_perm", 0))
        kind = "input" if l == 0 else "output" if l == depth else "hidden"
        groups[f"layer{l}"] = Group(f"layer{l}", kind, width, targets=tuple(targets), layer=l)
    conns = [
        Connection(f"linears.{l}.weight", f"layer{l + 1}", f"layer{l}", layer=l,
                   bias=f"linears.{l}.bias", plot=(0, l + 1, l))
        for l in range(depth)
    ]
    geom = Geometry(groups, conns, locality=locality, layer_distance=layer_distance,
                    reduction=reduction, bias_penalty=bias_penalty, panels=["MLP"])
    check_geometry(model, geom)
    return geom


# ---------------------------------------------------------------------------- data


def make_data(task: str, n: int, noise: float, generator: torch.Generator, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    if task == "two-moons":
        # sklearn's make_moons: an upper half circle and a lower one shifted right and down
        n_outer = n // 2
        t = torch.rand(n, generator=generator, dtype=torch.float64) * math.pi
        outer = torch.stack([torch.cos(t[:n_outer]), torch.sin(t[:n_outer])], 1)
        inner = torch.stack([1 - torch.cos(t[n_outer:]), 0.5 - torch.sin(t[n_outer:])], 1)
        x = torch.cat([outer, inner]) + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
        y = torch.cat([torch.zeros(n_outer, dtype=torch.long), torch.ones(n - n_outer, dtype=torch.long)])
        return x.to(dtype), y
    if task == "independence":
        x = torch.rand(n, 4, generator=generator, dtype=torch.float64) * 2 - 1
        y = torch.stack([(x[:, 0] + x[:, 2]) ** 3, x[:, 1] ** 2 + torch.sin(math.pi * x[:, 3])], 1)
        return x.to(dtype), y.to(dtype)
    raise ValueError(f"unknown toy task {task!r}; one of {', '.join(TASKS)}")


def task_loss(task: str, out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y) if task == "two-moons" else F.mse_loss(out, y)


@torch.no_grad()
def evaluate(task: str, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    out = model(x)
    result = {"loss": float(task_loss(task, out, y))}
    if task == "two-moons":
        result["accuracy"] = float((out.argmax(1) == y).double().mean())
    return result


# ---------------------------------------------------------------------------- training


@dataclass
class ToyRun:
    """One trained toy network and its numbers."""

    model: ToyMLP
    geometry: Geometry
    result: dict[str, Any]


def train_toy(cfg: Any, bimt: bool = True) -> ToyRun:
    """Train the toy MLP of ``cfg`` (a ``BIMTConfig``), with BIMT or plainly (``bimt=False``:
    no cost, no swaps), then prune at ``cfg.prune_threshold``; deterministic per seed."""
    toy = cfg.toy
    dtype = torch.float64 if toy.float64 else torch.float32
    d_in, d_out = TASKS[toy.task]
    gen = torch.Generator().manual_seed(toy.seed)
    x, y = make_data(toy.task, toy.train_samples, toy.noise, gen, dtype)
    x_test, y_test = make_data(toy.task, toy.test_samples, toy.noise, gen, dtype)
    torch.manual_seed(toy.seed)
    model = ToyMLP([d_in, *toy.hidden, d_out]).to(dtype)
    geom = mlp_geometry(model, cfg.locality, cfg.layer_distance, cfg.reduction, cfg.bias_penalty)
    optimizer = torch.optim.AdamW(model.parameters(), lr=toy.lr, weight_decay=0.0)
    swaps = 0
    t0 = time.perf_counter()
    for step in range(toy.steps):
        optimizer.zero_grad(set_to_none=False)
        loss = task_loss(toy.task, model(x), y)
        loss.backward()
        if bimt:
            add_cost_gradient(model, geom, lambda_at(cfg.lambda_phases, step, toy.steps))
        optimizer.step()
        if bimt and cfg.swap_every and (step + 1) % cfg.swap_every == 0:
            swaps += sum(d.accepted for d in swap_round(model, geom, cfg.swap_top_k, optimizer))
    seconds = time.perf_counter() - t0
    before = evaluate(toy.task, model, x_test, y_test)
    metrics = modularity_metrics(model, geom, cfg.prune_threshold, cfg.mass_radius, prefix="")
    above = count_above(model, geom, cfg.prune_threshold)
    prune_(model, geom, cfg.prune_threshold)
    after = evaluate(toy.task, model, x_test, y_test)
    result = {
        "mode": "bimt" if bimt else "plain",
        "train_loss": float(loss.detach()),
        "test_before_prune": before,
        "test_after_prune": after,
        "connections_above_threshold": above,
        "connections_total": geom.num_weights(model),
        "connection_cost": metrics["connection_cost"],
        "mass_within_radius": metrics["mass_within_radius"],
        "swaps_accepted": swaps,
        "seconds": seconds,
    }
    return ToyRun(model, geom, result)


def _labels(task: str) -> tuple[list[str], list[str]]:
    if task == "two-moons":
        return ["$x_1$", "$x_2$"], ["class 1", "class 2"]
    return ["$x_1$", "$x_2$", "$x_3$", "$x_4$"], ["$(x_1+x_3)^3$", "$x_2^2+\\sin(\\pi x_4)$"]


def plot_toy(runs: list[ToyRun], task: str, out_png: str | Path) -> Path:
    """The toy networks side by side (after pruning), inputs at the bottom, outputs on top."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6 * len(runs), 4.2))
    inputs, outputs = _labels(task)
    for k, run in enumerate(runs):
        ax = fig.add_subplot(1, len(runs), k + 1)
        draw_panel(ax, run.model, run.geometry, 0, max_width=3.0, dot_size=12)
        depth = len(run.model.linears)
        xs_in = run.geometry.groups["layer0"].coordinates().tolist()
        for x, i in zip(xs_in, run.model.in_perm.tolist(), strict=True):
            ax.text(x, -0.25, inputs[i], ha="center", va="top", fontsize=8)
        xs_out = run.geometry.groups[f"layer{depth}"].coordinates().tolist()
        for x, o in zip(xs_out, run.model.out_perm.tolist(), strict=True):
            ax.text(x, depth + 0.25, outputs[o], ha="center", va="bottom", fontsize=8)
        r = run.result
        score = r["test_after_prune"].get("accuracy")
        score_text = f"test acc {score:.3f}" if score is not None else f"test MSE {r['test_after_prune']['loss']:.2e}"
        ax.set_title(f"{r['mode']}: {r['connections_above_threshold']} connections\n{score_text}", fontsize=9, pad=14)
        ax.set_yticks([])
    return save_figure(fig, out_png)


def run_toy(cfg: Any, out_dir: str | Path | None = None) -> dict[str, Any]:
    """BIMT (and the plain baseline) on the recipe's toy task; writes toy.json + connectivity.png."""
    out = Path(out_dir or cfg.toy.out_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors of a few hundred numbers: threads only add overhead
    try:
        runs = [train_toy(cfg, bimt=True)]
        if cfg.toy.baseline:
            runs.append(train_toy(cfg, bimt=False))
    finally:
        torch.set_num_threads(threads)
    summary: dict[str, Any] = {"task": cfg.toy.task, "threshold": cfg.prune_threshold,
                               "float64": cfg.toy.float64, "steps": cfg.toy.steps}
    for run in runs:
        summary[run.result["mode"]] = run.result
    if cfg.toy.baseline:
        b, p = summary["bimt"]["connections_above_threshold"], summary["plain"]["connections_above_threshold"]
        summary["connection_reduction"] = p / max(1, b)
    summary["plot"] = str(plot_toy(runs, cfg.toy.task, out / "connectivity.png"))
    atomic_write_json(out / "toy.json", summary)
    return summary
