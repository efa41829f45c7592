"""The atomic checkpoint writer: a Lightning callback that saves every N steps and at the end.

A save has two phases:

1. **write** (at the end of the step, every rank): DeepSpeed shards / the Lightning file and
   each rank's RNG state go into ``.tmp-step-…``; each rank hashes (sha256) and fsyncs the
   files it wrote (its RNG file is hashed while it is written); rank 0 gathers the sizes
   and checksums into ``meta.json`` (which carries a checksum of itself) and fsyncs.
2. **publish** (rank 0, once every metric row of that step is on disk: at the start of the
   next step, at the end of training, or before a signal stop): the metric loggers are
   flushed and fsynced, the folder is renamed into place, ``last`` is replaced atomically,
   old checkpoints are pruned.

So a published checkpoint of step s always has every metric row of step s already in
``metrics.jsonl``: a resume from it (which drops rows after s) logs each step exactly once.
A kill between the two phases leaves only a ``.tmp-step-…`` folder; resume takes the
previous checkpoint. (:mod:`wbscale.ckpt.format` describes the layout.)

Pruning (``keep_last``) renames a folder to ``.trash-…`` before deleting it, so a kill
mid-delete never leaves a half-deleted ``step-…`` folder; leftovers (``.trash-*``,
``.tmp-step-*``, ``.*.tmp-<pid>`` files) are removed when a run (re)starts.

A full disk (ENOSPC) or quota (EDQUOT) while writing is one error line (exit 2) naming the
folder, the space a checkpoint needs (the previous one's size, or for the first one an
estimate from the parameter count) and the space left; the partial folder is removed and
``last`` still names the previous checkpoint. torch's and DeepSpeed's writers lose the
errno ("unexpected pos …", "basic_ios::clear: iostream error"): a 1 MiB probe write in the
temp folder decides whether the disk is full.

Fault injection (tests): ``WBSCALE_FAULT=<point>[@<step>]`` kills the process (SIGKILL)
at that point of the writer; :data:`FAULT_POINTS` lists them. ``WBSCALE_FAULT=disk-full@<step>``
makes that step's write fail as on a full disk.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from wbscale.ckpt.format import (
    LAST_FILE,
    META_FILE,
    META_SHA_KEY,
    MODEL_FILE,
    RNG_DIR,
    SHA_KEY,
    SIZES_KEY,
    STEP_DIR,
    checkpoints_dir,
    hash_files,
    latest_checkpoint,
    list_checkpoints,
    meta_digest,
    step_dir_name,
)
from wbscale.ckpt.rng import load_rank_rng, save_rank_rng
from wbscale.dist import zero_stage_of
from wbscale.errors import UserError
from wbscale.io import atomic_write_json, atomic_write_text, fsync_dir, fsync_file

FAULT_ENV = "WBSCALE_FAULT"
FAULT_POINTS = (
    "after-tmp-mkdir",  # write: the temp folder exists, nothing in it
    "after-model-write",  # write: model.ckpt (or the shards) written, no RNG state yet
    "after-rng-write",  # write: RNG state written, nothing hashed
    "after-hash",  # write: every file hashed, meta.json not written
    "after-meta-write",  # write: meta.json written, not fsynced
    "before-publish",  # publish: metrics fsynced, folder still .tmp-step-…
    "after-rename",  # publish: step-… in place, `last` still names the previous one
    "after-last",  # publish: `last` replaced, old checkpoints not pruned
    "mid-prune",  # prune: an old checkpoint renamed to .trash-…, not deleted
)
_OWNED_BY_RANK = (re.compile(r"zero_pp_rank_(\d+)_"), re.compile(r"^rng/rank-(\d+)\.pt$"))
_STALE_FILE = re.compile(r"^\..+\.tmp-\d+$")  # io.atomic_write_*'s temp names


def fault(point: str, step: int) -> None:
    """Kill this process (SIGKILL, no cleanup) if ``WBSCALE_FAULT`` names ``point``."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, at = spec.partition("@")
    if name == point and (not at or int(at) == step):
        os.kill(os.getpid(), signal.SIGKILL)


def _owner(rel: str) -> int:
    """The global rank that writes a checkpoint file (ZeRO shards and RNG files are per rank)."""
    for pattern in _OWNED_BY_RANK:
        found = pattern.search(rel)
        if found:
            return int(found.group(1))
    return 0


