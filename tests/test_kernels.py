"""Fused Triton ISTA kernels against the eager references (docs/architecture.md, Kernels).

Without a GPU the kernels run under the Triton interpreter on CPU tensors (slow, exact), so
every shape here is small. On a machine with CUDA (and TRITON_INTERPRET unset) the same
tests run the compiled kernels on the GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated: set it before the first import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed: the fused ISTA kernels need it")

from wbscale.kernels import ista, reference  # noqa: E402
from wbscale.kernels import ista_triton as it  # noqa: E402

from wbscale.bench import kernels as bench  # noqa: E402

if it._INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:  # pragma: no cover
    pytest.skip(
        "wbscale.kernels.ista_triton was imported without TRITON_INTERPRET=1 and there is no GPU",
        allow_module_level=True,
    )

ETA, LAM = 0.1, 0.1
VARIANTS = ("overcomplete", "square")
REFERENCES = {
    "overcomplete": reference.ista_overcomplete_reference,
    "square": reference.ista_square_reference,
}


def make_inputs(variant: str, t: int, d: int, seed: int = 0, lead: tuple[int, ...] = ()):
    """float64 x (lead..., t, d), dictionary (m, d) scaled like kaiming init, gy, gz."""
    gen = torch.Generator().manual_seed(seed)
    m = 4 * d if variant == "overcomplete" else d
    x = torch.randn(*lead, t, d, generator=gen, dtype=torch.float64)
    w = torch.randn(m, d, generator=gen, dtype=torch.float64) / d**0.5
    gy = torch.randn(*lead, t, d, generator=gen, dtype=torch.float64)
    gz = torch.randn(*lead, t, m, generator=gen, dtype=torch.float64)
    return x, w, gy, gz


def run(fn, x, w, gy, gz=None, dtype=torch.float64, device="cpu"):
    """(y, z, grad_x, grad_w) in float64 of ``fn(x, w) -> (y, z)`` with loss <y, gy> (+ <z, gz>)."""
    xr = x.detach().to(device=device, dtype=dtype, copy=True).requires_grad_()
    wr = w.detach().to(device=device, dtype=dtype, copy=True).requires_grad_()
    y, z = fn(xr, wr)
    loss = (y.double() * gy.to(device)).sum()
    if gz is not None:
        loss = loss + (z.double() * gz.to(device)).sum()
    loss.backward()
    return [t.detach().double().cpu() for t in (y, z, xr.grad, wr.grad)]


def kernel_fn(variant: str, **kwargs):
    return lambda x, w: it.ista_triton(
        x, w, variant=variant, eta=ETA, lam=LAM, return_code=True, **kwargs
    )


def reference_fn(variant: str):
    return lambda x, w: REFERENCES[variant](x, w, ETA, LAM, True)


def assert_all_close(got, want, names=("y", "code", "grad_x", "grad_w"), **tol):
    for name, g, r in zip(names, got, want, strict=False):
        torch.testing.assert_close(g, r, **tol, msg=lambda m, name=name: f"{name}: {m}")


def assert_close_relative_to_max(got, want, rel, names=("y", "code", "grad_x", "grad_w")):
    for name, g, r in zip(names, got, want, strict=False):
        err = (g - r).abs().max().item()
        scale = r.abs().max().item()
        assert err <= rel * scale, f"{name}: max error {err:.3e} > {rel} * max |ref| {scale:.3e}"


# --------------------------------------------------------------------------------------
# The references themselves
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_minimal_gemm_reference_equals_published_spelling(variant):
    x, w, _, _ = make_inputs(variant, 33, 32, lead=(2,))
    published = getattr(reference, f"ista_{variant}_published")
    torch.testing.assert_close(
        REFERENCES[variant](x, w, ETA, LAM), published(x, w, ETA, LAM), atol=1e-13, rtol=1e-13
    )


# --------------------------------------------------------------------------------------
# Forward, backward and the sparse code
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [16, 32])
@pytest.mark.parametrize("t", [1, 17, 64])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_forward_backward_and_code_match_reference(variant, t, d):
    x, w, gy, _ = make_inputs(variant, t, d, seed=t + d)
    want = [r.float().double() for r in run(reference_fn(variant), x, w, gy)]
    got = run(kernel_fn(variant), x, w, gy, dtype=torch.float32, device=DEVICE)
    assert_all_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_sparse_code_has_the_reference_zeros(variant):
    x, w, _, _ = make_inputs(variant, 64, 32, seed=3)
    y, code = it.ista_triton(
        x.float().to(DEVICE),
        w.float().to(DEVICE),
        variant=variant,
        eta=ETA,
        lam=LAM,
        return_code=True,
    )
    y_ref, code_ref = REFERENCES[variant](x.float(), w.float(), ETA, LAM, True)
    code, y = code.cpu(), y.cpu()
    assert (code == 0).sum() > 0.2 * code.numel(), "test data should make a sparse code"
    assert torch.equal(code == 0, code_ref == 0), (
        f"{int(((code == 0) != (code_ref == 0)).sum())} zeros differ"
    )
    torch.testing.assert_close(code, code_ref, atol=1e-6, rtol=1e-5)
    # the returned code is the one the output was made from (same pass, not a second one)
    if variant == "overcomplete":
        torch.testing.assert_close(y, code @ w.float(), atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(y, code)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("t", "d"), [(17, 32), (64, 16)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_low_precision_matches_float64_on_the_kernels_active_set(variant, t, d, dtype):
    """Outputs vs float64; gradients vs the float64 gradient on the kernel's own ReLU pattern.

    A few pre-activations within bf16 rounding of zero fall on the other side of the ReLU than
    in float64 (eager bf16 too); the gradient jumps there, so it is compared on the same piece.
    """
    x, w, gy, _ = make_inputs(variant, t, d, seed=7)
    x, w = x.to(dtype).double(), w.to(dtype).double()  # only the kernel's own rounding counts
    got = run(kernel_fn(variant), x, w, gy, dtype=dtype, device=DEVICE)
    want = run(reference_fn(variant), x, w, gy)
    codes = it.forward_codes(
        x.to(DEVICE, dtype), w.to(DEVICE, dtype), variant=variant, eta=ETA, lam=LAM
    )
    masks = [(c.cpu() > 0).double() for c in codes]
    on_set = run(lambda a, b: bench.ista_on_active_set(a, b, variant, ETA, LAM, masks), x, w, gy)
    assert_close_relative_to_max(got[:2], want[:2], rel=2e-2)
    assert_close_relative_to_max(got[2:], on_set[2:], rel=2e-2, names=("grad_x", "grad_w"))
    flips = ((got[1] > 0) != (want[1] > 0)).double().mean().item()
    assert flips < 0.01, f"{100 * flips:.2f}% of the code's zero pattern differs from float64"


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_through_the_returned_code(variant):
    x, w, gy, gz = make_inputs(variant, 17, 16, seed=5)
    want = [r.float().double() for r in run(reference_fn(variant), x, w, gy, gz)]
    got = run(kernel_fn(variant), x, w, gy, gz, dtype=torch.float32, device=DEVICE)
    assert_all_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_and_non_contiguous_inputs(variant):
    x, w, gy, _ = make_inputs(variant, 9, 32, seed=11, lead=(2,))
    want = run(reference_fn(variant), x, w, gy)
    # (B, T, d) as it comes from the model
    got = run(kernel_fn(variant), x, w, gy, dtype=torch.float32, device=DEVICE)
    assert got[0].shape == (2, 9, 32) and got[2].shape == (2, 9, 32)
    assert_all_close(got, want, atol=1e-5, rtol=1e-5)

    # a strided view (every other feature of a wider tensor) and a transposed batch
    def strided(a, b):
        wide = torch.stack([a, torch.full_like(a, float("nan"))], dim=-1).flatten(-2)
        view = wide[..., ::2]
        assert not view.is_contiguous()
        return it.ista_triton(view, b, variant=variant, eta=ETA, lam=LAM, return_code=True)

    assert_all_close(
        run(strided, x, w, gy, dtype=torch.float32, device=DEVICE), want, atol=1e-5, rtol=1e-5
    )

    def transposed(a, b):
        view = a.transpose(0, 1).contiguous().transpose(0, 1)
        assert not view.is_contiguous()
        return it.ista_triton(view, b, variant=variant, eta=ETA, lam=LAM, return_code=True)

    assert_all_close(
        run(transposed, x, w, gy, dtype=torch.float32, device=DEVICE), want, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("save", ["x_u", "x", False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_recomputing_backward_gives_identical_grads(variant, save):
    """Every save mode recomputes exactly what "all" kept: bit-identical outputs and grads."""
    x, w, gy, gz = make_inputs(variant, 33, 32, seed=2)
    saved = run(kernel_fn(variant, save_activations="all"), x, w, gy, gz, torch.float32, DEVICE)
    recomputed = run(kernel_fn(variant, save_activations=save), x, w, gy, gz, torch.float32, DEVICE)
    for name, a, b in zip(("y", "code", "grad_x", "grad_w"), saved, recomputed, strict=True):
        assert torch.equal(a, b), f"{name} differs: max {(a - b).abs().max().item():.3e}"


@pytest.mark.parametrize("save", it.SAVE_MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_save_mode_matches_reference_with_split_epilogue_and_split_k(variant, save):
    """fp32, tight: several tiles, ragged edges, the two-half epilogue, split-K atomics."""
    x, w, gy, gz = make_inputs(variant, 40, 32, seed=12)
    want = [r.float().double() for r in run(reference_fn(variant), x, w, gy, gz)]
    with it.force_config(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, EPI_SUBTILE=2, SPLIT_K=2):
        got = run(kernel_fn(variant, save_activations=save), x, w, gy, gz, torch.float32, DEVICE)
    assert_all_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("save", ["x_u", "x"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_save_modes_match_float64_on_the_active_set(variant, save):
    x, w, gy, _ = make_inputs(variant, 17, 32, seed=8)
    x, w = x.bfloat16().double(), w.bfloat16().double()
    got = run(kernel_fn(variant, save_activations=save), x, w, gy, None, torch.bfloat16, DEVICE)
    want = run(reference_fn(variant), x, w, gy)
    codes = it.forward_codes(
        x.to(DEVICE, torch.bfloat16),
        w.to(DEVICE, torch.bfloat16),
        variant=variant,
        eta=ETA,
        lam=LAM,
    )
    masks = [(c.cpu() > 0).double() for c in codes]
    on_set = run(lambda a, b: bench.ista_on_active_set(a, b, variant, ETA, LAM, masks), x, w, gy)
    assert_close_relative_to_max(got[:2], want[:2], rel=2e-2)
    assert_close_relative_to_max(got[2:], on_set[2:], rel=2e-2, names=("grad_x", "grad_w"))


def test_save_modes_and_their_boolean_spellings():
    assert [it.normalize_save(v) for v in (True, False, "all", "x_u", "x")] == [
        "all", "x", "all", "x_u", "x",
    ]  # fmt: skip
    x, w, _, _ = make_inputs("overcomplete", 4, 16)
    with pytest.raises(ValueError, match="x_u"):
        ista(x.float(), w.float(), kernel="eager", save_activations="codes")


@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_tensors_per_mode(variant):
    """What each mode keeps alive for backward (the activation memory it promises)."""
    x, w, _, _ = make_inputs(variant, 24, 16, seed=6)
    t, d, m = 24, 16, w.shape[0]
    expected = {  # elements kept besides the weight
        "overcomplete": {"all": t * d + t * m + t * d + t * m, "x_u": 2 * t * d, "x": t * d},
        "square": {"all": 3 * t * d, "x_u": 2 * t * d, "x": t * d},
    }[variant]
    for save, numel in expected.items():
        kept = []

        def pack(tensor, kept=kept):
            kept.append(tensor)
            return tensor

        xr = x.float().to(DEVICE).requires_grad_()
        wr = w.float().to(DEVICE).requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            it.ista_triton(xr, wr, variant=variant, eta=ETA, lam=LAM, save_activations=save)
        activations = sum(k.numel() for k in kept if k.data_ptr() != wr.data_ptr())
        assert activations == numel, f"{save}: keeps {activations} elements, want {numel}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_small_tiles_and_split_k_weight_gradient(variant):
    """Several tiles per dimension, several K steps, ragged edges, split-K atomics."""
    x, w, gy, _ = make_inputs(variant, 24, 32, seed=4)
    want = [r.float().double() for r in run(reference_fn(variant), x, w, gy)]
    with it.force_config(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, SPLIT_K=3):
        got = run(kernel_fn(variant), x, w, gy, dtype=torch.float32, device=DEVICE)
    assert_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_empty_token_batch():
    x, w, gy, _ = make_inputs("overcomplete", 0, 16)
    y, z, gx, gw = run(kernel_fn("overcomplete"), x, w, gy, dtype=torch.float32, device=DEVICE)
    assert y.shape == (0, 16) and z.shape == (0, 64) and gx.shape == (0, 16)
    assert torch.equal(gw, torch.zeros(64, 16, dtype=torch.float64))


@pytest.mark.parametrize(
    "full", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["fast", "full"]
)
@pytest.mark.parametrize("save", it.SAVE_MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck_float64_custom_ops(variant, save, full):
    """The hand-derived backward of both ops, through the float64 (PyTorch GEMM) path.

    ``fast``: gradcheck's random projections; ``full``: the whole Jacobian (slow).
    """
    gen = torch.Generator().manual_seed(0)
    m = 32 if variant == "overcomplete" else 16
    x = torch.randn(5, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(m, 16, generator=gen, dtype=torch.float64) / 4).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: it.ista_triton(
            a, b, variant=variant, eta=ETA, lam=LAM, return_code=True, save_activations=save
        ),
        (x, w),
        fast_mode=not full,
    )


# --------------------------------------------------------------------------------------
# Custom ops and torch.compile
# --------------------------------------------------------------------------------------


class _TinyCrate(torch.nn.Module):
    """Layers that call the dispatch exactly as wbscale/models/crate.py's ISTA module does."""

    def __init__(self, variant: str, d: int = 16, layers: int = 2, save: bool | str = True):
        super().__init__()
        m = 4 * d if variant == "overcomplete" else d
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(layers))
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(m, d) / d**0.5) for _ in range(layers)
        )
        self.variant, self.save = variant, save

    def forward(self, x):
        for norm, weight in zip(self.norms, self.weights, strict=True):
            x = x + ista(
                norm(x), weight, variant=self.variant, eta=ETA, lam=LAM, kernel="triton",
                return_code=False, save_activations=self.save,
            )  # fmt: skip
        return x


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_model_has_no_graph_break_and_matches_eager(variant):
    torch.manual_seed(0)
    model = _TinyCrate(variant).to(DEVICE)
    x = torch.randn(2, 8, 16, device=DEVICE)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(model)
    out = compiled(x)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = model(x)
    want.sum().backward()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_compiled_model_under_autocast_has_no_graph_break():
    torch.manual_seed(0)
    model = _TinyCrate("overcomplete", save="x_u").to(DEVICE)
    x = torch.randn(2, 8, 16, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        out = torch.compile(model)(x)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_custom_op_registrations_pass_opcheck(variant):
    """Schema, fake (meta) kernel and autograd registration agree with the real kernel."""
    x, w, _, _ = make_inputs(variant, 8, 16, seed=13)
    x = x.float().to(DEVICE).requires_grad_()
    w = w.float().to(DEVICE).requires_grad_()
    op = (
        torch.ops.wbscale.ista_overcomplete
        if variant == "overcomplete"
        else torch.ops.wbscale.ista_square
    )
    for save in it.SAVE_MODES:
        torch.library.opcheck(
            op, (x, w, ETA, LAM, save, False),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )  # fmt: skip


def test_autotune_policy_buckets_tokens_and_keeps_small_and_no_grad_calls_fixed():
    assert [it._bucket(n) for n in (1, 17, 1024, 1025, 16384)] == [1, 32, 1024, 2048, 16384]
    assert "M_BUCKET" in it._KEY and "K_BUCKET" in it._KEY and "M" not in it._KEY
    assert not it.use_tuned(it.TUNE_MIN_TOKENS - 1, grad=True)
    assert it.use_tuned(it.TUNE_MIN_TOKENS, grad=True)
    # generate(): a batch of 16 sequences of 1024 tokens without grad never tunes
    assert not it.use_tuned(16 * 1024, grad=False)
    assert it.use_tuned(it.TUNE_MIN_TOKENS_NO_GRAD, grad=False)
    assert isinstance(it.tuned_configs(), list)


def test_hopper_configs_and_pruning():
    tiles = [t[:5] for t in it._GPU_TILES]
    assert tiles == [
        (128, 256, 64, 4, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (128, 128, 64, 3, 4),
    ]
    configs = [it._config(*t) for t in it._GPU_TILES]
    a = torch.empty(16384, 768, dtype=torch.bfloat16)
    named = {"M": 16384, "N": 3072, "K": 768, "a0_ptr": a}
    plain = it._prune(configs, named, HAS_AUX=False, HAS_MASK=False, HAS_GATED=False)
    loads = it._prune(configs, named, HAS_AUX=True, HAS_MASK=True, HAS_GATED=False)
    # the split epilogue only where the epilogue reads tensors
    assert [c.kwargs["EPI_SUBTILE"] for c in loads] == [2, 2, 1, 1]
    assert [c.kwargs["EPI_SUBTILE"] for c in plain] == [1, 1, 1, 1]
    # fp32 operands: the 4-stage and 256-wide pipelines do not fit in 227 KiB
    fp32 = it._prune(configs, {**named, "a0_ptr": a.float()}, HAS_AUX=False)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages) for c in fp32] == [
        (128, 128, 3)
    ]
    wgrad = [it._config(*t, split_k=s) for t in it._GPU_WGRAD_TILES for s in it._SPLITS]
    kept = it._prune(wgrad, {"M": 768, "N": 768, "K": 2 * 16384, "a0_ptr": a})
    assert {c.kwargs["SPLIT_K"] for c in kept} == {1, 2, 4, 8}
    assert all(c.kwargs["ATOMIC"] == (c.kwargs["SPLIT_K"] > 1) for c in kept)
    # a tiny problem never gets a Hopper tile it cannot fill
    tiny = it._prune(configs, {"M": 64, "N": 64, "K": 64, "a0_ptr": a})
    assert [c.kwargs["BLOCK_M"] for c in tiny] == [it.FIXED_CONFIG["BLOCK_M"]]


