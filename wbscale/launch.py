"""Which process is this? Rank from the launcher's environment, before any process group."""

from __future__ import annotations

import os


def launch_rank() -> int:
    """This process's global rank as the launcher's environment tells it, before any
    process group exists: 0 only when every rank variable that is set is 0.

    RANK (torchrun), SLURM_PROCID (srun), LOCAL_RANK and NODE_RANK/GROUP_RANK (Lightning's
    launcher sets only these two in the processes it starts) are all checked: LOCAL_RANK
    alone would call the first process of every node rank 0.
    """
    for key in ("RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK"):
        value = os.environ.get(key, "").strip()
        if value.isdigit() and int(value) != 0:
            return int(value)
    return 0
