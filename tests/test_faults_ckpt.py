"""Fault injection around checkpoints: kill -9 inside the writer and at random moments,
flipped bytes in every kind of checkpoint file, broken metadata, SIGTERM / SIGINT, two
writers on one run, and metrics that hold every step exactly once afterwards.

Training runs happen in children forked from a clean fork server that has imported torch
and wbscale (so each run costs its training time, not a fresh interpreter's imports, and
inherits nothing of what earlier tests did in the test process: a forked pytest process
that had trained in-process hung in DeepSpeed's init in CI): a child runs
``wbscale.cli.main(["fit", …])`` exactly as the command line does and dies of a real
SIGKILL where ``WBSCALE_FAULT`` says (:mod:`wbscale.ckpt.writer`). Every run uses the same
recipe (dropout on, gradient accumulation 2, validation every 4 steps), so each resumed
run is compared bitwise with one uninterrupted reference run. One test goes through a
real ``wbscale fit`` subprocess to check the exit status of the command itself.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import tiny_overrides

from wbscale.ckpt.format import (
    META_SHA_KEY,
    SHA_KEY,
    checkpoint_problems,
    inspect_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    meta_digest,
    read_checkpoint,
)
from wbscale.ckpt.writer import FAULT_POINTS, clean_stale
from wbscale.errors import UserError

REPO = Path(__file__).resolve().parent.parent
STEPS = 12
VAL_STEPS = (4, 8, 12)
BASE = {
    "model.dropout": 0.1,  # resume must be exact with dropout on
    "train.max_steps": STEPS,
    "train.ckpt_every": 2,
    "train.keep_last": 2,
    "train.sample_max_new_tokens": 0,
    "tracking.metrics_every": 4,  # white-box rows: logged again by a resumed run if not deduplicated
    "tracking.wandb.mode": "disabled",
}


def overrides(tmp: Path, run: str, **extra: object) -> list[str]:
    return tiny_overrides(tmp, run, **{**BASE, **extra})


# what a launcher (Lightning, torchrun, wandb) exports to the processes it starts
LAUNCH_VARIABLES = {
    "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE",
    "LOCAL_WORLD_SIZE", "GROUP_RANK", "WANDB_SERVICE",
}


def _child(argv: list[str], env: dict[str, str], log: str) -> None:
    out = open(log, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - the child exits with it open
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    sys.stdout = sys.stderr = out
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    for key in [k for k in os.environ if k.startswith("SLURM_") or k in LAUNCH_VARIABLES]:
        del os.environ[key]  # outside SLURM and any launcher, even when the tests run in a job
    os.environ.update(env)
    import torch

    # One thread per run: the same numerics in every child, and no OpenMP spinning on a
    # shared machine (a 2-layer model trains 4x faster than with 2 contended threads).
    torch.set_num_threads(1)
    from wbscale.cli import main

    code = main(argv)
    out.flush()
    os._exit(code)


_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", "wbscale.cli"])


class Child:
    """``wbscale fit`` in a child of the fork server; ``code`` is its exit status (-9: SIGKILL)."""

    def __init__(self, tmp: Path, run: str, env: dict[str, str] | None = None, resume: str = "auto", **extra: object):
        self.run_dir = tmp / "runs" / run
        self.log = tmp / f"{run}.log"
        argv = ["fit", "demo", "--no-progress", "--resume", resume]
        for item in overrides(tmp, run, **extra):
            argv += ["--set", item]
        self.proc = _CONTEXT.Process(target=_child, args=(argv, env or {}, str(self.log)))
        self.proc.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float = 300) -> int:
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join()
            raise AssertionError(f"fit did not finish in {timeout} s:\n{self.output()[-3000:]}")
        return self.proc.exitcode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""


def fit_child(tmp: Path, run: str, expect: int = 0, **kw: object) -> Child:
    child = Child(tmp, run, **kw)
    code = child.wait()
    assert code == expect, f"fit {run}: exit {code}, expected {expect}:\n{child.output()[-3000:]}"
    return child


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def by_key(run_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in rows(run_dir) if key in r}


def assert_each_step_once(run_dir: Path) -> None:
    """metrics.jsonl: no (step, key) twice, steps in order, every train and val step present."""
    seen: dict[tuple[int, str], int] = {}
    steps = []
    for row in rows(run_dir):
        steps.append(row["step"])
        for key in row:
            if key != "step":
                seen[(row["step"], key)] = seen.get((row["step"], key), 0) + 1
    twice = sorted(k for k, n in seen.items() if n > 1)
    assert not twice, f"{run_dir.name}: logged more than once: {twice[:6]}"
    assert steps == sorted(steps), f"{run_dir.name}: steps out of order: {steps}"
    assert sorted(by_key(run_dir, "train/loss")) == list(range(1, STEPS + 1)), by_key(run_dir, "train/loss")
    assert sorted(by_key(run_dir, "val/loss")) == list(VAL_STEPS)


def assert_same_as_reference(ref: Path, run_dir: Path) -> None:
    assert_each_step_once(run_dir)
    for key in ("train/loss", "val/loss"):
        a, b = by_key(ref, key), by_key(run_dir, key)
        bad = [(s, a[s], b[s]) for s in a if a[s] != b[s]]
        assert not bad, f"{run_dir.name} differs from the uninterrupted run in {key} at (step, ref, resumed): {bad}"


def wait_for_step(run_dir: Path, step: int, child: Child, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.is_file() and any(r.get("step", 0) >= step and "train/loss" in r for r in rows(run_dir)):
            return
        if not child.proc.is_alive():
            raise AssertionError(f"fit ended before step {step}:\n{child.output()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"no step {step} after {timeout} s")


def assert_one_error_line(err: str, *needles: str) -> None:
    """The command failed with one ``wbscale: error:`` line naming ``needles``, no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("wbscale: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"


def flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))


