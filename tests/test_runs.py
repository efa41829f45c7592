"""The run registry (``wbscale runs``): files and concurrent writers, rebuild, state
derivation (stale included), the recorder in a real CPU fit, resubmit and its budget.

The SLURM end-to-end test (a job array sweep with a cancelled and a preempted task, then
``runs resubmit --failed``) is in test_slurm.py, next to the cluster fixture.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import losses, tiny_overrides

from wbscale.cli import main
from wbscale.errors import UserError
from wbscale.runs import heal, store
from wbscale.runs.recorder import classify, recipe_ref_from_argv, recording_failures
from wbscale.runs.state import derive, list_runs, matches, parse_filters
from wbscale.slurm.record import append_event
from wbscale.slurm.status import JobState, _task_ids, job_snapshot

REPO = Path(__file__).resolve().parent.parent


def make_run(runs: Path, name: str, max_steps: int = 8) -> Path:
    run = runs / name
    run.mkdir(parents=True, exist_ok=True)
    (run / "recipe.yaml").write_text(
        f"model:\n  arch: crate\n  n_layer: 2\n  n_embd: 32\n  n_head: 2\ntrain:\n  max_steps: {max_steps}\n"
        f"  run_name: {name}\n  runs_dir: {runs}\n"
    )
    return run


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def ev(event: str, t: float, **fields) -> dict:
    return {"event": event, "time": t, **fields}


def job(state: str, requeues: int = 0, exit_code: str = "0:0", reason: str | None = None) -> JobState:
    return JobState(job_id="x", state=state, requeues=requeues, exit_code=exit_code, reason=reason)


# ---------------------------------------------------------------------------- files


def test_events_are_one_file_each_and_torn_files_are_skipped(tmp_path):
    run = tmp_path / "r"
    for i in range(5):
        store.write_event(run, "progress-ish", i=i)
    (run / "events" / "zzz-torn.json").write_text('{"event": "start", "ti')  # a crash mid-write by hand
    (run / "events" / ".x.json.tmp-host-1-abc").write_text("{}")  # a temp file never renamed
    rows = store.read_events(run)
    assert [r["i"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(r["host"] == socket.gethostname() and r["pid"] == os.getpid() for r in rows)
    assert len(os.listdir(run / "events")) == 7


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from wbscale.runs import store
    runs, who, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    for i in range(n):
        store.write_event(runs / "shared", "tick", writer=who, i=i)
        run = runs / f"w{who}-{i % 5}"
        store.register(runs, run, recipe="demo", sweep=None)
        store.write_event(run, "tick", writer=who, i=i)
        store.write_progress(runs / "shared", {"step": i, "writer": who})
        # every writer registers one common run with a field of its own (and a recipe of its own)
        store.register(runs, runs / "common", **{f"k{who}": i, "recipe": f"r{who}"})
""")
READER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from wbscale.runs.state import list_runs
    for _ in range(int(sys.argv[2])):
        list_runs(Path(sys.argv[1]))
