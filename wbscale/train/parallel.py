"""Parallelize: apply activation checkpointing, compile and the strategy to an unchanged model.

One step, one readable order (torchtitan's ``parallelize_llama``): everything here acts on
the model from outside, in place, so parameter names, and checkpoints, never change.

1. activation checkpointing (``distributed.activation_checkpointing``): each block's
   ``forward`` recomputes its activations in backward instead of storing them;
2. ``torch.compile`` (``train.compile``), in place;
3. CPU threads: processes of one node share its cores;
4. the Lightning strategy (:func:`wbscale.train.strategy.build_strategy`): one device,
   DDP, or DeepSpeed ZeRO 1/2/3 (+ offload).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from lightning.pytorch.strategies import Strategy
from torch import nn

from wbscale.config import Recipe
from wbscale.train.strategy import build_strategy


def parallelize(
    model: nn.Module, recipe: Recipe, accelerator: str, precision: str, load_universal: bool = False
) -> str | Strategy:
    """Apply the recipe's parallelism to ``model`` in place; returns the Lightning strategy."""
    if recipe.distributed.activation_checkpointing:
        apply_activation_checkpointing(model)
    if recipe.train.compile:
        model.compile()  # in place: parameter names (and checkpoints) stay unchanged
    share_cpu_threads(accelerator, recipe.distributed.devices)
    return build_strategy(recipe, accelerator, precision, load_universal=load_universal)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Wrap each transformer block's ``forward`` so its activations are recomputed in backward.

    Calls that record white-box tensors or decode with a cache run unwrapped.
    """
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if blocks is None:
        return
    for block in blocks:
        if getattr(block, "_wbscale_checkpointed", False):
            continue
        block.forward = _checkpointed(block.forward)
        block._wbscale_checkpointed = True


def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint

    @functools.wraps(forward)
    def wrapped(x: torch.Tensor, *args: Any, **kwargs: Any):
        # Blocks are called as block(x, record, cache): recording white-box tensors or
        # decoding with a cache (any of them given) and no-grad calls run unwrapped.
        extras = [*args, *kwargs.values()]
        if any(a is not None for a in extras) or not torch.is_grad_enabled():
            return forward(x, *args, **kwargs)
        # Non-reentrant: works with ZeRO-3's parameter hooks and with torch.compile.
        return checkpoint(forward, x, use_reentrant=False)

    return wrapped


def share_cpu_threads(accelerator: str, devices_per_node: int) -> None:
    """Share the CPU cores among the processes of one node.

    Each process's torch defaults to every core, so 2 processes on 2 cores would run 4
    threads and slow each other down. torchrun sets OMP_NUM_THREADS=1 itself; Lightning's
    launcher does not. An explicit OMP_NUM_THREADS always wins.
    """
    local = max(1, devices_per_node)
    if accelerator != "cpu" or local == 1 or "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
