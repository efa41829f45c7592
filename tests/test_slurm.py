"""SLURM: job scripts, submission, multi-node launch, preemption with requeue and exact resume.

The job tests run against a real SLURM cluster on this machine (munge, slurmctld, two
slurmd as node1 and node2), started by ``slurm/local_cluster.sh`` through
``tests/slurm_cluster.py``; they skip, saying why, where SLURM is not installed or the
tests do not run as root. Jobs train the tiny CPU recipe of test_train.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers import losses, tiny_overrides
from slurm_cluster import LocalCluster, unavailable

from wbscale.ckpt.format import latest_checkpoint, list_checkpoints
from wbscale.cli import main
from wbscale.config import load_recipe
from wbscale.slurm.preemption import EXIT_NOT_REQUEUED
from wbscale.slurm.record import read_events

JOB_TIMEOUT = 240.0  # one tiny job on a loaded 2-core machine takes well under a minute


def job_overrides(root: Path, run: str, **extra: object) -> list[str]:
    """The tiny recipe, without the end-of-run extras (samples, white-box metrics)."""
    return tiny_overrides(
        root, run,
        **{"train.sample_max_new_tokens": 0, "tracking.metrics_every": 0, "distributed.accelerator": "cpu", **extra},
    )


def sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def submit(capsys, recipe_args: list[str], *flags: str) -> str:
    """``wbscale slurm submit demo ...``; returns the job id it prints."""
    capsys.readouterr()
    assert main(["slurm", "submit", "demo", *flags, *recipe_args]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out.strip()
    assert re.fullmatch(r"\d+", out), f"expected a job id, got {out!r}"
    return out


def job_log(run_dir: Path, pattern: str = "job-*.err") -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "slurm").glob(pattern)))


def wait_for_step(run_dir: Path, step: int, timeout: float = JOB_TIMEOUT) -> None:
    """Until metrics.jsonl has a row for ``step`` (the run is mid-training)."""
    path = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and any(json.loads(line).get("step", 0) >= step for line in path.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.3)
    raise AssertionError(f"{run_dir.name} did not reach step {step} in {timeout:.0f}s; log:\n{job_log(run_dir)[-3000:]}")


def assert_same_losses(reference: Path, resumed: Path, max_steps: int) -> None:
    a, b = losses(reference), losses(resumed)
    for step in range(1, max_steps + 1):
        assert "train/loss" in b.get(step, {}), f"{resumed.name}: no train/loss at step {step} (rows: {sorted(b)})"
        assert a[step]["train/loss"] == b[step]["train/loss"], (
            f"step {step}: uninterrupted {a[step]['train/loss']!r} vs preempted+resumed {b[step]['train/loss']!r}"
        )
        if "val/loss" in a[step]:
            assert a[step]["val/loss"] == b[step].get("val/loss"), f"step {step}: val/loss differs"
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps), f"{resumed.name}: metrics rewound after the requeue: {steps}"


def wandb_ids(run_dir: Path) -> list[str]:
    """The run id of every offline wandb segment (one per job incarnation)."""
    return [p.name.rsplit("-", 1)[1] for p in sorted((run_dir / "wandb").glob("offline-run-*"))]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def cluster():
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    handle = LocalCluster().start()
    saved = {k: os.environ.get(k) for k in handle.env}
    os.environ.update(handle.env)
    yield handle
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    handle.stop()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Prepared tiny data shared by the module's jobs (prepared here, not by racing jobs)."""
    from wbscale.data.prepare import prepare

    base = tmp_path_factory.mktemp("slurm")
    prepare(load_recipe("demo", job_overrides(base, "prep")).data, progress=False)
    return base


@pytest.fixture
def in_root(root, monkeypatch) -> Path:
    monkeypatch.chdir(root)
    return root


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


# ---------------------------------------------------------------------------- the job record

RECORD_WRITER = """
import sys
from pathlib import Path
from wbscale.slurm.record import append_event
run, who, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    append_event(run, "preempt" if who % 2 else "cancel", writer=who, i=i)
"""


