"""The LightningModule: loss, optimiser, LR schedule.

Research code only: the model is built from the recipe and left unchanged; parallelism
(:mod:`.parallel`), checkpoints, step metrics, tracking and sampling live in callbacks and
in :mod:`wbscale.train.fit`.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from wbscale.ckpt.rng import rng_state, set_rng_state
from wbscale.config import OptimConfig, Recipe
from wbscale.models import build_model
from wbscale.track.step_metrics import log_step_metrics


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup to ``max_lr``, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.max_lr - cfg.min_lr)


def adamw_implementation(model: torch.nn.Module) -> dict[str, bool]:
    """AdamW's implementation flags for where ``model``'s parameters live.

    CUDA: ``fused=True``, one kernel for the whole update of all parameters (the
    per-parameter loop launches ~12 kernels per tensor). Elsewhere ``foreach=False``: the
    single-tensor loop, whose results on CPU are the ones every resume test holds runs to.
    DeepSpeed wraps whichever is built (and swaps in its CPU Adam for offload)."""
    devices = {p.device.type for p in model.parameters()}
    if devices == {"cuda"}:
        return {"fused": True}
    return {"foreach": False}


class LMModule(L.LightningModule):
    """Next-token training of any wbscale language model described by a recipe."""

    def __init__(self, recipe: Recipe, extra_state: dict[str, Any] | None = None):
        super().__init__()
        self.recipe = recipe
        self.model = build_model(recipe.model)
        # Written into every checkpoint (tokenizer hash, wandb id): see on_save_checkpoint.
        self.extra_state = dict(extra_state or {})
        self._loss_sum = torch.zeros(())
        self._val_losses: list[torch.Tensor] = []

    # ------------------------------------------------------------------ steps
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        return self.model(idx, targets)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        _, loss = self.model(x, y, loss_chunk=self.recipe.train.loss_chunk)
        self._loss_sum = self._loss_sum + loss.detach()
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        # Lightning scales by 1/grad_accum itself.
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        _, loss = self.model(x, y, loss_chunk=self.recipe.train.loss_chunk)
        self._val_losses.append(loss.detach())

    def on_validation_epoch_start(self) -> None:
        self._val_losses = []

    def on_validation_epoch_end(self) -> None:
        if not self._val_losses or self.trainer.sanity_checking:
            return
        val = self.trainer.strategy.reduce(torch.stack(self._val_losses).mean(), reduce_op="mean")
        val = float(val)
        self.log("val_loss", val, prog_bar=True, logger=False, sync_dist=False)
        log_step_metrics(self.trainer, {"val/loss": val, "val/perplexity": math.exp(min(val, 50.0))})

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        cfg, max_steps = self.recipe.optim, self.recipe.train.max_steps
        groups = self.model.configure_param_groups(cfg.weight_decay)
        optimizer = torch.optim.AdamW(
            groups, lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **adamw_implementation(self.model)
        )
        # LambdaLR multiplies the base lr; the schedule is in absolute terms, so divide.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_at(step, cfg, max_steps) / cfg.max_lr
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def pop_step_loss(self) -> torch.Tensor:
        """Mean training loss of the optimizer step just taken (this rank); resets the sum."""
        loss = self._loss_sum / self.recipe.train.grad_accum
        self._loss_sum = torch.zeros((), device=self.device)
        return loss

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["wbscale"] = {
            "recipe": self.recipe.to_dict(),
            "rng": rng_state(),
            **self.extra_state,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("wbscale", {})
        if "rng" in state:
            set_rng_state(state["rng"])