""")


def test_concurrent_writers_and_readers_lose_nothing(tmp_path):
    """4 writer processes x 60 events into one shared run, plus memberships, progress
    snapshots and 2 readers rebuilding the index all the while: every event and every
    member is there afterwards, and every file parses."""
    runs = tmp_path / "runs"
    runs.mkdir()
    writers, n = 4, 60
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(runs), str(w), str(n)]) for w in range(writers)]
    procs += [subprocess.Popen([sys.executable, "-c", READER, str(runs), "6"]) for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=240) == 0
    shared = store.read_events(runs / "shared")
    assert sorted((e["writer"], e["i"]) for e in shared) == [(w, i) for w in range(writers) for i in range(n)]
    members = store.members(runs)
    assert {f"w{w}-{k}" for w in range(writers) for k in range(5)} <= set(members)
    common = members["common"]
    assert {f"k{w}" for w in range(writers)} <= set(common), common  # no writer dropped another's field
    assert common["recipe"] in {f"r{w}" for w in range(writers)} and common["name"] == "common"
    # one membership file per writer process; a re-registration with nothing new writes nothing
    assert len(os.listdir(runs / ".registry" / "runs" / "common")) == writers
    before = sorted(p.stat().st_mtime_ns for p in (runs / ".registry" / "runs" / "common").iterdir())
    assert store.register(runs, runs / "common", recipe="other")["recipe"] == common["recipe"]
    assert sorted(p.stat().st_mtime_ns for p in (runs / ".registry" / "runs" / "common").iterdir()) == before
    for w in range(writers):
        for k in range(5):
            got = sorted(e["i"] for e in store.read_events(runs / f"w{w}-{k}"))
            assert got == [i for i in range(n) if i % 5 == k], (w, k)
    assert store.read_progress(runs / "shared")["step"] == n - 1
    index = json.loads((runs / ".registry" / "index.json").read_text())
    assert isinstance(index["runs"], dict)
    leftovers = [p for p in runs.rglob(".*tmp-*")]
    assert not leftovers, leftovers


def test_a_lost_registry_is_rebuilt_from_the_run_folders(tmp_path):
    runs = tmp_path / "runs"
    a = make_run(runs, "a")
    store.write_event(a, "start", argv=["/x/wbscale/cli.py", "fit", "demo", "--set", "model.n_layer=2"])
    store.write_event(a, "start", argv=["/x/wbscale/cli.py", "fit", "--config", str(a / "recipe.yaml")])  # a resume
    make_run(runs / "sweeps" / "grid", "crate-L1")
    (runs / "sweeps" / "grid" / "sweep.json").write_text(json.dumps({"name": "grid", "recipe": "tiny"}))
    make_run(runs / "sweeps" / "bare", "p0")
    (runs / "sweeps" / "bare" / "sweep.json").write_text("{}")
    store.register(runs, runs / "a", recipe="demo")
    assert sorted(r.name for r in list_runs(runs)) == ["a"]  # shallow discovery only
    import shutil

    shutil.rmtree(runs / ".registry")
    assert sorted(r.name for r in list_runs(runs)) == ["a", "sweeps/bare/p0", "sweeps/grid/crate-L1"]
    members = store.members(runs)
    assert members["a"].get("recipe") == "demo" and not members["a"].get("sweep")  # the first start's RECIPE
    assert (members["sweeps/grid/crate-L1"]["recipe"], members["sweeps/grid/crate-L1"]["sweep"]) == ("tiny", "grid")
    assert members["sweeps/bare/p0"].get("sweep") == "bare" and not members["sweeps/bare/p0"].get("recipe")
    # a submitted run: its submit record says
    sub = make_run(runs, "sub")
    append_event(sub, "submit", job_id="5", recipe="recipes/x.yaml")
    store.rebuild(runs)
    assert store.members(runs)["sub"]["recipe"] == "recipes/x.yaml"
    # a membership written by an older version (one file per run) is still read, and merged
    legacy = runs / ".registry" / "runs" / "old.json"
    make_run(runs, "old")
    legacy.write_text(json.dumps({"run_dir": "old", "name": "old", "registered": 1.0, "recipe": "legacy"}))
    store.register(runs, runs / "old", sweep="s")
    assert (store.members(runs)["old"]["recipe"], store.members(runs)["old"]["sweep"]) == ("legacy", "s")
    store.unregister(runs, "old")
    assert "old" not in store.members(runs) and not legacy.exists()
    shutil.rmtree(runs / "old")
    # a folder deleted by hand leaves the registry at the next rebuild
    shutil.rmtree(runs / "a")
    assert store.rebuild(runs) == ["sub", "sweeps/bare/p0", "sweeps/grid/crate-L1"]
    # `slurm submit --array`'s parent folder holds no training: not a run
    parent = make_run(runs, "arr")
    append_event(parent, "submit", job_id="9", array="0-1")
    assert "arr" not in store.rebuild(runs)


# ---------------------------------------------------------------------------- states


def test_state_derivation_covers_every_state():
    t = 1000.0
    start = ev("start", t, pid=1, host="elsewhere")
    # local runs: the run lock tells whether the process lives
    assert derive([], [], {})[0] == "pending"
    assert derive([start], [], {}, lock=(True, "pid 1"))[0] == "running"
    state, reason, _ = derive([start], [], {}, lock=(False, "process 1 on vm is gone"))
    assert (state, reason) == ("stale", "process 1 on vm is gone")
    assert derive([start], [], {}, lock=(None, ""))[0] == "stale"  # no lock, no end, not here
    assert derive([start, ev("end", t + 5, reason="finished", step=8)], [], {})[0] == "finished"
    assert derive([start], [], {}, checkpoint=8, max_steps=8)[0] == "finished"
    state, reason, bad = derive([start, ev("end", t + 5, reason="error", exit_code=1, message="RuntimeError: x", step=3)], [], {})
    assert state == "failed" and "RuntimeError: x" in reason and not bad
    assert derive([ev("fail", t, reason="bad-input", exit_code=2, message="no such key")], [], {})[2] is True
    # SLURM runs: the job's state decides
    submit = {"event": "submit", "time": t - 10, "job_id": "77"}
    assert derive([], [submit], {"77": job("PENDING", reason="Priority")}) == ("pending", "job 77 pending: Priority", False)
    assert derive([], [submit], {"77": job("RUNNING")})[0] == "running"
    assert derive([], [submit], {"77": job("FAILED", exit_code="2:0")}) == (
        "failed", "job 77 ended FAILED before training started (exit 2)", True)
    sstart = ev("start", t, job_id="77", restart_count=0)
    assert derive([sstart], [submit], {"77": job("RUNNING")})[0] == "running"
    requeued = ev("end", t + 5, reason="requeued", exit_code=0, step=4)
    assert derive([sstart, requeued], [submit], {"77": job("PENDING", requeues=1)})[0] == "preempted-requeued"
    assert derive([sstart, requeued], [submit], {"77": job("RUNNING", requeues=1)})[0] == "running"
    term = ev("end", t + 5, reason="terminated", exit_code=143, step=4)
    state, reason, bad = derive([sstart, term], [submit], {"77": job("CANCELLED", exit_code="0:15")})
    assert state == "failed" and reason.startswith("cancelled: stopped by SIGTERM") and not bad
    assert derive([sstart], [submit], {"77": job("PENDING", requeues=1)})[0] == "preempted-requeued"  # node failure
    for word in ("NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT", "CANCELLED"):
        state, reason, _ = derive([sstart], [submit], {"77": job(word)})
        assert state == "stale" and word in reason, (word, reason)
    # a resubmission that has not started yet, then its start
    resub = {"event": "submit", "time": t + 100, "job_id": "90"}
    assert derive([sstart, term], [submit, resub], {"90": job("PENDING")})[0] == "pending"
    assert derive([sstart, term, ev("start", t + 120, job_id="90")], [submit, resub], {"90": job("RUNNING")})[0] == "running"


def test_states_without_the_recorder_come_from_the_slurm_record():
    """A run trained before the registry existed: SLURM's own start/preempt events."""
    jobs = [
        {"event": "submit", "time": 10.0, "job_id": "5"},
        {"event": "start", "time": 20.0, "job_id": "5", "restart_count": 0},
        {"event": "preempt", "time": 30.0, "job_id": "5", "action": "requeued", "exit_code": 0, "step": 3},
    ]
    assert derive([], jobs, {"5": job("PENDING", requeues=1)})[0] == "preempted-requeued"


