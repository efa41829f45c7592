"""Faults injected into `wbscale data prepare`: killed, disk full, damaged shards.

Killing prepare must leave no worker process behind and no lock that blocks the next
run; a full disk must be one clear line (exit 2) that leaves the folder resumable; a
damaged shard must be named and rebuilt byte for byte.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import small_data_cfg as small_cfg

from wbscale.data import prepare as prep
from wbscale.data import shards as shard_format
from wbscale.data.manifest import STATE_FILE, load_manifest
from wbscale.data.shards import check_shard
from wbscale.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


# ---------------------------------------------------------------------------- helpers


def write_recipe(path: Path, **data) -> Path:
    lines = ["data:"] + [f"  {k}: {v}" for k, v in data.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare_cmd(recipe: Path, out: Path, *sets: str) -> list[str]:
    cmd = [sys.executable, "-m", "wbscale.cli", "data", "prepare", "--config", str(recipe)]
    for s in (f"data.out_dir={out}", *sets):
        cmd += ["--set", s]
    return cmd


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # state, ppid, ...


def alive(pid: int) -> bool:
    """Running (a zombie, killed but not yet reaped, is not)."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))) is not None:
            parents[int(d.name)] = int(st[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def holders_of(path: Path) -> set[int]:
    """Live processes with ``path`` open."""
    target, pids = str(path.resolve()), set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (d / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == target and alive(int(d.name)):
                        pids.add(int(d.name))
    return pids


def wait_gone(pids: set[int], timeout: float = 10.0) -> set[int]:
    deadline = time.time() + timeout
    while (left := {p for p in pids if alive(p)}) and time.time() < deadline:
        time.sleep(0.1)
    return left


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- killed


POOL = """
import sys, time
import numpy as np
from wbscale.data import prepare as prep
from wbscale.data.bpe import train_bpe
from wbscale.data.tokenizer import eot_id
if sys.argv[1] == "no-prctl":  # the portable fallback: a thread watching the parent pid
    def refuse(*a, **k):
        raise OSError("no prctl here")
    prep.ctypes.CDLL = refuse
tok = train_bpe(["once upon a time there was a dog"] * 20, 300)
pool = prep._start_pool(2, tok, eot_id(tok), np.dtype("<u2"))
print(" ".join(str(p) for p in pool._processes), flush=True)
time.sleep(60)
"""


@linux_only
@pytest.mark.parametrize(
    "sig, how", [(signal.SIGKILL, "prctl"), (signal.SIGTERM, "prctl"), (signal.SIGKILL, "no-prctl")]
)
def test_tokenizer_workers_die_with_their_parent(sig, how):
    proc = subprocess.Popen([sys.executable, "-c", POOL, how], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    workers = {int(p) for p in proc.stdout.readline().split()}
    assert len(workers) == 2 and all(alive(p) for p in workers)
    os.kill(proc.pid, sig)
    proc.wait(timeout=30)
    assert not wait_gone(workers, timeout=10), "tokenizer workers outlived their parent"


def _kill_prepare_midway(tmp_path: Path, sig: signal.Signals):
    out = tmp_path / "data"
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        source="synthetic-stories",
        synthetic_documents=12000,
        tokenizer="bpe",
        vocab_size=320,
        shard_tokens=8192,
        workers=2,
    )
    cmd = prepare_cmd(recipe, out)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 300
    workers: set[int] = set()
    # Wait until the workers are tokenizing: two children and the first shard written.
    while not (len(workers) >= 2 and any(out.glob("train_*.bin"))):
        assert proc.poll() is None, f"prepare ended before it could be killed: {proc.communicate()}"
        assert time.time() < deadline, "prepare never started its workers"
        workers = descendants(proc.pid)
        time.sleep(0.05)
    workers = descendants(proc.pid)
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    return proc, err, workers, out, cmd


@linux_only
@pytest.mark.slow
def test_kill_9_prepare_leaves_no_worker_and_the_next_run_takes_over(tmp_path):
    proc, _, workers, out, cmd = _kill_prepare_midway(tmp_path, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    lock = out / prep.LOCK_FILE
    assert not wait_gone(workers), f"workers {workers} survived kill -9 of prepare {proc.pid}"
    assert lock.exists() and json.loads(lock.read_text())["pid"] == proc.pid  # stale, left behind
    assert not holders_of(lock)
    again = run(cmd)
    assert again.returncode == 0, again.stderr
    assert f"taking over the stale lock {lock} of pid {proc.pid}" in again.stderr
    assert "no longer running" in again.stderr and "Traceback" not in again.stderr
    assert not lock.exists()
    load_manifest(out)  # every shard verified by sha256


@linux_only
@pytest.mark.slow
def test_sigterm_stops_prepare_cleanly(tmp_path):
    proc, err, workers, out, cmd = _kill_prepare_midway(tmp_path, signal.SIGTERM)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert not wait_gone(workers)
    assert not (out / prep.LOCK_FILE).exists()  # released on the way out
    again = run(cmd)
    assert again.returncode == 0 and "taking over" not in again.stderr, again.stderr
    load_manifest(out)


# ---------------------------------------------------------------------------- disk full


def test_disk_full_while_writing_a_shard_is_one_clear_error(tmp_path, monkeypatch):
    """Injected ENOSPC (runs without root): names the shard, leaves no partial file,
    keeps the shards before it recorded, and the next run finishes the job."""
    cfg = small_cfg(tmp_path / "data")
    real, written = shard_format.atomic_write_bytes, []

    def fill_up(path: Path, data: bytes) -> None:
        if path.suffix == ".bin" and len(written) == 3:
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_bytes(data[: len(data) // 2])  # the half that fitted
            raise OSError(errno.ENOSPC, "No space left on device")
        if path.suffix == ".bin":
            written.append(path.name)
        real(path, data)

    monkeypatch.setattr(shard_format, "atomic_write_bytes", fill_up)
    with pytest.raises(shard_format.DiskFull) as info:
        prep.prepare(cfg, progress=False)
    msg = str(info.value)
    assert isinstance(info.value, UserError) and info.value.exit_code == 2
    assert "no space left on the disk writing" in msg and "train_000003.bin" in msg
    assert "it needs 8.0 KiB" in msg and " free)" in msg and "re-run" in msg
    data = Path(cfg.out_dir)
    assert not list(data.glob(".*.tmp-*")) and not (data / "train_000003.bin").exists()
    state = json.loads((data / STATE_FILE).read_text())
    recorded = state["splits"]["train"]["shards"]
    assert [r["file"] for r in recorded] == written
    assert all(check_shard(data, r, 2) is None for r in recorded)
    assert not (data / prep.LOCK_FILE).exists()
    monkeypatch.undo()
    report = prep.prepare_data(cfg, progress=False)
    clean = prep.prepare(small_cfg(tmp_path / "clean"), progress=False)
    assert report.shards_written == len(list(clean.glob("*.bin"))) - len(written)
    for p in clean.iterdir():
        assert sha256(data / p.name) == sha256(p), p.name


def test_disk_full_while_writing_the_manifest_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path / "data")
    data = prep.prepare(cfg, progress=False)
    manifest = (data / "manifest.json").read_bytes()
    shard = data / "train_000001.bin"
    shard.write_bytes(b"\0" * shard.stat().st_size)  # a repair that rewrites ...
    real = shard_format.atomic_write_bytes

    def full_on_manifest(path: Path, payload: bytes) -> None:
        if path.name in ("manifest.json", STATE_FILE):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        real(path, payload)

    monkeypatch.setattr(shard_format, "atomic_write_bytes", full_on_manifest)
    with pytest.raises(shard_format.DiskFull, match=r"disk quota exceeded writing .*prepare-state"):
        prep.prepare(cfg, progress=False)
    assert (data / "manifest.json").read_bytes() == manifest


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("disk-full test needs root to mount a small tmpfs (ENOSPC is injected in another test)")
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command to mount a small tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")


@linux_only
def test_disk_full_on_a_small_tmpfs(tmp_path):
    disk = tmp_path / "small"
    _mount_tmpfs(disk, "96k")
    try:
        out = disk / "data"
        recipe = write_recipe(
            tmp_path / "recipe.yaml",
            source="synthetic-stories",
            synthetic_documents=1500,
            tokenizer="bpe",
            vocab_size=300,
            shard_tokens=4096,
            workers=1,
        )
        cmd = prepare_cmd(recipe, out)
        full = run(cmd)
        assert full.returncode == 2, full.stderr
        # what tokenizer training says ("prepare: …" progress lines) aside: one error line
        lines = [ln for ln in full.stderr.strip().splitlines() if not ln.startswith("prepare: ")]
        assert len(lines) == 1 and "Traceback" not in full.stderr, full.stderr
        assert lines[0].startswith("wbscale: error: no space left on the disk writing ")
        assert str(out) in lines[0] and "it needs" in lines[0] and "free" in lines[0]
        assert not list(out.glob(".*.tmp-*")) and not (out / prep.LOCK_FILE).exists()
        assert not (out / "manifest.json").exists()
        if (out / STATE_FILE).exists():  # what was recorded is whole
            state = json.loads((out / STATE_FILE).read_text())
            for r in state["splits"]["train"]["shards"]:
                assert check_shard(out, r, 2) is None, r["file"]
        # a bigger disk: the same folder resumes and finishes
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        done = run(cmd)
        assert done.returncode == 0, done.stderr
        load_manifest(out)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# ---------------------------------------------------------------------------- damaged shard


@pytest.mark.parametrize("name", ["train_000002.bin", "val_000000.bin", "tokenizer.json"])
def test_flipped_byte_is_named_and_repaired_to_identical_sha256(tmp_path, capfd, name):
    cfg = small_cfg(tmp_path / "data")
    data = prep.prepare(cfg, progress=False)
    target = data / name
    good = sha256(target)
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    target.write_bytes(bytes(raw))
    capfd.readouterr()
    report = prep.prepare_data(cfg, progress=False)
    err = capfd.readouterr().err
    assert sha256(target) == good
    load_manifest(data)
    if name.endswith(".bin"):
        assert f"shard {target} is corrupt (sha256 mismatch); rebuilding it" in err
        assert f"(rebuilt {name})" in err and report.repaired == [name]
        assert report.shards_written == 1
    else:
        assert f"{target} differs from the one the shards were made with; rebuilding it" in err
