"""What the two fused kernels share: when Triton runs, the dtype rules, input checks and
the @triton.jit pieces of their GEMMs (:mod:`.ista_triton`, :mod:`.ista_general`)."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from .modes import interpreter_requested

# Read once, like @triton.jit does: kernels decorated without the interpreter cannot run on
# CPU tensors later, whatever the environment says by then.
_INTERPRET = interpreter_requested()
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _uses_triton(t: Tensor) -> bool:
    return t.dtype in _TRITON_DTYPES and (t.is_cuda or (_INTERPRET and t.device.type == "cpu"))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own matmul setting (tf32 off by default) so both paths agree
    if not _INTERPRET and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulator (and fp32 parameter) dtype for compute in ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _input_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The compute dtype: autocast's, else x's (which must then be the weight's)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if x.dtype != weight.dtype:
        raise TypeError(
            f"ISTA: x is {x.dtype} but the dictionary weight is {weight.dtype}; cast one, or "
            "run under torch.autocast"
        )
    return x.dtype


def _device_guard(t: Tensor) -> contextlib.AbstractContextManager:
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_shapes(x: Tensor, weight: Tensor, variant: str) -> None:
    if weight.dim() != 2 or x.dim() < 1 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"ISTA {variant}: x (..., d) and dictionary weight (m, d) disagree: "
            f"x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if variant == "square" and weight.shape[0] != weight.shape[1]:
        raise ValueError(f"ISTA square: weight must be (d, d), got {tuple(weight.shape)}")


def _check_device(x: Tensor, weight: Tensor, variant: str, module: str) -> None:
    """Same device, and CPU tensors only under the interpreter (``module``: what to import)."""
    if x.device != weight.device:
        raise ValueError(f"ISTA {variant}: x is on {x.device}, weight on {weight.device}")
    if x.device.type == "cpu" and not _INTERPRET:
        raise RuntimeError(
            "ISTA kernel 'triton' got CPU tensors but Triton is not interpreting: set "
            f"TRITON_INTERPRET=1 before wbscale.kernels.{module} is first imported, or use "
            "model.ista_kernel: eager"
        )


@triton.jit
def _grouped_pid(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid``: GROUP_M row-blocks share their B column-blocks in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _dot(acc, a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b in fp32."""
    if UPCAST:
        # the interpreter multiplies bf16 tiles as their raw uint16 bits; fp32 is exact here
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _store(c_ptrs, v, c_ok, RNE_BF16: tl.constexpr):
    """Store the fp32 tile v in the output's dtype."""
    if RNE_BF16:
        # the interpreter truncates fp32 -> bf16; round to nearest even by hand, as the GPU does
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        tl.store(c_ptrs, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=c_ok)
    else:
        tl.store(c_ptrs, v.to(c_ptrs.dtype.element_ty), mask=c_ok)