def test_list_runs_reads_losses_checkpoint_jobs_and_liveness(tmp_path, monkeypatch):
    from wbscale.locks import acquire

    runs = tmp_path / "runs"
    live = make_run(runs, "live")
    lock = acquire(live / ".fit.lock", "wbscale fit", heartbeat_every=0)
    store.write_event(live, "start", resumed_from=None, world_size=1)
    (live / "metrics.jsonl").write_text(
        '{"step": 1, "train/loss": 5.0, "train/tokens_seen": 256.0}\n'
        '{"step": 2, "train/loss": 4.5, "train/tokens_seen": 512.0, "train/tokens_per_second": 1000.0}\n'
        '{"step": 2, "val/loss": 4.75}\n{"step": 3, "train/lo'
    )
    (live / "checkpoints" / "step-00000002").mkdir(parents=True)
    (live / "checkpoints" / "step-00000002" / "meta.json").write_text("{}")
    (live / "checkpoints" / "last").write_text("step-00000002\n")
    gone = make_run(runs, "gone")
    (gone / ".fit.lock").write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "purpose": "wbscale fit"}))
    store.write_event(gone, "start")
    queued = make_run(runs, "queued")
    append_event(queued, "submit", job_id="123_1", recipe="demo", workdir=str(tmp_path))
    monkeypatch.setattr("wbscale.slurm.status.job_snapshot", lambda ids: {"123_1": JobState("123_1", "PENDING", 0)})
    try:
        rows = {r.name: r for r in list_runs(runs)}
    finally:
        lock.release()
    assert (rows["live"].state, rows["live"].step, rows["live"].train_loss, rows["live"].val_loss) == ("running", 2, 4.5, 4.75)
    assert (rows["live"].tokens, rows["live"].tokens_per_second, rows["live"].checkpoint) == (512.0, 1000.0, 2)
    assert (rows["live"].arch, rows["live"].size, rows["live"].max_steps) == ("crate", "2L-32d-2h", 8)
    assert rows["gone"].state == "stale" and "is gone" in rows["gone"].reason
    assert (rows["queued"].state, rows["queued"].jobs, rows["queued"].recipe) == ("pending", ["123_1"], "demo")
    filters = parse_filters(["state=running,stale"])
    assert sorted(r.name for r in rows.values() if matches(r, filters)) == ["gone", "live"]
    with pytest.raises(UserError, match="did you mean 'stale'"):
        parse_filters(["state=stal"])
    with pytest.raises(UserError, match="unknown field"):
        parse_filters(["colour=red"])


