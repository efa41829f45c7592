"""The real local SLURM cluster the SLURM tests run against (``slurm/local_cluster.sh``).

``unavailable()`` says why there can be none here (no SLURM binaries, not root), so tests
skip with that reason; ``LocalCluster.start()`` brings it up (idempotent) and remembers
whether this process started it, so ``stop()`` only takes down what it brought up.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "slurm" / "local_cluster.sh"
STATE_DIR = Path(os.environ.get("WBSCALE_SLURM_DIR", "/tmp/wbscale-slurm"))
CONF = STATE_DIR / "slurm.conf"
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def unavailable() -> str | None:
    """Why no local SLURM cluster can run here, or None."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"SLURM not installed ({', '.join(missing)} missing; apt-get install slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd as SlurmUser=root, munged as munge)"
    return None


def _running() -> bool:
    pid = STATE_DIR / "run" / "slurmctld.pid"
    try:
        os.kill(int(pid.read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


class LocalCluster:
    """Handle on the cluster: start/stop, and job queries for the tests."""

    def __init__(self) -> None:
        self.started_here = False
        self.env = {"SLURM_CONF": str(CONF)}

    def start(self) -> LocalCluster:
        self.started_here = not _running()
        proc = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"slurm/local_cluster.sh up failed ({proc.returncode}): {proc.stderr.strip()}")
        return self

    def stop(self) -> None:
        if self.started_here:
            subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, text=True, timeout=120)

    # ------------------------------------------------------------------ queries

    def _cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=60, env={**os.environ, **self.env})
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (first record: the job, or the first array task)."""
        out = self._cmd("scontrol", "-o", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0]))

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait(self, job_id: str, states: set[str], timeout: float, release_requeued: bool = False) -> dict[str, str]:
        """Poll until the job is in one of ``states``; fail with its record after ``timeout``.

        ``release_requeued``: SLURM holds a requeued batch job for about two minutes
        (BeginTime); start it now instead, as an operator could (scontrol update StartTime=now).
        """
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            state = info.get("JobState", "UNKNOWN")
            if state in states:
                return info
            if state in TERMINAL and not states & TERMINAL:
                raise AssertionError(f"job {job_id} ended {state} while waiting for {sorted(states)}: {info}")
            if release_requeued and state == "PENDING" and info.get("Reason") == "BeginTime":
                self._cmd("scontrol", "update", f"jobid={job_id}", "StartTime=now", check=False)
            time.sleep(1.0)
        raise AssertionError(f"job {job_id} not in {sorted(states)} after {timeout:.0f}s: {info}")

    def signal(self, job_id: str, name: str = "USR1") -> None:
        """What SLURM does before a time limit: send the signal to the job's processes."""
        self._cmd("scancel", f"--signal={name}", job_id)

    def cancel(self, job_id: str) -> None:
        self._cmd("scancel", job_id, check=False)

    @staticmethod
    def task_pid(job_id: str, rank: int) -> int:
        """The pid of one training process (``SLURM_PROCID`` = rank) of a job on this host."""
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
                environ = dict(
                    item.split(b"=", 1) for item in (proc / "environ").read_bytes().split(b"\0") if b"=" in item
                )
            except OSError:
                continue
            if (
                b"wbscale.cli" in cmdline
                and environ.get(b"SLURM_JOB_ID") == job_id.encode()
                and environ.get(b"SLURM_PROCID") == str(rank).encode()
            ):
                return int(proc.name)
        raise AssertionError(f"no training process of rank {rank} for job {job_id} on this host")
