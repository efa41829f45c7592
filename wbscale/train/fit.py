"""``wbscale fit``: prepare data if needed, build trainer + callbacks, train, resume.

This is the engineering side of a run (the research side is :mod:`.module`): it decides
what to resume from, checks that the checkpoint belongs to this model and tokenizer,
wires loggers and callbacks, and writes the run folder::

    runs/<run>/recipe.yaml  checkpoints/  metrics.jsonl  samples.jsonl  plots/  wandb/
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pickle
import re
import signal
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

from wbscale.ckpt.elastic import AccumulationChange, plan_resume
from wbscale.ckpt.format import (
    CheckpointInfo,
    latest_checkpoint,
    latest_intact_checkpoint,
    mark_verified_for_children,
    read_checkpoint,
    step_folders,
    verify_checkpoint,
)
from wbscale.ckpt.rng import StepRNG
from wbscale.ckpt.writer import AtomicCheckpoint
from wbscale.config import Recipe, recipe_from_dict, save_recipe
from wbscale.data.manifest import MANIFEST_FILE, load_manifest
from wbscale.data.prepare import prepare
from wbscale.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from wbscale.errors import UserError
from wbscale.io import atomic_write_bytes, atomic_write_json
from wbscale.locks import RUN_LOCK_FILE
from wbscale.ranks import is_rank_zero, say, wait_for_rank_zero
from wbscale.sizing import padded_vocab
from wbscale.slurm.preemption import cluster_plugins
from wbscale.slurm.record import job_id_from_env
from wbscale.train.datamodule import TokenDataModule
from wbscale.train.module import LMModule
from wbscale.train.parallel import parallelize
from wbscale.train.trainer import (
    accelerator_for,
    build_trainer,
    check_kernels,
    precision_for,
    quiet_lightning,
)


@dataclass
class FitResult:
    """What a call to :func:`fit` did."""

    run_dir: Path
    step: int
    resumed_from: int | None
    already_complete: bool = False


def resolve_vocab(recipe: Recipe, data_dir: Path) -> Recipe:
    """Fill ``model.vocab_size`` from the tokenizer (rounded up to a multiple of 64)."""
    manifest = load_manifest(data_dir, verify=False)
    vocab = int(manifest["vocab_size"])
    if recipe.model.vocab_size == 0:
        return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, vocab_size=padded_vocab(vocab)))
    if recipe.model.vocab_size < vocab:
        raise UserError(
            f"model.vocab_size ({recipe.model.vocab_size}) is smaller than the tokenizer's "
            f"vocabulary ({vocab}); set model.vocab_size: 0 to take it from the tokenizer"
        )
    return recipe


def ensure_data(recipe: Recipe, progress: bool = True) -> Path:
    """Prepare the recipe's token shards unless they are already there and intact."""
    data_dir = Path(recipe.data.out_dir)
    if is_rank_zero():
        prepare(recipe.data, progress=progress, wait=True)  # runs of a sweep share the folder
    else:  # torchrun/srun start every rank at once: let rank 0 finish preparing first
        wait_for_rank_zero(data_dir / MANIFEST_FILE, "data preparation")
    load_manifest(data_dir, verify=True)
    return data_dir


def resolve_resume(run_dir: Path, resume: str) -> CheckpointInfo | None:
    """``auto``: newest intact checkpoint if any; ``never``: refuse a run folder with
    checkpoints; a path: that checkpoint, verified (a damaged one is an error naming the file)."""
    if resume == "auto":
        # a damaged newest checkpoint (missing/truncated/corrupt file, unreadable metadata,
        # a stale `last`) falls back to the one before, with a warning naming the file
        return latest_intact_checkpoint(run_dir, warn=say)
    if resume == "never":
        existing = latest_checkpoint(run_dir)
        folders = step_folders(run_dir)
        if existing is not None or folders:
            newest = f"step {existing.step}" if existing is not None else f"{folders[-1].name}, unreadable"
            raise UserError(
                f"{run_dir} already has checkpoints (newest: {newest}); "
                "pass --resume auto to continue it, or choose another train.run_name"
            )
        return None
    if not Path(resume).exists():
        raise UserError(f"--resume {resume}: no such checkpoint (pass auto, never, or a checkpoint folder)")
    info = read_checkpoint(Path(resume))
    verify_checkpoint(info)  # an explicit path: name the damaged file, no silent fallback
    return info


