"""The LightningModule: loss, optimiser, LR schedule, throughput metrics.

Research code only: the model is built from the recipe and left unchanged; strategy,
checkpoints, tracking and sampling live in callbacks and in :mod:`wbscale.train.fit`.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

import lightning as L
import numpy as np
import torch

from wbscale.config import OptimConfig, Recipe
from wbscale.models import build_model

# Dense bf16 peak FLOP/s per device, for MFU. Matched by substring of the device name.
PEAK_FLOPS_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "V100": 125e12,
}


def device_peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of ``device``, or None where unknown (CPU: no MFU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS_BF16.items():
        if key in name:
            return flops
    return None


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup to ``max_lr``, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.max_lr - cfg.min_lr)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class LMModule(L.LightningModule):
    """Next-token training of any wbscale language model described by a recipe."""

    def __init__(self, recipe: Recipe, extra_state: dict[str, Any] | None = None):
        super().__init__()
        self.recipe = recipe
        self.model = build_model(recipe.model)
        # Written into every checkpoint (tokenizer hash, wandb id): see on_save_checkpoint.
        self.extra_state = dict(extra_state or {})
        self._window: tuple[int, float] | None = None  # (step, time) where the throughput window began
        self._loss_sum = torch.zeros(())
        self._grad_norm: float | None = None
        self._val_losses: list[torch.Tensor] = []

    # ------------------------------------------------------------------ steps
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        return self.model(idx, targets)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        _, loss = self.model(x, y)
        self._loss_sum = self._loss_sum + loss.detach()
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        # Lightning scales by 1/grad_accum itself.
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        _, loss = self.model(x, y)
        self._val_losses.append(loss.detach())

    def on_validation_epoch_start(self) -> None:
        self._val_losses = []

    def on_validation_epoch_end(self) -> None:
        if not self._val_losses or self.trainer.sanity_checking:
            return
        val = self.trainer.strategy.reduce(torch.stack(self._val_losses).mean(), reduce_op="mean")
        val = float(val)
        self.log("val_loss", val, prog_bar=True, logger=False, sync_dist=False)
        self.log_metrics({"val/loss": val, "val/perplexity": math.exp(min(val, 50.0))})

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Send metrics to every logger at the current optimizer step (rank 0 only)."""
        if self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.log_metrics(metrics, step=self.trainer.global_step)

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        cfg, max_steps = self.recipe.optim, self.recipe.train.max_steps
        groups = self.model.configure_param_groups(cfg.weight_decay)
        optimizer = torch.optim.AdamW(
            groups, lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False
        )
        # LambdaLR multiplies the base lr; the schedule is in absolute terms, so divide.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_at(step, cfg, max_steps) / cfg.max_lr
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _is_log_step(self, step: int) -> bool:
        return step % self.recipe.train.log_every == 0 or step == self.recipe.train.max_steps

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._is_log_step(self.trainer.global_step + 1):
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            # Norm before clipping (Lightning clips right after this hook).
            self._grad_norm = float(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            )

    # ------------------------------------------------------------------ throughput
    def tokens_per_step(self) -> int:
        t = self.recipe.train
        return t.micro_batch_size * t.grad_accum * self.recipe.model.block_size * self.trainer.world_size

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % self.recipe.train.grad_accum != 0:
            return
        now = time.perf_counter()
        step = self.trainer.global_step
        loss = self.trainer.strategy.reduce(self._loss_sum / self.recipe.train.grad_accum, reduce_op="mean") \
            if self._is_log_step(step) else None
        self._loss_sum = torch.zeros((), device=self.device)
        if loss is not None:
            metrics = {
                "train/loss": float(loss),
                "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"],
                "train/tokens_seen": float(step * self.tokens_per_step()),
            }
            grad_norm = self._grad_norm
            engine = getattr(self.trainer.strategy, "deepspeed_engine", None)
            if engine is not None:
                # Under ZeRO the gradients are partitioned (p.grad is empty): ask DeepSpeed
                # for the global norm it computed for clipping.
                norm = engine.get_global_grad_norm()
                grad_norm = float(norm) if norm is not None else None
            if grad_norm is not None:
                metrics["train/grad_norm"] = grad_norm
            if self._window is not None and step > self._window[0]:
                # Averaged over the steps since the last log line, first step excluded (warm-up).
                tokens_per_second = (step - self._window[0]) * self.tokens_per_step() / (now - self._window[1])
                metrics["train/tokens_per_second"] = tokens_per_second
                peak = device_peak_flops(self.device)
                if peak is not None:
                    flops = self.model.flops_per_token(self.recipe.model.block_size)
                    metrics["train/mfu"] = flops * tokens_per_second / (peak * self.trainer.world_size)
                    metrics["train/memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
            self.log_metrics(metrics)
        if self._window is None or loss is not None:
            self._window = (step, now)

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
