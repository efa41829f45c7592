"""``wbscale bench bimt``: BIMT timings at GPT-2 124M shape (random weights).

Times one swap round over all MLP layers (decide + apply, with AdamW state), over heads and
over the residual stream; ``add_cost_gradient`` and one forward + backward + AdamW step of
``batch`` x ``seq`` tokens, and their ratio.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from wbscale.bimt.cost import add_cost_gradient
from wbscale.bimt.geometry import lm_geometry
from wbscale.bimt.swaps import apply_permutation, decide_swaps
from wbscale.config import ModelConfig
from wbscale.models import GPT2

__all__ = ["bench_bimt"]


def _timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_bimt(device: str = "cpu", top_k: int = 32, batch: int = 1, seq: int = 1024) -> dict[str, Any]:
    """Seconds of a swap round per kind, of the cost gradient and of a train step (see module doc)."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="gpt2", n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)
    model = GPT2(cfg).to(device)
    geom = lm_geometry(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        model(idx, idx)[1].backward()
        opt.step()

    step()  # AdamW state exists from here on

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def round_over(kind: str) -> int:
        accepted = 0
        for g in geom.swappable():
            if g.kind == kind:
                d = decide_swaps(model, geom, g.name, top_k)
                if d.accepted:
                    apply_permutation(model, geom, g.name, d.perm, opt)
                accepted += d.accepted
        sync()
        return accepted

    result: dict[str, Any] = {"device": device, "top_k": top_k, "threads": torch.get_num_threads()}
    for kind in ("hidden", "heads", "residual"):
        t0 = time.perf_counter()
        result[f"swaps_{kind}"] = round_over(kind)
        result[f"swap_round_{kind}_s"] = time.perf_counter() - t0
    add_cost_gradient(model, geom, 1e-4)  # builds the shared factor matrices once
    result["cost_gradient_s"] = _timed(lambda: (add_cost_gradient(model, geom, 1e-4), sync()))
    result["train_step_s"] = _timed(lambda: (step(), sync()), repeat=2)
    result["tokens_per_step"] = batch * seq
    result["cost_gradient_overhead"] = result["cost_gradient_s"] / result["train_step_s"]
    return result
