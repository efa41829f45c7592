"""Fused Triton forward/backward of the two CRATE ISTA blocks (DESIGN.md, Kernels).

Everything is built from ONE tiled GEMM kernel, ``_gemm_kernel``, whose prologue and
epilogue are chosen by constexpr flags, so each ISTA step is one GEMM launch and no
element-wise kernel ever runs:

    C = epilogue( sum_s scale_s * A_s @ B_s )        (A_0 optionally masked: A_0 * [A_mask > 0])
    epilogue(v) = mask( relu( aux + v + beta + gated * [gate > 0] ) )   (every term optional)

A and B are strided views, so W^T and the transposed codes of the weight gradient are read
in place. Up to four (A_s, B_s, scale_s) segments that share shapes and strides form one
GEMM with K = n_segments * T: that is how the weight gradient ``[z2; eta g2; -z1; eta g1]^T
[gy; u; gu; x]`` is one launch with one fp32 accumulator. When the m x d output has too few
tiles to fill the GPU the autotuner may split the token dimension (split-K) and add the
partial sums with fp32 atomics into a zeroed buffer; the weight gradient's summation order
then varies from run to run on the GPU (last-bit differences, as with cuBLAS split-K).

Overcomplete block (x: T x d, W: m x d), 4 GEMMs forward, 4 + 1 (K = 4T) backward:

    z1 = relu(eta * x W^T - eta lam)           u  = x - z1 W
    z2 = relu(z1 + eta * u W^T - eta lam)      y  = z2 W
    g2 = (gy W^T + gz) * [z2 > 0]              gu = eta * g2 W
    g1 = (g2 - gu W^T) * [z1 > 0]              gx = gu + eta * g1 W
    gW = z2^T gy + eta g2^T u - z1^T gu + eta g1^T x

[p > 0] == [relu(p) > 0], so the ReLU masks come from the saved codes themselves: no mask
tensor and no fp32 T x m intermediate is ever written. ``gz`` is the gradient reaching the
returned sparse code (zero unless a loss reads it).

Square block (x: T x d, W: d x d), 2 GEMMs forward, 2 + 1 (K = 2T) backward:

    r   = x - x W^T                            out = relu(x + eta * r W - eta lam)
    g   = gy * [out > 0]        (A prologue)   dr  = eta * g W^T
    gx  = g + dr - dr W                        gW^T = eta g^T r - x^T dr   (stored transposed)

Saved for backward: x and the codes (z1, z2, u) -- square: (r, out) -- in the input dtype,
or only x with ``save_activations=False`` (the backward then recomputes them: +3 GEMMs
overcomplete, +2 square). Intermediates of the backward (g2, gu, g1 / dr) are stored in the
input dtype too, as eager autograd does; every GEMM accumulates in fp32.

float64 inputs and CPU tensors without ``TRITON_INTERPRET=1`` cannot use the Triton GEMM
(fp64 MMA is not a target here); float64 runs the same autograd.Functions with the GEMM
spelled in PyTorch (``_gemm_torch``: the same formula, no fusion), which is what
``torch.autograd.gradcheck`` checks the derivation with.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import ista_overcomplete_reference, ista_square_reference

__all__ = [
    "force_config",
    "forward_codes",
    "ista_triton",
]

# Read once, like @triton.jit does: kernels decorated without the interpreter cannot run on
# CPU tensors later, whatever the environment says by then.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ALIGN = 16  # tl.dot tiles are >= 16 wide; d, m multiples of 16 keep every row 32-byte aligned


# --------------------------------------------------------------------------------------
# The one GEMM kernel
# --------------------------------------------------------------------------------------


@triton.jit
def _accumulate_segment(
    acc,
    a_ptr,
    b_ptr,
    am_ptr,
    row0,
    col0,
    M,
    N,
    k_start,
    k_end,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    HAS_AMASK: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc += A[row0 : row0 + BLOCK_M, k_start:k_end] @ B[k_start:k_end, col0 : col0 + BLOCK_N]."""
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # 64-bit arithmetic only for the per-program base offset (T x m passes 2^31 elements at
    # GPT-2 xl sizes); tile offsets stay int32, int64 tiles cost registers in the main loop
    a_base = row0.to(tl.int64) * stride_am + k_start.to(tl.int64) * stride_ak
    a_tile = rm[:, None] * stride_am + rk[None, :] * stride_ak
    a_ptrs = a_ptr + a_base + a_tile
    am_ptrs = am_ptr + a_base + a_tile
    b_base = k_start.to(tl.int64) * stride_bk + col0.to(tl.int64) * stride_bn
    b_ptrs = b_ptr + b_base + (rk[:, None] * stride_bk + rn[None, :] * stride_bn)
    row_ok = (row0 + rm) < M
    col_ok = (col0 + rn) < N
    for k in range(k_start, k_end, BLOCK_K):
        k_ok = (k + rk) < k_end
        a_ok = row_ok[:, None] & k_ok[None, :]
        a = tl.load(a_ptrs, mask=a_ok, other=0.0)
        if HAS_AMASK:
            # the ReLU mask of the square block's backward, read from the saved output
            gate = tl.load(am_ptrs, mask=a_ok, other=0.0)
            a = tl.where(gate > 0, a, tl.zeros_like(a))
            am_ptrs += BLOCK_K * stride_ak
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            # the interpreter multiplies bf16 tiles as their raw uint16 bits; fp32 is exact here
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        # pointer tiles are 64-bit: stepping them never overflows, unlike an offset tile
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _tile_ptrs(ptr, row0, col0, stride_m, stride_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pointers to the (BLOCK_M, BLOCK_N) tile at (row0, col0): int64 base, int32 tile offsets."""
    base = row0.to(tl.int64) * stride_m + col0.to(tl.int64) * stride_n
    tile = tl.arange(0, BLOCK_M)[:, None] * stride_m + tl.arange(0, BLOCK_N)[None, :] * stride_n
    return ptr + base + tile


@triton.jit
def _gemm_kernel(
    a0_ptr, b0_ptr, a1_ptr, b1_ptr, a2_ptr, b2_ptr, a3_ptr, b3_ptr,
    c_ptr, aux_ptr, gated_ptr, gate_ptr, mask_ptr, amask_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_cm, stride_cn,
    stride_xm, stride_xn,  # aux
    stride_gm, stride_gn,  # gated and gate
    stride_mm, stride_mn,  # mask
    scale0, scale1, scale2, scale3, beta,
    NUM_SEG: tl.constexpr,
    HAS_AUX: tl.constexpr,
    HAS_GATED: tl.constexpr,
    RELU: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_AMASK: tl.constexpr,
    UPCAST: tl.constexpr,
    RNE_BF16: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # grouped ordering: GROUP_M row-blocks share their B column-blocks while they sit in L2
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)

    # One fp32 accumulator for all segments (two would double the registers of a tile): it
    # holds sum_s scale_s A_s B_s / scale_current, rescaled when the scale changes. Callers
    # order segments so that equal scales are adjacent (one inexact rescale at most).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate_segment(acc, a0_ptr, b0_ptr, amask_ptr, row0, col0, M, N, k_start, k_end,
                              stride_am, stride_ak, stride_bk, stride_bn,
                              HAS_AMASK, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    scale = scale0
    # segments after the first never carry an A mask (only the square backward needs one)
    if NUM_SEG > 1:
        acc = acc * (scale / scale1)
        scale = scale1
        acc = _accumulate_segment(acc, a1_ptr, b1_ptr, amask_ptr, row0, col0, M, N, k_start, k_end,
                                  stride_am, stride_ak, stride_bk, stride_bn,
                                  False, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    if NUM_SEG > 2:
        acc = acc * (scale / scale2)
        scale = scale2
        acc = _accumulate_segment(acc, a2_ptr, b2_ptr, amask_ptr, row0, col0, M, N, k_start, k_end,
                                  stride_am, stride_ak, stride_bk, stride_bn,
                                  False, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    if NUM_SEG > 3:
        acc = acc * (scale / scale3)
        scale = scale3
        acc = _accumulate_segment(acc, a3_ptr, b3_ptr, amask_ptr, row0, col0, M, N, k_start, k_end,
                                  stride_am, stride_ak, stride_bk, stride_bn,
                                  False, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    v = acc * scale

    c_ok = ((row0 + tl.arange(0, BLOCK_M)) < M)[:, None] & ((col0 + tl.arange(0, BLOCK_N)) < N)[
        None, :
    ]
    # same evaluation order as the eager reference (aux + v, then + beta), so fp32 results
    # round the same way and the sparse code has the reference's zeros
    if HAS_AUX:
        aux_ptrs = _tile_ptrs(aux_ptr, row0, col0, stride_xm, stride_xn, BLOCK_M, BLOCK_N)
        v = tl.load(aux_ptrs, mask=c_ok, other=0.0).to(tl.float32) + v
    v = v + beta
    if HAS_GATED:
        gate = tl.load(
            _tile_ptrs(gate_ptr, row0, col0, stride_gm, stride_gn, BLOCK_M, BLOCK_N),
            mask=c_ok,
            other=0.0,
        )
        gated = tl.load(
            _tile_ptrs(gated_ptr, row0, col0, stride_gm, stride_gn, BLOCK_M, BLOCK_N),
            mask=c_ok,
            other=0.0,
        )
        v += tl.where(gate > 0, gated.to(tl.float32), 0.0)
    if RELU:
        v = tl.where(v < 0, 0.0, v)  # not tl.maximum: a NaN must stay NaN, as in torch.relu
    if HAS_MASK:
        keep = tl.load(
            _tile_ptrs(mask_ptr, row0, col0, stride_mm, stride_mn, BLOCK_M, BLOCK_N),
            mask=c_ok,
            other=0.0,
        )
        v = tl.where(keep > 0, v, 0.0)
    c_ptrs = _tile_ptrs(c_ptr, row0, col0, stride_cm, stride_cn, BLOCK_M, BLOCK_N)
    if SPLIT_K == 1:
        if RNE_BF16:
            # the interpreter truncates fp32 -> bf16; round to nearest even by hand, as the GPU does
            bits = v.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            tl.store(c_ptrs, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=c_ok)
        else:
            tl.store(c_ptrs, v.to(c_ptr.dtype.element_ty), mask=c_ok)
    else:
        tl.atomic_add(c_ptrs, v, mask=c_ok)  # fp32 buffer, zeroed by the launcher


# --------------------------------------------------------------------------------------
# Autotuning
# --------------------------------------------------------------------------------------

_KEY = [
    "M",
    "N",
    "K",
    "NUM_SEG",
    "HAS_AUX",
    "HAS_GATED",
    "RELU",
    "HAS_MASK",
    "HAS_AMASK",
    "PRECISION",
]
# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps): the Hopper/Ampere matmul-tutorial set
_GPU_TILES = [
    (128, 256, 64, 3, 8),
    (256, 128, 64, 3, 8),
    (128, 128, 64, 4, 8),
    (128, 128, 64, 3, 4),
    (128, 128, 32, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 64, 32, 5, 2),
    (32, 64, 32, 5, 2),
    (16, 64, 64, 4, 2),
]
_GPU_WGRAD_TILES = [
    (128, 256, 64, 3, 8),
    (128, 128, 64, 4, 8),
    (128, 128, 64, 3, 4),
    (64, 128, 64, 4, 4),
]
# The interpreter runs each program in Python: few, large-ish tiles keep tests fast.
_INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "SPLIT_K": 1}


def _config(bm: int, bn: int, bk: int, stages: int, warps: int, split_k: int = 1) -> triton.Config:
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SPLIT_K": split_k}
    return triton.Config(meta, num_stages=stages, num_warps=warps)


def _gemm_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config(dict(_INTERPRET_CONFIG), num_stages=1, num_warps=4)]
    return [_config(*t) for t in _GPU_TILES]


def _wgrad_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config(dict(_INTERPRET_CONFIG), num_stages=1, num_warps=4)]
    return [_config(*t, split_k=s) for t in _GPU_WGRAD_TILES for s in (1, 2, 4, 8)]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles far larger than the problem and split-K that leaves a split under 256 rows."""
    m, n, k = named_args["M"], named_args["N"], named_args["K"]
    cap_m = max(16, triton.next_power_of_2(m))
    cap_n = max(16, triton.next_power_of_2(n))
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= cap_m
        and c.kwargs["BLOCK_N"] <= cap_n
        and k // c.kwargs["SPLIT_K"] >= 256 * (c.kwargs["SPLIT_K"] > 1)
    ]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


