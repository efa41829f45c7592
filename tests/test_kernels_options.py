"""The fused Triton general ISTA block (the CRATE block options) against its eager reference.

``wbscale.kernels.ista_general`` (K steps, separate decoder, per-atom lambda, learnable eta)
against ``reference.ista_general_reference``: fp32 tight, bf16 loose (on the kernel's own
ReLU pattern, as tests/test_kernels.py does for the published block), float64 gradcheck of
the derivation. Without a GPU the kernels run under the Triton interpreter (slow, exact), so
every shape is small.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated: set it before the first import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed: the fused ISTA kernels need it")

from wbscale.kernels import ista_general as ig  # noqa: E402
from wbscale.kernels import reference  # noqa: E402
from wbscale.kernels.general import ista_general  # noqa: E402

if ig._INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:  # pragma: no cover
    pytest.skip("wbscale.kernels.ista_general was imported without TRITON_INTERPRET=1 and there is no GPU",
                allow_module_level=True)

# (variant, steps, separate decoder, lambda: "float" | "scalar" (1,) tensor | "atoms" (m,), eta tensor?)
CASES = [
    ("overcomplete", 2, False, "float", False),  # the published block through the general path
    ("overcomplete", 1, False, "atoms", True),
    ("overcomplete", 2, True, "float", False),
    ("overcomplete", 2, True, "atoms", True),
    ("overcomplete", 3, False, "scalar", True),
    ("overcomplete", 3, True, "atoms", True),
    ("square", 1, False, "atoms", True),
    ("square", 2, False, "scalar", False),
    ("square", 3, False, "atoms", True),
]
IDS = [f"{v}-k{k}-{'sep' if s else 'tied'}-lam_{lam}-{'eta_t' if e else 'eta_f'}" for v, k, s, lam, e in CASES]


def make_inputs(case, t: int, d: int, seed: int = 0, lead: tuple[int, ...] = ()):
    """float64 x, W (kaiming-like scale), decoder or None, eta, lam, gy, gz."""
    variant, _, separate, lam_kind, eta_tensor = case
    g = torch.Generator().manual_seed(seed)
    m = 4 * d if variant == "overcomplete" else d
    x = torch.randn(*lead, t, d, generator=g, dtype=torch.float64)
    w = torch.randn(m, d, generator=g, dtype=torch.float64) / d**0.5
    dec = torch.randn(m, d, generator=g, dtype=torch.float64) / d**0.5 if separate else None
    eta = torch.tensor([0.2], dtype=torch.float64) if eta_tensor else 0.2
    lam = {"float": 0.1, "scalar": torch.tensor([0.1], dtype=torch.float64),
           "atoms": 0.2 * torch.rand(m, generator=g, dtype=torch.float64)}[lam_kind]
    gy = torch.randn(*lead, t, d, generator=g, dtype=torch.float64)
    gz = torch.randn(*lead, t, m, generator=g, dtype=torch.float64)
    return x, w, dec, eta, lam, gy, gz


def run(fn, inputs, dtype=torch.float64, device="cpu", with_gz=False):
    """float64 (y, z, gx, gW, gdec, geta, glam) of ``fn(x, w, dec, eta, lam) -> (y, z)``
    with loss <y, gy> (+ <z, gz>); absent inputs give None."""
    x, w, dec, eta, lam, gy, gz = inputs

    def leaf(t, cast=True):
        if not isinstance(t, torch.Tensor):
            return t
        return t.detach().to(device=device, dtype=dtype if cast else t.dtype, copy=True).requires_grad_()

    # lambda and eta stay fp32 parameters under a bf16 compute dtype, as in the model
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    args = [leaf(x), leaf(w), leaf(dec)] + [leaf(t.to(pdt), cast=False) if isinstance(t, torch.Tensor) else t
                                            for t in (eta, lam)]
    y, z = fn(*args)
    loss = (y.double() * gy.to(device)).sum()
    if with_gz:
        loss = loss + (z.double() * gz.to(device)).sum()
    loss.backward()
    grads = [a.grad if isinstance(a, torch.Tensor) else None for a in args]
    return [None if t is None else t.detach().double().cpu() for t in (y, z, *grads)]


NAMES = ("y", "code", "grad_x", "grad_w", "grad_decoder", "grad_eta", "grad_lambda")


def kernel_fn(case):
    variant, steps = case[0], case[1]
    return lambda x, w, dec, eta, lam: ig.ista_general_triton(
        x, w, variant=variant, steps=steps, decoder=dec, eta=eta, lam=lam, return_code=True)


def reference_fn(case, masks=None):
    variant, steps = case[0], case[1]
    return lambda x, w, dec, eta, lam: reference.ista_general_reference(
        x, w, eta, lam, True, steps=steps, decoder=dec, variant=variant, masks=masks)


def assert_all_close(got, want, **tol):
    for name, g, r in zip(NAMES, got, want, strict=True):
        assert (g is None) == (r is None), name
        if g is not None:
            torch.testing.assert_close(g, r, **tol, msg=lambda m, n=name: f"{n}: {m}")


def assert_close_relative_to_max(got, want, rel, names=NAMES):
    for name, g, r in zip(names, got, want, strict=True):
        if g is None:
            continue
        err = (g - r).abs().max().item()
        scale = r.abs().max().item()
        assert err <= rel * scale + 1e-12, f"{name}: max error {err:.3e} > {rel} * max |ref| {scale:.3e}"


# --------------------------------------------------------------------------------------
# fp32: tight
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("t", "d"), [(17, 16), (64, 32)])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fp32_forward_backward_match_the_reference(case, t, d):
    inputs = make_inputs(case, t, d, seed=t + d)
    want = [None if r is None else r.float().double() for r in run(reference_fn(case), inputs, dtype=torch.float32)]
    got = run(kernel_fn(case), inputs, dtype=torch.float32, device=DEVICE)
    assert_all_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("case", [CASES[3], CASES[5], CASES[8]], ids=[IDS[3], IDS[5], IDS[8]])
def test_gradient_through_the_returned_code(case):
    inputs = make_inputs(case, 17, 16, seed=5)
    want = run(reference_fn(case), inputs, dtype=torch.float32, with_gz=True)
    got = run(kernel_fn(case), inputs, dtype=torch.float32, device=DEVICE, with_gz=True)
    assert_all_close(got, want, atol=2e-5, rtol=2e-5)


def test_fp32_code_has_the_reference_zeros_and_the_output_is_decoded_from_it():
    case = CASES[5]  # 3 steps, separate decoder, per-atom lambda
    x, w, dec, eta, lam, _, _ = make_inputs(case, 64, 32, seed=3)
    args = [t.float().to(DEVICE) for t in (x, w, dec, eta, lam)]
    y, z = ig.ista_general_triton(args[0], args[1], steps=3, decoder=args[2], eta=args[3], lam=args[4],
                                  return_code=True)
    y_ref, z_ref = reference.ista_general_reference(*(t.float() for t in (x, w)), eta.float(), lam.float(), True,
                                                    steps=3, decoder=dec.float())
    z = z.cpu()
    assert (z == 0).sum() > 0.2 * z.numel(), "test data should make a sparse code"
    assert torch.equal(z == 0, z_ref == 0), f"{int(((z == 0) != (z_ref == 0)).sum())} zeros differ"
    torch.testing.assert_close(y.cpu(), z @ dec.float(), atol=1e-5, rtol=1e-5)


def test_batched_and_non_contiguous_inputs():
    case = CASES[3]
    inputs = make_inputs(case, 9, 16, seed=2, lead=(2,))
    want = run(reference_fn(case), inputs, dtype=torch.float32)
    got = run(kernel_fn(case), inputs, dtype=torch.float32, device=DEVICE)
    assert_all_close(got, want, atol=2e-5, rtol=2e-5)
    variant, steps = case[0], case[1]

    def transposed(x, w, dec, eta, lam):  # x and the weights as transposed views
        return ig.ista_general_triton(x.transpose(-1, -2).contiguous().transpose(-1, -2), w.t().contiguous().t(),
                                      variant=variant, steps=steps, decoder=dec.t().contiguous().t(), eta=eta,
                                      lam=lam, return_code=True)

    assert_all_close(run(transposed, inputs, dtype=torch.float32, device=DEVICE), want, atol=2e-5, rtol=2e-5)


def test_empty_token_batch():
    x = torch.zeros(0, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(64, 16, device=DEVICE, requires_grad=True)
    lam = torch.full((64,), 0.1, device=DEVICE, requires_grad=True)
    y, z = ig.ista_general_triton(x, w, steps=3, lam=lam, return_code=True)
    assert y.shape == (0, 16) and z.shape == (0, 64)
    y.sum().backward()
    assert torch.all(w.grad == 0) and torch.all(lam.grad == 0)


# --------------------------------------------------------------------------------------
# float64: the derivation; bf16: loose
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [CASES[3], CASES[4], CASES[8]], ids=[IDS[3], IDS[4], IDS[8]])
def test_gradcheck_float64(case):
    """float64 runs the same backward with the GEMMs in PyTorch: the formula, checked."""
    variant, steps = case[0], case[1]
    x, w, dec, eta, lam, _, _ = make_inputs(case, 3, 6, seed=11)  # any shape: no Triton tile here
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((dec,) if dec is not None else ())]
    eta_t = torch.as_tensor(eta, dtype=torch.float64).reshape(1).clone().requires_grad_()
    lam_t = torch.as_tensor(lam, dtype=torch.float64).reshape(-1).clone().requires_grad_()

    def f(*args):
        x_, w_ = args[0], args[1]
        dec_ = args[2] if dec is not None else None
        y, z = ig.ista_general_triton(x_, w_, variant=variant, steps=steps, decoder=dec_, eta=args[-2],
                                      lam=args[-1], return_code=True)
        return y, z

    assert torch.autograd.gradcheck(f, (*leaves, eta_t, lam_t), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("case", [CASES[1], CASES[5], CASES[8]], ids=[IDS[1], IDS[5], IDS[8]])
def test_bf16_matches_float64_on_the_kernels_active_set(case):
    """Outputs vs float64; gradients vs the float64 gradient on the kernel's own ReLU pattern
    (a pre-activation within bf16 rounding of 0 may fall on the other side of a ReLU)."""
    variant, steps = case[0], case[1]
    x, w, dec, eta, lam, gy, gz = make_inputs(case, 33, 16, seed=7)
    x, w = x.bfloat16().double(), w.bfloat16().double()  # only the kernel's own rounding counts
    dec = None if dec is None else dec.bfloat16().double()
    inputs = (x, w, dec, eta, lam, gy, gz)
    got = run(kernel_fn(case), inputs, dtype=torch.bfloat16, device=DEVICE)
    want = run(reference_fn(case), inputs)
    codes = ig.forward_codes(x.to(DEVICE, torch.bfloat16), w.to(DEVICE, torch.bfloat16), variant=variant,
                             steps=steps, eta=eta, lam=lam)
    masks = [(c.cpu() > 0).double() for c in codes]
    on_set = run(reference_fn(case, masks), inputs)
    assert_close_relative_to_max(got[:2], want[:2], rel=3e-2, names=NAMES[:2])
    assert_close_relative_to_max(got[2:], on_set[2:], rel=3e-2, names=NAMES[2:])
    flips = ((got[1] > 0) != (want[1] > 0)).double().mean().item()
    assert flips < 0.02, f"{100 * flips:.2f}% of the code's zero pattern differs from float64"


def test_autocast_runs_in_bf16_and_returns_weight_grads_in_the_parameter_dtype():
    x = torch.randn(2, 9, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(64, 16, device=DEVICE, requires_grad=True)
    dec = torch.randn(64, 16, device=DEVICE, requires_grad=True)
    log_eta = torch.full((1,), -2.3, device=DEVICE, requires_grad=True)
    lam = torch.full((64,), 0.1, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y, z = ig.ista_general_triton(x, w, steps=3, decoder=dec, eta=log_eta.exp(), lam=lam, return_code=True)
    assert y.dtype == z.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == dec.grad.dtype == lam.grad.dtype == log_eta.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32


# --------------------------------------------------------------------------------------
# Dispatch and the model
# --------------------------------------------------------------------------------------


def test_dispatch_triton_and_eager_agree():
    case = CASES[5]
    x, w, dec, eta, lam, _, _ = make_inputs(case, 17, 16, seed=1)
    args = [t.float().to(DEVICE) for t in (x, w, dec, eta, lam)]
    out = {}
    for kernel in ("triton", "eager"):
        out[kernel] = ista_general(args[0], args[1], steps=3, decoder=args[2], eta=args[3], lam=args[4],
                                   kernel=kernel, return_code=True)
    for a, b in zip(out["triton"], out["eager"], strict=True):
        torch.testing.assert_close(a.cpu(), b.cpu(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown ISTA kernel"):
        ista_general(args[0], args[1], kernel="cuda")


@pytest.mark.parametrize("variant", ["overcomplete", "square"])
def test_crate_training_step_with_every_option_triton_matches_eager(variant):
    from wbscale.config import ModelConfig
    from wbscale.models import CRATE

    options = dict(ista_residual=True, ista_learn_lambda=True, ista_learn_eta=True, ista_steps=3,
                   ista_init_scale=0.05)
    if variant == "overcomplete":
        options["ista_decoder"] = "separate"
    grads, loss = {}, {}
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    for kernel in ("triton", "eager"):
        torch.manual_seed(0)
        model = CRATE(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50,
                                  ista_variant=variant, ista_kernel=kernel, **options)).to(DEVICE)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        logits, loss[kernel] = model(idx.to(DEVICE), idx.to(DEVICE))
        loss[kernel].backward()
        grads[kernel] = {n: p.grad.detach().cpu() for n, p in model.named_parameters()}
    torch.testing.assert_close(loss["triton"], loss["eager"], atol=1e-6, rtol=1e-6)
    assert "transformer.h.0.ista.log_eta" in grads["eager"] and "transformer.h.0.ista.atom_lambda" in grads["eager"]
    for name, g in grads["eager"].items():
        torch.testing.assert_close(grads["triton"][name], g, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_cpu_tensors_without_the_interpreter_say_what_to_do():
    code = (
        "import torch; from wbscale.kernels.ista_general import ista_general_triton; "
        "ista_general_triton(torch.randn(4, 16), torch.randn(64, 16), steps=3)"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "TRITON_INTERPRET=1" in proc.stderr and "ista_kernel: eager" in proc.stderr


# --------------------------------------------------------------------------------------
# Ahead-of-time compile for the GPU (the interpreter never compiles)
# --------------------------------------------------------------------------------------

_AOT_COMPILE = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from wbscale.kernels import ista_general as ig

fn = ig._gemm_kernel
arch, dtype = int(sys.argv[1]), sys.argv[2]
bm, bn, bk, warps, stages = ig._GPU_TILE_16
# every epilogue the block launches: (HAS_ETA, HAS_AUX, HAS_LAM, RELU, HAS_MASK, ACCUM)
launches = {
    "z1": (1, 0, 1, 1, 0, 0), "u": (0, 1, 0, 0, 0, 0), "z_k": (1, 1, 1, 1, 0, 0), "y": (0, 0, 0, 0, 0, 0),
    "gp": (0, 1, 0, 0, 1, 0), "gu": (1, 0, 0, 0, 0, 0), "g_prev": (0, 1, 0, 0, 1, 0),
    "gx": (1, 1, 0, 0, 0, 0), "gW": (1, 0, 0, 0, 0, 1), "gW -z^T gu": (0, 0, 0, 0, 0, 1),
}
flags = ("HAS_ETA", "HAS_AUX", "HAS_LAM", "RELU", "HAS_MASK", "ACCUM")
for what, values in launches.items():
    accum = bool(values[5])
    signature, constants = {}, {}
    for n in fn.arg_names:
        if n.endswith("_ptr"):
            signature[n] = "*" + ("fp32" if n in ("lam_ptr", "eta_ptr") or (n == "c_ptr" and accum) else dtype)
        elif n in ("M", "N", "K") or n.startswith("stride"):
            signature[n] = "i32"
        elif n == "alpha":
            signature[n] = "fp32"
        else:
            signature[n] = "constexpr"
    constants.update({n: bool(v) for n, v in zip(flags, values)})
    constants.update(UPCAST=False, RNE_BF16=False, PRECISION="ieee", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
    kernel = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", arch, 32),
                            options={"num_stages": stages, "num_warps": warps})
    print("compiled", json.dumps({"launch": what, "ptx_bytes": len(kernel.asm["ptx"])}), flush=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU the other tests compile the kernels for real")
@pytest.mark.parametrize("arch", [90, 80])
def test_general_kernel_compiles_for_gpu_without_a_gpu(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT_COMPILE, str(arch), "bf16"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    infos = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("compiled ")]
    assert len(infos) == 10 and all(i["ptx_bytes"] > 0 for i in infos)
