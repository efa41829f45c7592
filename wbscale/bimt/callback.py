"""BIMT as a Lightning callback: cost gradient, swap rounds, metrics, pruning at the end.

The model and ``training_step`` stay untouched (docs/architecture.md: BIMT is a callback):

- Loss term: ``on_before_optimizer_step`` adds ``lam * d(cost)/dw`` (closed form,
  :func:`wbscale.bimt.cost.add_cost_gradient`) to the gradients. Lightning calls it once per
  optimizer step, after the AMP unscale and before clipping, with DDP's all-reduce done;
  every rank adds the same term to the same averaged gradient. ``train/loss`` therefore
  stays the task loss; the cost is logged as ``bimt/connection_cost``.
  Under DeepSpeed the gradients live in DeepSpeed's buffers by then, so the same term is
  added by gradient hooks on the parameters instead (per micro-batch, divided by the
  accumulation steps). :class:`wbscale.dist.WeightEditor` makes that choice, and every
  other one that depends on the strategy: the callback never asks which strategy runs.
- Swaps: every ``swap_every`` optimizer steps, at the start of the next step (so a
  checkpoint written at a step boundary never sits between a step and its swap, and a
  resumed run swaps exactly where the uninterrupted one did). Rank 0 decides each group's
  permutation on the full weights, broadcasts it, and every rank applies it to the
  weights, their gradients and the optimizer moments (DeepSpeed ZeRO-1/2: to the fp32
  master partition and its moments, gathered and scattered back).
- State in the checkpoint: round counter, step of the last round, and per group the
  cumulative permutation (original unit at each slot) — the map from the swapped model
  back to the pretrained one.
- End of training: on a copy, prune |w| < ``prune_threshold``, report the val loss before
  and after (``bimt.json`` + logged), export ``runs/<run>/bimt-pruned/``; the cumulative
  permutations go to ``bimt-permutations.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from wbscale.bimt.cost import add_cost_gradient, cost_gradient, lambda_at, modularity_metrics
from wbscale.bimt.geometry import Geometry, geometry_from_config, tensor
from wbscale.bimt.prune import prune_
from wbscale.bimt.swaps import apply_permutation, compose, decide_swaps, parameter_moves
from wbscale.dist import WeightEditor
from wbscale.ranks import say
from wbscale.track.step_metrics import log_step_metrics

REPORT_FILE = "bimt.json"
PERMUTATIONS_FILE = "bimt-permutations.json"
EXPORT_DIR = "bimt-pruned"


def _lm(pl_module: pl.LightningModule) -> nn.Module:
    model = getattr(pl_module, "model", pl_module)
    return getattr(model, "_orig_mod", model)


@torch.no_grad()
def _fingerprint(model: nn.Module, geom: Geometry) -> float:
    """Order-sensitive checksum of the cost's weights (first row and column of each)."""
    total = 0.0
    for conn in geom.connections:
        w = tensor(model, conn.name).detach().double()
        rows = torch.arange(1, w.shape[0] + 1, device=w.device, dtype=torch.float64)
        cols = torch.arange(1, w.shape[1] + 1, device=w.device, dtype=torch.float64)
        total += float((w[:, 0] * rows).sum() + (w[0, :] * cols).sum())
    return total