def copy_run(src: Path, name: str) -> Path:
    dst = src.parent / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("faults")
    from wbscale.config import load_recipe
    from wbscale.data.prepare import prepare

    prepare(load_recipe("demo", overrides(tmp, "data")).data, progress=False)
    return tmp


@pytest.fixture(scope="module")
def reference(tmp) -> Path:
    """The uninterrupted run every interrupted one is compared with."""
    run = fit_child(tmp, "reference").run_dir
    assert_each_step_once(run)
    return run


@pytest.fixture(scope="module")
def zero_run(tmp) -> Path:
    """A DeepSpeed ZeRO-2 run (one process): checkpoints made of shards."""
    zero = {"distributed.strategy": "deepspeed", "distributed.zero_stage": 2, "train.max_steps": 4}
    return fit_child(tmp, "zero", **zero).run_dir


# ---------------------------------------------------------------------------- fast unit checks


def _fake_checkpoint(folder: Path, step: int) -> Path:
    """A checkpoint folder as the writer lays it out, without training."""
    import hashlib

    import torch

    path = folder / f"step-{step:08d}"
    (path / "rng").mkdir(parents=True)
    torch.save({"state_dict": {"model.w": torch.arange(64.0)}}, path / "model.ckpt")
    torch.save({"torch": torch.get_rng_state()}, path / "rng" / "rank-00000.pt")
    files = {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*")) if p.is_file()}
    meta = {
        "step": step, "recipe": {"model": {}}, "world_size": 1,
        "files": {rel: p.stat().st_size for rel, p in files.items()},
        SHA_KEY: {rel: hashlib.sha256(p.read_bytes()).hexdigest() for rel, p in files.items()},
    }
    meta[META_SHA_KEY] = meta_digest(meta)
    (path / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


def test_checksums_name_the_corrupt_file(tmp_path, capsys):
    from wbscale.cli import main

    path = _fake_checkpoint(tmp_path / "checkpoints", 4)
    assert checkpoint_problems(read_checkpoint(path)) == []
    assert main(["ckpt", "inspect", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    flip_byte(path / "model.ckpt", 0.8)  # inside the tensor data: torch.load would not notice
    (problem,) = checkpoint_problems(read_checkpoint(path))
    assert "model.ckpt: sha256 mismatch" in problem
    report = inspect_checkpoint(path)
    assert report["ok"] is False and "model.ckpt: sha256 mismatch" in report["problems"][0]
    assert main(["ckpt", "inspect", str(path)]) == 1  # the report says what is wrong, the status that it is
    assert json.loads(capsys.readouterr().out)["ok"] is False
    meta = json.loads((path / "meta.json").read_text())
    meta["samples"] = 12345  # an edited or bit-flipped value, still valid JSON
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="meta.json: checksum mismatch"):
        read_checkpoint(path)


def test_legacy_checkpoint_without_checksums_still_loads_and_a_broken_zip_is_named(tmp_path):
    path = _fake_checkpoint(tmp_path / "checkpoints", 4)
    meta = json.loads((path / "meta.json").read_text())
    del meta[SHA_KEY], meta[META_SHA_KEY]  # as written before checksums were recorded
    (path / "meta.json").write_text(json.dumps(meta))
    assert checkpoint_problems(read_checkpoint(path)) == []
    data = bytearray((path / "model.ckpt").read_bytes())
    cd = data.rfind(b"PK\x01\x02")  # the zip's central directory: a name byte (UnicodeDecodeError in torch.load)
    data[cd + 48] ^= 0x80
    (path / "model.ckpt").write_bytes(bytes(data))
    (problem,) = checkpoint_problems(read_checkpoint(path))
    assert "model.ckpt: unreadable" in problem


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_text("{not json"), "corrupt checkpoint metadata (not valid JSON"),
        (lambda p: p.write_text(json.dumps({"recipe": {}})), "no valid 'step'"),
        (lambda p: p.unlink(), "meta.json: missing"),
        (lambda p: p.write_bytes(b"\xff\xfe\x00"), "unreadable checkpoint metadata"),
    ],
    ids=["corrupt-json", "no-step", "deleted", "not-utf8"],
)
def test_broken_metadata_is_skipped_with_a_message_and_refused_by_path(tmp_path, damage, message):
    run = tmp_path / "run"
    _fake_checkpoint(run / "checkpoints", 2)
    newest = _fake_checkpoint(run / "checkpoints", 4)
    (run / "checkpoints" / "last").write_text("step-00000004\n")
    damage(newest / "meta.json")
    warnings: list[str] = []
    assert latest_checkpoint(run, warn=warnings.append).step == 2
    assert any(message in w and "step-00000004" in w for w in warnings), warnings
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        read_checkpoint(newest)


