"""What a recipe implies about sizes: tokens per optimizer step, the padded vocabulary."""

from __future__ import annotations

from wbscale.config import Recipe

VOCAB_MULTIPLE = 64  # GEMM-friendly; the extra rows are never targets
# data.tokenizer: char before the text is read: a vocabulary of at most 128 (plain text has
# fewer than 126 distinct characters); the prepared folder's tokenizer replaces the guess.
CHAR_VOCAB_UNPREPARED = 128
GPT2_VOCAB = 50257  # the guess for a tokenizer file that cannot be read here


def padded_vocab(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """``vocab_size`` rounded up to a multiple of ``multiple``."""
    return (vocab_size + multiple - 1) // multiple * multiple


def model_vocab(recipe: Recipe, tokenizer_vocab: int | None) -> tuple[int, str | None]:
    """The model's vocabulary for ``recipe`` before it runs, and a note where it is a guess.

    ``model.vocab_size`` when set; else the tokenizer's size ``tokenizer_vocab``
    (:func:`wbscale.data.tokenizer.expected_vocab_size`) padded to a multiple of 64. Not
    known yet: ``data.tokenizer: char`` takes 128 (the text is not read yet), a tokenizer
    file that cannot be read here GPT-2's 50257 (padded: 50304), with a note saying so.
    ``wbscale fit`` itself takes the prepared data's vocabulary (``train.fit.resolve_vocab``).
    """
    m, d = recipe.model, recipe.data
    if m.vocab_size:
        return m.vocab_size, None
    if tokenizer_vocab is not None:
        return padded_vocab(tokenizer_vocab), None
    if d.tokenizer == "char":
        return padded_vocab(CHAR_VOCAB_UNPREPARED), None
    guess = padded_vocab(GPT2_VOCAB)
    return guess, f"vocabulary taken as {guess} (GPT-2's, padded): {d.tokenizer} not readable here"


def tokens_per_step(recipe: Recipe, world_size: int | None = None) -> int:
    """Tokens one optimizer step consumes: micro batch x accumulation x context x world.

    ``world_size`` defaults to the recipe's ``distributed.devices x distributed.nodes``;
    pass the running trainer's world size where a launcher may decide it.
    """
    t, d = recipe.train, recipe.distributed
    world = world_size if world_size is not None else d.devices * d.nodes
    return t.micro_batch_size * t.grad_accum * recipe.model.block_size * world
