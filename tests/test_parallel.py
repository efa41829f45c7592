"""parallelize(): activation checkpointing really recomputes, and changes nothing else."""

from __future__ import annotations

import copy

import pytest
import torch

from wbscale.config import ModelConfig
from wbscale.models import build_model
from wbscale.train.parallel import apply_activation_checkpointing


def _saved_tensors(model: torch.nn.Module, idx: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, idx)
    loss.backward()
    return count, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("arch", ["crate", "gpt2"])
def test_activation_checkpointing_saves_less_and_gives_the_same_gradients(arch):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, ista_kernel="eager")
    plain = build_model(cfg)
    wrapped = copy.deepcopy(plain)
    apply_activation_checkpointing(wrapped)
    idx = torch.randint(0, 64, (2, 16))
    saved_plain, grads_plain = _saved_tensors(plain, idx)
    saved_ckpt, grads_ckpt = _saved_tensors(wrapped, idx)
    assert saved_ckpt < saved_plain, f"checkpointed forward saved {saved_ckpt} tensors, plain {saved_plain}"
    for a, b in zip(grads_plain, grads_ckpt, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in wrapped.named_parameters()]


def test_checkpointed_blocks_still_decode_with_a_cache():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="crate", n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, ista_kernel="eager")
    model = build_model(cfg).eval()
    ref = model.generate(torch.zeros(1, 1, dtype=torch.long), 8, temperature=0)
    apply_activation_checkpointing(model)
    assert torch.equal(model.generate(torch.zeros(1, 1, dtype=torch.long), 8, temperature=0), ref)
