"""``wbscale bench train``: end-to-end training throughput of a recipe under its strategy.

Runs ``--steps`` optimizer steps of the recipe (its ``distributed:`` section, or
``--devices`` / ``--set`` overrides) with no checkpoints, loggers, samples or metrics in
the way, times every optimizer step, and writes
``bench/results/train-<recipe>-<strategy>-w<world>-<device>-<date>.json`` plus a ``.md``
line with the device:

- ``tokens_per_second``: global tokens per second over the steps after ``--warmup``,
- ``step_time_s``: mean / median / min over the same steps,
- ``peak_memory_bytes``: per rank (CUDA: max allocated; CPU: the process's peak RSS),
- ``mfu``: on a GPU with a known peak (model FLOPs per token x tokens/s / peak x world).

Multi-process runs use the same launch as ``wbscale fit`` (Lightning re-runs the command
line in each process, or torchrun/srun start them); rank 0 writes the report.
"""

from __future__ import annotations

import dataclasses
import re
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from wbscale.config import Recipe
from wbscale.hardware import device_peak_flops, mfu
from wbscale.io import atomic_write_json, atomic_write_text
from wbscale.provenance import device_name, git_commit, package_versions
from wbscale.sizing import tokens_per_step as tokens_per_step_of

RESULTS_DIR = Path("bench/results")


class StepTimer(L.Callback):
    """Wall time of every optimizer step (CUDA synchronised), and per-rank peak memory."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self._last: float | None = None
        self.peaks: list[int] = []

    def _now(self, pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._last = self._now(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches != 0:
            return
        now = self._now(pl_module)
        if self._last is not None:
            self.step_times.append(now - self._last)
        self._last = now

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        gathered = trainer.strategy.all_gather(torch.tensor([float(peak)], device=pl_module.device))
        self.peaks = [int(v) for v in gathered.flatten().tolist()]


def bench_train(recipe: Recipe, steps: int, warmup: int = 2, out_dir: Path = RESULTS_DIR) -> dict[str, Any] | None:
    """Train ``steps`` optimizer steps and report throughput; rank 0 returns the report."""
    from wbscale.ckpt.elastic import AccumulationChange
    from wbscale.train.datamodule import TokenDataModule
    from wbscale.train.fit import ensure_data, resolve_vocab
    from wbscale.train.module import LMModule
    from wbscale.train.parallel import parallelize
    from wbscale.train.trainer import accelerator_for, build_trainer, precision_for

    if steps <= warmup:
        from wbscale.errors import UserError

        raise UserError(f"--steps ({steps}) must exceed --warmup ({warmup}): warm-up steps are not timed")
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, max_steps=steps))
    data_dir = ensure_data(recipe, progress=False)
    recipe = resolve_vocab(recipe, data_dir)
    L.seed_everything(recipe.train.seed, workers=True, verbose=False)
    accelerator = accelerator_for(recipe)
    precision = precision_for(recipe, accelerator)
    timer = StepTimer()
    module = LMModule(recipe)
    t, d = recipe.train, recipe.distributed
    strategy = parallelize(module.model, recipe, accelerator, precision)
    trainer = build_trainer(
        recipe, accelerator=accelerator, precision=precision, strategy=strategy,
        callbacks=[timer, AccumulationChange()], root_dir=out_dir / ".runs", validate=False,
    )
    trainer.fit(module, datamodule=TokenDataModule(recipe, data_dir))
    if not trainer.is_global_zero:
        return None
    timed = timer.step_times[warmup:]
    world = trainer.world_size
    tokens_per_step = tokens_per_step_of(recipe, world)
    mean = statistics.fmean(timed)
    tokens_per_second = tokens_per_step / mean
    flops = module.model.flops_per_token(recipe.model.block_size)
    peak = device_peak_flops(module.device)
    strategy = d.strategy if d.strategy != "deepspeed" else f"zero{d.zero_stage}"
    if d.offload_optimizer or d.offload_params:
        strategy += "-offload" + ("-params" if d.offload_params else "")
    device = device_name(accelerator)
    report = {
        "recipe": recipe.train.run_name,
        "model": f"{recipe.model.arch} {recipe.model.n_layer}L-{recipe.model.n_embd}d-{recipe.model.n_head}h",
        "params": module.model.num_params(non_embedding=False),
        "device": device,
        "accelerator": accelerator,
        "precision": precision,
        "strategy": strategy,
        "world_size": world,
        "torch_threads": torch.get_num_threads(),
        "micro_batch_size": t.micro_batch_size,
        "grad_accum": t.grad_accum,
        "block_size": recipe.model.block_size,
        "tokens_per_step": tokens_per_step,
        "steps": steps,
        "warmup_steps": warmup,
        "step_time_s": {"mean": mean, "median": statistics.median(timed), "min": min(timed)},
        "tokens_per_second": tokens_per_second,
        "flops_per_token": flops,
        "mfu": mfu(flops, tokens_per_second, peak, world),
        "peak_memory_bytes": timer.peaks,
        "versions": package_versions(("torch", "lightning", "deepspeed", "triton")),
        "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    safe_device = _slug(device)
    stem = f"train-{recipe.train.run_name}-{strategy}-w{world}-{safe_device}-{time.strftime('%Y%m%d-%H%M%S')}"
    atomic_write_json(out_dir / f"{stem}.json", report)
    atomic_write_text(out_dir / f"{stem}.md", format_report(report) + "\n")
    report["path"] = str(out_dir / f"{stem}.json")
    return report


def _slug(device: str) -> str:
    """``Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz (2 cores)`` -> ``intel-xeon-platinum-8481c``."""
    name = re.sub(r"\((R|TM)\)", "", device, flags=re.IGNORECASE)
    name = re.split(r" CPU| @| \(", name)[0]
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def format_report(r: dict[str, Any]) -> str:
    """One Markdown table row (with header) for a report."""
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a (CPU)"
    peak = max(r["peak_memory_bytes"]) / 2**30 if r["peak_memory_bytes"] else float("nan")
    return (
        "| recipe | model | device | strategy | world | tokens/s | step (s) | MFU | peak mem/rank (GiB) |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        f"| {r['recipe']} | {r['model']} | {r['device']} | {r['strategy']} | {r['world_size']} | "
        f"{r['tokens_per_second']:,.0f} | {r['step_time_s']['mean']:.3f} | {mfu} | {peak:.2f} |"
    )


def bench_archs(
    name: str, overrides: list[str], archs: list[str], steps: int, warmup: int = 2, out_dir: Path = RESULTS_DIR
) -> list[dict[str, Any]]:
    """The same recipe once per architecture, back to back in one process (a fair ratio)."""
    from wbscale.config import load_recipe

    reports = []
    for arch in archs:
        recipe = load_recipe(name, [*overrides, f"model.arch={arch}"])
        recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, run_name=f"{recipe.train.run_name}-{arch}"))
        report = bench_train(recipe, steps=steps, warmup=warmup, out_dir=out_dir)
        if report is not None:
            reports.append(report)
    return reports