_INCARNATION = re.compile(r"SLURM job (\S+) restart (\d+)")


def _slurm_incarnation() -> tuple[str, int] | None:
    job = job_id_from_env()
    if job is None:
        return None
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0").strip()
    return job, int(restarts) if restarts.isdigit() else 0


def lock_run(run_dir: Path):
    """The run folder's writer lock (global rank 0 only): one ``fit`` per run at a time.

    A second writer is refused (UserError, exit 2) naming the holder (pid, host, since
    when); the lock of a dead holder is taken over (:mod:`wbscale.locks`: pid check on the
    same host, heartbeat age across SLURM nodes). A requeued SLURM job takes over the lock
    of its own previous incarnation (same job id, lower restart count) at once.
    """
    from wbscale.locks import LockHeld, acquire

    path = Path(run_dir) / RUN_LOCK_FILE
    mine = _slurm_incarnation()
    purpose = "wbscale fit" + (f", SLURM job {mine[0]} restart {mine[1]}" if mine else "")
    try:
        return acquire(path, purpose)
    except LockHeld as err:
        found = _INCARNATION.search(err.holder.purpose or "")
        if mine is None or found is None or found.group(1) != mine[0] or int(found.group(2)) >= mine[1]:
            raise UserError(f"run '{Path(run_dir).name}' is being trained by another process: {err}") from None
        say(
            f"taking over the run lock of job {mine[0]}'s previous incarnation (restart {found.group(2)}; "
            f"this is restart {mine[1]}: the job was requeued)"
        )
        path.unlink(missing_ok=True)
        return acquire(path, purpose)


def check_compatible(recipe: Recipe, ckpt: CheckpointInfo, tokenizer_sha: str) -> None:
    """Refuse a checkpoint of another model shape or tokenizer, naming what differs."""
    saved = recipe_from_dict(ckpt.meta["recipe"])
    mine, theirs = dataclasses.asdict(recipe.model), dataclasses.asdict(saved.model)
    runtime_only = {"ista_kernel", "ista_save_activations", "dropout"}  # may change between runs without changing the weights
    diffs = [
        f"model.{k}: checkpoint {theirs[k]!r} vs recipe {mine[k]!r}"
        for k in mine
        if k not in runtime_only and mine[k] != theirs[k]
    ]
    if diffs:
        raise UserError(
            f"checkpoint {ckpt.path} was trained with another model config ("
            + "; ".join(diffs)
            + "); resume it with its own recipe (runs/<run>/recipe.yaml) or start a new run name"
        )
    if ckpt.meta.get("tokenizer_sha256") not in (None, tokenizer_sha):
        raise UserError(
            f"checkpoint {ckpt.path} was trained with another tokenizer "
            f"(sha256 {ckpt.meta['tokenizer_sha256'][:12]}… vs {tokenizer_sha[:12]}… in "
            f"{recipe.data.out_dir}); point data.out_dir at the data it was trained on"
        )


