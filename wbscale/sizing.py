"""What a recipe implies about sizes: tokens per optimizer step, the padded vocabulary."""

from __future__ import annotations

from wbscale.config import Recipe

VOCAB_MULTIPLE = 64  # GEMM-friendly; the extra rows are never targets


def padded_vocab(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """``vocab_size`` rounded up to a multiple of ``multiple``."""
    return (vocab_size + multiple - 1) // multiple * multiple


def tokens_per_step(recipe: Recipe, world_size: int | None = None) -> int:
    """Tokens one optimizer step consumes: micro batch x accumulation x context x world.

    ``world_size`` defaults to the recipe's ``distributed.devices x distributed.nodes``;
    pass the running trainer's world size where a launcher may decide it.
    """
    t, d = recipe.train, recipe.distributed
    world = world_size if world_size is not None else d.devices * d.nodes
    return t.micro_batch_size * t.grad_accum * recipe.model.block_size * world
