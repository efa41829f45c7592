"""Fused Triton forward/backward of the two CRATE ISTA blocks (docs/architecture.md, Kernels).

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
partial sums with relaxed fp32 atomics into a zeroed buffer; the weight gradient's
summation order then varies from run to run on the GPU (last-bit differences, as with
cuBLAS split-K). The split count is a runtime argument: split 2, 4 and 8 share one binary.

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

What the forward keeps for backward (``save``), in the input dtype:

    "all"  x and every code: (z1, u, z2) -- square (r, out)   1.0x eager's activations
    "x_u"  x and u -- square x and r; the backward recomputes z1 and z2 (+2 GEMMs) -- square
           out (+1)                                           ~0.2x (overcomplete)
    "x"    x only; the backward recomputes the whole forward (+3 GEMMs, square +2)  ~0.1x

(``True`` means "all" and ``False`` means "x", the old boolean ``save_activations``.)
Intermediates of the backward (g2, gu, g1 / dr) are stored in the input dtype too, as eager
autograd does; every GEMM accumulates in fp32. The weight gradient comes back in the
weight's own dtype straight from the fp32 accumulator, so an fp32 master weight under
autocast gets an fp32 gradient that never went through bf16.

Both blocks are torch custom ops (``wbscale::ista_overcomplete``, ``wbscale::ista_square``
and their ``*_backward``) with a registered autograd formula and fake (meta) kernels, so
``torch.compile`` of a whole CRATE model keeps every ISTA block in its graph: no graph break.

Tiles: every launch of a problem with at least ``TUNE_MIN_TOKENS`` tokens (training sizes)
is autotuned over a few Hopper-sized configs, keyed on the token count rounded up to a
power of two (a new sequence length within the bucket does not tune again); smaller
problems, and no-grad calls under ``TUNE_MIN_TOKENS_NO_GRAD`` tokens (``generate()``), run
one fixed small config (``FIXED_CONFIG``) and never tune.

float64 inputs and CPU tensors without ``TRITON_INTERPRET=1`` cannot use the Triton GEMM
(fp64 MMA is not a target here); float64 runs the same custom ops with the GEMM spelled in
PyTorch (``_gemm_torch``: the same formula, no fusion), which is what
``torch.autograd.gradcheck`` checks the derivation with.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

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
from .modes import SAVE_MODES, normalize_save
from .reference import ista_overcomplete_reference, ista_square_reference

__all__ = [
    "FIXED_CONFIG",
    "collect_compile_jobs",
    "job_key",
    "precompile",
    "replay",
    "SAVE_MODES",
    "TUNE_MIN_TOKENS",
    "TUNE_MIN_TOKENS_NO_GRAD",
    "force_config",
    "forward_codes",
    "ista_triton",
    "normalize_save",
    "trace_gemms",
    "tuned_configs",
]

_ALIGN = 16  # tl.dot tiles are >= 16 wide; d, m multiples of 16 keep every row 32-byte aligned


def _atomic_sem_supported() -> bool:
    """Whether this Triton's ``tl.atomic_add`` takes ``sem=`` (2.1 and later)."""
    try:
        return "sem" in inspect.signature(tl.atomic_add).parameters
    except (TypeError, ValueError):  # pragma: no cover - an unusual wrapper
        return False