def build_callbacks(recipe: Recipe, run_dir: Path, data_dir: Path, meta: dict[str, Any], progress: bool) -> list[L.Callback]:
    """Checkpointing, SLURM preemption, white-box metrics, samples, plots, progress bar."""
    from wbscale.data.loader import val_batches
    from wbscale.slurm.preemption import SlurmPreemption
    from wbscale.track.callbacks import Plots, SampleGeneration, WhiteBoxMetrics
    from wbscale.track.step_metrics import StepMetrics

    t = recipe.train
    # First: every step draws its random numbers from (seed, step, rank); resume is exact.
    callbacks: list[L.Callback] = [StepRNG(t.seed)]
    if recipe.tracking.metrics_every > 0:
        # A fixed held-out batch so metrics are comparable step to step.
        x, _ = val_batches(data_dir, recipe.model.block_size, t.micro_batch_size, 1)[0]
        callbacks.append(WhiteBoxMetrics(x, every=recipe.tracking.metrics_every))
    if t.sample_prompts and t.sample_max_new_tokens > 0:
        callbacks.append(
            SampleGeneration(
                load_tokenizer(data_dir),
                prompts=t.sample_prompts,
                max_new_tokens=t.sample_max_new_tokens,
                temperature=t.sample_temperature,
                top_k=t.sample_top_k,
                top_p=t.sample_top_p,
                every=t.sample_every,
                out_path=run_dir / "samples.jsonl",
            )
        )
    if recipe.bimt.enabled:  # wbscale.bimt: cost gradient, swaps, metrics, pruned export
        from wbscale.bimt.callback import bimt_callback

        callbacks.append(bimt_callback(recipe, run_dir, data_dir))
    callbacks.append(Plots(run_dir, data_dir=data_dir))
    if progress:  # a terminal: a bar over optimizer steps (otherwise plain lines: build_loggers)
        from wbscale.track.progress import StepProgressBar

        callbacks.append(StepProgressBar())
    # Elastic resume bookkeeping; then the train/* row, after every callback that changes
    # gradients (BIMT) so the logged norm includes them.
    callbacks += [AccumulationChange(), StepMetrics(t.log_every, t.max_steps)]
    # Last: the checkpoint of a step is written after every other callback's end-of-step
    # hook and published once the step's metric rows are on disk (exactly-once metrics).
    callbacks.append(
        AtomicCheckpoint(
            run_dir, every=t.ckpt_every, keep_last=t.keep_last, meta_fn=lambda: meta, exit_interval=t.exit_interval
        )
    )
    # After AtomicCheckpoint, which it saves through: SIGTERM / SIGINT (anywhere) and the
    # SLURM requeue signal (unless slurm.preemption is off) stop at a step boundary with a checkpoint.
    callbacks.append(
        SlurmPreemption(
            run_dir, signal_name=recipe.slurm.signal, requeue=recipe.slurm.requeue,
            requeue_signal=recipe.slurm.preemption != "off",
        )
    )
    from wbscale.runs.recorder import RunRecorder

    callbacks.append(RunRecorder(recipe, run_dir))  # last: records start, progress and exit reason (wbscale runs)
    return callbacks


def build_loggers(recipe: Recipe, run_dir: Path, ckpt: CheckpointInfo | None, progress: bool = False) -> list:
    from wbscale.track.jsonl_logger import JSONLLogger
    from wbscale.track.wandb_run import make_wandb_logger

    # On resume, metrics logged after the checkpoint (by the interrupted process) are dropped;
    # a fresh run starts a fresh file. The wandb id comes from the checkpoint when known.
    loggers: list = [JSONLLogger(run_dir / "metrics.jsonl", resume_step=ckpt.step if ckpt else None)]
    wandb_logger = make_wandb_logger(recipe, run_dir, run_id=ckpt.meta.get("wandb_id") if ckpt else None)
    if wandb_logger is not None:
        loggers.append(wandb_logger)
    if not progress:  # no terminal (SLURM log, nohup, CI): one plain line per logged step
        from wbscale.track.progress import ProgressLines

        loggers.append(ProgressLines(recipe.train.max_steps))
    return loggers


def fit(recipe: Recipe, resume: str = "auto", progress: bool | None = None) -> FitResult:
    """Train (or resume) the run a recipe describes; returns where it ended."""
    quiet_lightning()
    accelerator = accelerator_for(recipe)  # before anything is written: a missing GPU is bad input
    check_kernels(recipe, accelerator)
    if progress is None:
        progress = sys.stderr.isatty()
    run_dir = recipe.run_dir
    for folder, key in ((Path(recipe.train.runs_dir), "train.runs_dir"), (run_dir, "train.run_name")):
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{key}: {folder} is a file, not a folder; point {key} somewhere else")
    data_dir = ensure_data(recipe, progress=True)  # a bar on a terminal, plain lines otherwise
    recipe = resolve_vocab(recipe, data_dir)
    manifest = load_manifest(data_dir, verify=False)
    tokenizer_sha = manifest["tokenizer_sha256"]

    ckpt = resolve_resume(run_dir, resume)
    if ckpt is not None:
        check_compatible(recipe, ckpt, tokenizer_sha)
        if ckpt.step >= recipe.train.max_steps:
            say(
                f"run '{recipe.train.run_name}' is complete: checkpoint at step {ckpt.step} of "
                f"{recipe.train.max_steps} ({ckpt.path}). Raise train.max_steps to train further, "
                "or choose another train.run_name."
            )
            return FitResult(run_dir, ckpt.step, ckpt.step, already_complete=True)
        say(f"resuming '{recipe.train.run_name}' from step {ckpt.step} ({ckpt.path})")
        if is_rank_zero():
            mark_verified_for_children(ckpt)  # the ranks Lightning launches need not hash it again

    # One writer per run folder: global rank 0 holds the lock until fit returns or exits.
    with lock_run(run_dir) if is_rank_zero() else contextlib.nullcontext():
        return _fit_locked(recipe, run_dir, data_dir, tokenizer_sha, ckpt, progress, accelerator)