def test_job_record_is_one_file_per_event_with_a_view_and_old_records_still_read(tmp_path):
    """Several hosts write a run's job record at once (cancel on the login node, preempt on a
    compute node): every event is its own file, nothing is lost; slurm_jobs.jsonl stays a
    readable view, and a record appended by an older version is still read."""
    import subprocess
    import sys

    from wbscale.slurm.record import EVENTS_DIR, JOBS_FILE, append_event
    from wbscale.slurm.status import resolve_run

    old = tmp_path / "old"
    old.mkdir()
    (old / JOBS_FILE).write_text('{"event": "submit", "job_id": "7", "time": "2024-01-01T00:00:00+0000"}\n'
                                 '{"event": "start", "job_id": "7"}\n{"event": "pre')  # torn by a crash
    assert [e["event"] for e in read_events(old)] == ["submit", "start"]
    append_event(old, "cancel", job_ids=["7"])
    assert [e["event"] for e in read_events(old)] == ["submit", "start", "cancel"]
    view = [json.loads(line) for line in (old / JOBS_FILE).read_text().splitlines()]
    assert [e["event"] for e in view] == ["submit", "start", "cancel"] and view[2]["id"]
    assert len(list((old / EVENTS_DIR).glob("*.json"))) == 1
    assert resolve_run(str(old)) == old.resolve()

    run = tmp_path / "shared"
    writers, n = 4, 40
    procs = [subprocess.Popen([sys.executable, "-c", RECORD_WRITER, str(run), str(w), str(n)]) for w in range(writers)]
    for proc in procs:
        assert proc.wait(timeout=240) == 0
    rows = read_events(run)
    assert sorted((e["writer"], e["i"]) for e in rows) == [(w, i) for w in range(writers) for i in range(n)]
    assert all(e["host"] and e["id"] for e in rows)
    assert len(list((run / EVENTS_DIR).glob("*.json"))) == writers * n
    for line in (run / JOBS_FILE).read_text().splitlines():  # the view: whole lines only
        json.loads(line)
    append_event(run, "cancel", writer=-1, i=0)  # a writer alone leaves a complete view
    assert len((run / JOBS_FILE).read_text().splitlines()) == writers * n + 1
    assert not list(run.rglob(".*tmp-*"))


# ---------------------------------------------------------------------------- job scripts


def test_dry_run_single_node_script_has_the_srun_and_sbatch_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))
    args = ["slurm", "submit", "demo", "--dry-run", "--set", "train.run_name=one", "--time", "01:00:00"]
    assert main(args) == 0
    script = capsys.readouterr().out
    run = tmp_path / "runs" / "one"
    for line in [
        "#!/bin/bash",
        "#SBATCH --job-name=wbscale-one",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --signal=USR1@90",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --chdir={tmp_path}",
        f"#SBATCH --output={run}/slurm/job-%j.out",
        f"#SBATCH --error={run}/slurm/job-%j.err",
        "#SBATCH --time=01:00:00",
        "export MASTER_ADDR=127.0.0.1",
        "srun --kill-on-bad-exit=1 --ntasks=1 \\",
    ]:
        assert line in script.splitlines(), f"missing line {line!r} in:\n{script}"
    assert f"-m wbscale.cli fit {run}/recipe.yaml --resume auto --no-progress &" in script
    assert f"-m wbscale.cli slurm record start {run}" in script
    assert "--gpus-per-node" not in script and "--partition" not in script
    assert not run.exists(), "a dry run must not create the run folder"


def test_dry_run_two_nodes_takes_the_rendezvous_from_the_allocation(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))
    args = [
        "slurm", "submit", "demo", "--dry-run", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
        "--account", "proj", "--qos", "high", "--constraint", "a100", "--set", "distributed.strategy=deepspeed",
        "--set", "slurm.signal=TERM", "--set", "slurm.grace_seconds=120",
    ]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --signal=TERM@120",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=a100",
        'first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_ADDR=${MASTER_ADDR:-$first_node}",
        "srun --kill-on-bad-exit=1 --nodes=2 --ntasks-per-node=4 \\",
        """trap '[ -n "${srun_pid:-}" ] && kill -TERM "$srun_pid" 2>/dev/null' TERM""",
    ]:
        assert line in lines, f"missing line {line!r}"
    assert any(line.startswith("export MASTER_PORT=$((") for line in lines)