def test_relaxed_atomics_are_used_where_triton_supports_them():
    import inspect

    import triton.language as tl

    assert it._RELAXED_ATOMICS == ("sem" in inspect.signature(tl.atomic_add).parameters)


def test_trace_records_every_launch_of_the_block():
    x, w, gy, _ = make_inputs("overcomplete", 8, 16, seed=3)
    xr, wr = x.float().to(DEVICE).requires_grad_(), w.float().to(DEVICE).requires_grad_()
    with it.trace_gemms() as launches:
        it.ista_triton(xr, wr, variant="overcomplete", eta=ETA, lam=LAM).backward(gy.float())
    assert [launch["name"] for launch in launches] == [
        "z1",
        "u",
        "z2",
        "y",
        "g2",
        "gu",
        "g1",
        "gx",
        "gW",
    ]
    assert launches[-1]["weight_grad"] and launches[-1]["mnk"] == (64, 16, 4 * 8)
    assert all(not launch["tuned"] for launch in launches)  # 8 tokens: the fixed config


# --------------------------------------------------------------------------------------
# Dispatch, fallbacks, errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_dispatch_triton_eager_and_compile_agree(variant):
    x, w, _, _ = make_inputs(variant, 17, 16, seed=9)
    x, w = x.float().to(DEVICE), w.float().to(DEVICE)
    outs = {
        k: ista(x, w, variant=variant, eta=ETA, lam=LAM, kernel=k, return_code=True)
        for k in ("triton", "eager", "compile")
    }
    for kernel in ("triton", "compile"):
        for name, got, want in zip(("y", "code"), outs[kernel], outs["eager"], strict=True):
            torch.testing.assert_close(
                got, want, atol=1e-5, rtol=1e-5, msg=lambda m, k=kernel, n=name: f"{k} {n}: {m}"
            )


