"""Which process is this, and who speaks: launcher rank before any process group, rank-0 printing."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from wbscale.errors import UserError


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


def is_rank_zero() -> bool:
    """True on the global rank-0 process (also before any process group exists)."""
    return launch_rank() == 0


def say(msg: str, topic: str | None = None) -> None:
    """Print one ``[wbscale] …`` line to stderr, once per job (global rank 0 only)."""
    if is_rank_zero():
        prefix = f"[wbscale] {topic}: " if topic else "[wbscale] "
        print(prefix + msg, file=sys.stderr, flush=True)


def say_always(msg: str, prefix: str = "[wbscale]") -> None:
    """Print a ``[wbscale] …`` line from whichever rank calls (signal handlers, per-rank events)."""
    print(f"{prefix} {msg}", file=sys.stderr, flush=True)


def wait_for_rank_zero(path: Path, what: str, poll_s: float = 0.5) -> None:
    """Block until ``path`` exists (rank 0 writes it; renamed into place when complete).

    For work done before any process group exists (data preparation, checkpoint
    conversion) when every rank starts at once (torchrun, srun). The limit is
    ``WBSCALE_RANK_WAIT_S`` seconds (default 3600).
    """
    timeout = float(os.environ.get("WBSCALE_RANK_WAIT_S", "3600"))
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise UserError(
                f"waited {timeout:.0f} s for rank 0 to write {path} ({what}); check rank 0's log "
                "(or raise WBSCALE_RANK_WAIT_S)"
            )
        time.sleep(poll_s)
