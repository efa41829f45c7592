"""`wbscale bench gpu` (`make gpu-check`): the whole GPU proof in one command, <= 8 minutes.

Stages run in order, each in its own process with its own time limit, so a hang, a crash or
an out-of-memory loses only that stage; each writes its JSON under ``out_dir`` while it runs
(partial rows survive a time-out) and the Markdown summary is rewritten after every stage:

    bench/results/gpu-check-<device>-<UTC stamp>-<n>-<stage>.json     one per stage
    bench/results/gpu-check-<device>-<UTC stamp>.md                    the summary

======  ===========  ===============================================================
 n      stage        what
======  ===========  ===============================================================
 1      env          device, SM count, clocks, memory, driver, torch/triton/CUDA, commit
 2      compile      every Triton binary the later stages need, built in parallel
 3      correctness  both ISTA variants vs the eager reference, fwd+bwd, bf16 + fp32,
                     T=257 (fixed config) and T=4096, d=768 (autotuned tiles, split-K);
                     save modes all / x_u / x agree
 4      kernels      T=16384, d=768 and 1024, bf16: eager, torch.compile, Triton (each
                     save mode), GEMM floor; fwd / bwd / fwd+bwd; memory; chosen configs
 5      breakdown    every GEMM of the block: Triton vs Triton without its epilogue vs
                     torch.matmul (cuBLAS) on the same operands
 6      train        CRATE 12L-768 (Triton ISTA, eager ISTA) and GPT-2 124M, context 1024,
                     bf16 autocast, fused AdamW, +/- torch.compile: tokens/s, MFU, memory
 7      generate     generation tokens/s of both models (no re-tuning per length)
======  ===========  ===============================================================

Stage code lives in :mod:`wbscale.bench.gpu_stages`; this module only schedules. Nothing
on this path imports deepspeed, wandb or datasets. Without a GPU only ``env`` runs, and the
command says so and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["STAGES", "Stage", "StageContext", "add_arguments", "run_gpu_check"]

DEFAULT_BUDGET_S = 470.0  # 8 minutes, less a margin for the interpreter start and the summary
MIN_STAGE_S = 15.0  # a stage with less time than this left is skipped, not started
RESULTS_DIR = Path("bench/results")
_STAGES_MODULE = "wbscale.bench.gpu_stages"


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: ``target`` is ``"module:function"``, called as ``function(ctx) -> dict``."""

    name: str
    target: str
    limit_s: float
    needs_gpu: bool = True
    help: str = ""


STAGES: tuple[Stage, ...] = (
    Stage("env", f"{_STAGES_MODULE}:stage_env", 45, False, "device, clocks, versions, commit"),
    Stage("compile", f"{_STAGES_MODULE}:stage_compile", 75, True, "Triton binaries, in parallel"),
    Stage("correctness", f"{_STAGES_MODULE}:stage_correctness", 90, True, "kernels vs reference"),
    Stage("kernels", f"{_STAGES_MODULE}:stage_kernels", 130, True, "ISTA block bench"),
    Stage("breakdown", f"{_STAGES_MODULE}:stage_breakdown", 45, True, "per-GEMM vs cuBLAS"),
    Stage("train", f"{_STAGES_MODULE}:stage_train", 150, True, "train step: tokens/s, MFU"),
    Stage("generate", f"{_STAGES_MODULE}:stage_generate", 45, True, "generation tokens/s"),
)


# --------------------------------------------------------------------------------------
# The child side: what a stage process runs
# --------------------------------------------------------------------------------------


class StageContext:
    """Handed to a stage function: its options, its clock, and a way to save as it goes."""

    def __init__(self, name: str, path: Path, deadline: float, quick: bool) -> None:
        self.name = name
        self.path = path
        self.deadline = deadline  # time.time() at which the parent kills this process
        self.quick = quick
        self.data: dict[str, Any] = {}
        self.started = time.time()

    def time_left(self) -> float:
        return self.deadline - time.time()

    def emit(self, **fields: Any) -> None:
        """Merge ``fields`` into the stage's data and write the JSON now (status "running")."""
        self.data.update(fields)
        self._write("running")

    def _write(self, status: str, **extra: Any) -> None:
        record = {
            "stage": self.name,
            "status": status,
            "elapsed_s": round(time.time() - self.started, 2),
            **extra,
            "data": self.data,
        }
        _write_json(self.path, record)