def test_unaligned_width_falls_back_to_eager_with_one_warning(monkeypatch):
    monkeypatch.setattr(it, "_warned", set())
    x, w, _, _ = make_inputs("overcomplete", 5, 24)
    x, w = x.float().to(DEVICE), w.float().to(DEVICE)
    with pytest.warns(UserWarning, match="multiples of 16"):
        y = it.ista_triton(x, w, variant="overcomplete", eta=ETA, lam=LAM)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        it.ista_triton(x, w, variant="overcomplete", eta=ETA, lam=LAM)
    torch.testing.assert_close(y, reference.ista_overcomplete_reference(x, w, ETA, LAM))


@pytest.mark.parametrize("variant", VARIANTS)
def test_autocast_runs_the_kernel_in_the_autocast_dtype(variant):
    x, w, gy, _ = make_inputs(variant, 17, 32, seed=1)
    x, w = x.float().to(DEVICE).requires_grad_(), w.float().to(DEVICE).requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = it.ista_triton(x, w, variant=variant, eta=ETA, lam=LAM)
        y_ref = REFERENCES[variant](x.detach(), w.detach(), ETA, LAM)
    assert y.dtype == torch.bfloat16
    y.float().backward(gy.float().to(DEVICE))
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    # the fp32 weight's gradient is the fp32 accumulator itself, never rounded through bf16
    assert not torch.equal(w.grad, w.grad.bfloat16().float())
    scale = y_ref.float().abs().max()
    assert (y.float() - y_ref.float()).abs().max() <= 2e-2 * scale


