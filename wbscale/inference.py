"""Use a loaded model: mean validation loss and perplexity, and seeded text sampling."""

from __future__ import annotations

import math

import torch
from tokenizers import Tokenizer

from wbscale.models.base import LanguageModel


@torch.no_grad()
def evaluate(model: LanguageModel, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Mean next-token loss and perplexity over ``batches``."""
    model.eval()
    device = next(model.parameters()).device
    losses = [float(model(x.to(device), y.to(device))[1]) for x, y in batches]
    loss = sum(losses) / len(losses)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "batches": len(losses)}


@torch.no_grad()
def generate_text(
    model: LanguageModel, tokenizer: Tokenizer, prompt: str, max_new_tokens: int,
    temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
) -> str:
    """Sample a continuation of ``prompt`` (deterministic for a given seed)."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt).ids or [0]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(gen.initial_seed())
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k)
    return tokenizer.decode(out[0].tolist())