def test_site_file_fills_defaults_and_flags_win(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    site = tmp_path / "slurm.yaml"
    site.write_text(yaml.safe_dump({
        "partition": "cpu", "account": "lab", "time": "02:00:00", "cpus_per_task": 4,
        "modules": ["cuda/12.4", "nccl"], "env": {"NCCL_SOCKET_IFNAME": "ib0"},
        "setup": ["source /opt/venv/bin/activate"], "sbatch": ["--exclusive"], "python": "/opt/venv/bin/python",
    }))
    assert main(["slurm", "submit", "demo", "--dry-run", "--site", str(site), "--partition", "debug"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for line in [
        "#SBATCH --partition=debug", "#SBATCH --account=lab", "#SBATCH --time=02:00:00",
        "#SBATCH --cpus-per-task=4", "#SBATCH --exclusive", "module load cuda/12.4 nccl",
        "export NCCL_SOCKET_IFNAME=ib0", "source /opt/venv/bin/activate",
    ]:
        assert line in lines, f"missing line {line!r}"
    assert "#SBATCH --partition=cpu" not in lines
    assert any("/opt/venv/bin/python -m wbscale.cli fit" in line for line in lines)
    # the default site file is read when there is no --site
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    (tmp_path / "cfg" / "wbscale").mkdir(parents=True)
    (tmp_path / "cfg" / "wbscale" / "slurm.yaml").write_text("partition: fromhome\n")
    assert main(["slurm", "submit", "demo", "--dry-run"]) == 0
    assert "#SBATCH --partition=fromhome" in capsys.readouterr().out.splitlines()


def test_bad_input_exits_2_with_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))
    bad_site = tmp_path / "site.yaml"
    bad_site.write_text("partiton: gpu\n")
    cases = [
        (["--site", str(bad_site)], "unknown key 'partiton' — did you mean 'partition'?"),
        (["--site", str(tmp_path / "missing.yaml")], "site file"),
        (["--time", "soon"], "is not a SLURM time limit"),
        (["--array", "a-b"], "--array 'a-b'"),
        (["--set", "slurm.signal=HUP"], "slurm.signal: 'HUP' is not one of 'USR1', 'TERM'"),
        (["--set", "train.run_name=my run"], "letters, digits"),
    ]
    for flags, message in cases:
        assert main(["slurm", "submit", "demo", "--dry-run", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (flags, err)
    assert main(["slurm", "status", "nosuchrun"]) == 2
    assert "no SLURM jobs recorded for run 'nosuchrun'" in capsys.readouterr().err


def test_submit_without_sbatch_exits_2_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert main(["slurm", "submit", "demo", "--set", "train.run_name=nosbatch"]) == 2
    err = capsys.readouterr().err
    assert "'sbatch' not found on PATH" in err and "--dry-run" in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_missing_scontrol_warns_and_exits_for_slurms_requeue(root, monkeypatch, capsys, restore_signals):
    """A signal inside a 'job' whose PATH has no scontrol: checkpoint, warning, exit 75."""
    from wbscale.train.fit import fit

    monkeypatch.setenv("PATH", str(root / "empty-bin"))  # no scontrol (nor anything else)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NAME", "wbscale-noscontrol")
    recipe = load_recipe("demo", job_overrides(root, "noscontrol", **{"train.max_steps": 40}))
    run_dir = recipe.run_dir

    def signal_mid_run() -> None:
        wait_for_step(run_dir, 2)
        os.kill(os.getpid(), signal.SIGUSR1)

    sender = threading.Thread(target=signal_mid_run, daemon=True)
    sender.start()
    with pytest.raises(SystemExit) as stopped:
        fit(recipe, progress=False)
    sender.join(5)
    err = capsys.readouterr().err
    assert stopped.value.code == EXIT_NOT_REQUEUED == 75
    assert "WARNING: 'scontrol' is not on PATH" in err and "RequeueExit=75" in err, err
    event = [e for e in read_events(run_dir) if e["event"] == "preempt"][-1]
    assert event["action"] == "not-requeued" and event["job_id"] == "4242"
    assert 2 <= event["step"] < 40
    assert latest_checkpoint(run_dir).step == event["step"], "the checkpoint of the stop step is not `last`"


# ---------------------------------------------------------------------------- real cluster


@pytest.mark.slow
def test_bad_partition_shows_slurms_error_and_leaves_nothing(cluster, in_root, capsys):
    run_dir = in_root / "runs" / "badpart"
    assert main(["slurm", "submit", "demo", "--partition", "nosuchpartition", *sets(job_overrides(in_root, "badpart"))]) == 2
    err = capsys.readouterr().err
    assert "sbatch refused the job" in err and "invalid partition" in err.lower(), err
    assert not run_dir.exists(), f"left behind: {list(run_dir.rglob('*'))}"


@pytest.mark.slow
def test_single_node_job_trains_to_completion(cluster, in_root, capsys):
    job = submit(capsys, sets(job_overrides(in_root, "single")))
    run_dir = in_root / "runs" / "single"
    # while it is queued or running, a second job for the same run folder is refused
    assert main(["slurm", "submit", "demo", *sets(job_overrides(in_root, "single"))]) == 2
    assert f"already has a job in the queue: {job}" in capsys.readouterr().err
    info = cluster.wait(job, {"COMPLETED"}, JOB_TIMEOUT)
    assert info["ExitCode"] == "0:0", job_log(run_dir)
    assert [c.step for c in list_checkpoints(run_dir)] == [4, 8]
    assert (run_dir / "slurm" / f"job-{job}.sbatch").is_file()
    assert (run_dir / "slurm" / f"env-{job}-0.json").is_file()
    env = json.loads((run_dir / "slurm" / f"env-{job}-0.json").read_text())
    assert env["versions"]["torch"] and "git_commit" in env and env["slurm"]["SLURM_JOB_ID"] == job
    events = read_events(run_dir)
    assert [e["event"] for e in events] == ["submit", "start"] and events[0]["job_id"] == job
    # `status` reports the job, its requeues and the run's last checkpoint
    assert main(["slurm", "status", str(run_dir), "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    (row,) = report["jobs"]
    assert (row["job_id"], row["state"], row["requeues"], row["last_step"]) == (job, "COMPLETED", 0, 8)
    assert main(["slurm", "status", "single", "--runs-dir", str(in_root / "runs")]) == 0
    assert re.search(rf"^\s+{job}\s+COMPLETED\s+0\s+node\d\s+0:0\s+step 8", capsys.readouterr().out, re.M)


@pytest.mark.slow
def test_two_node_zero2_job_stops_all_ranks_together_when_one_rank_is_signalled(cluster, in_root, capsys):
    """One CPU task on node1 and one on node2 (gloo, ZeRO-2). Only rank 1 gets USR1: both
    ranks still stop after the same step, rank 0 requeues, and the job finishes."""
    max_steps = 16
    overrides = job_overrides(
        in_root, "twonode",
        **{"distributed.strategy": "deepspeed", "distributed.zero_stage": 2, "train.max_steps": max_steps},
    )
    job = submit(capsys, sets(overrides), "--nodes", "2")
    run_dir = in_root / "runs" / "twonode"
    wait_for_step(run_dir, 2)
    os.kill(cluster.task_pid(job, rank=1), signal.SIGUSR1)
    cluster.wait(job, {"PENDING"}, 120)
    (stop,) = [e for e in read_events(run_dir) if e["event"] == "preempt"]
    assert stop["action"] == "requeued" and stop["signal"] == "a signal on another rank", stop
    saved = latest_checkpoint(run_dir)
    assert saved.step == stop["step"] and saved.meta["world_size"] == 2 and "DeepSpeed" in saved.meta["strategy"]
    info = cluster.wait(job, {"COMPLETED"}, JOB_TIMEOUT, release_requeued=True)
    log = job_log(run_dir)
    assert info["NodeList"] == "node[1-2]" and info["Restarts"] == "1", info
    for rank, node in ((0, "node1"), (1, "node2")):
        assert log.count(f"[wbscale] rank {rank}/2 (local 0) on node {node}") == 2, log[-4000:]
    assert f"resuming 'twonode' from step {stop['step']}" in log
    last = latest_checkpoint(run_dir)
    assert last.step == max_steps and last.meta["world_size"] == 2
    assert last.meta["samples"] == max_steps * 4 * 2 * 2  # steps x micro batch x grad accum x world


@pytest.mark.slow
def test_preemption_requeues_and_resumes_with_the_losses_of_an_uninterrupted_run(cluster, in_root, capsys):
    # room for the signal to land mid-run even when steps take milliseconds: with 24 steps a
    # quiet machine finished the run (about 1 s after step 2) before USR1 arrived
    max_steps = 120
    # only the preemption saves mid-run
    extra = {"train.max_steps": max_steps, "train.ckpt_every": 1000, "train.val_every": 40}
    reference_job = submit(capsys, sets(job_overrides(in_root, "uninterrupted", **extra)))
    job = submit(capsys, sets(job_overrides(in_root, "preempted", **extra)))
    run_dir = in_root / "runs" / "preempted"
    wait_for_step(run_dir, 2)
    cluster.signal(job, "USR1")  # what --signal=USR1@90 sends before a time limit
    cluster.wait(job, {"PENDING"}, 90)  # saved, requeued itself
    first_stop = [e for e in read_events(run_dir) if e["event"] == "preempt"]
    assert len(first_stop) == 1 and first_stop[0]["action"] == "requeued", (first_stop, job_log(run_dir)[-3000:])
    stop_step = first_stop[0]["step"]
    assert 2 <= stop_step < max_steps
    assert latest_checkpoint(run_dir).step == stop_step
    info = cluster.wait(job, {"COMPLETED"}, JOB_TIMEOUT, release_requeued=True)
    cluster.wait(reference_job, {"COMPLETED"}, JOB_TIMEOUT)
    log = job_log(run_dir)
    assert info["Restarts"] == "1", info
    assert f"resuming 'preempted' from step {stop_step}" in log
    assert_same_losses(in_root / "runs" / "uninterrupted", run_dir, max_steps)
    final = latest_checkpoint(run_dir)
    assert final.step == max_steps and final.meta["samples"] == max_steps * 4 * 2  # no sample repeated or skipped
    ids = wandb_ids(run_dir)
    assert len(ids) == 2 and len(set(ids)) == 1, f"wandb segments {ids}: expected one run id in both incarnations"
    assert (run_dir / "wandb_id.txt").read_text().strip() == ids[0] == final.meta["wandb_id"]
    starts = [e for e in read_events(run_dir) if e["event"] == "start"]
    assert [e["restart_count"] for e in starts] == [0, 1]
    assert main(["slurm", "status", str(run_dir), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)[0]["jobs"]
    assert (row["state"], row["requeues"], row["last_step"]) == ("COMPLETED", 1, max_steps)


@pytest.mark.slow
def test_requeue_inside_a_job_array(cluster, in_root, capsys):
    max_steps = 120  # room for the signal to land mid-run even when steps take milliseconds
    extra = {"train.max_steps": max_steps, "train.ckpt_every": 100, "train.val_every": 40}
    array_job = submit(capsys, sets(job_overrides(in_root, "sweep", **extra)), "--array", "0-1")
    task_run = in_root / "runs" / "sweep-1"
    wait_for_step(task_run, 2)
    cluster.signal(f"{array_job}_1", "USR1")
    cluster.wait(f"{array_job}_1", {"PENDING"}, 90)
    stop = [e for e in read_events(in_root / "runs" / "sweep") if e["event"] == "preempt"]
    assert len(stop) == 1 and stop[0]["job_id"] == f"{array_job}_1" and stop[0]["action"] == "requeued", stop
    cluster.wait(f"{array_job}_1", {"COMPLETED"}, JOB_TIMEOUT, release_requeued=True)
    cluster.wait(f"{array_job}_0", {"COMPLETED"}, JOB_TIMEOUT)
    for task in (0, 1):
        run = in_root / "runs" / f"sweep-{task}"
        assert latest_checkpoint(run).step == max_steps, job_log(in_root / "runs" / "sweep", "job-*.err")[-3000:]
        assert load_recipe(str(run / "recipe.yaml")).train.seed == 1337 + task
    assert main(["slurm", "status", "sweep", "--runs-dir", str(in_root / "runs"), "--json"]) == 0
    rows = {r["job_id"]: r for r in json.loads(capsys.readouterr().out)[0]["jobs"]}
    assert rows[f"{array_job}_1"]["requeues"] == 1 and rows[f"{array_job}_1"]["last_step"] == max_steps, rows
    assert rows[f"{array_job}_0"]["requeues"] == 0, rows


@pytest.mark.slow
def test_cancel_saves_a_checkpoint_and_stops_on_sigterm(cluster, in_root, capsys):
    job = submit(capsys, sets(job_overrides(in_root, "cancelled", **{"train.max_steps": 200, "train.ckpt_every": 1000})))
    run_dir = in_root / "runs" / "cancelled"
    wait_for_step(run_dir, 2)
    assert main(["slurm", "cancel", "cancelled", "--runs-dir", str(in_root / "runs")]) == 0
    assert f"cancelled {job}" in capsys.readouterr().err
    cluster.wait(job, {"CANCELLED"}, 60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(e["event"] == "preempt" for e in read_events(run_dir)):
        time.sleep(0.5)
    stop = [e for e in read_events(run_dir) if e["event"] == "preempt"]
    assert stop and stop[0]["action"] == "stopped" and stop[0]["exit_code"] == 143, (stop, job_log(run_dir)[-3000:])
    assert latest_checkpoint(run_dir).step == stop[0]["step"]
    assert "SIGTERM received: checkpoint saved" in job_log(run_dir)
    assert main(["slurm", "cancel", "cancelled", "--runs-dir", str(in_root / "runs")]) == 0
    assert "no queued or running job" in capsys.readouterr().err


# ---------------------------------------------------------------------------- sweeps as job arrays, the run registry

def runs_json(capsys, runs_dir: Path) -> dict[str, dict]:
    capsys.readouterr()
    assert main(["runs", "--runs-dir", str(runs_dir), "--json"]) == 0
    return {row["name"]: row for row in json.loads(capsys.readouterr().out)}


@pytest.mark.slow
def test_sweep_array_cancel_preempt_runs_states_and_resubmit_heals(cluster, in_root, capsys):
    """ONE job array of 3 points (at most 2 at once) whose recipes differ only in
    train.keep_last, so every point trains the same losses: task 0 runs through, task 1 is
    cancelled mid-run, task 2 is preempted (USR1) and requeues itself. `runs` shows failed /
    preempted-requeued / running-or-finished; `runs resubmit --failed` completes task 1 with
    the losses of the uninterrupted task 0; every task's registry writes are all there."""
    max_steps = 48
    fixed = job_overrides(in_root, "unused", **{"train.max_steps": max_steps, "train.ckpt_every": 100, "train.val_every": 16})
    fixed = [o for o in fixed if not o.startswith("train.keep_last=")]  # the axis
    args = ["sweep", "run", "demo", *sets(fixed), "--set", "train.keep_last=2,3,4", "--name", "arr", "--slurm",
            "--max-concurrent", "2", "--no-progress"]
    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr().err
    sweep_dir = in_root / "runs" / "sweeps" / "arr"
    state = json.loads((sweep_dir / "sweep.json").read_text())
    names = [p["name"] for p in state["points"]]
    (array,) = {p["array_job"] for p in state["points"]}
    assert [p["job_id"] for p in state["points"]] == [f"{array}_{i}" for i in range(3)]
    assert "#SBATCH --array=0-2%2" in (sweep_dir / "slurm" / f"job-{array}.sbatch").read_text()
    runs = [sweep_dir / n for n in names]
    log = lambda: job_log(sweep_dir, "job-*.err")[-4000:]  # noqa: E731

    wait_for_step(runs[1], 2)
    cluster.cancel(f"{array}_1")  # SIGTERM: checkpoint, exit 143, CANCELLED
    cluster.wait(f"{array}_1", {"CANCELLED"}, 90)
    wait_for_step(runs[2], 2)  # the freed slot starts task 2
    cluster.signal(f"{array}_2", "USR1")
    cluster.wait(f"{array}_2", {"PENDING"}, 90)
    deadline = time.monotonic() + 30  # the end event is written as the task leaves
    while time.monotonic() < deadline and runs_json(capsys, sweep_dir)[names[1]]["state"] != "failed":
        time.sleep(0.5)
    rows = runs_json(capsys, sweep_dir)
    assert rows[names[1]]["state"] == "failed" and rows[names[1]]["reason"].startswith("cancelled"), (rows[names[1]], log())
    assert rows[names[2]]["state"] == "preempted-requeued", (rows[names[2]], log())
    assert rows[names[0]]["state"] in ("running", "finished"), rows[names[0]]

    cluster.wait(f"{array}_2", {"COMPLETED"}, JOB_TIMEOUT, release_requeued=True)
    cluster.wait(f"{array}_0", {"COMPLETED"}, JOB_TIMEOUT)
    rows = runs_json(capsys, sweep_dir)
    assert [rows[n]["state"] for n in names] == ["finished", "failed", "finished"], (rows, log())
    assert rows[names[2]]["requeues"] == 1 and rows[names[2]]["jobs"] == [f"{array}_2"]
    cancel_step = rows[names[1]]["checkpoint"]
    assert cancel_step == rows[names[1]]["step"] < max_steps, rows[names[1]]

    capsys.readouterr()
    assert main(["runs", "resubmit", "--failed", "--runs-dir", str(sweep_dir), "--json"]) == 0
    (action,) = json.loads(capsys.readouterr().out)
    assert action["name"] == names[1] and action["action"] == "resubmitted", action
    assert action["pid"] is None and action["job_id"], action  # through SLURM, not a local process
    healed = action["job_id"]
    cluster.wait(healed, {"COMPLETED"}, JOB_TIMEOUT)

    assert_same_losses(runs[0], runs[1], max_steps)  # cancelled + resubmitted
    assert_same_losses(runs[0], runs[2], max_steps)  # preempted + requeued
    rows = runs_json(capsys, sweep_dir)
    assert all(rows[n]["state"] == "finished" and rows[n]["checkpoint"] == max_steps for n in names), rows
    assert rows[names[1]]["jobs"] == [f"{array}_1", healed] and rows[names[1]]["retries"] == 1
    # every task wrote its own registry files at once: nothing lost, every start and end there
    for run in runs:
        kinds = [e["event"] for e in store_events(run)]
        assert kinds.count("start") == kinds.count("end") >= 1, (run.name, kinds)
    ends = lambda run: [(e["event"], e.get("reason"), e.get("job_id")) for e in store_events(run)]  # noqa: E731
    assert ends(runs[0]) == [("start", None, f"{array}_0"), ("end", "finished", f"{array}_0")]
    assert ends(runs[1]) == [("start", None, f"{array}_1"), ("end", "terminated", f"{array}_1"),
                             ("resubmit", None, healed), ("start", None, healed), ("end", "finished", healed)]
    assert ends(runs[2]) == [("start", None, f"{array}_2"), ("end", "requeued", f"{array}_2"),
                             ("start", None, f"{array}_2"), ("end", "finished", f"{array}_2")]
    resumed = [e for e in store_events(runs[1]) if e["event"] == "start"][1]
    assert resumed["resumed_from"] == cancel_step and resumed["job_id"] == healed
    # each task is its own wandb run, kept across its requeue / resubmission
    ids = [(run / "wandb_id.txt").read_text().strip() for run in runs]
    assert all(ids) and len(set(ids)) == len(runs), ids
    for run, rid in zip(runs, ids, strict=True):
        assert set(wandb_ids(run)) == {rid}, (run.name, wandb_ids(run), rid)
        assert {e["wandb"]["id"] for e in store_events(run) if e["event"] == "start"} == {rid}, run.name
    assert set(runs_json(capsys, in_root / "runs")) >= {f"sweeps/arr/{n}" for n in names}
    capsys.readouterr()
    assert main(["runs", "show", names[1], "--runs-dir", str(sweep_dir)]) == 0
    shown = capsys.readouterr().out
    assert f"stopped by SIGTERM (cancel or preemption), checkpoint saved at step {cancel_step}" in shown
    assert f"resumed from step {cancel_step}" in shown and "attempt 1 of 3" in shown
    assert main(["sweep", "status", "arr", "--runs-dir", str(in_root / "runs")]) == 0
    assert "3 finished (3 runs)" in capsys.readouterr().out


def store_events(run: Path) -> list[dict]:
    from wbscale.runs.store import read_events as registry_events

    return registry_events(run)