def test_mismatched_dtypes_and_shapes_are_rejected():
    x = torch.randn(4, 16, device=DEVICE)
    with pytest.raises(TypeError, match="bfloat16"):
        it.ista_triton(
            x,
            torch.randn(64, 16, device=DEVICE, dtype=torch.bfloat16),
            variant="overcomplete",
            eta=ETA,
            lam=LAM,
        )
    with pytest.raises(ValueError, match="disagree"):
        it.ista_triton(
            x, torch.randn(64, 32, device=DEVICE), variant="overcomplete", eta=ETA, lam=LAM
        )
    with pytest.raises(ValueError, match=r"\(d, d\)"):
        it.ista_triton(x, torch.randn(64, 16, device=DEVICE), variant="square", eta=ETA, lam=LAM)


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU path without the interpreter")
def test_cpu_tensors_without_the_interpreter_say_what_to_do():
    code = (
        "import torch; from wbscale.kernels.ista_triton import ista_triton; "
        "ista_triton(torch.randn(2, 16), torch.randn(64, 16), variant='overcomplete', eta=0.1, lam=0.1)"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "TRITON_INTERPRET=1" in proc.stderr and "ista_kernel: eager" in proc.stderr


# --------------------------------------------------------------------------------------
# Bench (GPU-free paths)
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(DEVICE != "cpu", reason="the no-GPU path of the bench")
def test_bench_without_gpu_runs_a_correctness_sweep_and_writes_no_timings(tmp_path, capsys):
    path = bench.bench_kernels(
        variant="overcomplete", dtype="bf16", tokens=(17,), dims=(16,), out_dir=tmp_path
    )
    report = json.loads(path.read_text())
    assert report["timings"] is None and "rows" not in report
    assert [r["ok"] for r in report["correctness"]] == [True]
    assert not list(tmp_path.glob("*.md"))
    out = capsys.readouterr().out
    assert "No GPU present" in out and " ms" not in out

    from wbscale.cli import main as cli_main

    assert (
        cli_main(
            [
                "bench",
                "kernels",
                "--variant",
                "square",
                "--dtype",
                "fp32",
                "--tokens",
                "17",
                "--d",
                "16",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    square = json.loads((tmp_path / "kernels-square-fp32-correctness-cpu.json").read_text())
    assert square["correctness"][0]["ok"]


def test_bench_report_tables_speedups_and_memory(tmp_path):
    def row(impl, fwd, bwd, peak):
        times = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}
        r = {
            "impl": impl,
            "tokens": 4096,
            "d": 768,
            "m": 3072,
            "held_after_fwd_mb": peak / 2,
            "peak_mb": peak,
        }
        for mode, ms in times.items():
            r[f"{mode}_ms"] = {"median": ms, "p20": ms, "p80": ms}
            r[f"{mode}_tflops"] = 1.0
        return r

    report = {
        "variant": "overcomplete", "dtype": "bf16", "device": "Fake GPU", "save_activations": True,
        "versions": {"torch": "x", "triton": "y"}, "date": "today", "git_commit": None,
        "rows": [row("eager", 4.0, 8.0, 400), row("compile", 3.0, 6.0, 300), row("triton", 2.0, 4.0, 100),
                 row("floor", 1.8, 3.6, 50), {"impl": "eager", "tokens": 65536, "d": 768, "m": 3072, "error": "out of memory"}],
    }  # fmt: skip
    path = bench._write(report, tmp_path, "kernels-test", markdown=True)
    table = path.with_suffix(".md").read_text()
    assert (
        "| 4096 | 768 | fwd+bwd | 12.000 | 9.000 | 6.000 | 5.400 | 1.0 | 2.00x | 1.50x | 0.90x |"
        in table
    )
    assert "| 4096 | 768 | 200 / 400 | 150 / 300 | 50 / 100 | 0.25 |" in table
    assert "out of memory" in table
    assert bench.gemm_units("overcomplete") == {"fwd": 4, "bwd": 8, "fwd+bwd": 12}


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU")
def test_gpu_correctness_sweep():  # pragma: no cover - GPU only
    for variant in VARIANTS:
        for dtype in ("fp32", "bf16", "fp16"):
            rows = bench.correctness_sweep(variant, dtype, (1, 257, 1000), (64, 128), device="cuda")
            assert all(r["ok"] for r in rows), rows


@pytest.mark.parametrize("variant", VARIANTS)
def test_bench_measure_rows_with_a_stand_in_timer(variant):
    """The GPU timing path (minus do_bench and CUDA memory) on tiny shapes, counting calls."""
    calls = []

    def timer(fn, grad_to_none):
        fn()
        calls.append(grad_to_none)
        return [2.0, 1.0, 3.0]

    for impl in ("eager", "triton", "floor"):
        row = bench._measure(impl, variant, torch.float32, 17, 16, True, timer=timer, device=DEVICE)
        units = bench.gemm_units(variant)["fwd+bwd"]
        flops = units * 2 * 17 * 16 * bench.dictionary_size(variant, 16)
        assert row["fwd+bwd_ms"] == {"median": 2.0, "p20": 1.0, "p80": 3.0}
        assert row["fwd+bwd_tflops"] == pytest.approx(flops / 2e-3 / 1e12)
    assert len(calls) == 9


@pytest.mark.parametrize("variant", VARIANTS)
def test_crate_training_step_with_triton_kernel_matches_eager(variant):
    """A tiny CRATE: loss and every parameter gradient agree between ista_kernel triton / eager."""
    from wbscale.config import ModelConfig
    from wbscale.models import CRATE

    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    results = {}
    for kernel in ("eager", "triton"):
        torch.manual_seed(0)
        cfg = ModelConfig(
            arch="crate", n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=50,
            ista_variant=variant, ista_kernel=kernel,
        )  # fmt: skip
        model = CRATE(cfg).to(DEVICE)
        _, loss = model(idx, idx)
        loss.backward()
        results[kernel] = (loss.detach(), {n: p.grad.detach() for n, p in model.named_parameters()})
    (loss_e, grads_e), (loss_t, grads_t) = results["eager"], results["triton"]
    torch.testing.assert_close(loss_t, loss_e, atol=1e-6, rtol=1e-6)
    for name, g in grads_e.items():
        torch.testing.assert_close(
            grads_t[name], g, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )


_AOT_COMPILE = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from wbscale.kernels import ista_triton as it

fn = it._gemm_kernel
T, D, M4 = 16384, 768, 3072
row = lambda n: (n, 1)
# every epilogue the block launches: flags (NUM_SEG, HAS_AUX, HAS_GATED, RELU, HAS_MASK,
# HAS_AMASK), then the strides it passes at T x d, m = 4d: a, b, c, aux, gated/gate, mask.
# Strides equal to 1 become constants and the others multiples of 16, as the JIT
# specialises them at run time (without that, no load vectorises and nothing pipelines).
launches = {
    "z1": ((1, 0, 0, 1, 0, 0), row(D), (1, D), row(M4), row(D), row(D), row(D)),
    "z2": ((1, 1, 0, 1, 0, 0), row(D), (1, D), row(M4), row(M4), row(D), row(D)),
    "u": ((1, 1, 0, 0, 0, 0), row(M4), row(D), row(D), row(D), row(M4), row(M4)),
    "g1": ((1, 1, 0, 0, 1, 0), row(D), (1, D), row(M4), row(M4), row(D), row(M4)),
    "square dr": ((1, 0, 0, 0, 0, 1), row(D), (1, D), row(D), row(D), row(D), row(D)),
    "square gx": ((1, 1, 1, 0, 0, 0), row(D), row(D), row(D), row(D), row(D), row(D)),
    "overcomplete gW": ((4, 0, 0, 0, 0, 0), (1, M4), row(D), row(D), (1, M4), (1, M4), (1, M4)),
    "square gW": ((2, 0, 0, 0, 0, 1), (1, D), row(D), (1, D), (1, D), (1, D), (1, D)),
}
names = ("NUM_SEG", "HAS_AUX", "HAS_GATED", "RELU", "HAS_MASK", "HAS_AMASK")
stride_names = ("stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm", "stride_cn",
                "stride_xm", "stride_xn", "stride_gm", "stride_gn", "stride_mm", "stride_mn")
arch, dtype = int(sys.argv[1]), sys.argv[2]
tile = it._GPU_TILES[0] if arch >= 90 else it._GPU_TILES[-1]
bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
for what, (values, a, b, c, x, g, m) in launches.items():
    split = 2 if values[0] > 1 else 1
    loads = bool(values[1] or values[2] or values[4])
    strides = dict(zip(stride_names, (*a, *b, *c, *x, *g, *m)))
    signature, constants, attrs = {}, {}, {}
    for i, n in enumerate(fn.arg_names):
        if n.endswith("_ptr"):
            signature[n] = "*" + ("fp32" if n == "c_ptr" and split > 1 else dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n in strides and strides[n] == 1:
            signature[n], constants[n] = "constexpr", 1
        elif n in strides or n in ("M", "N", "K"):
            signature[n], attrs[(i,)] = "i32", [["tt.divisibility", 16]]
        elif n in ("M_BUCKET", "K_BUCKET", "SPLIT_K"):
            signature[n] = "i32"
        elif n.startswith("scale") or n == "beta":
            signature[n] = "fp32"
        else:
            signature[n] = "constexpr"
    constants.update({n: (v if n == "NUM_SEG" else bool(v)) for n, v in zip(names, values)})
    constants.update(UPCAST=False, RNE_BF16=False, PRECISION="ieee", RELAXED=it._RELAXED_ATOMICS,
                     BLOCK_M=tile[0], BLOCK_N=tile[1], BLOCK_K=tile[2], GROUP_M=8,
                     ATOMIC=split > 1, EPI_SUBTILE=tile[5] if loads else 1)
    kernel = triton.compile(ASTSource(fn, signature, constants, attrs),
                            target=GPUTarget("cuda", arch, 32),
                            options={"num_stages": tile[3], "num_warps": tile[4]})
    ptx = kernel.asm["ptx"]
    info = {"launch": what, "tile": list(tile), "amask": bool(values[5]),
            "pipelined": "async_copy_global_to_local" in kernel.asm["ttgir"],
            "relaxed": bool(re.search(r"(atom|red)\.[a-z0-9.]*relaxed", ptx)) if split > 1 else None,
            "spill_stores": None}
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    for ptxas in ("ptxas", "ptxas-blackwell"):  # -v reports registers and spills
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        try:
            v = subprocess.run([os.path.join(bindir, ptxas), "-v", f"--gpu-name={gpu}", f.name,
                                "-o", os.devnull], capture_output=True, text=True, timeout=300)
        except OSError:
            continue
        if re.search(r"Used (\d+) registers", v.stderr):
            s = re.search(r"(\d+) bytes spill stores", v.stderr)
            info["spill_stores"] = int(s.group(1)) if s else 0
            break
    print("compiled", json.dumps(info), flush=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU the other tests compile the kernels for real")
@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_for_gpu_without_a_gpu(arch):
    """The interpreter never compiles: ahead-of-time compile every launch for sm_90 / sm_80.

    With the specialisation the JIT gives real tensors, each main loop must be software
    pipelined, split-K must add with relaxed atomics, and on sm_90 the first Hopper tile
    (128 x 256, split epilogue) must not spill in any epilogue.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _AOT_COMPILE, str(arch), "bf16"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("no ptxas for ahead-of-time compilation")
    assert proc.returncode == 0, proc.stderr[-3000:]
    infos = [
        json.loads(line.split(" ", 1)[1])
        for line in proc.stdout.splitlines()
        if line.startswith("compiled ")
    ]
    assert len(infos) == 8
    for info in infos:
        assert info["pipelined"], info
        if info["relaxed"] is not None:
            assert info["relaxed"] == it._RELAXED_ATOMICS, info
        # the A-mask prologue of the square block holds two A tiles: a few bytes may spill there
        if arch == 90 and info["spill_stores"] is not None and not info["amask"]:
            assert info["spill_stores"] == 0, info
