"""How a training run records itself in the registry: a Lightning callback, cheap and harmless.

:class:`RunRecorder` (the last callback of ``wbscale fit``) writes, on global rank 0:

- at ``on_fit_start``: the run's membership in the registry of ``train.runs_dir``;
- at ``on_train_start`` (the checkpoint is restored by then): a ``start`` event — pid,
  host, SLURM job id and restart count, world size, nodes, strategy, ZeRO stage, the step
  it resumed from, ``max_steps``, the wandb run (URL online, folder offline), the command;
- ``progress.json`` (step + heartbeat) every ``progress_every_s`` seconds and whenever a
  checkpoint was saved, at an optimizer-step boundary: one small file rename, no reads;
- at the end: an ``end`` event with the reason — ``finished``, ``stopped``
  (``train.exit_interval``), the preemption's ``requeued`` / ``not-requeued`` /
  ``terminated`` / ``interrupted`` (its ``SystemExit`` status), ``bad-input``
  (a :class:`~wbscale.errors.UserError`), ``oom`` or ``error`` (the exception, shortened).

Another rank records an ``end`` only for an exception of its own (an OOM on rank 3).
Nothing here may stop a run: every write is guarded and a failure prints one warning.
A process killed without a chance to speak (SIGKILL, the OOM killer, a dead node) leaves a
start without an end; :mod:`.state` calls such a run *stale* once its lock or job is gone.

:func:`recording_failures` is for the CLI: failures before the trainer starts (a recipe
that does not fit the data, a checkpoint that does not match) become a ``fail`` event, so
``runs resubmit`` knows never to retry them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L

from wbscale.errors import UserError
from wbscale.runs import store
from wbscale.runs.store import recipe_ref_from_argv

__all__ = ["RunRecorder", "classify", "recipe_ref_from_argv", "recording_failures"]

PROGRESS_EVERY_S = 30.0
EXIT_REASONS = {0: "requeued", 75: "not-requeued", 143: "terminated", 130: "interrupted", 2: "bad-input"}


def classify(exc: BaseException) -> tuple[str, int, str]:
    """(reason, exit status, message) of the exception that ended a run."""
    if isinstance(exc, SystemExit):
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return EXIT_REASONS.get(code, "error"), code, "" if code in EXIT_REASONS else f"exit status {code}"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", 130, ""
    if isinstance(exc, UserError):
        return "bad-input", exc.exit_code, str(exc)[:500]
    name = type(exc).__name__
    if "OutOfMemory" in name:
        return "oom", 1, f"{name}: {str(exc)[:300]}"
    return "error", 1, f"{name}: {str(exc)[:500]}"


def _slurm() -> dict[str, Any]:
    env = os.environ
    job = None
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    elif env.get("SLURM_JOB_ID"):
        job = env["SLURM_JOB_ID"]
    if job is None:
        return {}
    restarts = env.get("SLURM_RESTART_COUNT", "0").strip()
    return {
        "job_id": job,
        "restart_count": int(restarts) if restarts.isdigit() else 0,
        "nodes": env.get("SLURM_JOB_NODELIST"),
    }


class RunRecorder(L.Callback):
    """Records the run in the registry (see the module doc). Put it last in the callbacks."""

    def __init__(self, recipe: Any, run_dir: Path | None = None, progress_every_s: float = PROGRESS_EVERY_S):
        self.run_dir = Path(run_dir or recipe.run_dir)
        self.runs_dir = Path(recipe.train.runs_dir)
        self.max_steps = int(recipe.train.max_steps)
        self.progress_every_s = float(progress_every_s)
        self.recipe_ref = recipe_ref_from_argv()
        self._started = False
        self._ended = False
        self._last_progress = 0.0
        self._last_saved: int | None = None
        self._warned = False

    # ------------------------------------------------------------------ guarded writes

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - recording must never stop training
            if not self._warned:
                self._warned = True
                print(f"wbscale: warning: could not record the run's {what} in the registry ({err})", file=sys.stderr)
            return None

    def _start_fields(self, trainer: L.Trainer, phase: str) -> dict[str, Any]:
        from wbscale.dist import zero_stage_of

        strategy = trainer.strategy
        resumed = trainer.global_step if trainer.global_step > 0 else None
        return {
            "phase": phase,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "strategy": type(strategy).__name__,
            "zero_stage": zero_stage_of(strategy),
            "resumed_from": resumed,
            "max_steps": self.max_steps,
            "cwd": os.getcwd(),
            "argv": list(sys.argv),
            "torchrun": bool(os.environ.get("TORCHELASTIC_RUN_ID")),
            "wandb": self._wandb(trainer),
            **_slurm(),
            # the folder the job was submitted as, which holds its submit record (an
            # array's parent or sweep folder: ``runs resubmit`` finds the job options there)
            **({"slurm_run_dir": os.environ["WBSCALE_SLURM_RUN_DIR"]} if _slurm() and os.environ.get("WBSCALE_SLURM_RUN_DIR") else {}),
        }

    @staticmethod
    def _wandb(trainer: L.Trainer) -> dict[str, Any] | None:
        for logger in trainer.loggers:
            run = getattr(logger, "_experiment", None)
            if run is None or not hasattr(run, "id"):
                continue
            with contextlib.suppress(Exception):
                settings = getattr(run, "settings", None)
                mode = getattr(settings, "mode", None)
                url = getattr(run, "url", None) if mode != "offline" else None
                return {"id": run.id, "mode": mode, "url": url, "dir": getattr(settings, "sync_dir", None)}
        return None

    def _write_start(self, trainer: L.Trainer, phase: str) -> None:
        store.write_event(self.run_dir, "start", **self._start_fields(trainer, phase))
        self._started = True

    def _progress(self, trainer: L.Trainer) -> None:
        store.write_progress(self.run_dir, {"step": trainer.global_step, "max_steps": self.max_steps, **_slurm()})
        self._last_progress = time.monotonic()

    def _end(self, trainer: L.Trainer, reason: str, code: int, message: str = "") -> None:
        if self._ended:
            return
        self._ended = True
        fields: dict[str, Any] = {"reason": reason, "exit_code": code, "step": trainer.global_step, **_slurm()}
        if message:
            fields["message"] = message
        if not trainer.is_global_zero:
            fields["rank"] = trainer.global_rank
        store.write_event(self.run_dir, "end", **fields)

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = self._ended = False
        if trainer.is_global_zero:
            self._guard("membership", store.register, self.runs_dir, self.run_dir, recipe=self.recipe_ref)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._guard("start", self._write_start, trainer, "train")
            self._guard("progress", self._progress, trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not trainer.is_global_zero or (batch_idx + 1) % trainer.accumulate_grad_batches != 0:
            return
        saved = self._saved_step(trainer)
        if saved != self._last_saved or time.monotonic() - self._last_progress >= self.progress_every_s:
            self._last_saved = saved
            self._guard("progress", self._progress, trainer)

    @staticmethod
    def _saved_step(trainer: L.Trainer) -> int | None:
        for callback in trainer.callbacks:
            if hasattr(callback, "last_saved_step"):
                return callback.last_saved_step
        return None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._guard("progress", self._progress, trainer)
        reason = "finished" if trainer.global_step >= self.max_steps else "stopped"
        self._guard("end", self._end, trainer, reason, 0)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        reason, code, message = classify(exception)
        if trainer.is_global_zero:
            if not self._started:
                self._guard("start", self._write_start, trainer, "setup")
            self._guard("progress", self._progress, trainer)
            self._guard("end", self._end, trainer, reason, code, message)
        elif not isinstance(exception, (SystemExit, KeyboardInterrupt)):
            self._guard("end", self._end, trainer, reason, code, message)


@contextlib.contextmanager
def recording_failures(recipe: Any) -> Iterator[None]:
    """Around ``fit(recipe)`` in the CLI: a UserError (exit 2) becomes a ``fail`` event of
    the run (global rank 0 only), so ``runs`` shows it and ``runs resubmit`` never retries it.

    Only for a run that exists already (a submitted, resumed or requeued one): bad input
    for a new run writes nothing at all.
    """
    try:
        yield
    except UserError as err:
        from wbscale.ranks import launch_rank

        if launch_rank() == 0 and Path(recipe.run_dir).is_dir():
            with contextlib.suppress(Exception):
                run_dir = Path(recipe.run_dir)
                store.register(Path(recipe.train.runs_dir), run_dir, recipe=recipe_ref_from_argv())
                store.write_event(
                    run_dir, "fail", reason="bad-input", exit_code=err.exit_code, message=str(err)[:500], phase="cli",
                    **_slurm(),
                )
        raise
