"""Fused Triton forward/backward of the general ISTA block (the CRATE block options).

The math is :func:`wbscale.kernels.reference.ista_general_reference`: K steps, a tied or
separate decoder, lambda a scalar or one per atom, eta a (learnable) scalar. Row form, x: T x d,
the codes z_k: T x m. Write R for the matrix the code reconstructs through (z R: m x d) --
overcomplete R = W, square R = W^T (a strided view) -- so that both variants are one loop:

    overcomplete (z0 = 0):  z1 = relu(eta x R^T - eta lam)
    every later step:       u  = x - z_{k-1} R         z_k = relu(z_{k-1} + eta u R^T - eta lam)
    square (z0 = x) runs the later-step form from k = 1;   y = z_K W_out (overcomplete), z_K (square)

Backward (gy = dL/dy, gz = dL/dz_K; gp_k = dL/dp_k; u_0 = x for overcomplete):

    gp_K   = (gy W_out^T + gz) * [z_K > 0]                 (square: gy * [z_K > 0])
    gW_out = z_K^T gy                                       (tied: added to gR)
    for k = K .. 1:
        gu      = eta gp_k R                  gR += eta gp_k^T u_{k-1} - z_{k-1}^T gu
        gp_k-1  = (gp_k - gu R^T) * [z_{k-1} > 0]         (square, k = 1: gz_0 goes into gx)
        gx     += gu
        geta   += <gp_k, z_k - z_{k-1}> / eta              (on the active set p_k = z_k)
        glam   -= eta * sum_tokens gp_k                    (per atom; summed for a scalar lambda)

Every GEMM is one launch of ``_gemm_kernel`` (below) whose epilogue applies the scalar eta
(read from device memory: a learned eta never syncs with the host), the per-atom threshold
eta * lam[col], the aux addend, the ReLU and the ReLU mask of a saved code, or adds into an
fp32 accumulator (the weight gradients: one fp32 buffer per weight, every term added in
fp32, returned in the parameter's dtype). Forward 2K GEMMs of T x d x m (square: 2K of
T x d x d), backward 4K: what ``flops_per_token`` counts. Three things run as PyTorch ops:
the square block's first ReLU mask of the backward (an element-wise where; it has no GEMM to
ride on), the running sum gx over K >= 3 steps, and the two parameter-gradient reductions
(glam: a column sum of gp_k; geta: a dot product), each a read of T x m per step.

The forward keeps x, every code z_1..z_K and every u (K T x m + (K - 1) T x d; square K
T x d each), in the compute dtype: the general block has one save mode, "all";
``model.ista_save_activations`` applies to the published block only. float64 (and CPU
tensors without ``TRITON_INTERPRET=1``) run the same formula with the GEMM in PyTorch: what
``torch.autograd.gradcheck`` checks the derivation with. An ``autograd.Function``, not a
custom op: ``torch.compile`` of a model that uses the options breaks its graph at the block.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    _INTERPRET,
    _TRITON_DTYPES,
    _acc_dtype,
    _check_device,
    _check_shapes,
    _device_guard,
    _dot,
    _dot_precision,
    _grouped_pid,
    _input_dtype,
    _store,
    _uses_triton,
)
from .reference import ista_general_reference, published_steps

__all__ = ["forward_codes", "ista_general_triton"]


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, aux_ptr, mask_ptr, lam_ptr, eta_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_cm, stride_cn, stride_xm, stride_xn, stride_mm, stride_mn, stride_lam,
    alpha,
    HAS_ETA: tl.constexpr,
    HAS_AUX: tl.constexpr,
    HAS_LAM: tl.constexpr,
    RELU: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ACCUM: tl.constexpr,
    UPCAST: tl.constexpr,
    RNE_BF16: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """C = mask(relu(aux + alpha [eta] (A @ B) - eta lam[col])) [+ C]  (every term optional)."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm < M
    col_ok = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    a_ptrs = a_ptr + rm64[:, None] * stride_am + rk[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + rk[:, None].to(tl.int64) * stride_bk + rn64[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(acc, a, b, UPCAST, PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # the eager reference's order: alpha * eta * (A B), then aux + that, then - eta lam
    v = acc * alpha
    if HAS_ETA:
        eta = tl.load(eta_ptr).to(tl.float32)
        v = v * eta
    c_ok = row_ok[:, None] & col_ok[None, :]
    if HAS_AUX:
        aux = tl.load(aux_ptr + rm64[:, None] * stride_xm + rn64[None, :] * stride_xn, mask=c_ok, other=0.0)
        v = aux.to(tl.float32) + v
    if HAS_LAM:
        eta_l = tl.load(eta_ptr).to(tl.float32)
        lam = tl.load(lam_ptr + rn64 * stride_lam, mask=col_ok, other=0.0).to(tl.float32)
        v = v - (eta_l * lam)[None, :]
    if RELU:
        v = tl.where(v < 0, 0.0, v)  # not tl.maximum: a NaN stays NaN, as in torch.relu
    if HAS_MASK:
        keep = tl.load(mask_ptr + rm64[:, None] * stride_mm + rn64[None, :] * stride_mn, mask=c_ok, other=0.0)
        v = tl.where(keep.to(tl.float32) > 0, v, 0.0)
    c_ptrs = c_ptr + rm64[:, None] * stride_cm + rn64[None, :] * stride_cn
    if ACCUM:
        # an fp32 buffer the launcher zeroed; launches run one after another (no atomics)
        v = tl.load(c_ptrs, mask=c_ok, other=0.0) + v
    _store(c_ptrs, v, c_ok, RNE_BF16)


# Tiles: one fixed config (not autotuned). Under the interpreter few, large-ish tiles keep the
# tests fast; on a GPU a 64 x 128 x 64 tile (16-bit) or 64 x 64 x 32 (fp32) per launch.
_INTERPRET_TILE = (32, 32, 32, 4, 1)
_GPU_TILE_16 = (64, 128, 64, 4, 3)
_GPU_TILE_32 = (64, 64, 32, 4, 3)


def _tile(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for operands of ``dtype``."""
    if _INTERPRET:
        return _INTERPRET_TILE
    return _GPU_TILE_32 if dtype == torch.float32 else _GPU_TILE_16


def _gemm(
    a: Tensor,
    b: Tensor,
    *,
    out: Tensor | None = None,
    alpha: float = 1.0,
    eta: Tensor | None = None,
    aux: Tensor | None = None,
    lam: Tensor | None = None,
    relu: bool = False,
    mask: Tensor | None = None,
    accum: bool = False,
) -> Tensor:
    """out = mask(relu(aux + alpha [eta] a @ b - eta lam)) [+ out]; a (M, K), b (K, N) strided.

    ``eta``: a one-element fp32 tensor; ``lam``: (1,) or (N,) fp32 (needs ``eta``); ``accum``:
    add into ``out`` (an fp32 buffer). ``out`` defaults to a new (M, N) tensor in a's dtype.
    """
    (M, K), N = a.shape, b.shape[1]
    if out is None:
        out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    if M == 0 or N == 0:
        return out
    if not _uses_triton(a):
        return _gemm_torch(a, b, out, alpha, eta, aux, lam, relu, mask, accum)
    bm, bn, bk, warps, stages = _tile(a.dtype)
    dummy = a
    aux_t = aux if aux is not None else dummy
    mask_t = mask if mask is not None else dummy
    lam_t = lam if lam is not None else out
    eta_t = eta if eta is not None else out
    stride_lam = 0 if lam is None or lam.numel() == 1 else lam.stride(0)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    with _device_guard(a):
        _gemm_kernel[grid](
            a, b, out, aux_t, mask_t, lam_t, eta_t,
            M, N, K,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            out.stride(0), out.stride(1), aux_t.stride(0), aux_t.stride(1),
            mask_t.stride(0), mask_t.stride(1), stride_lam,
            float(alpha),
            HAS_ETA=eta is not None, HAS_AUX=aux is not None, HAS_LAM=lam is not None,
            RELU=relu, HAS_MASK=mask is not None, ACCUM=accum,
            UPCAST=_INTERPRET and a.dtype == torch.bfloat16,
            RNE_BF16=_INTERPRET and out.dtype == torch.bfloat16,
            PRECISION=_dot_precision(a.dtype),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return out


def _gemm_torch(
    a: Tensor, b: Tensor, out: Tensor, alpha: float, eta: Tensor | None, aux: Tensor | None,
    lam: Tensor | None, relu: bool, mask: Tensor | None, accum: bool,
) -> Tensor:  # fmt: skip
    """The kernel's formula in PyTorch: float64, and the reference for the derivation."""
    acc = _acc_dtype(a.dtype)
    v = (a.to(acc) @ b.to(acc)) * alpha
    if eta is not None:
        v = v * eta.to(acc).reshape(())
    if aux is not None:
        v = aux.to(acc) + v
    if lam is not None:
        v = v - (eta.to(acc).reshape(()) * lam.to(acc).reshape(-1))
    if relu:
        v = torch.relu(v)
    if mask is not None:
        v = torch.where(mask > 0, v, torch.zeros_like(v))
    if accum:
        v = out.to(acc) + v
    return out.copy_(v)


# --------------------------------------------------------------------------------------
# The block
# --------------------------------------------------------------------------------------


def _forward(
    x: Tensor, r: Tensor, eta: Tensor, lam: Tensor, steps: int, square: bool
) -> tuple[list[Tensor], list[Tensor | None]]:
    """Codes z_1..z_K and the residuals u_0..u_{K-1} (u_0 None for overcomplete: it is x)."""
    codes: list[Tensor] = []
    resid: list[Tensor | None] = []
    z = x if square else None
    for _ in range(steps):
        if z is None:
            z = _gemm(x, r.t(), eta=eta, lam=lam, relu=True)
            resid.append(None)
        else:
            u = _gemm(z, r, alpha=-1.0, aux=x)
            z = _gemm(u, r.t(), eta=eta, aux=z, lam=lam, relu=True)
            resid.append(u)
        codes.append(z)
    return codes, resid


class _GeneralISTA(torch.autograd.Function):
    """(y, z_K) of the general block for x (T, d) contiguous in the compute dtype; square: y."""

    @staticmethod
    def forward(ctx, x, weight, decoder, eta, lam, steps, square):  # type: ignore[override]
        dtype = x.dtype
        w = weight.to(dtype).contiguous()
        r = w.t() if square else w
        eta32, lam32 = _scalars(eta, lam, dtype)
        codes, resid = _forward(x, r, eta32, lam32, steps, square)
        z = codes[-1]
        ctx.steps, ctx.square = steps, square
        ctx.has_decoder = decoder is not None
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, decoder, eta, lam, *codes, *resid)
        if square:
            return z
        dec = w if decoder is None else decoder.to(dtype).contiguous()
        y = _gemm(z, dec)
        return y, z

    @staticmethod
    def backward(ctx, gy, gz=None):  # type: ignore[override]
        x, weight, decoder, eta, lam, *saved = ctx.saved_tensors
        steps, square = ctx.steps, ctx.square
        codes, resid = saved[:steps], saved[steps:]
        need_x, need_w, need_dec, need_eta, need_lam = ctx.needs_input_grad[:5]
        if gy is None and gz is None:
            return None, None, None, None, None, None, None
        dtype = x.dtype
        w = weight.to(dtype).contiguous()
        r = w.t() if square else w
        eta32, lam32 = _scalars(eta, lam, dtype)
        z_last = codes[-1]
        gw = torch.zeros(weight.shape, device=x.device, dtype=_acc_dtype(weight.dtype)) if need_w else None
        gr = None if gw is None else (gw.t() if square else gw)  # gR lands in gW (square: transposed)
        gdec = None
        if gy is not None:
            gy = gy.contiguous()
        if gz is not None:
            gz = gz.contiguous()
        if square:
            gp = torch.where(z_last > 0, gy, torch.zeros_like(gy))
        else:
            dec = w if decoder is None else decoder.to(dtype).contiguous()
            if gy is None:
                gp = torch.where(z_last > 0, gz, torch.zeros_like(gz))
            else:
                gp = _gemm(gy, dec.t(), aux=gz, mask=z_last)
                if decoder is None and gw is not None:
                    _gemm(z_last.t(), gy, out=gw, accum=True)
                elif decoder is not None and need_dec:
                    gdec = torch.zeros(decoder.shape, device=x.device, dtype=_acc_dtype(decoder.dtype))
                    _gemm(z_last.t(), gy, out=gdec, accum=True)
        pdt = eta32.dtype
        geta = torch.zeros((), device=x.device, dtype=pdt) if need_eta else None
        glam = torch.zeros(lam32.numel(), device=x.device, dtype=pdt) if need_lam else None
        gx_sum: Tensor | None = None
        gx: Tensor | None = None
        for k in reversed(range(steps)):
            z_k = codes[k]
            z_prev = codes[k - 1] if k > 0 else (x if square else None)
            if geta is not None:
                step = z_k.to(pdt) if z_prev is None else z_k.to(pdt) - z_prev.to(pdt)
                geta += (gp.to(pdt) * step).sum()
            if glam is not None:
                glam += gp.to(pdt).sum(0) if glam.numel() > 1 else gp.to(pdt).sum()
            if z_prev is None:  # overcomplete, first step: u_0 = x, z_0 = 0
                if need_x:
                    gx = _gemm(gp, r, eta=eta32, aux=gx_sum)
                if gr is not None:
                    _gemm(gp.t(), x, eta=eta32, out=gr, accum=True)
                break
            u = resid[k]
            gu = _gemm(gp, r, eta=eta32)
            if gr is not None:
                _gemm(gp.t(), u, eta=eta32, out=gr, accum=True)
                _gemm(z_prev.t(), gu, alpha=-1.0, out=gr, accum=True)
            g_prev = _gemm(gu, r.t(), alpha=-1.0, aux=gp, mask=z_prev if k > 0 else None)
            if need_x:
                gx_sum = gu if gx_sum is None else gx_sum + gu
            if k > 0:
                gp = g_prev
            elif need_x:  # square: z_0 = x
                gx = gx_sum + g_prev
        geta_out = None
        if geta is not None:
            geta_out = (geta / eta32.reshape(())).reshape(eta.shape).to(eta.dtype)
        glam_out = None
        if glam is not None:
            glam_out = (-eta32 * glam).reshape(lam.shape).to(lam.dtype)
        return (
            gx,
            None if gw is None else gw.to(weight.dtype),
            None if gdec is None else gdec.to(decoder.dtype),
            geta_out,
            glam_out,
            None,
            None,
        )


def _scalars(eta: Tensor, lam: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """eta (1,) and lam (1,) or (m,), contiguous, in fp32 (fp64 for float64 compute)."""
    pdt = _acc_dtype(dtype)
    return eta.detach().to(pdt).reshape(1).contiguous(), lam.detach().to(pdt).reshape(-1).contiguous()


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------

_warned: set[str] = set()


def _check(x: Tensor, weight: Tensor, decoder: Tensor | None, variant: str) -> None:
    if variant not in ("overcomplete", "square"):
        raise ValueError(f"unknown ISTA variant {variant!r}; choose overcomplete or square")
    _check_shapes(x, weight, variant)
    if decoder is not None:
        if variant == "square":
            raise ValueError("ISTA square: the output is the code itself, there is no decoder")
        if tuple(decoder.shape) != tuple(weight.shape):
            raise ValueError(f"ISTA: decoder {tuple(decoder.shape)} must match the dictionary {tuple(weight.shape)}")
    _check_device(x, weight, variant, "ista_general")


def _as_tensor(v: float | Tensor, like: Tensor) -> Tensor:
    if isinstance(v, Tensor):
        return v if v.dim() >= 1 else v.reshape(1)
    return torch.tensor([float(v)], device=like.device, dtype=torch.float32)


@torch._dynamo.disable
def _apply(x2: Tensor, weight: Tensor, decoder: Tensor | None, eta: Tensor, lam: Tensor, steps: int,
           square: bool) -> Tensor | tuple[Tensor, Tensor]:  # fmt: skip
    """The autograd.Function, kept out of torch.compile's graph (a graph break, not a trace of
    the launchers)."""
    with torch.autocast(x2.device.type, enabled=False):
        return _GeneralISTA.apply(x2, weight, decoder, eta, lam, steps, square)


def ista_general_triton(
    x: Tensor,
    weight: Tensor,
    *,
    variant: str = "overcomplete",
    steps: int | None = None,
    decoder: Tensor | None = None,
    eta: float | Tensor = 0.1,
    lam: float | Tensor = 0.1,
    return_code: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The fused general block on x (..., d); arguments as ``ista_general_reference``."""
    _check(x, weight, decoder, variant)
    k_steps = published_steps(variant) if steps is None else int(steps)
    if k_steps < 1:
        raise ValueError(f"ISTA needs at least one step, got steps={steps}")
    dtype = _input_dtype(x, weight)  # the published block's rule
    if dtype not in _TRITON_DTYPES and dtype != torch.float64:
        message = f"ISTA triton kernel does not support {dtype}; using the eager reference"
        if message not in _warned:
            _warned.add(message)
            warnings.warn(message, stacklevel=2)
        return ista_general_reference(x, weight, eta, lam, return_code, steps=k_steps, decoder=decoder, variant=variant)
    d, m = x.shape[-1], weight.shape[0]
    lam_t = _as_tensor(lam, x)
    if lam_t.numel() not in (1, m):
        raise ValueError(f"ISTA: lambda has {lam_t.numel()} entries; use one or one per atom ({m})")
    eta_t = _as_tensor(eta, x)
    if eta_t.numel() != 1:
        raise ValueError(f"ISTA: eta must be a scalar, got {eta_t.numel()} entries")
    lead = x.shape[:-1]
    x2 = x.to(dtype).reshape(-1, d).contiguous()
    out = _apply(x2, weight, decoder, eta_t, lam_t, k_steps, variant == "square")
    if variant == "square":
        y = out.reshape(*lead, d)
        return (y, y) if return_code else y
    y, z = out
    y, z = y.reshape(*lead, d), z.reshape(*lead, m)
    return (y, z) if return_code else y


def forward_codes(
    x: Tensor, weight: Tensor, *, variant: str = "overcomplete", steps: int | None = None,
    eta: float | Tensor = 0.1, lam: float | Tensor = 0.1,
) -> list[Tensor]:  # fmt: skip
    """The K codes the fused forward computes, for x (T, d): exactly what its backward takes its
    ReLU masks from (tests check low-precision gradients on that active set)."""
    k_steps = published_steps(variant) if steps is None else int(steps)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    w = weight.contiguous()
    r = w.t() if variant == "square" else w
    eta32, lam32 = _scalars(_as_tensor(eta, x), _as_tensor(lam, x), x.dtype)
    with torch.no_grad():
        codes, _ = _forward(x2, r, eta32, lam32, k_steps, variant == "square")
    return codes
