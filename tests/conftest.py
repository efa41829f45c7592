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


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_environment():
    """Each test leaves ``os.environ`` as it found it.

    In-process fits change it: Lightning's launcher exports ``LOCAL_RANK``, ``WORLD_SIZE``,
    ``MASTER_PORT``…, wandb its ``WANDB_SERVICE``. A later test's forked ``fit`` that
    inherits them believes it is one rank of a launched job and waits for the others.
    Session- and module-scoped fixtures (the SLURM cluster) set theirs before this runs."""
    saved = dict(os.environ)
    yield
    for key in [k for k in os.environ if k not in saved]:
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value
