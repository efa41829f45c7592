"""Distributed training on CPU: DDP and DeepSpeed ZeRO-1/2/3 with 2 processes (gloo), and a
hung (SIGSTOP'd) rank.

Multi-process runs go through the real command line (``python -m wbscale.cli fit …
--set distributed.devices=2``): Lightning's launcher re-executes the command line in the
second process, so these cannot run inside pytest's process. Each run is made once per
module (``Runs``) and shared by the tests that read it.

Tolerances: 2 processes vs 1 process with the same global batch differ only in the order
of floating-point sums (gradient all-reduce / reduce-scatter, thread count), measured
below 1e-6 on these losses (~5.5 nats); the tests allow 1e-5 absolute. Resume with the
same world size and strategy is exact (bitwise), like the single-process resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import losses, tiny_overrides

from wbscale.ckpt.format import list_checkpoints, read_checkpoint
from wbscale.config import load_recipe
from wbscale.errors import UserError

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-5
STEPS = 8


def tiny(tmp: Path, run: str, **extra: object) -> list[str]:
    """A recipe small enough that process start-up dominates (8 steps, 2 layers, d=32)."""
    values = {
        "train.max_steps": STEPS,
        "train.ckpt_every": 2,
        "train.keep_last": 4,
        "train.sample_max_new_tokens": 4,
        "tracking.metrics_every": 0,
        "tracking.wandb.mode": "disabled",
    }
    return tiny_overrides(tmp, run, **{**values, **extra})


TWO = {"distributed.devices": 2, "train.grad_accum": 1}  # same global batch as 1 x accum 2
LAST_ONLY = {"train.ckpt_every": STEPS}
# exact resume must hold with dropout on: each rank's RNG (its own stream) saved and restored
DROPOUT = {"model.dropout": 0.1}


def zero(stage: int, **extra: object) -> dict[str, object]:
    return {"distributed.strategy": "deepspeed", "distributed.zero_stage": stage, **extra}


def fit_cli(tmp: Path, run: str, **extra: object) -> Path:
    """``wbscale fit`` in a subprocess (the launcher re-executes it per rank)."""
    cmd = [sys.executable, "-m", "wbscale.cli", "fit", "--recipe", "demo", "--no-progress"]
    for item in tiny(tmp, run, **extra):
        cmd += ["--set", item]
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"wbscale fit {run} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return tmp / "runs" / run


def fork_run(tmp: Path, src: str, dst: str, step: int) -> None:
    """Copy run ``src`` to ``dst`` keeping only checkpoint ``step``: a job that died after it."""
    root = tmp / "runs"
    shutil.copytree(root / src, root / dst)
    keep = f"step-{step:08d}"
    for ckpt in (root / dst / "checkpoints").glob("step-*"):
        if ckpt.name != keep:
            shutil.rmtree(ckpt)
    (root / dst / "checkpoints" / "last").write_text(keep + "\n")
    (root / dst / "summary.json").unlink(missing_ok=True)


def assert_curves_close(ref: Path, other: Path, steps, tol: float = TOL, key: str = "train/loss") -> None:
    a, b = losses(ref), losses(other)
    worst = max(abs(a[s][key] - b[s][key]) for s in steps)
    assert worst <= tol, "\n".join(
        [f"{other.name} vs {ref.name}: max |diff| {worst:.3g} > {tol}"]
        + [f"step {s}: {a[s][key]!r} vs {b[s][key]!r}" for s in steps]
    )


class Runs:
    """Each training run of the module, made on first use."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.done: dict[str, Path] = {}

    def get(self, name: str) -> Path:
        if name not in self.done:
            self.done[name] = getattr(self, f"_{name}")()
        return self.done[name]

    def _single(self) -> Path:  # the reference: 1 process, accum 2, in this process
        from wbscale.train.fit import fit

        return fit(load_recipe("demo", tiny(self.tmp, "single")), progress=False).run_dir

    # (the curve-only runs save once, at the end: checkpoints are not what they test)
    def _ddp(self) -> Path:
        return fit_cli(self.tmp, "ddp", **{"distributed.strategy": "ddp", **TWO, **LAST_ONLY})

    def _zero1(self) -> Path:
        return fit_cli(self.tmp, "zero1", **zero(1, **TWO, **LAST_ONLY))

    def _zero2(self) -> Path:
        return fit_cli(self.tmp, "zero2", **zero(2, **TWO, **LAST_ONLY))

    def _zero3_chunked(self) -> Path:  # the LM-head loss in chunks: ZeRO-3 gathers the tied weight
        return fit_cli(self.tmp, "zero3-chunked", **zero(3, **TWO, **LAST_ONLY), **{"train.loss_chunk": 24})

    def _zero3(self) -> Path:  # uninterrupted ZeRO-3 on 2 processes: checkpoints at 2, 4, 6, 8
        return fit_cli(self.tmp, "zero3", **zero(3, **TWO))

    def _zero3_dropout(self) -> Path:  # uninterrupted ZeRO-3 on 2 processes with dropout on
        return fit_cli(self.tmp, "zero3-dropout", **zero(3, **TWO), **DROPOUT)

    def _zero3_resumed(self) -> Path:  # the same run stopped at step 4 (exit_interval), resumed
        fit_cli(self.tmp, "zero3-parts", **zero(3, **TWO), **DROPOUT, **{"train.exit_interval": 4})
        first = losses(self.tmp / "runs" / "zero3-parts")
        assert max(first) == 4, f"exit_interval=4 should stop at step 4, metrics reach {max(first)}"
        return fit_cli(self.tmp, "zero3-parts", **zero(3, **TWO), **DROPOUT, **{"train.exit_interval": 4})

    def _to_one(self) -> Path:  # ZeRO-3 x 2 processes at step 2 -> ZeRO-2 x 1 process
        self.get("zero3")
        fork_run(self.tmp, "zero3", "to-one", 2)
        return fit_cli(self.tmp, "to-one", **zero(2))

    def _to_two(self) -> Path:  # ZeRO-2 x 1 process at step 4 -> ZeRO-2 x 2 processes
        self.get("to_one")
        fork_run(self.tmp, "to-one", "to-two", 4)
        return fit_cli(self.tmp, "to-two", **zero(2, **TWO))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    tmp = tmp_path_factory.mktemp("dist")
    from wbscale.data.prepare import prepare

    # Prepared once here, so the subprocess runs only read it.
    prepare(load_recipe("demo", tiny(tmp, "prep")).data, progress=False)
    return Runs(tmp)