_gemm_tuned = triton.autotune(
    configs=_gemm_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune}
)(_gemm_kernel)
# split-K accumulates with atomics: benchmarking a config must start from a zeroed buffer
_wgrad_tuned = triton.autotune(
    configs=_wgrad_configs(),
    key=_KEY,
    prune_configs_by={"early_config_prune": _prune},
    reset_to_zero=["c_ptr"],
)(_gemm_kernel)

_forced_config: dict | None = None


@contextlib.contextmanager
def force_config(**meta: int) -> Iterator[None]:
    """Run every GEMM with one fixed tile config (tests: exercise tiling, split-K, ragged edges)."""
    global _forced_config
    previous, _forced_config = _forced_config, {**_INTERPRET_CONFIG, **meta}
    try:
        yield
    finally:
        _forced_config = previous


# --------------------------------------------------------------------------------------
# GEMM launcher (Triton, or the same formula in PyTorch for float64)
# --------------------------------------------------------------------------------------

Segment = tuple[Tensor, Tensor, float]  # (A: M x K view, B: K x N view, scale)


def _uses_triton(t: Tensor) -> bool:
    return t.dtype in _TRITON_DTYPES and (t.is_cuda or (_INTERPRET and t.device.type == "cpu"))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own matmul setting (tf32 off by default) so both paths agree
    if not _INTERPRET and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _gemm(
    segments: Sequence[Segment],
    *,
    out: Tensor | None = None,
    beta: float = 0.0,
    aux: Tensor | None = None,
    gated: Tensor | None = None,
    gate: Tensor | None = None,
    relu: bool = False,
    mask: Tensor | None = None,
    a_mask: Tensor | None = None,
    weight_grad: bool = False,
) -> Tensor:
    """C = epilogue(sum_s scale_s A_s B_s); see the module docstring for the epilogue.

    ``out`` defaults to a new contiguous (M, N) tensor in A's dtype. With ``weight_grad`` the
    kernel may split K and accumulate with atomics, so ``out`` must be a zeroed fp32 buffer.
    """
    a0, b0, _ = segments[0]
    (M, K), N = a0.shape, b0.shape[1]
    if out is None:
        out = torch.empty((M, N), device=a0.device, dtype=a0.dtype)
    if M == 0 or N == 0:
        return out
    if not _uses_triton(a0):
        return _gemm_torch(segments, out, beta, aux, gated, gate, relu, mask, a_mask)
    if len(segments) > 1:
        # the kernel rescales its accumulator by scale_prev / scale_next: no zero scales
        segments = [segments[0]] + [seg for seg in segments[1:] if seg[2] != 0.0]
    for a, b, _ in segments[1:]:
        assert a.shape == a0.shape and a.stride() == a0.stride(), "segments must share A's layout"
        assert b.shape == b0.shape and b.stride() == b0.stride(), "segments must share B's layout"
    if a_mask is not None:
        assert a_mask.shape == a0.shape and a_mask.stride() == a0.stride()
    if gated is not None:
        assert gate is not None and gate.stride() == gated.stride()
    padded = list(segments) + [segments[0]] * (4 - len(segments))
    ptrs = [t for a, b, _ in padded for t in (a, b)]
    scales = [float(s) for _, _, s in padded]
    dummy = a0
    aux_t = aux if aux is not None else dummy
    gated_t = gated if gated is not None else dummy
    mask_t = mask if mask is not None else dummy
    args = (
        *ptrs,
        out, aux_t, gated_t, gate if gate is not None else dummy, mask_t,
        a_mask if a_mask is not None else dummy,
        M, N, K,
        a0.stride(0), a0.stride(1), b0.stride(0), b0.stride(1),
        out.stride(0), out.stride(1),
        aux_t.stride(0), aux_t.stride(1),
        gated_t.stride(0), gated_t.stride(1),
        mask_t.stride(0), mask_t.stride(1),
        *scales, float(beta),
    )  # fmt: skip
    flags = {
        "NUM_SEG": len(segments),
        "HAS_AUX": aux is not None,
        "HAS_GATED": gated is not None,
        "RELU": relu,
        "HAS_MASK": mask is not None,
        "HAS_AMASK": a_mask is not None,
        "UPCAST": _INTERPRET and a0.dtype == torch.bfloat16,
        "RNE_BF16": _INTERPRET and out.dtype == torch.bfloat16,
        "PRECISION": _dot_precision(a0.dtype),
    }

    def grid(meta: dict) -> tuple[int, int]:
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (tiles, meta["SPLIT_K"])

    with _device_guard(a0):
        if _forced_config is not None:
            meta = dict(_forced_config)
            if not weight_grad:
                meta["SPLIT_K"] = 1
            _gemm_kernel[grid](*args, **flags, **meta)
        elif weight_grad:
            _wgrad_tuned[grid](*args, **flags)
        else:
            _gemm_tuned[grid](*args, **flags)
    return out


