"""`wbscale bench gpu` / `make gpu-check` without a GPU: stage 1, the scheduler, the imports.

The GPU stages themselves need CUDA; here they are replaced by small fake stages that
finish, fail, crash, hang and overrun, to check that each stage keeps its own time limit,
writes its JSON as it goes, and that a hang loses only that stage. The measuring helpers
under the GPU stages run on CPU with tiny models. A subprocess with deepspeed, wandb and
datasets made unimportable proves the whole path needs none of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from wbscale.bench import gpu

REPO = Path(__file__).resolve().parent.parent

FAKE_STAGES = """
import os, subprocess, sys, time


def fast(ctx):
    ctx.emit(rows=[1])
    return {"rows": [1, 2], "quick": ctx.quick}


def hang(ctx):
    ctx.emit(rows=["measured before the hang"])
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    ctx.emit(grandchild=child.pid)
    time.sleep(120)


def boom(ctx):
    ctx.emit(rows=["partial"])
    raise ValueError("bad kernel")


def crash(ctx):
    ctx.emit(rows=["partial"])
    sys.stdout.flush()
    os._exit(3)


def slow(ctx):
    time.sleep(3)
    return {"done": True}
"""


@pytest.fixture
def fake_stages(tmp_path, monkeypatch):
    (tmp_path / "fake_gpu_stages.py").write_text(FAKE_STAGES)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(REPO)]))
    return lambda name, limit, needs_gpu=False: gpu.Stage(
        name, f"fake_gpu_stages:{name}", limit, needs_gpu
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_each_stage_has_its_own_limit_and_writes_as_it_goes(tmp_path, fake_stages):
    table = [
        fake_stages("fast", 30),
        fake_stages("hang", 4),
        fake_stages("boom", 30),
        fake_stages("crash", 30),
        fake_stages("slow", 30),
    ]
    out = tmp_path / "results"
    on_disk_at_start: dict[str, dict[str, str]] = {}  # stage -> {earlier stage: its status}

    def echo(line: str) -> None:
        if line.startswith("== stage") and "limit" in line:
            records = [json.loads(p.read_text()) for p in out.glob("*.json")]
            on_disk_at_start[line.split()[3]] = {r["stage"]: r["status"] for r in records}

    started = time.time()
    rc = gpu.run_gpu_check(out, None, 60, stage_table=table, echo=echo, gpu=True, quick=True)
    assert rc == 1
    assert time.time() - started < 100  # the hang cost its 4 s limit, not 120 s
    files = sorted(out.glob("*.json"))
    assert [f.name.split("-")[-1] for f in files] == [
        "fast.json", "hang.json", "boom.json", "crash.json", "slow.json",
    ]  # fmt: skip
    records = {json.loads(f.read_text())["stage"]: json.loads(f.read_text()) for f in files}
    assert records["fast"]["status"] == "ok"
    assert records["fast"]["data"] == {"rows": [1, 2], "quick": True}
    # a time-out keeps what the stage had written, and kills the stage's whole process group
    assert records["hang"]["status"] == "timeout"
    assert records["hang"]["data"]["rows"] == ["measured before the hang"]
    assert 3.5 < records["hang"]["elapsed_s"] < 20
    grandchild = records["hang"]["data"]["grandchild"]
    deadline = time.time() + 5
    while _alive(grandchild) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "the hung stage's own subprocess survived the time-out"
    assert records["boom"]["status"] == "failed"
    assert "ValueError: bad kernel" in records["boom"]["error"]
    assert records["boom"]["data"]["rows"] == ["partial"]
    assert records["crash"]["status"] == "crashed" and records["crash"]["returncode"] == 3
    assert records["crash"]["data"]["rows"] == ["partial"]
    assert records["slow"]["status"] == "ok" and records["slow"]["data"] == {"done": True}
    # each stage's final JSON was on disk before the next stage started
    assert on_disk_at_start["boom"] == {"fast": "ok", "hang": "timeout"}
    assert on_disk_at_start["slow"] == {
        "fast": "ok", "hang": "timeout", "boom": "failed", "crash": "crashed",
    }  # fmt: skip
    assert [f.name.split("-")[-2] for f in files] == ["1", "2", "3", "4", "5"]
    summary = next(out.glob("*.md")).read_text()
    for name, status in (
        ("fast", "ok"),
        ("hang", "timeout"),
        ("boom", "failed"),
        ("crash", "crashed"),
    ):
        assert f"| {name} | {status} |" in summary


def test_the_budget_clips_and_skips_later_stages(tmp_path, fake_stages):
    table = [fake_stages("slow", 30), fake_stages("hang", 30), fake_stages("fast", 30)]
    # 3 s of slow, then hang gets what is left of the budget, and fast none of it
    rc = gpu.run_gpu_check(
        tmp_path, None, 3 + gpu.MIN_STAGE_S + 4, stage_table=table, gpu=True, echo=lambda _: None
    )
    records = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("*.json"))]
    assert [r["status"] for r in records] == ["ok", "timeout", "skipped"]
    assert records[1]["limit_s"] < 30
    assert "budget" in records[2]["reason"]
    assert rc == 1


def test_stage_selection_and_gpu_requirement(tmp_path, fake_stages):
    table = [fake_stages("fast", 30), fake_stages("slow", 30, needs_gpu=True)]
    lines: list[str] = []
    rc = gpu.run_gpu_check(
        tmp_path, ["slow", "fast"], 60, stage_table=table, gpu=False, echo=lines.append
    )
    assert rc == 2  # a GPU stage was asked for and there is none
    assert "No GPU present" in lines[0] and "slow" in lines[0]
    assert [f.name.split("-")[-1] for f in tmp_path.glob("*.json")] == ["fast.json"]
    with pytest.raises(ValueError, match="unknown gpu-check stage"):
        gpu.run_gpu_check(tmp_path, ["nope"], 60, stage_table=table, gpu=False)


def test_stage_table_and_command_line():
    assert [s.name for s in gpu.STAGES] == [
        "env", "compile", "correctness", "kernels", "breakdown", "train", "generate",
    ]  # fmt: skip
    assert not gpu.STAGES[0].needs_gpu and all(s.needs_gpu for s in gpu.STAGES[1:])
    # every stage fits the budget on its own; together they are clipped by it
    assert all(s.limit_s < gpu.DEFAULT_BUDGET_S for s in gpu.STAGES)
    assert gpu.DEFAULT_BUDGET_S <= 8 * 60
    for s in gpu.STAGES:
        assert callable(gpu._resolve(s.target))
    args = gpu.add_arguments(__import__("argparse").ArgumentParser()).parse_args(
        ["--stages", "env,train", "--budget", "100", "--quick", "--out", "x"]
    )
    assert (args.stages, args.budget, args.quick, args.out, args.list) == (
        "env,train", 100.0, True, Path("x"), False,
    )  # fmt: skip
    from wbscale.cli import main as cli_main

    assert cli_main(["bench", "gpu", "--list"]) == 0


def test_peak_flops_tell_the_hopper_parts_apart(monkeypatch):
    import torch

    from wbscale.bench.gpu_stages import peak_flops

    def peak(name):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        return peak_flops(torch.device("cuda"))

    assert peak("NVIDIA H100 80GB HBM3") == (989e12, "wbscale.hardware")  # SXM
    assert peak("NVIDIA H100 PCIe")[0] == 756e12
    assert peak("NVIDIA H200")[0] == 989e12
    assert peak("Some GPU") == (None, "wbscale.hardware: unknown device")
    assert peak_flops(torch.device("cpu"))[0] is None


# --------------------------------------------------------------------------------------
# The measuring helpers on CPU
# --------------------------------------------------------------------------------------

TINY = dict(n_layer=1, n_head=2, n_embd=32, block=16, vocab=64, device="cpu")


@pytest.mark.parametrize("arch", ["crate", "gpt2"])
def test_train_and_generate_helpers_on_cpu(arch):
    row = gpu_stages().train_bench(arch, "eager", batch=2, steps=1, warmup=1, **TINY)
    assert row["tokens_per_s"] > 0 and row["mfu"] is None  # no peak for a CPU
    assert row["flops_per_token"] > 0 and row["loss"] > 0
    gen = gpu_stages().generate_bench(arch, "eager", batch=2, prompt=4, new_tokens=3, **TINY)
    assert gen["generated"] == 3 and gen["tokens_per_s"] > 0 and gen["autotune_runs"] == 0


def test_compile_jobs_and_save_mode_agreement_on_cpu():
    """The compile stage's dry run (nothing launches) and the correctness stage's mode check."""
    gs = gpu_stages()
    from wbscale.kernels import ista_triton as it

    if not it._INTERPRET:  # pragma: no cover - imported without the interpreter
        pytest.skip("needs the Triton interpreter on CPU")
    plan = [
        dict(variant=v, t=8, d=16, dtype="bf16", save="x_u") for v in ("overcomplete", "square")
    ]
    jobs = gs.collect_jobs(plan, "cpu")
    assert jobs and all(set(j) == {"args", "kwargs"} for j in jobs.values())
    assert len(jobs) == len({it.job_key(j) for j in jobs.values()})
    assert any(j["kwargs"]["NUM_SEG"] == 4 for j in jobs.values())  # the overcomplete gW
    assert it.tuned_configs() == []  # a dry run tunes nothing
    import torch

    row = gs.save_mode_agreement("overcomplete", 8, 16, torch.float32, "cpu")
    assert row["ok"], row
    assert row["x_u"]["y_equal"] and row["x"]["gx_equal"]


def gpu_stages():
    from wbscale.bench import gpu_stages as module

    return module


def test_summaries_render_partial_and_failed_rows():
    gs = gpu_stages()
    rows = [
        {"impl": "triton", "save": "all", "variant": "overcomplete", "d": 768, "tokens": 16384,
         "fwd_ms": {"median": 1.0}, "bwd_ms": {"median": 2.0}, "fwd+bwd_ms": {"median": 3.0},
         "fwd+bwd_tflops": 300.0, "held_after_fwd_mb": 100.0, "peak_mb": 200.0},
        {"impl": "eager", "save": None, "variant": "overcomplete", "d": 768, "tokens": 16384,
         "fwd_ms": {"median": 2.0}, "bwd_ms": {"median": 3.0}, "fwd+bwd_ms": {"median": 5.0},
         "fwd+bwd_tflops": 180.0, "held_after_fwd_mb": 400.0, "peak_mb": 500.0},
        {"impl": "compile", "save": None, "variant": "overcomplete", "d": 768, "tokens": 16384,
         "error": "skipped: too little time left for torch.compile"},
    ]  # fmt: skip
    text = "\n".join(gs.summarize("kernels", {"rows": rows}))
    assert "| overcomplete | 768 | triton | all | 1.000 | 2.000 | 3.000 | 300 | 100 | 200 |" in text
    assert "skipped: too little time" in text
    assert "| overcomplete | 768 | — | 1.67 | — |" in text
    train = [{"arch": "gpt2", "compile": True, "error": "skipped: 10 s left, needs ~80"}]
    assert "skipped" in "\n".join(gs.summarize("train", {"rows": train}))
    assert gs.summarize("nope", {}) == []


# --------------------------------------------------------------------------------------
# Stage 1 for real, and the import path without deepspeed / wandb / datasets
# --------------------------------------------------------------------------------------

BLOCKER = """
import importlib.abc, sys