# ---------------------------------------------------------------------------- fast: config


def test_deepspeed_config_follows_the_recipe():
    from wbscale.train.strategy import deepspeed_config

    recipe = load_recipe("demo", [
        "train.micro_batch_size=6", "train.grad_accum=3", "optim.grad_clip=0.5",
        "distributed.strategy=deepspeed", "distributed.zero_stage=3", "distributed.offload_optimizer=true",
        "distributed.offload_params=true", "distributed.deepspeed_extra={zero_optimization: {sub_group_size: 1000}}",
    ])
    cfg = deepspeed_config(recipe, accelerator="gpu", precision="bf16-mixed")
    assert cfg["train_micro_batch_size_per_gpu"] == 6
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": True}
    zero_cfg = cfg["zero_optimization"]
    assert zero_cfg["stage"] == 3 and zero_cfg["sub_group_size"] == 1000
    assert zero_cfg["offload_optimizer"]["device"] == "cpu" and zero_cfg["offload_param"]["device"] == "cpu"
    cpu = deepspeed_config(load_recipe("demo", ["distributed.strategy=deepspeed"]), "cpu", "32-true")
    assert "bf16" not in cpu and "fp16" not in cpu


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("{zero_optimisation: {stage: 2}}", r"deepspeed_extra.zero_optimisation: not a DeepSpeed config key — did you mean 'zero_optimization'"),
        ("{train_micro_batch_size_per_gpu: 8}", r"set by wbscale from train.micro_batch_size"),
        ("{zero_optimization: {stage: 3}}", r"zero_optimization.stage: set by wbscale from distributed.zero_stage"),
        ("{zero_optimization: {reduce_bucket: 10}}", r"zero_optimization.reduce_bucket: not a DeepSpeed ZeRO key"),
    ],
)
def test_deepspeed_extra_refuses_unknown_and_recipe_owned_keys(extra, message):
    from wbscale.train.strategy import deepspeed_config

    recipe = load_recipe("demo", ["distributed.strategy=deepspeed", f"distributed.deepspeed_extra={extra}"])
    with pytest.raises(UserError, match=message):
        deepspeed_config(recipe, "cpu", "32-true")