def test_job_snapshot_reads_scontrol_including_pending_array_tasks(tmp_path, monkeypatch):
    assert _task_ids("1-5:2,9%2") == ["1", "3", "5", "9"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(textwrap.dedent("""\
        #!/bin/sh
        echo "JobId=101 ArrayJobId=100 ArrayTaskId=0 JobState=RUNNING Restarts=1 ExitCode=0:0 NodeList=node1 Reason=None"
        echo "JobId=100 ArrayJobId=100 ArrayTaskId=1-2%2 JobState=PENDING Restarts=0 ExitCode=0:0 Reason=JobArrayTaskLimit"
        echo "JobId=7 JobState=NODE_FAIL Restarts=0 ExitCode=0:0"
    """))
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    snap = job_snapshot(["100_0", "100_2", "7", "8"])
    assert (snap["100_0"].state, snap["100_0"].requeues) == ("RUNNING", 1)
    assert (snap["100_2"].state, snap["100_2"].reason) == ("PENDING", "JobArrayTaskLimit")
    assert snap["7"].state == "NODE_FAIL" and "8" not in snap


# ---------------------------------------------------------------------------- recorder


def test_recipe_ref_and_exit_classification():
    assert recipe_ref_from_argv(["wbscale", "fit", "demo", "--set", "a=1"]) == "demo"
    assert recipe_ref_from_argv(["x", "fit", "--set", "a=1", "--config", "r.yaml"]) == "r.yaml"
    assert recipe_ref_from_argv(["x", "fit", "--resume", "auto", "--no-progress", "tiny"]) == "tiny"
    assert recipe_ref_from_argv(["pytest"]) is None
    assert classify(SystemExit(0))[:2] == ("requeued", 0)
    assert classify(SystemExit(143))[:2] == ("terminated", 143)
    assert classify(UserError("bad"))[:2] == ("bad-input", 2)
    assert classify(RuntimeError("boom")) == ("error", 1, "RuntimeError: boom")


def test_bad_input_for_a_new_run_writes_nothing(tmp_path):
    recipe = SimpleNamespace(run_dir=tmp_path / "runs" / "new", train=SimpleNamespace(runs_dir=str(tmp_path / "runs")))
    with pytest.raises(UserError), recording_failures(recipe):
        raise UserError("bad")
    assert not (tmp_path / "runs").exists()


def test_cli_records_bad_input_and_resubmit_never_retries_it(tmp_path):
    recipe = SimpleNamespace(run_dir=tmp_path / "runs" / "bad", train=SimpleNamespace(runs_dir=str(tmp_path / "runs")))
    make_run(tmp_path / "runs", "bad")  # an existing run (submitted, or resumed) that fails on bad input
    with pytest.raises(UserError), recording_failures(recipe):
        raise UserError("model.n_embd (30) must be divisible by model.n_head (4)")
    (row,) = list_runs(tmp_path / "runs")
    assert (row.state, row.bad_input) == ("failed", True) and "divisible" in row.reason
    (action,) = heal.resubmit(tmp_path / "runs", failed=True)
    assert action.action == "skipped" and "bad input" in action.detail


def test_a_real_fit_records_start_progress_and_end(tmp_path, capsys):
    from wbscale.config import load_recipe
    from wbscale.train.fit import fit

    overrides = tiny_overrides(
        tmp_path, "rec", **{"train.max_steps": 4, "train.ckpt_every": 2, "train.val_every": 2, "train.exit_interval": 2,
                            "train.sample_max_new_tokens": 0, "tracking.metrics_every": 0},
    )
    fit(load_recipe("demo", overrides), progress=False)  # fit puts the RunRecorder last in its callbacks
    runs = tmp_path / "runs"
    (row,) = list_runs(runs)
    assert (row.state, row.step, row.checkpoint) == ("failed", 2, 2)
    assert row.reason == "stopped early (train.exit_interval) at step 2"
    fit(load_recipe("demo", [*overrides, "train.exit_interval=0"]), progress=False)
    (row,) = list_runs(runs)
    metrics = losses(runs / "rec")
    assert (row.state, row.step, row.max_steps, row.checkpoint) == ("finished", 4, 4, 4)
    assert row.train_loss == metrics[4]["train/loss"] and row.val_loss == metrics[4]["val/loss"]
    assert row.tokens == 4 * 4 * 2 * 32 and row.wandb and "offline-run-" in row.wandb
    events = store.read_events(runs / "rec")
    assert [(e["event"], e.get("reason"), e.get("resumed_from")) for e in events] == [
        ("start", None, None), ("end", "stopped", None), ("start", None, 2), ("end", "finished", None),
    ]
    assert events[0]["world_size"] == 1 and events[0]["strategy"] and events[0]["wandb"]["mode"] == "offline"
    assert store.read_progress(runs / "rec")["step"] == 4
    capsys.readouterr()
    assert main(["runs", "show", "rec", "--runs-dir", str(runs)]) == 0
    shown = capsys.readouterr().out
    assert "resumed from step 2" in shown and "fresh start" in shown and "finished" in shown
    assert main(["runs", "--runs-dir", str(runs)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:4] == ["NAME", "RECIPE", "MODEL", "STATE"]
    assert "rec " in table and " finished " in table and "4/4" in table and "1 finished (1 runs)" in table


# ---------------------------------------------------------------------------- resubmit


def failed_local_run(runs: Path, name: str) -> Path:
    run = make_run(runs, name)
    store.write_event(run, "start", cwd=str(runs.parent))
    store.write_event(run, "end", reason="error", exit_code=1, message="RuntimeError: NCCL timeout", step=3)
    return run


def test_resubmit_local_runs_with_a_retry_budget(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    failed_local_run(runs, "a")
    started = []

    def spawn(cmd, cwd, log):
        started.append((cmd, cwd))
        return dead_pid()

    monkeypatch.setattr("wbscale.runs.heal._spawn", spawn)
    assert [a.action for a in heal.resubmit(runs, failed=True, dry_run=True)] == ["would-resubmit"]
    assert not started
    (first,) = heal.resubmit(runs, failed=True, max_retries=2)
    assert first.action == "resubmitted" and first.pid
    cmd, cwd = started[0]
    assert cmd[-5:] == ["fit", str(runs / "a" / "recipe.yaml"), "--resume", "auto", "--no-progress"]  # RECIPE form
    assert Path(cwd) == tmp_path
    (row,) = list_runs(runs)
    assert row.state == "failed" and "exited before training started" in row.reason and row.retries == 1
    resub = [e for e in store.read_events(runs / "a") if e["event"] == "resubmit"]
    assert resub[0]["attempt"] == 1 and "NCCL timeout" in resub[0]["after"]
    assert heal.resubmit(runs, ["a"], max_retries=2)[0].action == "resubmitted"
    (third,) = heal.resubmit(runs, ["a"], max_retries=2)
    assert third.action == "skipped" and "retry budget spent (2 of 2" in third.detail
    with pytest.raises(UserError, match="say which runs"):
        heal.resubmit(runs)


def test_resubmit_of_a_slurm_run_repeats_its_job_options(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    run = make_run(runs, "s")
    append_event(run, "submit", job_id="41", workdir=str(tmp_path), options={
        "partition": "gpu", "account": "lab", "time": "01:00:00", "qos": None, "constraint": "a100", "site_path": None})
    store.write_event(run, "start", job_id="41", restart_count=0)
    submitted = []

    def fake_submit(recipe_ref, overrides, options, *, workdir, dry_run=False):
        submitted.append((recipe_ref, overrides, options, workdir))
        return SimpleNamespace(job_id="42", run_dir=run)

    monkeypatch.setattr("wbscale.slurm.submit.submit", fake_submit)
    monkeypatch.setattr("wbscale.slurm.status.job_snapshot", lambda ids: {"41": JobState("41", "NODE_FAIL", 0)})
    (row,) = list_runs(runs)
    assert row.state == "stale" and "NODE_FAIL" in row.reason
    (action,) = heal.resubmit(runs, stale=True)
    assert action.action == "resubmitted" and action.job_id == "42"
    ref, overrides, options, workdir = submitted[0]
    assert ref == str(run / "recipe.yaml") and overrides == [] and workdir == tmp_path
    assert (options.partition, options.account, options.time, options.constraint) == ("gpu", "lab", "01:00:00", "a100")
    event = [e for e in store.read_events(run) if e["event"] == "resubmit"][0]
    assert event["job_id"] == "42" and event["after_state"] == "stale" and "NODE_FAIL" in event["after"]


def no_local_spawn(cmd, cwd, log):
    raise AssertionError(f"a SLURM run was restarted as a local process: {cmd}")


def test_resubmit_of_an_array_task_goes_through_slurm_with_the_arrays_options(tmp_path, monkeypatch):
    """Tasks of `slurm submit --array` (folders <run>-<i>) and sweep points whose folder holds
    no submit record of their own: found by job id in the array's record, resubmitted as
    one SLURM job each with its options; a SLURM run without any record is refused."""
    runs = tmp_path / "runs"
    options = {"partition": "gpu", "account": "lab", "time": "02:00:00", "qos": "hi", "constraint": None, "site_path": None}
    parent = make_run(runs, "seed")  # `slurm submit --array 0-1`: the array's record, no training
    append_event(parent, "submit", job_id="50", array="0-1", recipe="demo", workdir=str(tmp_path), options=options)
    task = make_run(runs, "seed-1")
    store.write_event(task, "start", job_id="50_1", restart_count=0, host="node2", cwd=str(tmp_path))
    store.write_event(task, "end", reason="terminated", exit_code=143, step=3, job_id="50_1")
    sweep = runs / "sweeps" / "g"
    point = make_run(sweep, "p0")
    (sweep / "sweep.json").write_text(json.dumps({"name": "g", "recipe": "demo"}))
    append_event(sweep, "submit", job_id="60", array="0", points=[str(point)], workdir=str(tmp_path),
                 options={**options, "partition": "big"})
    store.write_event(point, "start", job_id="60_0", restart_count=0, host="node1", slurm_run_dir=str(sweep))
    hand = make_run(runs, "hand")  # sbatch'ed by hand: SLURM, but no submit record anywhere
    store.write_event(hand, "start", job_id="70", restart_count=0, host=socket.gethostname(), cwd=str(tmp_path))
    orphan = make_run(runs, "orphan-3")
    store.write_event(orphan, "start", job_id="80_3", restart_count=0, host=socket.gethostname())
    submitted = []

    def fake_submit(recipe_ref, overrides, options, *, workdir, dry_run=False):
        submitted.append((recipe_ref, overrides, options, workdir))
        return SimpleNamespace(job_id=str(90 + len(submitted)), run_dir=Path(recipe_ref).parent)

    monkeypatch.setattr("wbscale.slurm.submit.submit", fake_submit)
    monkeypatch.setattr("wbscale.runs.heal._spawn", no_local_spawn)
    monkeypatch.setattr("wbscale.slurm.status.job_snapshot",
                        lambda ids: {i: JobState(i, "CANCELLED", 0, exit_code="0:15") for i in ids})
    rows = {r.name: r for r in list_runs(runs)}
    assert "seed" not in rows  # the array's parent holds no training
    assert {n: rows[n].state for n in ("seed-1", "hand", "orphan-3")} == {"seed-1": "failed", "hand": "stale", "orphan-3": "stale"}
    assert rows["sweeps/g/p0"].state == "stale"
    dry = {a.name: a for a in heal.resubmit(runs, failed=True, stale=True, dry_run=True)}
    assert dry["seed-1"].action == "would-resubmit" and "as a SLURM job with the options of job 50" in dry["seed-1"].detail
    assert dry["hand"].action == "skipped" and not submitted

    actions = {a.name: a for a in heal.resubmit(runs, failed=True, stale=True)}
    assert actions["seed-1"].action == "resubmitted" and actions["seed-1"].job_id and actions["seed-1"].pid is None
    assert "options of array 50" in actions["seed-1"].detail
    assert actions["sweeps/g/p0"].action == "resubmitted" and actions["sweeps/g/p0"].pid is None
    for name in ("hand", "orphan-3"):
        assert actions[name].action == "skipped" and "wbscale slurm submit" in actions[name].detail, actions[name]
    assert "SLURM job 70" in actions["hand"].detail and "array task 80_3" in actions["orphan-3"].detail
    by_recipe = {Path(ref).parent.name: (ref, overrides, opts, workdir) for ref, overrides, opts, workdir in submitted}
    assert set(by_recipe) == {"seed-1", "p0"}
    ref, overrides, opts, workdir = by_recipe["seed-1"]
    assert ref == str(task / "recipe.yaml") and overrides == [] and workdir == tmp_path  # one job, the task's own recipe
    assert (opts.partition, opts.account, opts.time, opts.qos, opts.array) == ("gpu", "lab", "02:00:00", "hi", None)
    assert by_recipe["p0"][2].partition == "big"
    event = [e for e in store.read_events(task) if e["event"] == "resubmit"][0]
    assert event["job_id"] == actions["seed-1"].job_id and "log" not in event  # no local process
    assert not [e for e in store.read_events(hand) if e["event"] == "resubmit"]


def test_resubmit_watch_dry_run_submits_nothing_and_interval_needs_watch(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    failed_local_run(runs, "w")
    started = []
    monkeypatch.setattr("wbscale.runs.heal._spawn", lambda cmd, cwd, log: started.append(cmd) or dead_pid())
    capsys.readouterr()
    assert main(["runs", "resubmit", "--watch", "--dry-run", "--rounds", "2", "--interval", "1", "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert out.count("would-resubmit") == 2 and not started
    assert not [e for e in store.read_events(runs / "w") if e["event"] == "resubmit"]
    seen = []
    heal.watch(runs, rounds=1, dry_run=True, report=seen.append, sleep=lambda s: None)
    assert [a.action for a in seen[0]] == ["would-resubmit"] and not started
    for flags, named in ((["--interval", "5"], "--interval"), (["--rounds", "2"], "--rounds"),
                         (["--interval", "5", "--rounds", "2"], "--interval and --rounds")):
        assert main(["runs", "resubmit", "--failed", *flags, "--runs-dir", str(runs)]) == 2, flags
        assert f"{named} only apply with --watch" in capsys.readouterr().err
    assert not started


def test_watch_is_bounded(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    failed_local_run(runs, "w")
    monkeypatch.setattr("wbscale.runs.heal._spawn", lambda cmd, cwd, log: dead_pid())
    slept, seen = [], []
    heal.watch(runs, interval=0.01, rounds=3, max_retries=2, report=seen.append, sleep=slept.append)
    assert slept == [1.0, 1.0]  # clamped to the lower bound, no sleep after the last round
    assert [[a.action for a in r] for r in seen] == [["resubmitted"], ["resubmitted"], ["skipped"]]
    with pytest.raises(UserError, match="--rounds"):
        heal.watch(runs, rounds=0)


def test_runs_cli_errors_exit_2(tmp_path, capsys):
    runs = tmp_path / "runs"
    make_run(runs, "only")
    assert main(["runs", "--runs-dir", str(runs), "--filter", "state=nope"]) == 2
    assert main(["runs", "show", "onyl", "--runs-dir", str(runs)]) == 2
    assert "did you mean 'only'" in capsys.readouterr().err
    assert main(["runs", "resubmit", "--runs-dir", str(runs)]) == 2
    assert main(["runs", "resubmit", "only", "--runs-dir", str(runs)]) == 2
    assert "is pending" in capsys.readouterr().err
    assert main(["runs", "--runs-dir", str(runs), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == "only" and row["state"] == "pending"
    assert main(["sweep", "status", "nosuch", "--runs-dir", str(runs)]) == 2


def test_local_sweep_registers_every_point_and_sweep_status_shows_them(tmp_path, monkeypatch, capsys):
    from wbscale.sweep.grid import SweepSpec, parse_grid, run_sweep

    monkeypatch.setattr("wbscale.data.prepare.prepare", lambda cfg, progress=True, **kwargs: None)
    fixed, axes = parse_grid(["model.n_layer=1,2", f"train.runs_dir={tmp_path / 'runs'}"])
    spec = SweepSpec("demo", fixed, axes, name="g")
    seen = []

    def fit_fn(recipe, resume, progress):
        rows = list_runs(spec.out_dir)
        seen.append({r.name: r.state for r in rows})
        return SimpleNamespace(already_complete=False)

    run_sweep(spec, fit_fn=fit_fn, progress=False)
    assert seen[0] == {"crate-L1": "pending", "crate-L2": "pending"}
    assert set(store.members(tmp_path / "runs")) == {"sweeps/g/crate-L1", "sweeps/g/crate-L2"}
    assert store.members(spec.out_dir)["crate-L1"]["sweep"] == "g"
    capsys.readouterr()
    assert main(["sweep", "status", "g", "--runs-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "crate-L1" in out and "crate-L2" in out and "2 pending" in out