BLOCKED = {"deepspeed", "wandb", "datasets"}


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the GPU image does not have it")
        return None


sys.meta_path.insert(0, _Blocker())
"""

CHECK = """
import sys
from wbscale.bench import gpu, gpu_stages
from wbscale.kernels import ista_triton
import wbscale.models
for name in ("deepspeed", "wandb", "datasets"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} imported although blocked")
env = gpu_stages.environment()
assert env["torch"] and env["git_commit"] is not None, env
row = gpu_stages.train_bench("crate", "eager", batch=1, steps=1, warmup=1, n_layer=1, n_head=2,
                             n_embd=32, block=8, vocab=32, device="cpu")
assert row["tokens_per_s"] > 0
from wbscale.cli import main as cli_main
try:
    cli_main(["bench", "gpu", "--help"])
except SystemExit as e:
    assert e.code == 0
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("deepspeed", "wandb", "datasets"))
assert not loaded, loaded
print("IMPORTS-OK", env["peak_flops_source"] if "peak_flops_source" in env else "cpu")
"""


@pytest.fixture
def blocked_env(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
    return env


def test_gpu_check_path_imports_without_deepspeed_wandb_datasets(blocked_env):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHECK)], env=blocked_env, cwd=REPO,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "IMPORTS-OK" in proc.stdout


def test_gpu_check_on_cpu_runs_stage_one_and_says_no_gpu(tmp_path, blocked_env):
    """The real command, with the blocked modules in the child processes too."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "wbscale.cli", "bench", "gpu", "--out", str(out)], env=blocked_env,
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if gpu.gpu_present():  # pragma: no cover - a GPU machine runs everything
        pytest.skip("a GPU is present: the CPU path does not apply")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "No GPU present" in proc.stdout
    (env_file,) = out.glob("gpu-check-cpu-*-1-env.json")
    record = json.loads(env_file.read_text())
    assert record["status"] == "ok", record
    data = record["data"]
    assert data["cuda_available"] is False and data["torch"]
    assert data["kernels"]["autotune_tiles"][0][:5] == [128, 256, 64, 4, 8]
    (summary,) = out.glob("gpu-check-cpu-*.md")
    assert "| env | ok |" in summary.read_text()


def test_makefile_has_a_gpu_check_target():
    proc = subprocess.run(
        ["make", "-n", "gpu-check"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "bench gpu" in proc.stdout