def _fit_locked(
    recipe: Recipe, run_dir: Path, data_dir: Path, tokenizer_sha: str, ckpt: CheckpointInfo | None,
    progress: bool, accelerator: str,
) -> FitResult:
    if is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
        # the run carries its tokenizer: generate / export work on a copied or moved run folder
        atomic_write_bytes(run_dir / TOKENIZER_FILE, (data_dir / TOKENIZER_FILE).read_bytes())

    from wbscale.track.wandb_run import wandb_run_id

    L.seed_everything(recipe.train.seed, workers=True, verbose=False)
    plan = plan_resume(recipe, ckpt)  # converts a checkpoint of another topology first
    loggers = build_loggers(recipe, run_dir, ckpt, progress=progress)
    meta = {
        "recipe": recipe.to_dict(),
        "tokenizer_sha256": tokenizer_sha,
        "wandb_id": wandb_run_id(run_dir),
        "data_dir": str(data_dir.resolve()),  # absolute: the run folder may move, commands run anywhere
    }
    module = LMModule(recipe, extra_state={"tokenizer_sha256": tokenizer_sha, "wandb_id": meta["wandb_id"]})
    if ckpt is None and recipe.bimt.init_from:
        # a fresh run starts from given weights; a resumed one takes them from its checkpoint
        load_initial_weights(module.model, recipe.bimt.init_from)
    precision = precision_for(recipe, accelerator)
    strategy = parallelize(module.model, recipe, accelerator, precision, load_universal=plan.load_universal)
    trainer = build_trainer(
        recipe,
        accelerator=accelerator,
        precision=precision,
        strategy=strategy,
        callbacks=build_callbacks(recipe, run_dir, data_dir, meta, progress),
        loggers=loggers,
        root_dir=run_dir,
        progress=progress,
        plugins=cluster_plugins(),  # under srun: SLURM's environment, Lightning's auto-requeue off
    )
    # Our own checkpoints carry RNG states (numpy, python) that weights_only loading refuses.
    try:
        trainer.fit(
            module, datamodule=TokenDataModule(recipe, data_dir), ckpt_path=plan.ckpt_path, weights_only=False
        )
    except Exception as err:
        # A checkpoint without checksums (older wbscale) whose content is damaged: name it.
        if ckpt is not None and trainer.global_step == 0 and _is_load_error(err):
            raise UserError(
                f"checkpoint {ckpt.path} could not be loaded ({type(err).__name__}: {str(err)[:200]}); "
                f"resume from an earlier one (--resume {ckpt.path.parent}/step-…) or delete it and use --resume auto"
            ) from None
        if trainer.world_size > 1 and _is_collective_failure(err):
            _leave_after_rank_failure(trainer, recipe, err)
        raise
    if trainer.is_global_zero:
        write_summary(trainer, run_dir, data_dir)
    from wbscale.track.wandb_run import finish_wandb

    for logger in loggers:
        finish_wandb(logger)  # the wandb logger, when there is one; others are left alone
    return FitResult(run_dir, trainer.global_step, ckpt.step if ckpt else None)


