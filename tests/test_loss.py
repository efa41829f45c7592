"""The chunked LM-head loss (wbscale.models.loss) against the full-logits reference."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from wbscale.config import ModelConfig
from wbscale.models import build_model
from wbscale.models.loss import linear_cross_entropy, linear_cross_entropy_reference
from wbscale.train.module import adamw_implementation


def _problem(n: int = 37, d: int = 16, v: int = 50, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    w = (0.3 * torch.randn(v, d, generator=g, dtype=dtype)).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    return h, w, y


def _loss_and_grads(fn, h, w, y):
    h.grad = w.grad = None
    loss = fn(h, w, y)
    (3.0 * loss).backward()  # a non-unit upstream gradient
    return loss.detach(), h.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
def test_fp32_matches_the_reference_tightly(chunk):
    h, w, y = _problem()
    y[[3, 10, 11]] = -1  # ignored targets
    ref = _loss_and_grads(linear_cross_entropy_reference, h, w, y)
    out = _loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_tokens=chunk), h, w, y)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_the_reference_loosely():
    h, w, y = _problem(n=64, d=32, v=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _loss_and_grads(linear_cross_entropy_reference, h, w, y)
        out = _loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_tokens=16), h, w, y)
    assert out[1].dtype == h.dtype and out[2].dtype == w.dtype  # grads in the leaves' dtypes
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_all_targets_ignored_gives_nan_like_cross_entropy():
    h, w, y = _problem(n=5)
    y[:] = -1
    assert torch.isnan(linear_cross_entropy(h, w, y, chunk_tokens=2)) and torch.isnan(linear_cross_entropy_reference(h, w, y))


def test_no_grad_computes_only_the_loss():
    h, w, y = _problem()
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y, chunk_tokens=8)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, linear_cross_entropy_reference(h, w, y).detach())


@pytest.mark.parametrize("arch", ["gpt2", "crate"])
def test_model_loss_and_every_gradient_match_the_full_logits(arch):
    """Through a whole model with the head tied to the token embedding."""
    cfg = ModelConfig(arch=arch, n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=96, dropout=0.0, ista_kernel="eager")
    torch.manual_seed(0)
    model = build_model(cfg)
    idx = torch.randint(0, 96, (3, 16))
    y = torch.randint(0, 96, (3, 16))
    grads = []
    for chunk in (0, 10):
        model.zero_grad(set_to_none=True)
        logits, loss = model(idx, y, loss_chunk=chunk)
        assert (logits is None) == (chunk > 0)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_bad_chunk_is_refused():
    from wbscale.config import load_recipe
    from wbscale.errors import UserError

    with pytest.raises(UserError, match="train.loss_chunk must be >= 0"):
        load_recipe("demo", ["train.loss_chunk=-1"])


def test_adamw_is_fused_on_cuda_and_the_exact_loop_elsewhere():
    cuda = SimpleNamespace(parameters=lambda: iter([SimpleNamespace(device=torch.device("cuda", 0))] * 2))
    assert adamw_implementation(cuda) == {"fused": True}
    assert adamw_implementation(torch.nn.Linear(2, 2)) == {"foreach": False}
    # the fused update is the same AdamW (torch has a CPU fused kernel too: check the numbers)
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    b.load_state_dict(a.state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, **kw) for m, kw in ((a, {"foreach": False}), (b, {"fused": True}))]
    x = torch.randn(4, 8)
    for _ in range(5):
        for m, opt in zip((a, b), opts, strict=True):
            m(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