def test_last_naming_a_missing_folder_falls_back_with_a_message(tmp_path):
    run = tmp_path / "run"
    _fake_checkpoint(run / "checkpoints", 2)
    (run / "checkpoints" / "last").write_text("step-00000010\n")
    warnings: list[str] = []
    assert latest_checkpoint(run, warn=warnings.append).step == 2
    assert "names step-00000010, which is not usable" in warnings[0] and "step 2" in warnings[0]


def test_leftovers_of_crashes_are_cleaned(tmp_path):
    run = tmp_path / "run"
    root = run / "checkpoints"
    _fake_checkpoint(root, 2)
    for name in (".tmp-step-00000004", ".trash-step-00000000-77-1"):
        (root / name / "model.ckpt").mkdir(parents=True)
    (root / ".last.tmp-4242").write_text("step-00000004\n")
    (run / ".metrics.jsonl.tmp-4242").write_text("")
    removed = clean_stale(run)
    assert sorted(removed) == [".last.tmp-4242", ".metrics.jsonl.tmp-4242", ".tmp-step-00000004", ".trash-step-00000000-77-1"]
    assert [c.step for c in list_checkpoints(run)] == [2]


def test_collective_timeout_is_a_recipe_value(tmp_path):
    from datetime import timedelta

    from wbscale.config import load_recipe
    from wbscale.train.strategy import build_strategy

    recipe = load_recipe("demo", overrides(tmp_path, "t", **{"distributed.strategy": "ddp", "distributed.timeout_s": 42}))
    assert build_strategy(recipe, "cpu")._timeout == timedelta(seconds=42)
    assert load_recipe("demo", []).distributed.timeout_s == 600
    with pytest.raises(UserError, match="distributed.timeout_s must be >= 10"):
        load_recipe("demo", ["distributed.timeout_s=0"])


