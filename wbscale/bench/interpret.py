"""``wbscale bench interpret``: collect throughput vs a plain forward pass over the same tokens.

    wbscale bench interpret --ckpt runs/demo --tokens 16384 --device cpu

Measures tokens/s of ``model(idx)`` (logits, every layer) and of the streaming phase
of :func:`wbscale.interpret.collect.collect` (top-k, frequencies; the one-off final step
that reads contexts back and writes files is reported apart), best of ``repeats``,
alternating the two so that a noisy machine slows both alike.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from wbscale.ckpt.load import load_for_inference
from wbscale.hardware import resolve_device
from wbscale.interpret.collect import TokenStream, _batches, collect

__all__ = ["bench_interpret"]


def bench_interpret(ckpt: str, data_dir: str | None = None, tokens: int = 16384, batch_size: int = 8,
                    device: str = "cpu", repeats: int = 2, layers: str | None = None) -> dict[str, Any]:
    """Tokens/s of a plain forward and of collect's streaming phase over the same tokens."""
    dev = torch.device(resolve_device(device))
    model, recipe, _ = load_for_inference(ckpt, device=str(dev))
    data = data_dir or recipe.data.out_dir
    stream = TokenStream(data, "val")
    n = min(tokens, stream.total)
    batches = [torch.from_numpy(stream.read(f, f + r * t).reshape(r, t)).to(dev)
               for f, r, t in _batches(n, model.config.block_size, batch_size)]
    forward, streaming, finalize = [], [], []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            for idx in batches:
                model(idx)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        forward.append(n / (time.perf_counter() - t0))
        with tempfile.TemporaryDirectory() as tmp:
            manifest = collect(ckpt, Path(tmp), data_dir=data, layers=layers, tokens=n, batch_size=batch_size,
                               device=str(dev), save_every=10**9, progress=False)
        streaming.append(manifest["timing"]["tokens_per_second"])
        finalize.append(manifest["timing"]["finalize_seconds"])
    return {
        "ckpt": str(ckpt), "device": str(dev), "threads": torch.get_num_threads(), "tokens": n,
        "batch_size": batch_size, "seq_len": model.config.block_size,
        "forward_tokens_per_second": round(max(forward), 1),
        "collect_tokens_per_second": round(max(streaming), 1),
        "overhead": round(max(forward) / max(streaming), 3),
        "finalize_seconds": min(finalize),
    }