# What gloo, NCCL and the rendezvous store say when a peer rank hung (SIGSTOP, a deadlock,
# a stalled node) or died: gloo "Timed out waiting 10000ms for recv operation to complete",
# "Application timeout caused pair closure", "Connection closed by peer [10.0.0.2]:1234",
# "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error …"; NCCL "Watchdog caught
# collective operation timeout: WorkNCCL(SeqNum=5, OpType=ALLREDUCE, …) ran for 600012
# milliseconds before timing out", "NCCL communicator was aborted on rank 1", "ncclRemoteError:
# … remote process exited or there was a network error"; the store "Socket Timeout".
_COLLECTIVE_FAILURE = re.compile(
    r"timed out waiting \d+ ?ms|timeout caused pair closure|connection (closed|reset|refused) by peer|"
    r"connection refused|broken pipe|gloo/transport|\bgloo\b.*(timeout|timed out|closed|read error|write error)|"
    r"watchdog caught collective operation timeout|before timing out|communicator was aborted|"
    r"nccl(remote|system|internal)error|nccl error|remote process exited|some nccl operations have failed|"
    r"socket timeout|dist(backend|network|store)error",
    re.IGNORECASE,
)


def _is_collective_failure(err: BaseException) -> bool:
    """A collective (or the rendezvous store) that timed out (a hung rank) or lost its peer
    (a dead rank); looks through the exception's causes too."""
    try:
        from torch.distributed import DistError
    except ImportError:  # pragma: no cover - a torch without distributed
        DistError = ()  # noqa: N806
    if isinstance(err, UserError):
        return False  # already one clear line (e.g. a full disk found while a peer also failed)
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, DistError) or (
            isinstance(err, RuntimeError) and _COLLECTIVE_FAILURE.search(str(err))
        ):
            return True
        err, seen = err.__cause__ or (None if err.__suppress_context__ else err.__context__), seen + 1
    return False


def _leave_after_rank_failure(trainer: L.Trainer, recipe: Recipe, err: BaseException) -> None:
    """One line instead of a traceback, the ranks this process launched stopped, exit 1."""
    from wbscale.ranks import say_always

    launcher = getattr(trainer.strategy, "launcher", None)
    if launcher is not None and hasattr(launcher, "kill"):  # Lightning's launcher: no orphaned ranks
        launcher.kill(signal.SIGKILL)
    first = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
    say_always(
        f"rank {trainer.global_rank}: a collective failed at step {trainer.global_step + 1}: another rank hung "
        f"or died (no answer within distributed.timeout_s={recipe.distributed.timeout_s} s, or its connection "
        f"closed: {first}); see that rank's log. The last checkpoint is intact: resume with --resume auto"
    )
    raise SystemExit(1) from None


def _is_load_error(err: BaseException) -> bool:
    """What torch.load raises on a damaged file (zip directory, pickle stream, truncation)."""
    if isinstance(err, (UnicodeDecodeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile)):
        return True
    return isinstance(err, RuntimeError) and any(
        s in str(err) for s in ("PytorchStreamReader", "zip archive", "central directory", "invalid header")
    )


def write_summary(trainer: L.Trainer, run_dir: Path, data_dir: Path) -> dict[str, Any]:
    """Final val loss next to the data's unigram entropy (the no-context baseline)."""
    from wbscale.data.loader import unigram_entropy

    val = trainer.callback_metrics.get("val_loss")
    summary = {
        "step": trainer.global_step,
        "val_loss": float(val) if val is not None else None,
        "unigram_entropy": unigram_entropy(data_dir, "train"),
    }
    atomic_write_json(run_dir / "summary.json", summary)
    if summary["val_loss"] is not None:
        say(
            f"step {summary['step']}: val loss {summary['val_loss']:.3f} nats/token "
            f"(perplexity {math.exp(summary['val_loss']):.1f}); unigram entropy of the "
            f"training data {summary['unigram_entropy']:.3f} nats/token"
        )
    return summary


def load_initial_weights(model: nn.Module, source: str | Path) -> None:
    """Start a fresh run from another run's (or an export folder's) weights, shapes checked."""
    from wbscale.ckpt.load import load_for_inference
    from wbscale.models.base import load_checked

    loaded, _, _ = load_for_inference(source)
    load_checked(model, loaded.state_dict(), str(source))
    say(f"initial weights from {source}")


def recipe_for_resume(ckpt_path: Path, overrides: list[str]) -> Recipe:
    """The resolved recipe stored in a checkpoint, plus ``--set`` overrides."""
    info = read_checkpoint(ckpt_path)
    return recipe_from_dict(info.meta["recipe"], overrides)
