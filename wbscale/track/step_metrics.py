"""Per-step training metrics: loss, learning rate, gradient norm, throughput, MFU, memory.

A callback, so the LightningModule stays research code (loss, optimizer, schedule). Every
``train.log_every`` optimizer steps it logs one row: ``train/loss`` (mean over the step's
micro-batches and ranks), ``train/lr``, ``train/tokens_seen``, ``train/grad_norm`` (before
clipping; under ZeRO from the DeepSpeed engine), ``train/tokens_per_second`` (averaged since
the last row, the first step excluded as warm-up) and, on a GPU with a known peak,
``train/mfu`` and ``train/memory_gb``.

Place it after callbacks that change gradients (BIMT's cost term), so the norm includes them.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from wbscale.dist import deepspeed_global_grad_norm, strategy_info
from wbscale.hardware import device_peak_flops, mfu
from wbscale.sizing import tokens_per_step


def log_step_metrics(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Send metrics to every logger at the current optimizer step (rank 0 only)."""
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


class StepMetrics(L.Callback):
    """Log the ``train/*`` row every ``log_every`` optimizer steps (and at the last step)."""

    def __init__(self, log_every: int, max_steps: int) -> None:
        self.log_every = max(1, int(log_every))
        self.max_steps = int(max_steps)
        self._window: tuple[int, float] | None = None  # (step, time) where the throughput window began
        self._grad_norm: float | None = None

    def _is_log_step(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.max_steps

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not self._is_log_step(trainer.global_step + 1):
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:
            # Norm before clipping (Lightning clips right after this hook).
            self._grad_norm = float(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches != 0:
            return
        now = time.perf_counter()
        step = trainer.global_step
        step_loss = pl_module.pop_step_loss()
        if not self._is_log_step(step):
            if self._window is None:
                self._window = (step, now)
            return
        recipe = pl_module.recipe
        per_step = tokens_per_step(recipe, trainer.world_size)
        loss = trainer.strategy.reduce(step_loss, reduce_op="mean")
        metrics = {
            "train/loss": float(loss),
            "train/lr": trainer.optimizers[0].param_groups[0]["lr"],
            "train/tokens_seen": float(step * per_step),
        }
        if strategy_info(trainer.strategy).grads_in_params:
            grad_norm = self._grad_norm
        else:  # partitioned gradients: p.grad is empty, the engine knows the global norm
            grad_norm = deepspeed_global_grad_norm(trainer.strategy)
        if grad_norm is not None:
            metrics["train/grad_norm"] = grad_norm
        if self._window is not None and step > self._window[0]:
            tokens_per_second = (step - self._window[0]) * per_step / (now - self._window[1])
            metrics["train/tokens_per_second"] = tokens_per_second
            peak = device_peak_flops(pl_module.device)
            if peak is not None:
                flops = pl_module.model.flops_per_token(recipe.model.block_size)
                metrics["train/mfu"] = mfu(flops, tokens_per_second, peak, trainer.world_size)
                metrics["train/memory_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 1e9
        log_step_metrics(trainer, metrics)
        self._window = (step, now)
