"""Suite-wide settings: offline wandb, Triton interpreter on machines without a GPU."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:
    import torch

    # Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. at first import:
    # set it before any test imports wbscale.kernels.ista_triton.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass
