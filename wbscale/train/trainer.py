"""``build_trainer``: the one place a Lightning ``Trainer`` is configured from a recipe.

``wbscale fit`` and ``wbscale bench train`` both use it, so a benchmark measures the same
loop a run trains with (same accumulation, clipping, precision, devices, strategy).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import Strategy

from wbscale.config import Recipe
from wbscale.errors import UserError


def accelerator_for(recipe: Recipe) -> str:
    """``cpu`` or ``gpu``: the recipe's choice, or a GPU when one is visible."""
    accelerator = recipe.distributed.accelerator
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise UserError(
            "distributed.accelerator: gpu, but this machine has no usable CUDA GPU "
            "(torch.cuda.is_available() is False); use distributed.accelerator: auto or cpu"
        )
    return accelerator


def check_kernels(recipe: Recipe, accelerator: str) -> None:
    """Refuse, before anything is written, a kernel choice this machine cannot run."""
    from wbscale.kernels.modes import interpreter_requested

    if recipe.model.ista_kernel == "triton" and accelerator == "cpu" and not interpreter_requested():
        raise UserError(
            "model.ista_kernel: triton needs a CUDA GPU (or TRITON_INTERPRET=1 to run the kernels, slowly, "
            "on the CPU); use model.ista_kernel: auto or eager here"
        )


def precision_for(recipe: Recipe, accelerator: str) -> str:
    """Lightning's precision string: the recipe's, or bf16-mixed on a GPU that supports it."""
    if recipe.train.precision != "auto":
        return recipe.train.precision if recipe.train.precision != "32" else "32-true"
    if accelerator == "gpu" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def quiet_lightning() -> None:
    """Keep Lightning's banner lines (GPU/TPU available, tips) and a known upstream
    deprecation warning out of the run's output; warnings and errors still show."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.pytorch.trainer.connectors.checkpoint_connector"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # Printed on every run on a machine with SLURM installed, even outside a job.
    warnings.filterwarnings("ignore", message=r".*The `srun` command is available on your system but is not used.*")


def build_trainer(
    recipe: Recipe,
    *,
    accelerator: str,
    precision: str,
    strategy: str | Strategy,
    callbacks: list[L.Callback],
    loggers: list[Any] | bool = False,
    root_dir: Path,
    progress: bool = False,
    validate: bool = True,
    plugins: list[Any] | None = None,
) -> L.Trainer:
    """A Trainer for ``recipe``'s loop: steps, accumulation, clipping, validation cadence.

    Checkpoints are wbscale's own (:class:`wbscale.ckpt.writer.AtomicCheckpoint` among the
    callbacks), the sampler is wbscale's (global-sample keyed), so Lightning's are off.
    ``validate=False`` runs no validation at all (benchmarks).
    """
    t = recipe.train
    return L.Trainer(
        accelerator=accelerator,
        devices=recipe.distributed.devices,
        num_nodes=recipe.distributed.nodes,
        strategy=strategy,
        precision=precision,
        max_steps=t.max_steps,
        accumulate_grad_batches=t.grad_accum,
        gradient_clip_val=recipe.optim.grad_clip or None,
        val_check_interval=t.val_every * t.grad_accum if validate else None,
        check_val_every_n_epoch=None if validate else 1,
        limit_val_batches=t.val_batches if validate else 0,
        num_sanity_val_steps=0,
        logger=loggers,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        deterministic=t.deterministic and accelerator == "cpu",
        default_root_dir=str(root_dir),
        use_distributed_sampler=False,
        log_every_n_steps=t.log_every,
        plugins=plugins or None,
    )
