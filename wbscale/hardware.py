"""GPU facts: memory and dense bf16 peak FLOP/s per model, for MFU (:func:`mfu`) and the memory planner.

One table serves both: ``recipes check --gpu NAME`` looks a GPU up by its key, the MFU of a
running job by the name CUDA reports (``torch.cuda.get_device_name``). Peaks are NVIDIA's
dense (no sparsity) bf16 tensor-core numbers; memory is as sold (GB = 1e9 bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GB = 1e9


@dataclass(frozen=True)
class GPU:
    """One GPU model: ``names`` are substrings of the CUDA device name that identify it."""

    memory: float  # bytes
    peak_bf16: float  # FLOP/s, dense
    names: tuple[str, ...] = ()


# Order matters for name matching: the more specific name first (H100 PCIe before H100).
GPUS: dict[str, GPU] = {
    "h200-nvl-141gb": GPU(141 * GB, 835e12, ("H200 NVL",)),
    "h200-141gb": GPU(141 * GB, 989e12, ("H200",)),
    "h800-80gb": GPU(80 * GB, 989e12, ("H800",)),
    "h100-pcie-80gb": GPU(80 * GB, 756e12, ("H100 PCIe",)),
    "h100-nvl-94gb": GPU(94 * GB, 835e12, ("H100 NVL",)),
    "h100-80gb": GPU(80 * GB, 989e12, ("H100",)),  # SXM (HBM3)
    "h100-94gb": GPU(94 * GB, 989e12),
    "a100-80gb": GPU(80 * GB, 312e12, ("A100",)),
    "a100-40gb": GPU(40 * GB, 312e12),
    "l40s-48gb": GPU(48 * GB, 362e12, ("L40S",)),
    "a10g-24gb": GPU(24 * GB, 70e12, ("A10G",)),
    "l4-24gb": GPU(24 * GB, 121e12, ("L4",)),
    "rtx4090-24gb": GPU(24 * GB, 165e12, ("RTX 4090",)),
    "v100-32gb": GPU(32 * GB, 125e12, ("V100",)),
    "v100-16gb": GPU(16 * GB, 125e12),
}


def gpu_for_name(device_name: str) -> GPU | None:
    """The table entry whose name pattern occurs in a CUDA device name, or None."""
    for gpu in GPUS.values():
        if any(pattern in device_name for pattern in gpu.names):
            return gpu
    return None


def device_peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of ``device``, or None where unknown (CPU: no MFU)."""
    if device.type != "cuda":
        return None
    gpu = gpu_for_name(torch.cuda.get_device_name(device))
    return gpu.peak_bf16 if gpu is not None else None


def mfu(flops_per_token: float, tokens_per_second: float, peak: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation: the model's FLOPs per token x tokens/s over the peak FLOP/s of
    ``devices`` devices (:func:`device_peak_flops` of one); None where the peak is unknown."""
    if not peak:
        return None
    return flops_per_token * tokens_per_second / (peak * devices)


def resolve_device(name: str) -> str:
    """A ``--device`` value checked against this machine: ``auto`` is ``cuda`` when CUDA is
    available, else ``cpu``; ``cuda`` / ``cuda:N`` must exist here (UserError otherwise)."""
    from wbscale.errors import UserError

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {name}: this machine has no usable CUDA GPU; use --device cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {name}: this machine has {count} CUDA GPU(s) (cuda:0 … cuda:{count - 1})")
    elif device.type != "cpu":
        raise UserError(f"--device {name}: wbscale runs on cpu or cuda devices")
    return name