def _write_json(path: Path, obj: Any) -> None:
    """Atomic: a reader (the parent, after a kill) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def _resolve(target: str) -> Callable[[StageContext], dict[str, Any] | None]:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


# How a stage's own process starts (process isolation for the time limit, not a command).
CHILD_CODE = "import sys; from wbscale.bench.gpu import child_main; sys.exit(child_main(sys.argv[1:]))"


def child_main(argv: Sequence[str]) -> int:
    """One stage in its own process: ``NAME TARGET OUT DEADLINE [--quick]``."""
    name, target, out, deadline = argv[:4]
    ctx = StageContext(name, Path(out), float(deadline), quick="--quick" in argv[4:])
    ctx._write("running")
    try:
        result = _resolve(target)(ctx)
        if result:
            ctx.data.update(result)
    except BaseException as err:  # noqa: BLE001 - every failure is the stage's result
        ctx._write("failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        print(f"stage {name} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 1
    ctx._write("ok")
    return 0


# --------------------------------------------------------------------------------------
# The parent side: schedule, time-limit, collect
# --------------------------------------------------------------------------------------


def gpu_present() -> bool:
    """An NVIDIA GPU is visible (nvidia-smi lists one; no CUDA context is created here)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        proc = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0 and "GPU" in proc.stdout


