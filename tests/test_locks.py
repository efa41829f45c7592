"""wbscale.locks: refused while held by a live process, taken over when the holder is gone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wbscale import locks
from wbscale.errors import UserError

HOLD = """
import os, sys, time
from wbscale.locks import acquire
lock = acquire(sys.argv[1], "test holder", heartbeat_every=float(sys.argv[3]))
if sys.argv[2] == "fork":
    child = os.fork()
    if child == 0:  # a child that outlives its parent (like an orphaned worker)
        time.sleep(60)
        os._exit(0)
    print(child, flush=True)
print("held", flush=True)
if sys.argv[2] == "die":
    os._exit(0)  # no cleanup at all, as after kill -9
if sys.argv[2] == "exit":
    sys.exit(0)  # no release(): the atexit hook removes the file
time.sleep(60)
"""


def hold(path: Path, mode: str = "wait", heartbeat: float = 0) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), mode, str(heartbeat)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def write_lock(path: Path, **fields) -> None:
    path.write_text(json.dumps(fields))


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_acquire_writes_the_holder_and_release_removes_it(tmp_path):
    path = tmp_path / "sub" / "run.lock"
    with locks.acquire(path, "wbscale fit") as lock:
        assert lock.held
        data = json.loads(path.read_text())
        assert data["pid"] == os.getpid() and data["host"] == socket.gethostname()
        assert data["purpose"] == "wbscale fit" and data["started"] and data["heartbeat"]
        assert locks.read_holder(path) == locks.Holder.from_json(data)
    assert not path.exists() and not lock.held
    lock.release()  # idempotent
    assert list(path.parent.iterdir()) == []  # no temp file left either


def test_held_by_a_live_process_is_refused_naming_it(tmp_path):
    path = tmp_path / "run.lock"
    proc = hold(path)
    try:
        with pytest.raises(locks.LockHeld) as info:
            locks.acquire(path, "second")
        err = info.value
        assert isinstance(err, UserError) and err.exit_code == 2
        msg = str(err)
        assert f"pid {proc.pid} on {socket.gethostname()}" in msg
        assert "since 20" in msg and "(test holder)" in msg and f"kill {proc.pid}" in msg
        assert "\n" not in msg
        assert err.holder.pid == proc.pid
        assert json.loads(path.read_text())["pid"] == proc.pid  # untouched
    finally:
        proc.kill()
        proc.wait()


def test_dead_holder_is_taken_over_with_a_message(tmp_path, capfd):
    path = tmp_path / "run.lock"
    proc = hold(path, mode="die")
    proc.wait()
    assert path.exists()  # left behind, as by kill -9
    with locks.acquire(path, "next"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    err = capfd.readouterr().err
    assert f"taking over the stale lock {path} of pid {proc.pid}" in err
    assert "no longer running" in err and len(err.strip().splitlines()) == 1


def test_forked_children_do_not_keep_the_lock(tmp_path, capfd):
    path = tmp_path / "run.lock"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), "fork", "0"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    assert proc.stdout.readline() == "held\n"
    proc.kill()
    proc.wait()
    try:
        os.kill(child, 0)  # the forked child still runs, but closed its copy of the lock
        with locks.acquire(path, "next"):
            pass
        assert "no longer running" in capfd.readouterr().err
    finally:
        os.kill(child, 9)


def test_exit_without_release_removes_the_file(tmp_path):
    path = tmp_path / "run.lock"
    hold(path, mode="exit").wait()
    assert not path.exists()


def test_reused_pid_counts_as_dead(tmp_path, capfd):
    path = tmp_path / "run.lock"
    if locks._pid_start(os.getpid()) is None:
        pytest.skip("no /proc: process start times are not available")
    write_lock(path, pid=os.getpid(), host=socket.gethostname(), started=iso(time.time()), pid_start=1)
    with locks.acquire(path, "next"):
        pass
    assert "no longer running" in capfd.readouterr().err


def test_another_host_with_a_stale_heartbeat_is_taken_over(tmp_path, capfd):
    path = tmp_path / "run.lock"
    old = time.time() - 3600
    write_lock(path, pid=1, host="node-gone", started=iso(old), heartbeat=iso(old), purpose="wbscale fit")
    os.utime(path, (old, old))
    with locks.acquire(path, "next", stale_after=600):
        assert json.loads(path.read_text())["host"] == socket.gethostname()
    err = capfd.readouterr().err
    assert "pid 1 on node-gone" in err and "no heartbeat for 60 min" in err


def test_another_host_with_a_fresh_heartbeat_is_refused(tmp_path):
    path = tmp_path / "run.lock"
    old = time.time() - 3600
    write_lock(path, pid=1, host="node-busy", started=iso(old), heartbeat=iso(time.time() - 5))
    os.utime(path, (old, old))
    with pytest.raises(locks.LockHeld, match="pid 1 on node-busy.*last heartbeat [0-9]+ s ago") as info:
        locks.acquire(path, "next", stale_after=600)
    assert "stop it on node-busy" in str(info.value) and "10 min old" in str(info.value)
    # the file's mtime counts as a heartbeat too (clock skew between nodes)
    write_lock(path, pid=1, host="node-busy", started=iso(old), heartbeat=iso(old))
    with pytest.raises(locks.LockHeld):
        locks.acquire(path, "next", stale_after=600)


def test_heartbeat_is_rewritten_in_place(tmp_path):
    path = tmp_path / "run.lock"
    proc = hold(path, heartbeat=0.3)
    try:
        first = json.loads(path.read_text())
        deadline = time.time() + 10
        while json.loads(path.read_text())["heartbeat"] == first["heartbeat"]:
            assert time.time() < deadline, "the heartbeat never changed"
            time.sleep(0.2)
        with pytest.raises(locks.LockHeld):  # still locked: the rewrite kept the inode
            locks.acquire(path, "second")
    finally:
        proc.kill()
        proc.wait()


def test_unreadable_file_nobody_holds_is_taken_over(tmp_path, capfd):
    path = tmp_path / "run.lock"
    path.write_text("")  # e.g. left by an older wbscale
    with locks.acquire(path, "next"):
        pass
    assert "empty or unreadable" in capfd.readouterr().err


def test_custom_hint(tmp_path):
    path = tmp_path / "run.lock"
    with locks.acquire(path, "first"):
        with pytest.raises(locks.LockHeld, match=r"\. Use another run name\.$"):
            locks.acquire(path, "second", hint="Use another run name.")


# ---------------------------------------------------------------------------- the run lock of `wbscale fit`


def _run_lock_file() -> str:
    """The run lock's file name (moving from wbscale.train.fit to wbscale.locks)."""
    from wbscale.train import fit

    return getattr(locks, "RUN_LOCK_FILE", None) or fit.RUN_LOCK_FILE


