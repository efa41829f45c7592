"""Use a loaded model: mean validation loss and perplexity, and seeded text sampling."""

from __future__ import annotations

import math

import torch
from tokenizers import Tokenizer

from wbscale.errors import UserError
from wbscale.models.base import LanguageModel, check_sampling

# End-of-text tokens, in the order wbscale.data.tokenizer.eot_id tries them (that module sits
# in this layer, so it is not imported here).
END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


@torch.no_grad()
def evaluate(model: LanguageModel, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Mean next-token loss and perplexity over ``batches``."""
    model.eval()
    device = next(model.parameters()).device
    losses = [float(model(x.to(device), y.to(device))[1]) for x, y in batches]
    loss = sum(losses) / len(losses)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "batches": len(losses)}


def end_of_text_id(tokenizer: Tokenizer) -> int | None:
    """The tokenizer's end-of-text id (``<|endoftext|>`` or a common alias), None if it has none."""
    for name in END_OF_TEXT:
        idx = tokenizer.token_to_id(name)
        if idx is not None:
            return idx
    return None


def check_generate_options(
    max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
    num_samples: int = 1,
) -> None:
    """UserError for options ``generate_text`` refuses (cheap: call it before loading a model)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p, min_new_tokens=1)
    if num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {num_samples}")


@torch.no_grad()
def generate_text(
    model: LanguageModel, tokenizer: Tokenizer, prompt: str, max_new_tokens: int,
    temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
    *, top_p: float = 1.0, stop: bool = True, use_cache: bool = True,
) -> str:
    """The prompt and a sampled continuation (deterministic for a given seed).

    ``temperature`` 0 is greedy; ``top_k`` None or 0 and ``top_p`` 1 filter nothing. With
    ``stop`` (default) and a tokenizer that has an end-of-text token, generation ends when it
    is produced and the text stops before it. ``use_cache`` changes the speed, not the text.
    Call it in eval mode (``load_for_inference`` returns the model so).
    """
    check_generate_options(max_new_tokens, temperature, top_k, top_p)
    device = next(model.parameters()).device
    eot = end_of_text_id(tokenizer)
    prompt_ids = tokenizer.encode(prompt).ids
    # An empty prompt starts a new document: after the end-of-text token, as in training.
    ids = prompt_ids or [eot if eot is not None else 0]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    eos_id = eot if stop else None
    out = model.generate(
        idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
        generator=gen, use_cache=use_cache,
    )
    new = out[0, len(ids):].tolist()
    if eos_id is not None and eos_id in new:
        new = new[: new.index(eos_id)]
    # Special tokens stay visible: with stop=False an end-of-text token shows where a text ended.
    return tokenizer.decode(prompt_ids + new, skip_special_tokens=False)