def _device_guard(t: Tensor) -> contextlib.AbstractContextManager:
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _gemm_torch(
    segments: Sequence[Segment],
    out: Tensor,
    beta: float,
    aux: Tensor | None,
    gated: Tensor | None,
    gate: Tensor | None,
    relu: bool,
    mask: Tensor | None,
    a_mask: Tensor | None,
) -> Tensor:
    """The kernel's formula in PyTorch: float64, and the reference for the derivation."""
    acc_dtype = torch.float64 if segments[0][0].dtype == torch.float64 else torch.float32
    v = None
    for i, (a, b, scale) in enumerate(segments):
        if i == 0 and a_mask is not None:
            a = torch.where(a_mask > 0, a, torch.zeros_like(a))
        term = scale * (a.to(acc_dtype) @ b.to(acc_dtype))
        v = term if v is None else v + term
    if aux is not None:
        v = aux.to(acc_dtype) + v
    v = v + beta
    if gated is not None:
        v = v + torch.where(gate > 0, gated.to(acc_dtype), torch.zeros_like(v))
    if relu:
        v = torch.relu(v)
    if mask is not None:
        v = torch.where(mask > 0, v, torch.zeros_like(v))
    return out.copy_(v)


def _weight_grad(
    segments: Sequence[Segment],
    shape: tuple[int, int],
    dtype: torch.dtype,
    *,
    a_mask: Tensor | None = None,
    transposed: bool = False,
) -> Tensor:
    """sum_s scale_s A_s B_s (K = n_seg * T) into a zeroed fp32 buffer, cast to ``dtype``.

    ``transposed``: the segments compute gW^T, stored through a transposed view of gW.
    """
    a0 = segments[0][0]
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    buf = torch.zeros(shape, device=a0.device, dtype=acc_dtype)
    _gemm(segments, out=buf.t() if transposed else buf, a_mask=a_mask, weight_grad=True)
    return buf.to(dtype)