def _slurm(monkeypatch, job: str | None, restart: int | None = None, array: tuple[str, str] | None = None) -> None:
    for key in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    if job is not None:
        monkeypatch.setenv("SLURM_JOB_ID", job)
    if restart is not None:
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart))
    if array is not None:
        monkeypatch.setenv("SLURM_ARRAY_JOB_ID", array[0])
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", array[1])


def _live_remote_holder(path: Path, purpose: str) -> None:
    """A lock held by a process on another node with a fresh heartbeat: not stale."""
    path.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    write_lock(path, pid=4242, host="node-before-requeue", started=iso(now - 60), heartbeat=iso(now), purpose=purpose)


@pytest.mark.parametrize("array", [None, ("777", "3")], ids=["job", "array-task"])
def test_a_requeued_slurm_job_takes_over_its_previous_incarnations_run_lock(tmp_path, monkeypatch, capfd, array):
    from wbscale.train.fit import lock_run

    job = "777_3" if array else "1234"
    run = tmp_path / "run"
    path = run / _run_lock_file()
    _live_remote_holder(path, f"wbscale fit, SLURM job {job} restart 1")
    _slurm(monkeypatch, "1234" if not array else "778", restart=2, array=array)
    with lock_run(run) as lock:
        assert lock.held
        data = json.loads(path.read_text())
        assert data["pid"] == os.getpid() and data["host"] == socket.gethostname()
        assert data["purpose"] == f"wbscale fit, SLURM job {job} restart 2"
    assert not path.exists()
    err = capfd.readouterr().err
    assert f"taking over the run lock of job {job}'s previous incarnation (restart 1; this is restart 2" in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "holder, job, restart",
    [
        ("wbscale fit, SLURM job 1234 restart 2", "1234", 2),  # the same incarnation twice (a second srun)
        ("wbscale fit, SLURM job 1234 restart 3", "1234", 2),  # a newer incarnation holds it
        ("wbscale fit, SLURM job 999 restart 0", "1234", 2),  # another job trains this run
        ("wbscale fit", "1234", 2),  # a fit outside SLURM holds it
        ("wbscale fit, SLURM job 1234 restart 0", None, None),  # this fit runs outside SLURM
    ],
    ids=["same-incarnation", "newer-holder", "other-job", "holder-not-slurm", "not-in-slurm"],
)
def test_the_run_lock_of_anyone_but_an_earlier_incarnation_is_refused(tmp_path, monkeypatch, holder, job, restart):
    from wbscale.train.fit import lock_run

    run = tmp_path / "run"
    path = run / _run_lock_file()
    _live_remote_holder(path, holder)
    before = path.read_text()
    _slurm(monkeypatch, job, restart)
    with pytest.raises(UserError, match="run 'run' is being trained by another process: .*pid 4242 on node-before-requeue") as info:
        lock_run(run)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    assert path.read_text() == before  # untouched
