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