def test_offload_params_needs_stage_3():
    from wbscale.train.strategy import deepspeed_config

    recipe = load_recipe("demo", ["distributed.strategy=deepspeed", "distributed.zero_stage=2", "distributed.offload_params=true"])
    with pytest.raises(UserError, match="offload_params needs distributed.zero_stage: 3"):
        deepspeed_config(recipe, "cpu", "32-true")


def test_memory_estimate_matches_deepspeed_estimators():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from wbscale.train.memory import estimate, model_facts

    recipe = load_recipe("demo", ["model.n_layer=12", "model.n_embd=768", "model.n_head=12", "model.block_size=1024",
                                  "data.vocab_size=50257"])
    facts, _ = model_facts(recipe)
    assert 80e6 < facts.params < 90e6, facts.params  # the published CRATE LM 12L is ~82M

    def states(strategy: str, offload: str, nodes: int, gpus: int) -> float:
        e = estimate(facts, strategy, offload, nodes * gpus, gpus, micro_batch=1, activation_checkpointing=False)
        return e.weights + e.gradients + e.optimizer

    for nodes, gpus in ((1, 1), (1, 8), (4, 8)):

        for offload, cpu_offload in (("none", False), ("optimizer", True)):
            _, ds_gpu = estimate_zero2_model_states_mem_needs(facts.params, gpus, nodes, cpu_offload=cpu_offload)
            assert states("zero2", offload, nodes, gpus) == pytest.approx(ds_gpu, rel=1e-6), (nodes, gpus, offload)
        for offload, cpu_offload, offload_params in (
            ("none", False, False), ("optimizer", True, False), ("optimizer+params", True, True)
        ):
            _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
                facts.params, facts.largest_layer_params, gpus, nodes,
                cpu_offload=cpu_offload, cpu_offload_params=offload_params,
            )
            assert states("zero3", offload, nodes, gpus) == pytest.approx(ds_gpu, rel=1e-6), (nodes, gpus, offload)