def device_slug() -> str:
    """``nvidia-h100-80gb-hbm3``-style name of GPU 0 for file names, or ``cpu``."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            proc = subprocess.run(
                [smi, "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            if proc.returncode == 0 and proc.stdout.strip():
                return _slug(proc.stdout.strip().splitlines()[0])
        except (OSError, subprocess.SubprocessError):
            pass
    return "cpu"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _triton_cache_dir() -> Path:
    return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def _count_binaries(root: Path) -> int:
    try:
        return sum(1 for _ in root.rglob("*.cubin"))
    except OSError:
        return 0


def _run_stage(
    stage: Stage,
    path: Path,
    limit_s: float,
    quick: bool,
    python: str,
    env: dict[str, str],
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """Run one stage in a child process group; kill the group at ``limit_s``."""
    deadline = time.time() + limit_s
    cmd = [python, "-c", CHILD_CODE, stage.name, stage.target, str(path)]
    cmd += [f"{deadline:.3f}"] + (["--quick"] if quick else [])
    tail: deque[str] = deque(maxlen=60)
    cache = _triton_cache_dir()
    binaries_before = _count_binaries(cache)
    started = time.time()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True, bufsize=1,
    )  # fmt: skip

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            echo(f"[{stage.name}] {line}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
    reader.join(timeout=5)
    elapsed = time.time() - started

    record = _read_json(path) or {"stage": stage.name, "data": {}}
    child_status = record.get("status")
    if timed_out:
        status = "timeout"
    elif proc.returncode == 0 and child_status == "ok":
        status = "ok"
    elif child_status == "failed":
        status = "failed"
    else:
        status = "crashed"  # killed by a signal (OOM killer, segfault) or died mid-stage
    record.update(
        stage=stage.name,
        status=status,
        elapsed_s=round(elapsed, 2),
        limit_s=round(limit_s, 1),
        returncode=proc.returncode,
        triton_binaries_compiled=_count_binaries(cache) - binaries_before,
        log_tail=list(tail)[-40:],
    )
    _write_json(path, record)
    return record


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the stage's own process group (the child and its compile workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - an unkillable child
        pass


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_gpu_check(
    out_dir: Path = RESULTS_DIR,
    stages: list[str] | None = None,
    budget_s: float = DEFAULT_BUDGET_S,
    *,
    quick: bool = False,
    stage_table: Sequence[Stage] = STAGES,
    python: str | None = None,
    echo: Callable[[str], None] = print,
    gpu: bool | None = None,
) -> int:
    """Run the stages (all, or those named in ``stages``) within ``budget_s`` seconds.

    Returns 0 when every stage that ran passed, 1 when one failed, timed out or crashed,
    2 when stages that need a GPU were asked for and there is none (``env`` still runs).
    ``stage_table``, ``python`` and ``gpu`` are for tests.
    """
    by_name = {s.name: s for s in stage_table}
    names = list(stages) if stages else [s.name for s in stage_table]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(
            f"unknown gpu-check stage(s) {', '.join(unknown)}; choose from {', '.join(by_name)}"
        )
    selected = [s for s in stage_table if s.name in names]  # always in table order
    has_gpu = gpu_present() if gpu is None else gpu
    skipped_for_gpu = [s.name for s in selected if s.needs_gpu and not has_gpu]
    if skipped_for_gpu:
        echo(
            f"No GPU present: running only {', '.join(s.name for s in selected if not s.needs_gpu) or 'nothing'}; "
            f"{', '.join(skipped_for_gpu)} need an NVIDIA GPU (CUDA)."
        )
        selected = [s for s in selected if not s.needs_gpu]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    slug = device_slug() if has_gpu else "cpu"
    prefix = f"gpu-check-{slug}-{stamp}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)  # the real kernels, never the interpreter
    python = python or sys.executable
    started = time.time()
    records: list[dict[str, Any]] = []
    summary = out_dir / f"{prefix}.md"
    for stage in selected:
        number = [s.name for s in stage_table].index(stage.name) + 1
        path = out_dir / f"{prefix}-{number}-{stage.name}.json"
        remaining = budget_s - (time.time() - started)
        if remaining < MIN_STAGE_S:
            record = {
                "stage": stage.name, "status": "skipped", "elapsed_s": 0.0, "data": {},
                "reason": f"time budget: {remaining:.0f} s left of {budget_s:.0f} s",
            }  # fmt: skip
            _write_json(path, record)
        else:
            limit = min(stage.limit_s, remaining)
            echo(f"== stage {number} {stage.name} (limit {limit:.0f} s) -> {path}")
            record = _run_stage(stage, path, limit, quick, python, env, echo)
        record["file"] = path.name
        records.append(record)
        echo(f"== stage {number} {stage.name}: {record['status']} in {record['elapsed_s']:.1f} s")
        _write_summary(summary, records, budget_s, time.time() - started)
    total = time.time() - started
    echo(f"gpu-check: {len(records)} stage(s) in {total:.0f} s; summary {summary}")
    if skipped_for_gpu:
        return 2
    return 0 if all(r["status"] in ("ok", "skipped") for r in records) else 1


def _write_summary(
    path: Path, records: list[dict[str, Any]], budget_s: float, total_s: float
) -> None:
    try:
        from wbscale.bench.gpu_stages import summarize
    except Exception:  # noqa: BLE001 - a summary must not cost the stage results
        summarize = None
    env = next((r.get("data", {}) for r in records if r.get("stage") == "env"), {})
    lines = [
        f"# GPU check: {env.get('device_name', 'unknown device')}",
        "",
        f"{env.get('date', '')} · commit {env.get('git_commit') or 'unknown'} · torch "
        f"{env.get('torch', '?')} · triton {env.get('triton', '?')} · CUDA {env.get('cuda', '?')}"
        f" · {total_s:.0f} s of a {budget_s:.0f} s budget",
        "",
        "| stage | status | time (s) | file |",
        "|---|---|---:|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['stage']} | {r['status']} | {r.get('elapsed_s', 0):.1f} | {r.get('file', '')} |"
        )
    for r in records:
        lines += ["", f"## {r['stage']} ({r['status']})", ""]
        if r.get("error"):
            lines += [f"Error: `{r['error']}`", ""]
        if r.get("reason"):
            lines += [r["reason"], ""]
        body: list[str] = []
        if summarize is not None:
            try:
                body = summarize(r["stage"], r.get("data", {}))
            except Exception as err:  # noqa: BLE001
                body = [f"(no summary: {type(err).__name__}: {err})"]
        lines += body
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``wbscale bench gpu`` (the CLI adds them to its sub-parser)."""
    names = ", ".join(s.name for s in STAGES)
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="results folder (default bench/results)"
    )
    parser.add_argument(
        "--stages",
        default=None,
        help=f"comma-separated subset, in any order (default all: {names})",
    )
    parser.add_argument(
        "--budget", type=float, default=DEFAULT_BUDGET_S,
        help=f"seconds for all stages together (default {DEFAULT_BUDGET_S:.0f})",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true", help="smaller shapes and fewer steps (a smoke run)"
    )
    parser.add_argument("--list", action="store_true", help="print the stages and exit")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """What ``wbscale bench gpu`` does with the parsed options."""
    if args.list:
        for i, s in enumerate(STAGES, 1):
            print(
                f"{i} {s.name:<12} {s.limit_s:>4.0f} s  {'GPU' if s.needs_gpu else 'any'}  {s.help}"
            )
        return 0
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    try:
        return run_gpu_check(args.out, stages, args.budget, quick=args.quick)
    except ValueError as err:
        print(f"wbscale bench gpu: {err}", file=sys.stderr)
        return 2