def test_a_write_error_without_errno_is_decided_by_a_probe_write(tmp_path, monkeypatch):
    """torch / DeepSpeed lose the errno of a full disk ("unexpected pos …", "basic_ios::clear:
    iostream error"): a 1 MiB probe write in the checkpoint's folder decides, and is removed."""
    import builtins
    import errno

    import torch

    from wbscale.ckpt import writer

    lost = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 66176 vs 66064")
    assert writer._disk_full(lost, tmp_path) is None  # the disk has room: not a full disk, re-raised as is
    assert writer._disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path) == errno.EDQUOT
    assert writer._disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path) is None
    assert writer._disk_full(RuntimeError("basic_ios::clear: iostream error"), tmp_path / "nowhere") is None
    for code in (errno.ENOSPC, errno.EDQUOT):
        def full_open(path, mode="r", *args, code=code, **kw):
            f = builtins.open(path, mode, *args, **kw)
            if "w" in mode:
                f.close()  # created, as on a real disk, then the write fails
                raise OSError(code, os.strerror(code), str(path))
            return f

        monkeypatch.setattr(writer, "open", full_open, raising=False)
        assert writer._disk_full(RuntimeError("basic_ios::clear: iostream error"), tmp_path) == code
        assert writer._disk_full(OSError("file write failed"), tmp_path) == code
        monkeypatch.undo()
        assert list(tmp_path.iterdir()) == [], "the probe file was left behind"
    err = writer._disk_full_error(tmp_path / "checkpoints", tmp_path / "checkpoints" / ".tmp-step-00000002",
                                  errno.EDQUOT, lost, torch.nn.Linear(1000, 1000, bias=False))
    assert str(err).startswith("disk quota exceeded writing checkpoint") and "no checkpoint was saved" in str(err)
    assert "needs at least about 11.4 MiB" in str(err) and "unexpected pos 66176" in str(err), err


def _mount_tmpfs(folder: Path, size: str, remount: bool = False) -> None:
    options = f"remount,size={size}" if remount else f"size={size}"
    cmd = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        if remount:
            raise AssertionError(f"remounting the tmpfs failed: {proc.stderr}")
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip() or proc.returncode}")


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs (size set by the test): writes fail with ENOSPC when it is full."""
    if shutil.which("mount") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("a real full disk needs root (mount -t tmpfs)")
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = []

    def mount(size: str) -> Path:
        _mount_tmpfs(folder, size, remount=bool(mounted))
        mounted.append(size)
        return folder

    yield mount
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# (kind, recipe, tmpfs size that holds one checkpoint of it but not two): a checkpoint is
# ~0.35 MiB plain, ~0.5 MiB ZeRO-2 (model states + optimizer shard + DeepSpeed's scripts)
DISK_KINDS = {
    "plain": ({}, "600k"),
    "zero": ({"distributed.strategy": "deepspeed", "distributed.zero_stage": 2}, "700k"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(DISK_KINDS))
def test_disk_full_on_a_real_tmpfs_is_one_line_and_the_previous_checkpoint_resumes(tmp, small_disk, kind):
    """A full disk (a real tmpfs) at the first checkpoint, then at a later one: exit 2, one
    line naming the folder and the space needed, nothing half-written left, the previous
    checkpoint intact and resumed once there is space. For ZeRO the errno is lost inside
    torch.save ("unexpected pos …"): the probe write finds the full disk."""
    recipe, one_ckpt = DISK_KINDS[kind]
    env = {"DS_ACCELERATOR": "cpu"}
    disk = small_disk("250k")  # less than any checkpoint of this model
    extra = {**recipe, "train.runs_dir": str(disk), "train.max_steps": 4, "tracking.metrics_every": 0}
    first = fit_child(tmp, f"disk-{kind}-first", expect=2, env=env, **extra)
    assert_one_error_line(first.output(), "no space left on the disk writing checkpoint", ".tmp-step-00000002",
                          "needs at least about", "no checkpoint was saved")
    shutil.rmtree(disk / f"disk-{kind}-first")
    small_disk(one_ckpt)
    run = f"disk-{kind}"
    child = fit_child(tmp, run, expect=2, env=env, **extra)
    assert_one_error_line(child.output(), "no space left on the disk writing checkpoint", ".tmp-step-00000004",
                          "needs about", "step-00000002) is intact")
    names = sorted(p.name for p in (disk / run / "checkpoints").iterdir())
    assert names == ["last", "step-00000002"], f"a half-written checkpoint is visible: {names}"
    last = latest_checkpoint(disk / run)
    assert last.step == 2 and checkpoint_problems(last) == []
    small_disk("8m")  # space freed: the run resumes from the intact checkpoint
    resumed = fit_child(tmp, run, env=env, **extra)
    assert f"resuming '{run}' from step 2" in resumed.output()
    assert latest_checkpoint(disk / run).step == 4


# ---------------------------------------------------------------------------- kill -9


# (writer point, step it fires at, step `last` names after the kill). One run is killed at
# every point in turn, each time resumed from what the previous kill left.
KILLS = [
    ("after-tmp-mkdir", 4, 2),
    ("after-model-write", 4, 2),
    ("after-rng-write", 4, 2),
    ("after-hash", 4, 2),
    ("after-meta-write", 4, 2),
    ("before-publish", 4, 2),
    ("after-rename", 4, 2),  # step-00000004 is in place, `last` still names step 2
    ("after-last", 6, 6),  # `last` moved, step 2 not pruned yet
    ("mid-prune", 8, 8),  # step 2 renamed to .trash-…, not deleted
]


def test_every_writer_fault_point_is_exercised():
    assert [k[0] for k in KILLS] == list(FAULT_POINTS)


@pytest.mark.slow
def test_kill_at_every_point_of_the_checkpoint_writer_then_resume_is_exact(tmp, reference):
    """A full disk, then kill -9 at each point of the writer, each resumed from what the
    previous fault left; the run then finishes with the uninterrupted run's losses."""
    run = "kill-writer"
    run_dir = tmp / "runs" / run
    for point, step, expected_last in [("disk-full", 4, 2), *KILLS]:
        expect = 2 if point == "disk-full" else -signal.SIGKILL
        child = fit_child(tmp, run, expect=expect, env={"WBSCALE_FAULT": f"{point}@{step}"})
        if point == "disk-full":  # one line naming the folder and the space needed; nothing left behind
            assert_one_error_line(child.output(), "no space left on the disk writing checkpoint", ".tmp-step-00000004",
                                  "needs about", "step-00000002) is intact")
            assert not (run_dir / "checkpoints" / ".tmp-step-00000004").exists()
        last = latest_checkpoint(run_dir)
        assert last is not None and checkpoint_problems(last) == [], f"{point}: `last` names a damaged checkpoint"
        assert last.step == expected_last, f"{point}: newest usable checkpoint is step {last.step}\n{child.output()[-2000:]}"
    assert (run_dir / "checkpoints" / ".trash-step-00000002").exists() or any(
        p.name.startswith(".trash-step-00000002") for p in (run_dir / "checkpoints").iterdir()
    ), "mid-prune did not leave the half-deleted folder under its trash name"
    resumed = fit_child(tmp, run)
    assert f"resuming '{run}' from step 8" in resumed.output()
    assert_same_as_reference(reference, run_dir)
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["last", "step-00000010", "step-00000012"], f"leftovers of the kills, or keep_last broke: {names}"