def test_recipes_check_says_whether_it_fits(capsys):
    from wbscale.cli import main

    big = ["--set", "model.n_layer=48", "--set", "model.n_embd=1600", "--set", "model.n_head=25",
           "--set", "model.block_size=1024", "--set", "data.vocab_size=50257", "--set", "train.micro_batch_size=16"]
    assert main(["recipes", "check", "demo", "--gpu", "a100-40gb", "--strict", *big]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "zero3 offload optimizer+params" in out
    assert main(["recipes", "check", "demo", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["configured_fits"] and report["params"] > 0 and report["flops_per_token"] > 0
    assert main(["recipes", "check", "demo", "--gpu", "a100"]) == 2
    assert "did you mean 'a100-80gb'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- slow: 2 processes


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "zero1", "zero2", "zero3", "zero3_chunked"])
def test_two_processes_match_one_process(runs, name):
    """Same global batch (2 x micro 4 vs 1 x micro 4 x accum 2): same loss curve within TOL."""
    assert_curves_close(runs.get("single"), runs.get(name), range(1, STEPS + 1))
    assert_curves_close(runs.get("single"), runs.get(name), (4, 8), key="val/loss")


@pytest.mark.slow
def test_zero3_partitions_parameter_and_optimizer_state(runs):
    """Each of 2 ranks holds half of the fp32 weights + Adam moments of the 1-process run."""
    from wbscale.ckpt.elastic import optimizer_param_names

    run = runs.get("zero3")
    ckpt = read_checkpoint(run)
    recipe = load_recipe("demo", tiny(runs.tmp, "x"))
    from wbscale.train.fit import resolve_vocab

    recipe = resolve_vocab(recipe, runs.tmp / "data")
    with torch.device("meta"):
        from wbscale.models import build_model

        params = sum(dict((id(p), p.numel()) for p in build_model(recipe.model).parameters()).values())
    assert len(optimizer_param_names(recipe)[0]) > 0
    full_bytes = 3 * 4 * params  # fp32 master weights, exp_avg, exp_avg_sq

    def tensor_bytes(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size() if obj.dim() else 0  # 0-d: the step counter
        if isinstance(obj, dict):
            return sum(tensor_bytes(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(tensor_bytes(v) for v in obj)
        return 0

    shards = sorted((ckpt.model_path / "checkpoint").glob("*optim_states.pt"))
    assert len(shards) == 2, shards
    per_rank = [tensor_bytes(torch.load(s, map_location="cpu", weights_only=False)["optimizer_state_dict"]) for s in shards]
    for rank, held in enumerate(per_rank):
        assert held == pytest.approx(full_bytes / 2, rel=0.02), (
            f"rank {rank} holds {held} bytes of optimizer state; 1 process holds {full_bytes}"
        )


@pytest.mark.slow
def test_interrupted_zero3_run_resumes_exactly(runs):
    """2 processes, ZeRO-3, dropout on: stopped at step 4 and resumed = uninterrupted, bitwise."""
    full, parts = runs.get("zero3_dropout"), runs.get("zero3_resumed")
    assert read_checkpoint(parts).meta["recipe"]["model"]["dropout"] == DROPOUT["model.dropout"]
    a, b = losses(full), losses(parts)
    for step in range(1, STEPS + 1):
        assert a[step]["train/loss"] == b[step]["train/loss"], (
            f"step {step}: uninterrupted {a[step]['train/loss']!r} vs resumed {b[step]['train/loss']!r}"
        )
    assert a[8]["val/loss"] == b[8]["val/loss"]


def _moments_close(a_path: Path, b_path: Path, tol: float = 1e-5) -> None:
    from wbscale.ckpt.elastic import full_training_state

    a, b = full_training_state(a_path), full_training_state(b_path)
    assert a["moments"].keys() == b["moments"].keys()
    for name in a["moments"]:
        for key in ("exp_avg", "exp_avg_sq"):
            x, y = a["moments"][name][key], b["moments"][name][key]
            scale = float(x.abs().max()) or 1.0
            diff = float((x - y).abs().max()) / scale
            assert diff <= tol, f"{name} {key}: relative difference {diff:.3g} after the topology change"
        assert torch.allclose(a["weights"][name], b["weights"][name], atol=1e-5), name


@pytest.mark.slow
def test_world_size_and_stage_change_resume_with_optimizer_state(runs):
    """ZeRO-3 x 2 -> ZeRO-2 x 1 (step 2), then ZeRO-2 x 1 -> ZeRO-2 x 2 (step 4)."""
    ref = runs.get("zero3")
    one, two = runs.get("to_one"), runs.get("to_two")
    assert (one / "checkpoints" / "step-00000002" / "universal").is_dir(), "no universal conversion happened"
    assert_curves_close(ref, one, range(3, STEPS + 1))
    assert_curves_close(ref, two, range(5, STEPS + 1))
    assert_curves_close(ref, two, (8,), key="val/loss")
    meta = read_checkpoint(one / "checkpoints" / "step-00000004").meta
    assert (meta["world_size"], meta["zero_stage"]) == (1, 2)
    # Adam's moments continue: had they been reset, they would differ by O(1) relative
    _moments_close(ref / "checkpoints" / "step-00000004", one / "checkpoints" / "step-00000004")
    _moments_close(ref / "checkpoints" / "step-00000008", two / "checkpoints" / "step-00000008")


@pytest.mark.slow
def test_deepspeed_checkpoint_resumes_on_a_single_device(runs):
    """Sharded ZeRO-3 x 2 at step 4 -> one process without DeepSpeed (full.ckpt)."""
    from wbscale.train.fit import fit

    runs.get("zero3")
    fork_run(runs.tmp, "zero3", "to-single", 4)
    result = fit(load_recipe("demo", tiny(runs.tmp, "to-single")), progress=False)
    assert (result.run_dir / "checkpoints" / "step-00000004" / "full.ckpt").is_file()
    assert_curves_close(runs.get("zero3"), result.run_dir, range(5, STEPS + 1))


@pytest.mark.slow
def test_consolidated_checkpoint_evaluates_like_the_live_model(runs, capsys, tmp_path):
    from wbscale.cli import main

    run = runs.get("zero3")
    out = tmp_path / "export"
    assert main(["ckpt", "consolidate", str(run), "--out", str(out)]) == 0
    capsys.readouterr()
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "recipe.yaml", "tokenizer.json"}
    assert main(["eval", "--ckpt", str(out), "--batches", "2", "--batch-size", "4"]) == 0
    evaluated = json.loads(capsys.readouterr().out)["loss"]
    live = losses(run)[STEPS]["val/loss"]
    assert evaluated == pytest.approx(live, abs=1e-5), f"consolidated {evaluated} vs live {live}"
    assert main(["ckpt", "consolidate", str(run), "--out", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert main(["generate", "--ckpt", str(tmp_path / "bf16"), "--max-new-tokens", "3"]) == 0


@pytest.mark.slow
def test_damaged_shard_is_named_and_auto_resume_falls_back(runs, tmp_path, capsys):
    from wbscale.ckpt.format import inspect_checkpoint, verify_checkpoint
    from wbscale.train.fit import resolve_resume

    runs.get("zero3")
    run = tmp_path / "damaged"
    shutil.copytree(runs.tmp / "runs" / "zero3", run)
    newest = read_checkpoint(run)
    assert newest.step == STEPS
    report = inspect_checkpoint(newest.path)
    assert report["ok"] and report["sharded"] and report["zero_stage"] == 3 and report["world_size"] == 2
    shard = newest.model_path / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, as by a full disk
    with pytest.raises(UserError, match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt: 100 bytes, expected"):
        verify_checkpoint(newest)
    assert not inspect_checkpoint(newest.path)["ok"]
    fallback = resolve_resume(run, "auto")
    assert fallback.step == STEPS - 2
    assert "skipping damaged checkpoint" in capsys.readouterr().err
    shard.unlink()
    with pytest.raises(UserError, match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt: missing"):
        resolve_resume(run, str(newest.path))
    steps = [c.step for c in list_checkpoints(run)]
    assert steps == [2, 4, 6, 8]


@pytest.mark.slow
def test_bench_train_writes_a_report(runs, tmp_path, capsys):
    from wbscale.cli import main

    runs.get("single")  # data prepared
    out = tmp_path / "bench"
    args = ["bench", "train", "demo", "--steps", "4", "--warmup", "1", "--out", str(out)]
    for item in tiny(runs.tmp, "bench", **{"train.grad_accum": 1}):
        args += ["--set", item]
    assert main(args) == 0
    (report_path,) = out.glob("train-*.json")
    report = json.loads(report_path.read_text())
    assert report["tokens_per_second"] > 0 and report["world_size"] == 1
    assert report["peak_memory_bytes"][0] > 0 and report["mfu"] is None  # CPU: no MFU


# ---------------------------------------------------------------------------- a hung rank


@pytest.mark.parametrize("message", [
    "Application timeout caused pair closure",  # gloo, the peer of a SIGSTOP'd rank
    "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 10000ms for recv operation to complete",
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500",
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Read error [127.0.0.1]:29500: Connection reset by peer",
    "[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5, OpType=ALLREDUCE, NumelIn=1, "
    "NumelOut=1, Timeout(ms)=600000) ran for 600012 milliseconds before timing out.",
    "NCCL communicator was aborted on rank 1.",
    "NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network error, NCCL version 2.21.5",
    "ncclRemoteError: A call failed possibly due to a network error or a remote process exiting prematurely.",
    "Socket Timeout",
])
def test_collective_failures_are_recognised(message):
    from wbscale.train.fit import _is_collective_failure

    assert _is_collective_failure(RuntimeError(message))
    try:  # wrapped by whatever re-raised it
        try:
            raise RuntimeError(message)
        except RuntimeError as inner:
            raise ValueError("while logging") from inner
    except ValueError as outer:
        assert _is_collective_failure(outer)
    assert _is_collective_failure(torch.distributed.DistBackendError("anything"))


@pytest.mark.parametrize("err", [
    RuntimeError("DataLoader timed out after 5 seconds"),
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x32 and 64x32)"),
    UserError("no space left on the disk writing checkpoint x"),
    ValueError("Timed out waiting 10000ms for recv operation to complete"),  # not a RuntimeError
])
def test_other_errors_are_not_collective_failures(err):
    from wbscale.train.fit import _is_collective_failure

    assert not _is_collective_failure(err)


def _proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, exit status as waitpid reports it: set for a zombie) or None if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[49]) if len(fields) > 49 else -1


def _gone(pid: int) -> bool:
    state = _proc_state(pid)
    return state is None or state[0] in "ZX"


def _wait_until(condition, timeout: float, what: str) -> float:
    import time

    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what} after {timeout} s"
        time.sleep(0.1)
    return time.monotonic() - start


TIMEOUT_S = 10  # the smallest distributed.timeout_s allowed


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
@pytest.mark.parametrize("stopped", [0, 1])
def test_a_stopped_rank_makes_the_other_exit_with_one_line(runs, stopped):
    """SIGSTOP one rank of a 2-process DDP run: within distributed.timeout_s the other rank
    exits non-zero with one line (no traceback) naming the timeout; no process is left."""
    import signal

    run = f"stopped-rank-{stopped}"
    cmd = [sys.executable, "-m", "wbscale.cli", "fit", "--recipe", "demo", "--no-progress"]
    values = {"distributed.strategy": "ddp", **TWO, "distributed.timeout_s": TIMEOUT_S, "train.max_steps": 100000,
              "train.ckpt_every": 100000, "train.val_every": 100000, "train.sample_max_new_tokens": 0, "train.log_every": 1}
    for item in tiny(runs.tmp, run, **values):
        cmd += ["--set", item]
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    log_path = runs.tmp / f"{run}.log"
    metrics = runs.tmp / "runs" / run / "metrics.jsonl"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ranks = {0: proc.pid}
    try:
        def training() -> bool:
            assert proc.poll() is None, f"fit ended before training:\n{log_path.read_text()[-3000:]}"
            return metrics.is_file() and metrics.read_text().count("train/loss") >= 3

        _wait_until(training, 240, "no training step")
        for child in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
            with open(f"/proc/{child}/environ", "rb") as f:
                if b"\0LOCAL_RANK=1\0" in b"\0" + f.read():
                    ranks[1] = int(child)
        assert 1 in ranks, "rank 1 (launched by rank 0) not found"
        survivor = 1 - stopped
        os.kill(ranks[stopped], signal.SIGSTOP)
        took = _wait_until(lambda: _gone(ranks[survivor]), TIMEOUT_S + 60, f"rank {survivor} still running")
        assert took < TIMEOUT_S + 30, f"rank {survivor} took {took:.0f} s to give up on the stopped rank"
        if survivor == 0:
            code = proc.wait(30)
        else:  # a zombie until its (stopped) parent reaps it: the exit status is in /proc
            state = _proc_state(ranks[1])
            code = state[1] >> 8 if state is not None and state[0] == "Z" else None
        assert code not in (0, None), f"rank {survivor} exit status {code}"
    finally:
        for pid in ranks.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        try:
            proc.wait(60)  # rank 0 stopped: it continues, finds rank 1 gone and is ended by its launcher
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"rank 0 did not end after SIGCONT:\n{log_path.read_text()[-3000:]}") from None
    assert proc.returncode != 0
    for rank, pid in ranks.items():
        _wait_until(lambda pid=pid: _gone(pid), 15, f"rank {rank} (pid {pid}) left running")
    out = log_path.read_text()
    lines = [line for line in out.splitlines() if "a collective failed" in line]
    assert len(lines) == 1 and "Traceback" not in out, out[-4000:]
    assert lines[0].startswith(f"[wbscale] rank {survivor}: a collective failed at step"), lines[0]
    assert f"no answer within distributed.timeout_s={TIMEOUT_S} s" in lines[0] and "resume with --resume auto" in lines[0]