def trash(folder: Path, step: int = -1) -> None:
    """Delete a folder so that a kill midway leaves a ``.trash-…`` name, never a half ``step-…``."""
    if not folder.exists():
        return
    target = folder.with_name(f".trash-{folder.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(folder, target)
    fsync_dir(folder.parent)
    fault("mid-prune", step)
    shutil.rmtree(target, ignore_errors=True)


def clean_stale(run_dir: Path) -> list[str]:
    """Remove what crashed processes left behind: half-pruned ``.trash-*`` and unpublished
    ``.tmp-step-*`` checkpoint folders, and ``.<name>.tmp-<pid>`` files of atomic writes.

    Only the run's single writer (global rank 0, holding the run lock) calls this.
    """
    removed = []
    root = checkpoints_dir(run_dir)
    for folder in (root, Path(run_dir)):
        if not folder.is_dir():
            continue
        for child in list(folder.iterdir()):
            if child.name.startswith((".trash-", ".tmp-step-")) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            elif _STALE_FILE.match(child.name) and child.is_file():
                child.unlink(missing_ok=True)
            else:
                continue
            removed.append(child.name)
    return removed


_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_PROBE_BYTES = 1 << 20
# What torch / DeepSpeed raise when a write fails on a full disk, the errno lost on the way
# (torch.save's C++ stream writer): "file write failed", "unexpected pos 66176 vs 66064",
# "basic_ios::clear: iostream error". Not matched on text alone: a probe write decides.
_LOST_ERRNO_WRITE = ("write failed", "unexpected pos", "iostream error", "PytorchStreamWriter", "inline_container")


def _probe_space(folder: Path) -> int | None:
    """Write (and fsync) a 1 MiB file in ``folder``: the errno if that fails with
    ENOSPC / EDQUOT, else None. The probe file is removed either way."""
    if not folder.is_dir():
        return None
    probe = folder / f".space-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * _PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())  # some filesystems (NFS, quotas) report only at fsync / close
    except OSError as err:
        return err.errno if err.errno in _DISK_FULL else None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return None


def _disk_full(err: BaseException, folder: Path) -> int | None:
    """ENOSPC / EDQUOT (the errno) if ``err`` is a write that failed for lack of space.

    An OSError with its errno says so itself; a RuntimeError (torch's and DeepSpeed's
    writers lose the errno) or an OSError without errno is decided by a probe write in
    ``folder`` (the checkpoint's temp folder, whose partial files still take their space).
    """
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno if err.errno in _DISK_FULL else None
    text = str(err)
    if "No space left" in text:
        return errno.ENOSPC
    if "Disk quota exceeded" in text:
        return errno.EDQUOT
    if isinstance(err, (OSError, RuntimeError)):
        return _probe_space(folder)
    return None


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= (1 << 27) else f"{n / (1 << 20):.1f} MiB"


def estimate_checkpoint_bytes(module: torch.nn.Module | None) -> int | None:
    """What a first checkpoint of ``module`` takes at least: fp32 weights and AdamW's two
    moments (12 bytes per parameter; ZeRO-3 partitioned parameters count in full)."""
    if module is None:
        return None
    seen: dict[int, int] = {}
    for p in module.parameters():
        seen[id(p)] = int(getattr(p, "ds_numel", 0) or p.numel())
    params = sum(seen.values())
    return 12 * params if params else None


def _disk_full_error(root: Path, tmp: Path, code: int, err: BaseException, module: torch.nn.Module | None = None) -> UserError:
    previous = list_checkpoints(root.parent)
    needed = sum((previous[-1].meta.get(SIZES_KEY) or {}).values()) if previous else None
    if needed:
        need = f"a checkpoint of this run needs about {_gib(needed)}"
    else:
        estimate = estimate_checkpoint_bytes(module)
        need = (f"a checkpoint of this model needs at least about {_gib(estimate)}: fp32 weights and AdamW moments"
                if estimate else "it needs more space")
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = None
    what = "disk quota exceeded" if code == errno.EDQUOT else "no space left on the disk"
    have = f", {_gib(free)} free" if free is not None else ""
    last = f"the previous checkpoint ({previous[-1].path.name}) is intact" if previous else "no checkpoint was saved"
    if isinstance(err, OSError) and err.errno is not None:
        cause = ""
    else:  # the writer's own words, for the record (the probe decided it was the disk)
        first = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        cause = f" [{type(err).__name__}: {first[:120]}]"
    return UserError(
        f"{what} writing checkpoint {tmp} ({need}{have}); {last}. Free up space (or lower "
        f"train.keep_last) and resume with --resume auto{cause}"
    )


class AtomicCheckpoint(L.Callback):
    """Save every ``every`` optimizer steps and at the end of training.

    With ``exit_interval`` the run also saves and stops cleanly at multiples of it.

    ``meta_fn()`` returns the run's metadata (recipe, tokenizer hash, wandb id, …); the
    callback adds step, samples, topology, sizes and checksums.

    Put it after every callback that logs metrics or changes the model at the end of a
    step (its hooks then run after theirs), and before the signal handler that saves
    through it (:class:`wbscale.slurm.preemption.SlurmPreemption`).
    """

    def __init__(self, run_dir: Path, every: int, keep_last: int, meta_fn=None, exit_interval: int = 0):
        self.run_dir = Path(run_dir)
        self.every = every
        self.exit_interval = exit_interval
        self.keep_last = keep_last
        self.meta_fn = meta_fn or (lambda: {})
        self.last_saved_step: int | None = None
        self._pending: tuple[Path, Path, int] | None = None  # written, not yet published

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            clean_stale(self.run_dir)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        # The previous step is over: its metric rows (train, validation, callbacks) are logged.
        self.publish(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        accum = trainer.accumulate_grad_batches
        if (batch_idx + 1) % accum != 0:
            return
        step = trainer.global_step
        stop = self.exit_interval > 0 and step % self.exit_interval == 0
        if step % self.every == 0 or step >= (trainer.max_steps or 0) or stop:
            self.write(trainer)
        if stop and step < trainer.max_steps:
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.publish(trainer)
        if self.last_saved_step != trainer.global_step and trainer.global_step > 0:
            self.save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Not published: the step's metrics may be incomplete. The temp folder is removed
        # when the run restarts (clean_stale); resume takes the previous checkpoint.
        self._pending = None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # The Lightning state holds rank 0's RNG only (the module restores it on every
        # rank); with the same world size each rank gets its own back.
        if trainer.ckpt_path:
            load_rank_rng(Path(trainer.ckpt_path).parent, trainer.global_rank, trainer.world_size)

    # ------------------------------------------------------------------ saving

    def save(self, trainer: L.Trainer) -> Path:
        """Write and publish a checkpoint of the current step now; returns its folder."""
        final = self.write(trainer)
        self.publish(trainer)
        return final

    def write(self, trainer: L.Trainer) -> Path:
        """Write the current step's checkpoint into its temp folder (every rank).

        A full disk (or quota) is a UserError naming the folder, the space a checkpoint of
        this run needs and the space left; the partial folder is removed, the previous
        checkpoint stays ``last``.
        """
        root = checkpoints_dir(self.run_dir)
        tmp = root / f".tmp-{step_dir_name(trainer.global_step)}"
        try:
            return self._write(trainer)
        except (OSError, RuntimeError) as err:
            code = _disk_full(err, tmp if tmp.is_dir() else root)
            if code is None:
                raise
            self._pending = None
            shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays; `last` is untouched
            raise _disk_full_error(root, tmp, code, err, trainer.lightning_module) from None

    def _write(self, trainer: L.Trainer) -> Path:
        step = trainer.global_step
        root = checkpoints_dir(self.run_dir)
        final = root / step_dir_name(step)
        tmp = root / f".tmp-{step_dir_name(step)}"
        rank = trainer.global_rank
        if trainer.is_global_zero:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / RNG_DIR).mkdir(parents=True)
            fault("after-tmp-mkdir", step)
        trainer.strategy.barrier("wbscale-ckpt-begin")
        # Every rank writes: DeepSpeed its shards into model.ckpt/, each rank its RNG state.
        if os.environ.get(FAULT_ENV) == f"disk-full@{step}":  # tests: a full disk mid-write
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / MODEL_FILE))
        trainer.save_checkpoint(tmp / MODEL_FILE)
        fault("after-model-write", step)
        rng_rel, rng_size, rng_sha = save_rank_rng(tmp, rank)
        fault("after-rng-write", step)
        trainer.strategy.barrier("wbscale-ckpt-files")
        # Each rank hashes and fsyncs what it wrote, while it is still in the page cache.
        own = self._hash_own_files(tmp, rank, skip={rng_rel})
        own[rng_rel] = (rng_size, rng_sha)
        gathered = self._gather(trainer, own)
        if trainer.is_global_zero:
            fault("after-hash", step)
            files: dict[str, tuple[int, str]] = {}
            for part in gathered:
                files.update(part)
            datamodule = trainer.datamodule
            meta = {
                "step": step,
                "samples": datamodule.samples_consumed() if datamodule is not None else None,
                "world_size": trainer.world_size,
                "strategy": type(trainer.strategy).__name__,
                "zero_stage": zero_stage_of(trainer.strategy),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "torch": torch.__version__,
                # integrity check before every load: sizes and sha256 of every file
                SIZES_KEY: {rel: size for rel, (size, _) in sorted(files.items())},
                SHA_KEY: {rel: sha for rel, (_, sha) in sorted(files.items())},
                **self.meta_fn(),
            }
            meta[META_SHA_KEY] = meta_digest(meta)
            atomic_write_json(tmp / META_FILE, meta)
            fault("after-meta-write", step)
            for dirpath, _, _ in os.walk(tmp):
                fsync_dir(Path(dirpath))
        trainer.strategy.barrier("wbscale-ckpt-written")
        self._pending = (tmp, final, step)
        self.last_saved_step = step
        return final

    def publish(self, trainer: L.Trainer) -> Path | None:
        """Rank 0: make the written checkpoint the run's ``last`` (after syncing the metrics)."""
        if self._pending is None:
            return None
        tmp, final, step = self._pending
        self._pending = None
        if not trainer.is_global_zero:
            return final
        try:
            return self._publish(trainer, tmp, final, step)
        except OSError as err:
            if err.errno not in _DISK_FULL:
                raise
            what = "disk quota exceeded" if err.errno == errno.EDQUOT else "no space left on the disk"
            last = latest_checkpoint(self.run_dir)
            raise UserError(
                f"{what} publishing checkpoint {final.name} ({err.filename or final.parent}); the run's `last` "
                f"checkpoint ({last.path.name if last else 'none'}) is intact. Free up space and resume with --resume auto"
            ) from None

    def _publish(self, trainer: L.Trainer, tmp: Path, final: Path, step: int) -> Path:
        for logger in trainer.loggers:  # the step's metric rows reach the disk first
            sync = getattr(logger, "sync", None)
            if callable(sync):
                sync()
        fault("before-publish", step)
        root = tmp.parent
        if final.exists():  # a re-save of the same step (a resume from an older checkpoint)
            trash(final)
        os.replace(tmp, final)
        fsync_dir(root)
        fault("after-rename", step)
        atomic_write_text(root / LAST_FILE, final.name + "\n")
        fault("after-last", step)
        self._prune(root)
        return final

    def _hash_own_files(self, tmp: Path, rank: int, skip: set[str]) -> dict[str, tuple[int, str]]:
        mine = []
        for path in sorted(tmp.rglob("*")):
            rel = path.relative_to(tmp).as_posix()
            if path.is_file() and rel not in skip and rel != META_FILE and _owner(rel) == rank:
                mine.append(path)
        digests = hash_files(mine)
        out = {}
        for path in mine:
            fsync_file(path)
            out[path.relative_to(tmp).as_posix()] = (path.stat().st_size, digests[path])
        return out

    @staticmethod
    def _gather(trainer: L.Trainer, own: dict[str, tuple[int, str]]) -> list[dict[str, tuple[int, str]]]:
        if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return [own]
        parts: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(parts, own)
        return parts

    def _prune(self, root: Path) -> None:
        complete = list_checkpoints(self.run_dir)
        kept = complete[max(0, len(complete) - self.keep_last):]
        newest = complete[-1].step if complete else -1
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            trash(old.path, newest)
        oldest_kept = kept[0].step if kept else None
        for child in list(root.iterdir()):
            match = STEP_DIR.match(child.name)
            if match and oldest_kept is not None and int(match.group(1)) < oldest_kept and child.is_dir():
                trash(child, newest)  # an unreadable folder older than every kept checkpoint (half-deleted by an old version)
            elif child.name.startswith((".tmp-step-", ".trash-")) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)  # leftovers of a crash mid-save
            elif _STALE_FILE.match(child.name) and child.is_file():
                child.unlink(missing_ok=True)  # e.g. .last.tmp-<pid> of a process killed mid-write