@pytest.mark.slow
def test_kill_at_random_moments_then_resume_is_exact(tmp, reference):
    rng = random.Random()
    run = "kill-random"
    for _ in range(2):  # two kills in one run: resume after a resume too
        child = Child(tmp, run)
        wait_for_step(tmp / "runs" / run, rng.randint(1, STEPS - 3), child)
        time.sleep(rng.uniform(0, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait() in (-signal.SIGKILL, 0)
        last = latest_checkpoint(tmp / "runs" / run)
        assert last is None or checkpoint_problems(last) == []
    fit_child(tmp, run)
    assert_same_as_reference(reference, tmp / "runs" / run)


# ---------------------------------------------------------------------------- flipped bytes


def _flip_target(run_dir: Path, kind: str) -> Path:
    newest = latest_checkpoint(run_dir)
    return {
        "model.ckpt": lambda: newest.model_path,
        "rng": lambda: newest.path / "rng" / "rank-00000.pt",
        "meta.json": lambda: newest.path / "meta.json",
        "zero-shard": lambda: newest.model_path / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero-model-states": lambda: newest.model_path / "checkpoint" / "mp_rank_00_model_states.pt",
    }[kind]()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model.ckpt", "rng", "meta.json", "zero-shard", "zero-model-states"])
def test_flipped_byte_is_named_auto_resume_falls_back_and_a_path_exits_2(tmp, reference, zero_run, kind, capsys):
    from wbscale.cli import main
    from wbscale.train.fit import resolve_resume

    src = zero_run if kind.startswith("zero") else reference
    run = copy_run(src, f"flip-{kind}")
    target = _flip_target(run, kind)
    newest = latest_checkpoint(run).path
    flip_byte(target)
    fallback = resolve_resume(run, "auto")
    assert fallback.step == latest_checkpoint(src).step - 2
    err = capsys.readouterr().err
    assert "skipping" in err and target.name in err, err
    assert main(["fit", "--resume", str(newest), "--no-progress"]) == 2
    assert_one_error_line(capsys.readouterr().err, target.name)
    report = inspect_checkpoint(newest)
    assert report["ok"] is False and target.name in report["problems"][0], report
    if kind == "model.ckpt":
        for argv in (["eval", "--ckpt", str(newest), "--batches", "1", "--batch-size", "2"],
                     ["generate", "--ckpt", str(newest), "--max-new-tokens", "2"]):
            assert main(argv) == 2
            assert_one_error_line(capsys.readouterr().err, "model.ckpt: sha256 mismatch")
    if kind.startswith("zero"):
        assert main(["ckpt", "consolidate", str(newest), "--out", str(run / "export")]) == 2
        assert_one_error_line(capsys.readouterr().err, target.name)
        assert not (run / "export").exists()


@pytest.mark.slow
def test_corrupt_newest_checkpoint_auto_resumes_from_the_previous_one_exactly(tmp, reference):
    run = "flip-resume"
    fit_child(tmp, run, **{"train.exit_interval": 8})  # stops cleanly at step 8: checkpoints 6 and 8
    flip_byte(tmp / "runs" / run / "checkpoints" / "step-00000008" / "model.ckpt", 0.9)
    child = fit_child(tmp, run)
    out = child.output()
    assert "skipping damaged checkpoint" in out and "step-00000008/model.ckpt: sha256 mismatch" in out, out
    assert f"resuming '{run}' from step 6" in out
    assert_same_as_reference(reference, tmp / "runs" / run)
    # every checkpoint corrupt: auto-resume refuses (exit 2) instead of starting over
    for ckpt in list_checkpoints(tmp / "runs" / run):
        flip_byte(ckpt.model_path, 0.9)
    child = fit_child(tmp, run, expect=2, **{"train.max_steps": STEPS + 2})
    assert "no intact checkpoint" in child.output() and "Traceback" not in child.output()


# ---------------------------------------------------------------------------- signals


@pytest.mark.slow
def test_signals_save_at_the_step_boundary_exit_nonzero_and_resume_exactly(tmp, reference):
    """SIGTERM -> 143, SIGINT (Ctrl-C) -> 130, SIGUSR1 outside SLURM -> 75 ("resume me")."""
    run = "signals"
    run_dir = tmp / "runs" / run
    after = 1
    for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGUSR1, 75)):
        child = Child(tmp, run, **{"train.ckpt_every": 100})  # only the signal saves mid-run
        wait_for_step(run_dir, after + 1, child)
        os.kill(child.pid, signum)
        assert child.wait() == code, child.output()[-3000:]
        out = child.output()
        stop = latest_checkpoint(run_dir)
        assert stop is not None and after < stop.step < STEPS, out
        assert f"{signum.name} received: checkpoint saved at step {stop.step}" in out, out
        assert f"exiting with status {code}" in out and "Traceback" not in out, out
        assert max(by_key(run_dir, "train/loss")) == stop.step, "rows past the checkpoint were logged"
        after = stop.step
    fit_child(tmp, run, **{"train.ckpt_every": 100})
    assert_same_as_reference(reference, run_dir)