# --------------------------------------------------------------------------------------
# Autograd Functions
# --------------------------------------------------------------------------------------


def _overcomplete_forward(x: Tensor, w: Tensor, eta: float, lam: float) -> tuple[Tensor, ...]:
    wt = w.t()
    z1 = _gemm([(x, wt, eta)], beta=-eta * lam, relu=True)
    u = _gemm([(z1, w, -1.0)], aux=x)
    z2 = _gemm([(u, wt, eta)], beta=-eta * lam, aux=z1, relu=True)
    return z1, u, z2


class ISTAOvercompleteFunction(torch.autograd.Function):
    """y = z2 W with two ISTA steps; returns (y, z2). Inputs: x (T, d) contiguous, W (m, d)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eta: float, lam: float, save_activations: bool):
        z1, u, z2 = _overcomplete_forward(x, weight, eta, lam)
        y = _gemm([(z2, weight, 1.0)])
        ctx.eta, ctx.lam, ctx.saved_codes = eta, lam, save_activations
        ctx.set_materialize_grads(False)
        if any(ctx.needs_input_grad[:2]):
            ctx.save_for_backward(x, weight, *((z1, u, z2) if save_activations else ()))
        return y, z2

    @staticmethod
    def backward(ctx, gy: Tensor | None, gz: Tensor | None):
        x, w, *codes = ctx.saved_tensors
        eta = ctx.eta
        z1, u, z2 = codes if ctx.saved_codes else _overcomplete_forward(x, w, eta, ctx.lam)
        wt = w.t()
        if gy is None:
            gy = torch.zeros_like(x)
        gy = gy.contiguous()
        if gz is not None:
            gz = gz.contiguous()
        g2 = _gemm([(gy, wt, 1.0)], aux=gz, mask=z2)
        gu = _gemm([(g2, w, eta)])
        g1 = _gemm([(gu, wt, -1.0)], aux=g2, mask=z1)
        gx = _gemm([(g1, w, eta)], aux=gu) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            # equal scales adjacent: the kernel rescales its one accumulator once (see there)
            segments = [(z2.t(), gy, 1.0), (z1.t(), gu, -1.0), (g2.t(), u, eta), (g1.t(), x, eta)]
            gw = _weight_grad(segments, tuple(w.shape), w.dtype)
        return gx, gw, None, None, None


def _square_forward(x: Tensor, w: Tensor, eta: float, lam: float) -> tuple[Tensor, Tensor]:
    r = _gemm([(x, w.t(), -1.0)], aux=x)
    out = _gemm([(r, w, eta)], aux=x, beta=-eta * lam, relu=True)
    return r, out


class ISTASquareFunction(torch.autograd.Function):
    """out = relu(x + eta (x - x W^T) W - eta lam). Inputs: x (T, d) contiguous, W (d, d)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eta: float, lam: float, save_activations: bool):
        r, out = _square_forward(x, weight, eta, lam)
        ctx.eta, ctx.lam, ctx.saved_codes = eta, lam, save_activations
        if any(ctx.needs_input_grad[:2]):
            ctx.save_for_backward(x, weight, *((r, out) if save_activations else ()))
        return out

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, w, *codes = ctx.saved_tensors
        eta = ctx.eta
        r, out = codes if ctx.saved_codes else _square_forward(x, w, eta, ctx.lam)
        gy = gy.contiguous()
        # g = gy * [out > 0] is never materialised: A prologue here, gated epilogue below
        dr = _gemm([(gy, w.t(), eta)], a_mask=out)
        gx = _gemm([(dr, w, -1.0)], aux=dr, gated=gy, gate=out) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            # gW = eta r^T g - dr^T x, computed as its transpose so the mask lands on A
            segments = [(gy.t(), r, eta), (x.t(), dr, -1.0)]
            gw = _weight_grad(segments, tuple(w.shape), w.dtype, a_mask=out.t(), transposed=True)
        return gx, gw, None, None, None


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _check(x: Tensor, weight: Tensor, variant: str) -> None:
    if weight.dim() != 2 or x.dim() < 1 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"ISTA {variant}: x (..., d) and dictionary weight (m, d) disagree: "
            f"x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if variant == "square" and weight.shape[0] != weight.shape[1]:
        raise ValueError(f"ISTA square: weight must be (d, d), got {tuple(weight.shape)}")
    if x.device != weight.device:
        raise ValueError(f"ISTA {variant}: x is on {x.device}, weight on {weight.device}")
    if x.device.type == "cpu" and not _INTERPRET:
        raise RuntimeError(
            "ISTA kernel 'triton' got CPU tensors but Triton is not interpreting: set "
            "TRITON_INTERPRET=1 before wbscale.kernels.ista_triton is first imported, or use "
            "model.ista_kernel: eager"
        )