_RELAXED_ATOMICS = _atomic_sem_supported()


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
        acc = _dot(acc, a, b, UPCAST, PRECISION)
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
def _epilogue(
    v, row0, col0, M, N,
    c_ptr, aux_ptr, gated_ptr, gate_ptr, mask_ptr,
    stride_cm, stride_cn, stride_xm, stride_xn, stride_gm, stride_gn, stride_mm, stride_mn,
    beta,
    HAS_AUX: tl.constexpr,
    HAS_GATED: tl.constexpr,
    RELU: tl.constexpr,
    HAS_MASK: tl.constexpr,
    RNE_BF16: tl.constexpr,
    ATOMIC: tl.constexpr,
    RELAXED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Store mask(relu(aux + v + beta + gated * [gate > 0])) for the (BLOCK_M, BLOCK_N) tile."""
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
    if ATOMIC:
        # fp32 buffer, zeroed by the launcher; the partial sums need no ordering among
        # themselves (the kernel boundary orders them for the reader), so relaxed suffices
        if RELAXED:
            tl.atomic_add(c_ptrs, v, mask=c_ok, sem="relaxed")
        else:
            tl.atomic_add(c_ptrs, v, mask=c_ok)
    else:
        _store(c_ptrs, v, c_ok, RNE_BF16)


@triton.jit(do_not_specialize=["SPLIT_K", "M_BUCKET", "K_BUCKET"])
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
    M_BUCKET, K_BUCKET,  # autotune key only: M and K rounded up to a power of two
    SPLIT_K,  # runtime: one binary serves every split count > 1
    NUM_SEG: tl.constexpr,
    HAS_AUX: tl.constexpr,
    HAS_GATED: tl.constexpr,
    RELU: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_AMASK: tl.constexpr,
    UPCAST: tl.constexpr,
    RNE_BF16: tl.constexpr,
    PRECISION: tl.constexpr,
    RELAXED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    ATOMIC: tl.constexpr,  # SPLIT_K > 1: accumulate into a zeroed fp32 buffer
    EPI_SUBTILE: tl.constexpr,  # 2: run an epilogue that reads tensors on two column halves
):  # fmt: skip
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _grouped_pid(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
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
    a_ptrs, b_ptrs = (a0_ptr, a1_ptr, a2_ptr, a3_ptr), (b0_ptr, b1_ptr, b2_ptr, b3_ptr)
    scales = (scale0, scale1, scale2, scale3)
    # unrolled; segments after the first never carry an A mask (only the square backward has one)
    for s in tl.static_range(1, NUM_SEG):
        acc = acc * (scale / scales[s])
        scale = scales[s]
        acc = _accumulate_segment(acc, a_ptrs[s], b_ptrs[s], amask_ptr, row0, col0, M, N, k_start, k_end,
                                  stride_am, stride_ak, stride_bk, stride_bn,
                                  False, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    v = acc * scale

    # At 128 x 256 with 8 warps the fp32 accumulator alone is 128 registers per thread; an
    # epilogue that also holds a full aux / mask / gate tile of the same shape spills. Split
    # into two 128 x 128 column halves, each loads half the epilogue operands at a time
    # (the autotuner offers it only to launches whose epilogue reads tensors).
    if EPI_SUBTILE == 2:
        parts = tl.split(tl.permute(tl.reshape(v, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    else:
        parts = (v,)
    for h in tl.static_range(len(parts)):  # unrolled: one epilogue per column part
        _epilogue(parts[h], row0, col0 + h * (BLOCK_N // len(parts)), M, N,
                  c_ptr, aux_ptr, gated_ptr, gate_ptr, mask_ptr,
                  stride_cm, stride_cn, stride_xm, stride_xn, stride_gm, stride_gn, stride_mm, stride_mn,
                  beta, HAS_AUX, HAS_GATED, RELU, HAS_MASK, RNE_BF16, ATOMIC, RELAXED,
                  BLOCK_M, BLOCK_N // len(parts))  # fmt: skip


# --------------------------------------------------------------------------------------
# Autotuning
# --------------------------------------------------------------------------------------

# Problems with fewer tokens than this run FIXED_CONFIG (tests, tiny batches); no-grad calls
# (inference, generate()) up to TUNE_MIN_TOKENS_NO_GRAD tokens do too, so a growing sequence
# never triggers a tuning run.
TUNE_MIN_TOKENS = 4096
TUNE_MIN_TOKENS_NO_GRAD = 65536

_KEY = [
    "M_BUCKET",
    "N",
    "K_BUCKET",
    "NUM_SEG",
    "HAS_AUX",
    "HAS_GATED",
    "RELU",
    "HAS_MASK",
    "HAS_AMASK",
    "PRECISION",
]
# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps, EPI_SUBTILE): Hopper-sized tiles only;
# at training sizes (T >= 4096 tokens, d >= 512) nothing smaller wins. The two 8-warp big
# tiles run an epilogue that reads tensors on two column halves (EPI_SUBTILE=2): compiled
# for sm_90a (triton 3.9, ptxas -v), g1 (aux + mask) at 128 x 256 goes from 255 registers
# and spill stores to 214 and none, the square block's gx (aux + gated) from 664 spilled
# bytes to none; 256 x 128 likewise. Launches whose epilogue reads nothing run them whole.
_GPU_TILES = [
    (128, 256, 64, 4, 8, 2),
    (256, 128, 64, 3, 8, 2),
    (128, 128, 64, 4, 8, 1),
    (128, 128, 64, 3, 4, 1),
]
_GPU_WGRAD_TILES = [
    (128, 256, 64, 4, 8, 1),
    (256, 128, 64, 3, 8, 1),
    (128, 128, 64, 4, 8, 1),
]
_SPLITS = (1, 2, 4, 8)
# The fixed config: small problems, inference, and every launch under the interpreter (which
# runs each program in Python: few, large-ish tiles keep tests fast).
_INTERPRET_CONFIG = {
    "BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "SPLIT_K": 1, "EPI_SUBTILE": 1,
}  # fmt: skip
_GPU_FIXED_CONFIG = {
    "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "SPLIT_K": 1, "EPI_SUBTILE": 1,
}  # fmt: skip
FIXED_CONFIG: dict[str, int] = dict(_INTERPRET_CONFIG if _INTERPRET else _GPU_FIXED_CONFIG)
_FIXED_LAUNCH = {"num_warps": 4, "num_stages": 1 if _INTERPRET else 3}


def _config(
    bm: int, bn: int, bk: int, stages: int, warps: int, subtile: int, split_k: int = 1
) -> triton.Config:
    meta = {
        "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
        "SPLIT_K": split_k, "ATOMIC": split_k > 1, "EPI_SUBTILE": subtile,
    }  # fmt: skip
    return triton.Config(meta, num_stages=stages, num_warps=warps)


def _fixed_triton_config() -> triton.Config:
    return triton.Config({**FIXED_CONFIG, "ATOMIC": False}, **_FIXED_LAUNCH)


def _gemm_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [_fixed_triton_config()]
    return [_config(*t) for t in _GPU_TILES]


def _wgrad_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [_fixed_triton_config()]
    return [_config(*t, split_k=s) for t in _GPU_WGRAD_TILES for s in _SPLITS]


@functools.cache
def _device_limits(index: int) -> tuple[int, int]:
    """(streaming multiprocessors, shared memory per block in bytes) of CUDA device ``index``."""
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0)
    if not smem:
        try:
            smem = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
        except Exception:  # pragma: no cover - an unusual driver
            smem = 227 * 1024
    return props.multi_processor_count, int(smem)


def _prune(configs: list[triton.Config], named_args: dict, **kwargs: Any) -> list[triton.Config]:
    """Keep the configs worth timing for this launch.

    Drops tiles far larger than the problem, pipelines that do not fit in shared memory
    (fp32 operands, or an Ampere part) and split-K that leaves a split under 256 rows; an
    epilogue that reads nothing runs whole (one binary less to compile per tile).
    """
    m, n, k = named_args["M"], named_args["N"], named_args["K"]
    a0 = named_args["a0_ptr"]
    element = a0.element_size()
    smem = _device_limits(a0.device.index or 0)[1] if a0.is_cuda else 227 * 1024
    loads = bool(kwargs.get("HAS_AUX") or kwargs.get("HAS_MASK") or kwargs.get("HAS_GATED"))
    cap_m = max(16, triton.next_power_of_2(m))
    cap_n = max(16, triton.next_power_of_2(n))
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        split = c.kwargs["SPLIT_K"]
        if bm > cap_m or bn > cap_n:
            continue
        if c.num_stages * (bm + bn) * bk * element > smem:
            continue
        if split > 1 and k // split < 256:
            continue
        if c.kwargs["EPI_SUBTILE"] > 1 and not loads:
            c = triton.Config(
                {**c.kwargs, "EPI_SUBTILE": 1}, num_warps=c.num_warps, num_stages=c.num_stages
            )
        kept.append(c)
    return kept or [_fixed_triton_config()]


def _autotune(configs: list[triton.Config], **extra: Any):
    options: dict[str, Any] = {}
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        # tuning results on disk next to the compiled kernels: a second process (the next
        # stage of `wbscale bench gpu`, a resumed run) does not benchmark again
        options["cache_results"] = os.environ.get("WBSCALE_AUTOTUNE_CACHE", "1") == "1"
    return triton.autotune(
        configs=configs,
        key=_KEY,
        prune_configs_by={"early_config_prune": _prune},
        **options,
        **extra,
    )(_gemm_kernel)


_gemm_tuned = _autotune(_gemm_configs())
# split-K accumulates with atomics: benchmarking a config must start from a zeroed buffer
_wgrad_tuned = _autotune(_wgrad_configs(), reset_to_zero=["c_ptr"])

_forced_config: dict | None = None


@contextlib.contextmanager
def force_config(**meta: int) -> Iterator[None]:
    """Run every GEMM with one fixed tile config (tests: exercise tiling, split-K, ragged edges)."""
    global _forced_config
    previous, _forced_config = _forced_config, {**FIXED_CONFIG, **meta}
    try:
        yield
    finally:
        _forced_config = previous


def _bucket(n: int) -> int:
    """The autotune key's token count: ``n`` rounded up to a power of two."""
    return triton.next_power_of_2(max(1, int(n)))


def use_tuned(tokens: int, grad: bool) -> bool:
    """Whether a block over ``tokens`` rows autotunes (True) or runs FIXED_CONFIG (False)."""
    return tokens >= (TUNE_MIN_TOKENS if grad else TUNE_MIN_TOKENS_NO_GRAD)


def tuned_configs() -> list[dict[str, Any]]:
    """What the autotuner chose so far in this process: one row per (kernel, key)."""
    rows = []
    for kernel, tuner in (("gemm", _gemm_tuned), ("weight_grad", _wgrad_tuned)):
        for key, config in tuner.cache.items():
            fields = dict(zip(_KEY, key[: len(_KEY)], strict=False))
            rows.append(
                {
                    "kernel": kernel,
                    "key": {
                        k: (v if isinstance(v, (int, float, bool)) else str(v))
                        for k, v in fields.items()
                    },
                    "dtypes": [str(v) for v in key[len(_KEY) :]],
                    "config": _config_dict(config),
                }
            )
    return rows


def _config_dict(config: triton.Config) -> dict[str, Any]:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


# --------------------------------------------------------------------------------------
# GEMM launcher (Triton, or the same formula in PyTorch for float64)
# --------------------------------------------------------------------------------------

Segment = tuple[Tensor, Tensor, float]  # (A: M x K view, B: K x N view, scale)

_trace: list[dict[str, Any]] | None = None


@contextlib.contextmanager
def trace_gemms() -> Iterator[list[dict[str, Any]]]:
    """Record every GEMM launch (name, segments, epilogue, config) made inside the block.

    ``wbscale bench gpu`` replays them one by one against torch.matmul on the same operands.
    """
    global _trace
    previous, _trace = _trace, []
    try:
        yield _trace
    finally:
        _trace = previous


_collect: list[dict[str, Any]] | None = None


@contextlib.contextmanager
def collect_compile_jobs() -> Iterator[list[dict[str, Any]]]:
    """Dry run: record the binaries the block's launches would compile; launch nothing.

    Inside, every Triton GEMM returns its (uninitialised) output without running, and
    appends one job per config it could run (the autotuner's pruned list, or the fixed
    config) to the yielded list. :func:`precompile` compiles a job into Triton's on-disk
    cache, so a pool of processes can build them all in parallel before the real run
    (``wbscale bench gpu``: the autotuner would otherwise compile them one by one).
    """
    global _collect
    previous, _collect = _collect, []
    try:
        yield _collect
    finally:
        _collect = previous


def _job_arg(v: Any) -> Any:
    if isinstance(v, Tensor):
        return {"dtype": str(v.dtype).removeprefix("torch.")}
    return v


def job_key(job: dict[str, Any]) -> str:
    """Jobs with equal keys compile to the same binary (Triton specialises ints on == 1 and
    on divisibility by 16, never on the do-not-specialise ones)."""
    names = _gemm_kernel.arg_names
    unspecialised = {names.index(n) for n in ("SPLIT_K", "M_BUCKET", "K_BUCKET")}

    def norm(i: int, v: Any) -> Any:
        if isinstance(v, float):
            return "f"
        if isinstance(v, bool) or not isinstance(v, int):
            return v
        if i in unspecialised:
            return "*"
        return 1 if v == 1 else ("D" if v % 16 == 0 else "n")

    spec = [norm(i, v) for i, v in enumerate(job["args"])]
    return repr((spec, sorted(job["kwargs"].items())))


def precompile(job: dict[str, Any]) -> None:
    """Compile one job from :func:`collect_compile_jobs` for the current CUDA device."""
    args = [getattr(torch, a["dtype"]) if isinstance(a, dict) else a for a in job["args"]]
    _gemm_kernel.warmup(*args, grid=(1,), **job["kwargs"])


def _record_jobs(args: tuple, flags: dict[str, Any], configs: list[triton.Config]) -> None:
    spec = [_job_arg(a) for a in args]
    for c in configs:
        kwargs = {**flags, **c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
        _collect.append({"args": spec, "kwargs": kwargs})


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
    tuned: bool = True,
    name: str = "gemm",
) -> Tensor:
    """C = epilogue(sum_s scale_s A_s B_s); see the module docstring for the epilogue.

    ``out`` defaults to a new contiguous (M, N) tensor in A's dtype. With ``weight_grad`` the
    kernel may split K and accumulate with atomics, so ``out`` must be a zeroed fp32 buffer.
    ``tuned``: autotune (bucketed key) or run FIXED_CONFIG.
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
        _bucket(M), _bucket(K),
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
        "RELAXED": _RELAXED_ATOMICS,
    }

    def grid(meta: dict) -> tuple[int, int]:
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (tiles, meta["SPLIT_K"])

    if _collect is not None:
        if _forced_config is not None or not tuned:
            meta = _fixed_meta(weight_grad)
            configs = [triton.Config(meta, **_FIXED_LAUNCH)]
        else:
            tuner = _wgrad_tuned if weight_grad else _gemm_tuned
            named = dict(zip(_gemm_kernel.arg_names, args, strict=False))
            configs = _prune(tuner.configs, named, **flags)
        _record_jobs(args, flags, configs)
        _record_trace(name, segments, out, beta, aux, gated, gate, relu, mask, a_mask,
                      weight_grad, tuned, None, (M, N, K * len(segments)))  # fmt: skip
        return out
    with _device_guard(a0):
        if _forced_config is not None or not tuned:
            meta = _fixed_meta(weight_grad)
            _gemm_kernel[grid](*args, **flags, **meta, **_FIXED_LAUNCH)
            config: dict[str, Any] = {**meta, **_FIXED_LAUNCH}
        else:
            tuner = _wgrad_tuned if weight_grad else _gemm_tuned
            tuner[grid](*args, **flags)
            best = getattr(tuner, "best_config", None)
            config = _config_dict(best) if best is not None else {}
    _record_trace(name, segments, out, beta, aux, gated, gate, relu, mask, a_mask,
                  weight_grad, tuned, config, (M, N, K * len(segments)))  # fmt: skip
    return out


def _fixed_meta(weight_grad: bool) -> dict[str, Any]:
    """The forced config or FIXED_CONFIG, as launch meta; split-K only for a weight gradient."""
    meta = dict(_forced_config if _forced_config is not None else FIXED_CONFIG)
    if not weight_grad:
        meta["SPLIT_K"] = 1
    meta["ATOMIC"] = meta["SPLIT_K"] > 1
    return meta


def _record_trace(
    name, segments, out, beta, aux, gated, gate, relu, mask, a_mask, weight_grad, tuned, config, mnk
) -> None:
    if _trace is not None:
        _trace.append(
            {
                "name": name,
                "segments": list(segments),
                "epilogue": {"out": out, "beta": beta, "aux": aux, "gated": gated, "gate": gate,
                             "relu": relu, "mask": mask, "a_mask": a_mask},
                "weight_grad": weight_grad,
                "tuned": tuned,
                "config": config,
                "mnk": mnk,
            }
        )  # fmt: skip


def replay(launch: dict[str, Any], epilogue: bool = True) -> Tensor:
    """Run one launch recorded by :func:`trace_gemms` again, on the same operands.

    ``epilogue=False``: the same GEMM with a plain store (no aux, gate, ReLU or mask; an A
    mask stays, it is part of the main loop), to tell main-loop time from epilogue time.
    A weight-gradient launch zeroes its fp32 buffer first, as the block does.
    """
    ep = launch["epilogue"]
    out = ep["out"]
    if launch["weight_grad"]:
        out.zero_()
    kwargs: dict[str, Any] = {"a_mask": ep["a_mask"]}
    if epilogue:
        kwargs.update(
            beta=ep["beta"], aux=ep["aux"], gated=ep["gated"], gate=ep["gate"],
            relu=ep["relu"], mask=ep["mask"],
        )  # fmt: skip
    return _gemm(
        launch["segments"], out=out, weight_grad=launch["weight_grad"], tuned=launch["tuned"],
        name=launch["name"], **kwargs,
    )  # fmt: skip


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
    acc_dtype = _acc_dtype(segments[0][0].dtype)
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
    weight: Tensor,
    *,
    a_mask: Tensor | None = None,
    transposed: bool = False,
    tuned: bool = True,
) -> Tensor:
    """sum_s scale_s A_s B_s (K = n_seg * T) into a zeroed fp32 buffer, in ``weight``'s dtype.

    An fp32 weight gets the fp32 accumulator itself (no copy, no rounding through the compute
    dtype). ``transposed``: the segments compute gW^T, stored through a transposed view of gW.
    """
    a0 = segments[0][0]
    acc_dtype = _acc_dtype(weight.dtype)
    buf = torch.zeros(tuple(weight.shape), device=a0.device, dtype=acc_dtype)
    _gemm(
        segments, out=buf.t() if transposed else buf, a_mask=a_mask, weight_grad=True,
        tuned=tuned, name="gW",
    )  # fmt: skip
    return buf.to(weight.dtype)


# --------------------------------------------------------------------------------------
# The blocks: forward, recompute, backward
# --------------------------------------------------------------------------------------


def _z1(x: Tensor, w: Tensor, eta: float, lam: float, tuned: bool) -> Tensor:
    return _gemm([(x, w.t(), eta)], beta=-eta * lam, relu=True, tuned=tuned, name="z1")


def _z2(u: Tensor, z1: Tensor, w: Tensor, eta: float, lam: float, tuned: bool) -> Tensor:
    return _gemm([(u, w.t(), eta)], beta=-eta * lam, aux=z1, relu=True, tuned=tuned, name="z2")


def _overcomplete_forward(
    x: Tensor, w: Tensor, eta: float, lam: float, tuned: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    z1 = _z1(x, w, eta, lam, tuned)
    u = _gemm([(z1, w, -1.0)], aux=x, tuned=tuned, name="u")
    z2 = _z2(u, z1, w, eta, lam, tuned)
    return z1, u, z2


def _overcomplete_backward(
    gy: Tensor | None,
    gz: Tensor | None,
    x: Tensor,
    w: Tensor,
    z1: Tensor | None,
    u: Tensor | None,
    z2: Tensor | None,
    eta: float,
    lam: float,
    save: str,
    tuned: bool,
    need_gx: bool,
    need_gw: bool,
    weight: Tensor,
) -> tuple[Tensor | None, Tensor | None]:
    """(gx, gW) of the overcomplete block; recomputes what ``save`` did not keep.

    ``w`` is the dictionary in the compute dtype, ``weight`` the parameter (gW's dtype).
    """
    if save == "x":
        z1, u, z2 = _overcomplete_forward(x, w, eta, lam, tuned)
    elif save == "x_u":
        z1 = _z1(x, w, eta, lam, tuned)
        z2 = _z2(u, z1, w, eta, lam, tuned)
    wt = w.t()
    gy = torch.zeros_like(x) if gy is None else gy.contiguous()
    if gz is not None:
        gz = gz.contiguous()
    g2 = _gemm([(gy, wt, 1.0)], aux=gz, mask=z2, tuned=tuned, name="g2")
    gu = _gemm([(g2, w, eta)], tuned=tuned, name="gu")
    g1 = _gemm([(gu, wt, -1.0)], aux=g2, mask=z1, tuned=tuned, name="g1")
    gx = _gemm([(g1, w, eta)], aux=gu, tuned=tuned, name="gx") if need_gx else None
    gw = None
    if need_gw:
        # equal scales adjacent: the kernel rescales its one accumulator once (see there)
        segments = [(z2.t(), gy, 1.0), (z1.t(), gu, -1.0), (g2.t(), u, eta), (g1.t(), x, eta)]
        gw = _weight_grad(segments, weight, tuned=tuned)
    return gx, gw


def _square_out(r: Tensor, x: Tensor, w: Tensor, eta: float, lam: float, tuned: bool) -> Tensor:
    return _gemm([(r, w, eta)], aux=x, beta=-eta * lam, relu=True, tuned=tuned, name="out")


def _square_forward(
    x: Tensor, w: Tensor, eta: float, lam: float, tuned: bool = True
) -> tuple[Tensor, Tensor]:
    r = _gemm([(x, w.t(), -1.0)], aux=x, tuned=tuned, name="r")
    return r, _square_out(r, x, w, eta, lam, tuned)


def _square_backward(
    gy: Tensor,
    x: Tensor,
    w: Tensor,
    r: Tensor | None,
    out: Tensor | None,
    eta: float,
    lam: float,
    save: str,
    tuned: bool,
    need_gx: bool,
    need_gw: bool,
    weight: Tensor,
) -> tuple[Tensor | None, Tensor | None]:
    if save == "x":
        r, out = _square_forward(x, w, eta, lam, tuned)
    elif save == "x_u":
        out = _square_out(r, x, w, eta, lam, tuned)
    gy = gy.contiguous()
    # g = gy * [out > 0] is never materialised: A prologue here, gated epilogue below
    dr = _gemm([(gy, w.t(), eta)], a_mask=out, tuned=tuned, name="dr")
    gx = None
    if need_gx:
        gx = _gemm([(dr, w, -1.0)], aux=dr, gated=gy, gate=out, tuned=tuned, name="gx")
    gw = None
    if need_gw:
        # gW = eta r^T g - dr^T x, computed as its transpose so the mask lands on A
        segments = [(gy.t(), r, eta), (x.t(), dr, -1.0)]
        gw = _weight_grad(segments, weight, a_mask=out.t(), transposed=True, tuned=tuned)
    return gx, gw


# --------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile (no graph break), autograd registered
# --------------------------------------------------------------------------------------
#
# The forward op returns what the backward needs next to its outputs (empty tensors for
# what ``save`` drops); setup_context keeps them, the caller never sees them. The backward
# is an op of its own so that AOTAutograd can trace the backward graph without looking
# into the launchers. Under autocast the caller casts x; the op casts the weight itself so
# that gW comes back in the parameter's dtype from the fp32 accumulator.


def _compute_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    return weight.to(dtype).contiguous()


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def _present(t: Tensor | None) -> Tensor | None:
    return None if t is None or (t.numel() == 0 and t.dim() == 1) else t


@torch.library.custom_op(
    "wbscale::ista_overcomplete",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, float eta, float lam, str save, bool tuned) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
)
def _overcomplete_op(x, weight, eta, lam, save, tuned):
    """(y, z2, z1 or empty, u or empty) for x (T, d) contiguous in the compute dtype."""
    w = _compute_weight(weight, x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        z1, u, z2 = _overcomplete_forward(x, w, eta, lam, tuned)
        y = _gemm([(z2, w, 1.0)], tuned=tuned, name="y")
    return y, z2, (z1 if save == "all" else x.new_empty(0)), (u if save != "x" else x.new_empty(0))


@_overcomplete_op.register_fake
def _(x, weight, eta, lam, save, tuned):
    t, m = x.shape[0], weight.shape[0]
    z1 = x.new_empty(t, m) if save == "all" else x.new_empty(0)
    u = x.new_empty(x.shape) if save != "x" else x.new_empty(0)
    return x.new_empty(x.shape), x.new_empty(t, m), z1, u


@torch.library.custom_op(
    "wbscale::ista_overcomplete_backward",
    mutates_args=(),
    schema="(Tensor? gy, Tensor? gz, Tensor x, Tensor weight, Tensor z1, Tensor u, Tensor z2, "
    "float eta, float lam, str save, bool tuned, bool need_gx, bool need_gw) -> (Tensor, Tensor)",
)
def _overcomplete_backward_op(
    gy, gz, x, weight, z1, u, z2, eta, lam, save, tuned, need_gx, need_gw
):
    w = _compute_weight(weight, x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        gx, gw = _overcomplete_backward(
            gy, gz, x, w, _present(z1), _present(u), _present(z2), eta, lam, save, tuned,
            need_gx, need_gw, weight,
        )  # fmt: skip
    return _or_empty(gx, x), _or_empty(gw, weight)


@_overcomplete_backward_op.register_fake
def _(gy, gz, x, weight, z1, u, z2, eta, lam, save, tuned, need_gx, need_gw):
    gx = x.new_empty(x.shape) if need_gx else x.new_empty(0)
    return gx, weight.new_empty(weight.shape) if need_gw else weight.new_empty(0)


def _overcomplete_setup_context(ctx, inputs, output):
    x, weight, eta, lam, save, tuned = inputs
    _, z2, z1, u = output
    ctx.eta, ctx.lam, ctx.save, ctx.tuned = eta, lam, save, tuned
    # a loss that reads only y (or only the code) leaves the other gradient undefined: keep
    # it None instead of a T x m tensor of zeros
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(z1, u)
    ctx.save_for_backward(x, weight, z1, u, z2 if save == "all" else x.new_empty(0))


def _overcomplete_autograd(ctx, gy, gz, _gz1, _gu):
    x, weight, z1, u, z2 = ctx.saved_tensors
    need_gx, need_gw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx, gw = torch.ops.wbscale.ista_overcomplete_backward(
        gy, gz, x, weight, z1, u, z2, ctx.eta, ctx.lam, ctx.save, ctx.tuned, need_gx, need_gw
    )
    return (gx if need_gx else None), (gw if need_gw else None), None, None, None, None


_overcomplete_op.register_autograd(
    _overcomplete_autograd, setup_context=_overcomplete_setup_context
)


@torch.library.custom_op(
    "wbscale::ista_square",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, float eta, float lam, str save, bool tuned) -> (Tensor, Tensor)",
)
def _square_op(x, weight, eta, lam, save, tuned):
    """(out, r or empty) for x (T, d) contiguous in the compute dtype."""
    w = _compute_weight(weight, x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        r, out = _square_forward(x, w, eta, lam, tuned)
    return out, (r if save != "x" else x.new_empty(0))


@_square_op.register_fake
def _(x, weight, eta, lam, save, tuned):
    return x.new_empty(x.shape), (x.new_empty(x.shape) if save != "x" else x.new_empty(0))


@torch.library.custom_op(
    "wbscale::ista_square_backward",
    mutates_args=(),
    schema="(Tensor gy, Tensor x, Tensor weight, Tensor r, Tensor out, float eta, float lam, "
    "str save, bool tuned, bool need_gx, bool need_gw) -> (Tensor, Tensor)",
)
def _square_backward_op(gy, x, weight, r, out, eta, lam, save, tuned, need_gx, need_gw):
    w = _compute_weight(weight, x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        gx, gw = _square_backward(
            gy, x, w, _present(r), _present(out), eta, lam, save, tuned, need_gx, need_gw, weight
        )
    return _or_empty(gx, x), _or_empty(gw, weight)


@_square_backward_op.register_fake
def _(gy, x, weight, r, out, eta, lam, save, tuned, need_gx, need_gw):
    gx = x.new_empty(x.shape) if need_gx else x.new_empty(0)
    return gx, weight.new_empty(weight.shape) if need_gw else weight.new_empty(0)


def _square_setup_context(ctx, inputs, output):
    x, weight, eta, lam, save, tuned = inputs
    out, r = output
    ctx.eta, ctx.lam, ctx.save, ctx.tuned = eta, lam, save, tuned
    ctx.mark_non_differentiable(r)
    ctx.save_for_backward(x, weight, r, out if save == "all" else x.new_empty(0))


def _square_autograd(ctx, gy, _gr):
    x, weight, r, out = ctx.saved_tensors
    need_gx, need_gw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx, gw = torch.ops.wbscale.ista_square_backward(
        gy, x, weight, r, out, ctx.eta, ctx.lam, ctx.save, ctx.tuned, need_gx, need_gw
    )
    return (gx if need_gx else None), (gw if need_gw else None), None, None, None, None


_square_op.register_autograd(_square_autograd, setup_context=_square_setup_context)


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def forward_codes(
    x: Tensor, weight: Tensor, *, variant: str, eta: float, lam: float
) -> tuple[Tensor, ...]:
    """The codes the forward computes, (z1, z2) or (out,), for x (T, d): exactly what the
    backward derives its ReLU masks from (tests and the bench check gradients on that active set).
    """
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    w = weight.contiguous()
    tuned = use_tuned(x2.shape[0], grad=True)  # the tiles a training step would use
    if variant == "overcomplete":
        z1, _, z2 = _overcomplete_forward(x2, w, eta, lam, tuned)
        return z1, z2
    return (_square_forward(x2, w, eta, lam, tuned)[1],)


def ista_triton(
    x: Tensor,
    weight: Tensor,
    *,
    variant: str,
    eta: float,
    lam: float,
    return_code: bool = False,
    save_activations: bool | str = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Fused ISTA block on x (..., d); with ``return_code`` also the sparse code z.

    overcomplete: weight (m, d), returns y (..., d) [and z2 (..., m)];
    square: weight (d, d), returns out (..., d) [and out again: it is its own code].
    ``save_activations``: what backward keeps, ``"all"`` (True), ``"x_u"`` or ``"x"``
    (False); see the module docstring.
    """
    if variant not in ("overcomplete", "square"):
        raise ValueError(f"unknown ISTA variant {variant!r}; choose overcomplete or square")
    save = normalize_save(save_activations)
    _check_shapes(x, weight, variant)
    _check_device(x, weight, variant, "ista_triton")
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
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    tuned = use_tuned(x2.shape[0], grad)
    if variant == "overcomplete":
        y, z, _, _ = torch.ops.wbscale.ista_overcomplete(
            x2, weight, float(eta), float(lam), save, tuned
        )
        y, z = y.reshape(*lead, d), z.reshape(*lead, m)
    else:
        y, _ = torch.ops.wbscale.ista_square(x2, weight, float(eta), float(lam), save, tuned)
        y = y.reshape(*lead, d)
        z = y
    return (y, z) if return_code else y
