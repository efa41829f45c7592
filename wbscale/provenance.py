"""Where a result came from: git commit of the checkout, package versions, hardware.

One place for what every report, run config, job record and benchmark JSON records, so
their fields agree. Cheap: nothing here imports torch unless asked about devices.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from wbscale.config import REPO_ROOT

PACKAGES = ("wbscale", "torch", "lightning", "deepspeed", "triton", "wandb", "tokenizers", "numpy")


def _git(args: list[str], cwd: Path = REPO_ROOT) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit(short: bool = False) -> str | None:
    """The checkout's HEAD (12 characters when ``short``); None outside git."""
    return _git(["rev-parse", "--short=12" if short else "HEAD", *(["HEAD"] if short else [])])


def git_dirty() -> bool | None:
    """True when tracked files have uncommitted changes; None outside git."""
    status = _git(["status", "--porcelain", "--untracked-files=no"])
    return bool(status) if status is not None else None


def commit_label() -> str | None:
    """``<short sha>`` (``+dirty`` with uncommitted changes), for tables and report footers."""
    sha = git_commit(short=True)
    return None if sha is None else sha + ("+dirty" if git_dirty() else "")


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions (from package metadata, no imports) and Python's."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in packages:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return versions


def cuda_version() -> str | None:
    """The CUDA version torch was built with; None for a CPU build (or without torch)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda


def code_version() -> dict[str, Any]:
    """Git commit, dirty flag and package versions: what a job record stores."""
    commit = git_commit()
    return {
        "git_commit": commit,
        "git_dirty": git_dirty() if commit else None,
        "versions": package_versions(),
    }


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo, else platform)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(accelerator: str = "auto") -> str:
    """The first GPU's name, or the CPU model with its core count."""
    import torch

    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_model()} ({os.cpu_count()} cores)"


def hardware() -> dict[str, Any]:
    """Host, platform, cores, memory and GPUs of this machine."""
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu_count"] = torch.cuda.device_count()
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a broken CUDA setup must not stop a report
        pass
    return info


def run_environment() -> dict[str, Any]:
    """Commit, versions, hardware, command line and launcher variables of this process."""
    env: dict[str, Any] = {**code_version(), "hardware": hardware(), "argv": list(sys.argv)}
    env["versions"]["cuda"] = cuda_version()
    env["date"] = _dt.date.today().isoformat()
    for var in ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_NNODES", "WORLD_SIZE"):
        if os.environ.get(var):
            env[var.lower()] = os.environ[var]
    return env


def report_environment() -> dict[str, Any]:
    """The short form a report's footer shows: device, cores, torch, Python, commit, date."""
    import torch

    if torch.cuda.is_available():
        device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        device = f"CPU: {cpu_model()}, {torch.get_num_threads()} torch threads"
    return {
        "device": device,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit_label(),
        "date": _dt.date.today().isoformat(),
    }