def _input_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if x.dtype != weight.dtype:
        raise TypeError(
            f"ISTA: x is {x.dtype} but the dictionary weight is {weight.dtype}; cast one, or "
            "run under torch.autocast"
        )
    return x.dtype


def forward_codes(
    x: Tensor, weight: Tensor, *, variant: str, eta: float, lam: float
) -> tuple[Tensor, ...]:
    """The codes the forward computes, (z1, z2) or (out,), for x (T, d): exactly what the
    backward derives its ReLU masks from (tests and the bench check gradients on that active set).
    """
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    w = weight.contiguous()
    if variant == "overcomplete":
        z1, _, z2 = _overcomplete_forward(x2, w, eta, lam)
        return z1, z2
    return (_square_forward(x2, w, eta, lam)[1],)


# Dynamo would trace into the launcher's Python; a compiled model graph-breaks here instead.
@torch.compiler.disable
def ista_triton(
    x: Tensor,
    weight: Tensor,
    *,
    variant: str,
    eta: float,
    lam: float,
    return_code: bool = False,
    save_activations: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Fused ISTA block on x (..., d); with ``return_code`` also the sparse code z.

    overcomplete: weight (m, d), returns y (..., d) [and z2 (..., m)];
    square: weight (d, d), returns out (..., d) [and out again: it is its own code].
    ``save_activations=False`` keeps only x for backward and recomputes the codes there.
    """
    if variant not in ("overcomplete", "square"):
        raise ValueError(f"unknown ISTA variant {variant!r}; choose overcomplete or square")
    _check(x, weight, variant)
    d, m = x.shape[-1], weight.shape[0]
    reference = ista_overcomplete_reference if variant == "overcomplete" else ista_square_reference
    if d % _ALIGN or m % _ALIGN:
        _warn_once(
            f"ISTA triton kernel needs d and m multiples of {_ALIGN} (got d={d}, m={m}); "
            "using the eager reference for these shapes"
        )
        return reference(x, weight, eta, lam, return_code)
    dtype = _input_dtype(x, weight)
    if dtype not in _TRITON_DTYPES and dtype != torch.float64:
        _warn_once(f"ISTA triton kernel does not support {dtype}; using the eager reference")
        return reference(x, weight, eta, lam, return_code)

    lead = x.shape[:-1]
    # one copy at most: the weight-gradient GEMM reads x with the same strides as gy
    x2 = x.to(dtype).reshape(-1, d).contiguous()
    w = weight.to(dtype).contiguous()
    with torch.autocast(x.device.type, enabled=False):
        if variant == "overcomplete":
            y, z = ISTAOvercompleteFunction.apply(x2, w, float(eta), float(lam), save_activations)
            y, z = y.reshape(*lead, d), z.reshape(*lead, m)
        else:
            y = ISTASquareFunction.apply(x2, w, float(eta), float(lam), save_activations).reshape(
                *lead, d
            )
            z = y
    return (y, z) if return_code else y