@pytest.mark.slow
def test_sigterm_through_the_command_line_exits_143(tmp):
    run = "signal-cli"
    cmd = [sys.executable, "-m", "wbscale.cli", "fit", "demo", "--no-progress"]
    for item in overrides(tmp, run, **{"train.max_steps": 400}):
        cmd += ["--set", item]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp / "runs" / run / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not (metrics.is_file() and metrics.stat().st_size):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 143, out[-3000:]
    assert "SIGTERM received: checkpoint saved at step" in out and "Traceback" not in out, out[-3000:]


# ---------------------------------------------------------------------------- one writer


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_dead_ones_lock_is_taken_over(tmp, reference, capsys):
    from wbscale.cli import main

    run = "two-writers"
    first = Child(tmp, run)
    wait_for_step(tmp / "runs" / run, 2, first)
    argv = ["fit", "demo", "--no-progress", *[a for o in overrides(tmp, run) for a in ("--set", o)]]
    assert main(argv) == 2
    assert_one_error_line(capsys.readouterr().err, f"pid {first.pid} on {socket.gethostname()}", "being trained by another process")
    os.kill(first.pid, signal.SIGKILL)  # dies holding the lock
    assert first.wait() == -signal.SIGKILL
    resumed = fit_child(tmp, run)
    assert "taking over the stale lock" in resumed.output()
    assert_same_as_reference(reference, tmp / "runs" / run)
    assert not (tmp / "runs" / run / ".fit.lock").exists()