class BIMTCallback(Callback):
    """Brain-inspired modular training of the module's language model (``pl_module.model``).

    Args:
        cfg: the recipe's ``bimt`` section (:class:`wbscale.config.BIMTConfig`).
        max_steps: the run's optimizer steps (the lambda phases are fractions of it).
        metrics_every: cadence of the modularity metrics in optimizer steps.
        run_dir, data_dir: where ``bimt.json`` / the pruned export go, and the val data for
            the before/after-pruning loss (None: no report, e.g. in unit tests).
        recipe: written into the pruned export (inference folder).
    """

    def __init__(
        self,
        cfg: Any,
        max_steps: int,
        metrics_every: int = 10,
        run_dir: str | Path | None = None,
        data_dir: str | Path | None = None,
        val_batch_size: int = 8,
        val_batches: int = 10,
        block_size: int | None = None,
        recipe: Any = None,
    ) -> None:
        self.cfg = cfg
        self.max_steps = int(max_steps)
        self.metrics_every = int(metrics_every)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.val_batch_size = val_batch_size
        self.val_batches = val_batches
        self.block_size = block_size
        self.recipe = recipe
        self.geom: Geometry | None = None
        # checkpointed state
        self.round = 0
        self.last_swap_step = -1
        self.permutations: dict[str, Tensor] = {}
        # runtime
        self.last_round: dict[str, float] = {}
        self.report: dict[str, Any] | None = None
        self._last_metrics_step = -1
        self._editor: WeightEditor | None = None  # made in setup, from the trainer's strategy

    @classmethod
    def from_recipe(cls, recipe: Any, run_dir: str | Path, data_dir: str | Path) -> BIMTCallback:
        t = recipe.train
        return cls(
            recipe.bimt, max_steps=t.max_steps, metrics_every=recipe.bimt.metrics_every or t.log_every,
            run_dir=run_dir, data_dir=data_dir, val_batch_size=t.micro_batch_size,
            val_batches=t.val_batches, block_size=recipe.model.block_size, recipe=recipe,
        )

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        model = _lm(pl_module)
        self.geom = geometry_from_config(model, self.cfg)
        for g in self.geom.swappable():
            self.permutations.setdefault(g.name, torch.arange(g.units))
        self._editor = WeightEditor(trainer.strategy, "bimt")  # refuses ZeRO-3 and DeepSpeed fp16

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = _lm(pl_module)
        names = [c.name for c in self.geom.connections]
        if self.geom.bias_penalty:
            names += [c.bias for c in self.geom.connections if c.bias is not None]
        self._editor.add_gradient_term(
            {name: tensor(model, name) for name in names},
            term=lambda name, coef: cost_gradient(model, self.geom, name, coef),
            add_all=lambda coef: add_cost_gradient(model, self.geom, coef),
            accumulate=trainer.accumulate_grad_batches,
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._editor.close()

    # ------------------------------------------------------------------ loss term
    def lam(self, step: int) -> float:
        return lambda_at(self.cfg.lambda_phases, step, self.max_steps)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._editor.before_optimizer_step(self.lam(trainer.global_step))

    # ------------------------------------------------------------------ swaps
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        self._editor.set_coefficient(self.lam(step))
        every = self.cfg.swap_every
        if every and step > 0 and step % every == 0 and step != self.last_swap_step:
            self.swap_round(trainer, pl_module)
            self.last_swap_step = step

    def swap_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Decide on rank 0, broadcast, apply everywhere; one group after the other."""
        model = _lm(pl_module)
        t0 = time.perf_counter()
        by_kind: dict[str, int] = {}
        delta = 0.0
        for group in self.geom.swappable():
            payload = None
            if trainer.is_global_zero:
                d = decide_swaps(model, self.geom, group.name, self.cfg.swap_top_k)
                payload = (d.perm, d.accepted, d.delta)
            if trainer.world_size > 1:
                payload = trainer.strategy.broadcast(payload, src=0)
            perm, accepted, group_delta = payload
            if accepted:
                self._apply(model, group.name, perm)
                self.permutations[group.name] = compose(self.permutations[group.name], perm)
            by_kind[group.kind] = by_kind.get(group.kind, 0) + int(accepted)
            delta += group_delta
        self.round += 1
        if trainer.world_size > 1:
            self._check_replicas(trainer, model)
        metrics = {f"bimt/swaps_accepted/{kind}": float(n) for kind, n in sorted(by_kind.items())}
        metrics["bimt/swaps_accepted"] = float(sum(by_kind.values()))
        metrics["bimt/swap_round"] = float(self.round)
        metrics["bimt/swap_cost_change"] = delta * self.geom.scale(model)
        metrics["bimt/swap_round_seconds"] = time.perf_counter() - t0
        self.last_round = metrics
        self._log(trainer, metrics)
        return metrics

    def _check_replicas(self, trainer: pl.Trainer, model: nn.Module) -> None:
        """Every rank must hold the same (swapped) weights; a silent divergence would make
        DDP average gradients of different networks."""
        values = trainer.strategy.all_gather(torch.tensor([_fingerprint(model, self.geom)], dtype=torch.float64))
        values = values.flatten().tolist()
        if any(v != values[0] for v in values):
            raise RuntimeError(f"bimt: ranks disagree after swap round {self.round} (weight fingerprints {values})")

    def _apply(self, model: nn.Module, group: str, perm: Tensor) -> None:
        """The weights and their gradients here; the optimizer state wherever the strategy keeps it."""
        apply_permutation(model, self.geom, group, perm, state_fn=lambda p: [])
        self._editor.permute_optimizer_state(parameter_moves(model, self.geom, group, perm))

    # ------------------------------------------------------------------ metrics
    def _log(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        log_step_metrics(trainer, metrics)

    def metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        model = _lm(pl_module)
        out = modularity_metrics(model, self.geom, self.cfg.prune_threshold, self.cfg.mass_radius)
        out["bimt/lambda"] = self.lam(trainer.global_step)
        return out

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0 and trainer.is_global_zero:
            self._log(trainer, self.metrics(trainer, pl_module))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_metrics_step or self.metrics_every <= 0 or step % self.metrics_every:
            return
        self._last_metrics_step = step
        if trainer.is_global_zero:
            self._log(trainer, self.metrics(trainer, pl_module))

    # ------------------------------------------------------------------ end: prune + report
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.run_dir is not None and self.data_dir is not None:
            self.report = self.prune_and_report(trainer, pl_module)
        trainer.strategy.barrier("wbscale-bimt-report")

    @torch.no_grad()
    def prune_and_report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        from wbscale.data.loader import val_batches
        from wbscale.inference import evaluate
        from wbscale.io import atomic_write_json

        model = copy.deepcopy(_lm(pl_module)).float().eval()
        batches = val_batches(self.data_dir, self.block_size or model.config.block_size, self.val_batch_size, self.val_batches)
        metrics = modularity_metrics(model, self.geom, self.cfg.prune_threshold, self.cfg.mass_radius, prefix="")
        before = evaluate(model, batches)["loss"]
        counts = prune_(model, self.geom, self.cfg.prune_threshold)
        after = evaluate(model, batches)["loss"]
        report = {
            "step": trainer.global_step,
            "prune_threshold": self.cfg.prune_threshold,
            "val_loss_before_prune": before,
            "val_loss_after_prune": after,
            "connections_kept": counts["kept"],
            "connections_total": counts["total"],
            "connection_cost": metrics["connection_cost"],
            "mass_within_radius": metrics["mass_within_radius"],
            "swap_rounds": self.round,
            "export": None,
        }
        if self.cfg.export_pruned and self.recipe is not None:
            report["export"] = str(self._export(model))
        # slot -> original unit per group: reads the swapped model in the pretrained one's terms
        atomic_write_json(self.run_dir / PERMUTATIONS_FILE, {k: v.tolist() for k, v in self.permutations.items()})
        atomic_write_json(self.run_dir / REPORT_FILE, report)
        self._log(trainer, {
            "bimt/prune/val_loss_before": before, "bimt/prune/val_loss_after": after,
            "bimt/prune/connections_kept": float(counts["kept"]),
        })
        say(
            f"pruned |w| < {self.cfg.prune_threshold:g}: kept {counts['kept']} of {counts['total']} "
            f"connections; val loss {before:.4f} -> {after:.4f} ({self.run_dir / REPORT_FILE})",
            topic="bimt",
        )
        return report

    def _export(self, model: nn.Module) -> Path:
        from wbscale.ckpt.load import export_folder

        recipe = self.recipe
        # the export holds the weights: sizes from the model, no hub id, no init_from
        recipe = dataclasses.replace(
            recipe,
            model=dataclasses.replace(model.config, pretrained=None),
            bimt=dataclasses.replace(recipe.bimt, init_from=None),
        )
        tokenizer = self.data_dir / "tokenizer.json"
        return export_folder(model, recipe, self.run_dir / EXPORT_DIR,
                             tokenizer_path=tokenizer if tokenizer.is_file() else None)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "last_swap_step": self.last_swap_step,
            "permutations": {k: v.clone() for k, v in self.permutations.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.round = int(state_dict.get("round", 0))
        self.last_swap_step = int(state_dict.get("last_swap_step", -1))
        self.permutations.update({k: torch.as_tensor(v) for k, v in state_dict.get("permutations", {}).items()})


def bimt_callback(recipe: Any, run_dir: str | Path, data_dir: str | Path) -> BIMTCallback:
    """The callback ``wbscale fit`` adds when ``bimt.enabled``."""
    return BIMTCallback.from_recipe(recipe, run_dir, data_dir)
