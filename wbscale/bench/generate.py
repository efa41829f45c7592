"""``wbscale bench generate``: decoding tokens/s with and without the attention cache.

    wbscale bench generate --device cpu            # demo shape: 4 layers, d = 128, block 128

For each architecture, a freshly initialised model of the given shape (speed does not depend
on the weights; no end-of-text stop) decodes ``max_new_tokens`` greedy tokens after a
``prompt_tokens`` prompt, with the cache and without, alternating the two ``repeats`` times
(best of each), and checks that both give the same tokens. Past ``block_size`` every position
moves (learned absolute positions), so both paths recompute the cropped window at each step:
``in_window`` times only the tokens that fit (``block_size - prompt_tokens``), where the cache
does all the work. ``cache_mib`` is the cache of one full window: CRATE's MSSA keeps one
tensor per layer (q = k = v = X U_k), GPT-2 two (k and v).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from wbscale.config import ModelConfig
from wbscale.models import MODEL_CLASSES
from wbscale.provenance import device_name

__all__ = ["bench_generate"]


def _timed(model, prompt: torch.Tensor, n: int, use_cache: bool) -> tuple[float, torch.Tensor]:
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(prompt, n, temperature=0, use_cache=use_cache)
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def _rates(model, prompt: torch.Tensor, n: int, repeats: int) -> dict[str, Any]:
    """Best-of-``repeats`` tokens/s (all rows) with and without the cache, and whether they agree."""
    best = {True: float("inf"), False: float("inf")}
    outs = {}
    for _ in range(repeats):
        for use_cache in (False, True):
            seconds, outs[use_cache] = _timed(model, prompt, n, use_cache)
            best[use_cache] = min(best[use_cache], seconds)
    tokens = n * prompt.size(0)
    no_cache, cache = tokens / best[False], tokens / best[True]
    return {
        "new_tokens": n,
        "no_cache_tokens_per_second": round(no_cache, 1),
        "cache_tokens_per_second": round(cache, 1),
        "speedup": round(cache / no_cache, 2),
        "identical": bool(torch.equal(outs[True], outs[False])),
    }


def bench_generate(
    archs: Sequence[str] = ("crate", "gpt2"),
    n_layer: int = 4,
    n_embd: int = 128,
    n_head: int = 4,
    block_size: int = 128,
    vocab_size: int = 2048,
    ista_variant: str = "overcomplete",
    prompt_tokens: int = 8,
    max_new_tokens: int = 256,
    batch_size: int = 1,
    repeats: int = 3,
    device: str = "cpu",
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Tokens/s of ``generate`` with and without the cache, per architecture (JSON-ready)."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    prompt = torch.randint(0, vocab_size, (batch_size, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    prompt = prompt.to(dev)
    in_window = block_size - prompt_tokens
    results: dict[str, Any] = {}
    for arch in archs:
        config = ModelConfig(
            arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, block_size=block_size,
            vocab_size=vocab_size, dropout=0.0, ista_variant=ista_variant,
        )
        torch.manual_seed(seed)
        model = MODEL_CLASSES[arch](config).to(dev).eval()
        _timed(model, prompt, min(8, max_new_tokens), True)  # warm-up (allocator, kernels)
        row: dict[str, Any] = {"params": model.num_params(non_embedding=False)}
        row.update(_rates(model, prompt, max_new_tokens, repeats))
        if 0 < in_window < max_new_tokens:
            row["in_window"] = _rates(model, prompt, in_window, repeats)
        cache = model.new_cache()
        with torch.no_grad():
            model.hidden_states(torch.zeros(batch_size, block_size, dtype=torch.long, device=dev), cache=cache)
        row["cache_tensors_per_layer"] = len(cache[0].tensors)
        row["cache_mib"] = round(sum(t.numel() * t.element_size() for c in cache for t in c.tensors) / 2**20, 3)
        results[arch] = row
    return {
        "device": device_name("cuda" if dev.type == "cuda" else "cpu"),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "shape": dict(
            n_layer=n_layer, n_embd=n_embd, n_head=n_head, block_size=block_size, vocab_size=vocab_size,
            ista_variant=ista_variant, prompt_tokens=prompt_tokens, batch_size=batch_size,
        ),
        "decoding": "greedy, no end-of-text stop; best of "
        f"{repeats}; tokens past block_size recompute the cropped window in both paths",
        "models": results,
    }
