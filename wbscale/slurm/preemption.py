"""Signals: checkpoint at a step boundary, then requeue or exit (in and outside SLURM).

A signal must never throw away the work since the last checkpoint. The handlers here only
set a flag: nothing is safe inside a signal handler in the middle of a step (Lightning's
own handlers save, or run a collective, right there). At every optimizer-step boundary
every rank takes part in one all-reduce (MAX) of the flag, because a signal can reach the
ranks a step apart; so all ranks stop at the same step. They save a checkpoint there with
:class:`~wbscale.ckpt.writer.AtomicCheckpoint`, let the step finish as it would anyway
(its metrics logged, validation on a validation step), publish the checkpoint, close the
loggers (wandb included) before the next step starts, print one line, and exit:

- **SIGTERM** (``kill``, a cancel, a preemption, ``docker stop``): exit 143 (128 + 15).
- **SIGINT** (Ctrl-C): exit 130 (128 + 2). A second Ctrl-C stops at once, without saving
  (the previous checkpoint stays intact).
- **the requeue signal** (``slurm.signal``, USR1 by default; ``sbatch --signal=USR1@90``
  sends it 90 s before the time limit): inside a SLURM job rank 0 runs ``scontrol requeue
  <job>`` (``<array job>_<task>`` in an array) and every rank exits 0; the requeued job
  runs ``wbscale fit --resume auto``: the same checkpoint, the same wandb run id, the next
  sample of the data stream. No ``scontrol`` on PATH (containers), a failed requeue,
  ``slurm.requeue: false``, or not a SLURM job (USR1 sent by hand): a warning, exit 75
  (EX_TEMPFAIL: "resume me"), so SLURM's ``--requeue`` can act; a cluster with
  ``RequeueExit=75`` requeues it, anywhere else ``--resume auto`` continues the run.
  ``slurm.preemption: off`` leaves the requeue signal alone (SIGTERM and SIGINT are
  always handled).

Inside a SLURM job SIGTERM reaches every process of the job step, wandb's service too, so
wandb logging stops at SIGTERM there (metrics.jsonl keeps every step).

A signal after the last step is not swallowed (the run is complete and saved). Lightning's
own SLURM requeue is switched off (:func:`cluster_plugins`) so the two never both save
and requeue.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from wbscale.ranks import say_always
from wbscale.slurm.record import append_event, job_id_from_env

# Requests, ordered: when ranks disagree the larger wins (a stop beats a requeue).
NONE, REQUEUE, INTERRUPT, STOP = 0, 1, 2, 3
STOP_SIGNALS = {signal.SIGINT: INTERRUPT, signal.SIGTERM: STOP}
EXIT_REQUEUED = 0
EXIT_NOT_REQUEUED = 75  # EX_TEMPFAIL: "try again later"; SLURM's RequeueExit can name it
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130
SIGNALS = {"USR1": signal.SIGUSR1, "TERM": signal.SIGTERM}
SCONTROL_TIMEOUT = 60.0


def in_slurm_job() -> bool:
    """Inside a batch or srun job (an interactive ``srun bash`` shell does not count)."""
    return bool(os.environ.get("SLURM_JOB_ID")) and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def cluster_plugins() -> list[Any]:
    """Trainer plugins: under srun, SLURM's environment without Lightning's auto-requeue."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    in_srun = "SLURM_NTASKS" in os.environ and SLURMEnvironment.detect()  # detect() alone warns off SLURM
    return [SLURMEnvironment(auto_requeue=False)] if in_srun else []


class SlurmPreemption(L.Callback):
    """On SIGTERM, SIGINT or the requeue signal: checkpoint at the next step, requeue or exit.

    Installed in every ``wbscale fit`` (in SLURM or not: see the module doc).
    ``run_dir`` is the run being trained; in a SLURM job events go to ``record_dir`` (the
    submitted run's folder, ``$WBSCALE_SLURM_RUN_DIR`` in a job; for an array task it is
    the array's). ``requeue_signal=False`` (``slurm.preemption: off``) leaves the requeue
    signal alone. Must come after :class:`AtomicCheckpoint` in the callback list.
    """

    def __init__(
        self, run_dir: Path, signal_name: str = "USR1", requeue: bool = True, record_dir: Path | None = None,
        requeue_signal: bool = True,
    ):
        self.run_dir = Path(run_dir)
        self.record_dir = Path(record_dir or os.environ.get("WBSCALE_SLURM_RUN_DIR") or run_dir)
        self.requeue_signal = SIGNALS[signal_name]
        self.handle_requeue_signal = requeue_signal
        self.requeue = requeue
        self._request = NONE
        self._received: list[str] = []
        self._signums: set[int] = set()
        self._pending: tuple[int, Path] | None = None  # (request, checkpoint) saved, exit next
        self._trainer: L.Trainer | None = None
        self._wandb_detached = False
        # idle: outside fit, the signals act as they did before; armed: a flag for the next
        # step boundary; done: after the last step there is nothing left to save or requeue;
        # leaving: saved and on the way out (a requeue makes SLURM send SIGTERM right away)
        self._phase = "idle"
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------ signal handling

    def _signals(self) -> list[int]:
        extra = [self.requeue_signal] if self.handle_requeue_signal else []
        return list(dict.fromkeys([*extra, signal.SIGTERM, signal.SIGINT]))

    def _handle(self, signum: int, frame: Any) -> None:
        if self._phase == "armed":
            if signum == signal.SIGINT and signal.SIGINT in self._signums:
                self._abort()  # a second Ctrl-C: stop now, without saving
            self._received.append(signal.Signals(signum).name)
            self._signums.add(signum)
            request = REQUEUE if signum == self.requeue_signal else STOP_SIGNALS.get(signum, STOP)
            self._request = max(self._request, request)
            if signum == signal.SIGTERM and in_slurm_job():
                self._detach_wandb()
            elif signum == signal.SIGINT and (self._trainer is None or self._trainer.is_global_zero):
                say_always(
                    f"SIGINT received: saving a checkpoint at the end of step {self._step_hint()}, then exiting "
                    "(press Ctrl-C again to stop at once without saving)"
                )
            return
        if self._phase == "leaving":
            return  # the checkpoint is saved and the process exits; SIGKILL follows if it hangs
        if self._phase == "done" and signum not in (signal.SIGTERM, signal.SIGINT):
            return  # a time-limit warning after the last step: the run is complete
        # SIGTERM after the loop, or any signal outside fit: never swallowed, acted on as before
        previous = self._previous.get(signum, signal.SIG_DFL)
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def _step_hint(self) -> str:
        trainer = self._trainer
        return str(trainer.global_step + 1) if trainer is not None else "the current step"

    def _abort(self) -> None:
        say_always("second SIGINT: stopping now without a checkpoint; the last saved checkpoint is intact")
        self._phase = "idle"
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt

    def _detach_wandb(self) -> None:
        """Stop logging to wandb: SLURM's SIGTERM reaches every process of the job step,
        and wandb's service (wandb-core) exits on it, so the next wandb call would raise
        before the step boundary where the checkpoint is saved. metrics.jsonl keeps every
        step; the requeued or resubmitted job continues the same wandb run."""
        from lightning.pytorch.loggers import WandbLogger

        trainer = self._trainer
        if trainer is None or self._wandb_detached:
            return
        kept = [lg for lg in trainer.loggers if not isinstance(lg, WandbLogger)]
        if len(kept) != len(trainer.loggers):
            trainer.loggers = kept
            self._wandb_detached = True

    def _guard_wandb(self, trainer: L.Trainer) -> None:
        """Let a wandb call that fails because SIGTERM took wandb's service down not crash
        the run before its checkpoint: SLURM signals the service and the trainer at once,
        so a call already under way can fail before the handler has detached wandb."""
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and "log_metrics" not in vars(logger):
                logger.log_metrics = self._tolerant(logger.log_metrics)

    def _tolerant(self, log_metrics: Any) -> Any:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if self._wandb_detached:
                return None
            try:
                return log_metrics(*args, **kwargs)
            except Exception:
                stops = {signal.SIGTERM, signal.SIGINT}
                if not stops & self._signums:
                    time.sleep(0.5)  # a pending SIGTERM's handler runs here
                if not stops & self._signums:
                    raise  # not a signal's doing: a real error
                self._detach_wandb()
                return None

        return guarded

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in self._signals():
            current = signal.getsignal(signum)
            if signum not in self._previous and current != self._handle:
                self._previous[signum] = current
            signal.signal(signum, self._handle)

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._request, self._received, self._signums, self._pending = NONE, [], set(), None
        self._trainer, self._wandb_detached = trainer, False
        self._phase = "armed"
        self._install()
        self._guard_wandb(trainer)
        if in_slurm_job():  # one line per rank: where each rank runs, for multi-node troubleshooting
            env = os.environ
            print(
                f"[wbscale] rank {trainer.global_rank}/{trainer.world_size} (local {trainer.local_rank}) on node "
                f"{env.get('SLURMD_NODENAME', '?')} ({socket.gethostname()}), job {job_id_from_env()}, "
                f"rendezvous {env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}",
                file=sys.stderr, flush=True,
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning wraps SIGTERM with its own handler after setup; take it back. A SIGTERM
        # that came in between is in our flag too; Lightning's copy would end the run with
        # status 0 after the first step, before our checkpoint and exit status.
        self._install()
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and getattr(connector, "received_sigterm", False):
            connector.received_sigterm = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:  # the loop stopped first (train.exit_interval): still requeue
            self._leave(trainer)
        self._phase = "done"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._phase != "leaving":
            self._phase = "idle"

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._phase = "idle"
            self._restore()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._pending is not None or (batch_idx + 1) % trainer.accumulate_grad_batches != 0:
            return
        request = self._agreed_request(trainer)
        if request == NONE:
            return
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            return  # the last step: the run completes normally (and saves) instead
        self._pending = (request, self._save(trainer))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        # The step that saved has now logged its metrics (and validated, on a validation
        # step), exactly as in an uninterrupted run: leave before the next one starts.
        if self._pending is not None:
            self._leave(trainer)

    # ------------------------------------------------------------------ stopping

    def _agreed_request(self, trainer: L.Trainer) -> int:
        """The largest request of any rank (every rank calls this at every step)."""
        if trainer.world_size <= 1:
            return self._request
        flag = torch.tensor([self._request], dtype=torch.int32, device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(flag, reduce_op="max").item())

    @staticmethod
    def _saver(trainer: L.Trainer) -> Any:
        from wbscale.ckpt.writer import AtomicCheckpoint

        saver = next((c for c in trainer.callbacks if isinstance(c, AtomicCheckpoint)), None)
        if saver is None:
            raise RuntimeError("SlurmPreemption needs an AtomicCheckpoint callback before it")
        return saver

    def _save(self, trainer: L.Trainer) -> Path:
        """Write a checkpoint of this step through AtomicCheckpoint (unless it has just
        written one); :meth:`_leave` publishes it once the step's metrics are logged."""
        from wbscale.ckpt.format import checkpoints_dir, step_dir_name

        saver = self._saver(trainer)
        step = trainer.global_step
        if saver.last_saved_step == step:
            return checkpoints_dir(saver.run_dir) / step_dir_name(step)
        return saver.write(trainer)

    def _leave(self, trainer: L.Trainer) -> None:
        """Publish the checkpoint, close the loggers, requeue (rank 0), and exit every rank
        with rank 0's status."""
        from wbscale.track.wandb_run import finish_wandb

        self._phase = "leaving"
        request, path = self._pending
        step = trainer.global_step
        self._saver(trainer).publish(trainer)  # first: SIGKILL may follow soon
        for logger in trainer.loggers:
            logger.save()
            finish_wandb(logger)  # before the requeue: SLURM then signals every process, wandb's too
        if "wandb" in sys.modules:  # and stop wandb's service now, not at exit when it may be gone
            try:
                sys.modules["wandb"].teardown()
            except Exception:  # noqa: BLE001 - the service already died of SIGTERM: nothing to flush
                pass
        signame = "/".join(dict.fromkeys(self._received)) or "a signal on another rank"
        code = EXIT_INTERRUPTED if request == INTERRUPT else EXIT_TERMINATED
        if trainer.is_global_zero:
            job = job_id_from_env()
            if request == REQUEUE:
                code, outcome, detail = self._requeue()
            elif job is not None and request == STOP:
                outcome = "stopped"
                detail = "SIGTERM: the job is being cancelled or preempted, so not requeuing (SLURM requeues a preempted --requeue job)"
            else:
                outcome = "stopped"
                detail = "continue with `wbscale fit ... --resume auto`"
            say_always(f"{signame} received: checkpoint saved at step {step} ({path}); {detail}; exiting with status {code}")
            if self._wandb_detached:
                say_always("wandb stopped logging at SIGTERM (SLURM stops wandb's service with the job); metrics.jsonl has every step")
            if job is not None:
                append_event(
                    self.record_dir, "preempt", job_id=job, step=step, signal=signame, action=outcome,
                    exit_code=code, trained_run=str(self.run_dir),
                )
        code = int(trainer.strategy.broadcast(code, src=0))
        raise SystemExit(code)

    def _requeue(self) -> tuple[int, str, str]:
        """Rank 0: ``scontrol requeue`` this job; (exit code, outcome, what happened)."""
        resume_hint = "resubmit (or rerun `wbscale fit ... --resume auto`): the run resumes from this checkpoint"
        if not self.requeue:
            return EXIT_NOT_REQUEUED, "not-requeued", f"slurm.requeue is false, so not requeuing; {resume_hint}"
        job = job_id_from_env()
        if job is None:
            return EXIT_NOT_REQUEUED, "not-requeued", f"not inside a SLURM job (no SLURM_JOB_ID); {resume_hint}"
        scontrol = shutil.which("scontrol")
        if scontrol is None:
            return (
                EXIT_NOT_REQUEUED, "not-requeued",
                f"WARNING: 'scontrol' is not on PATH (usual inside containers), so job {job} cannot requeue "
                f"itself; exiting with status {EXIT_NOT_REQUEUED} so SLURM's --requeue can act (a cluster with "
                f"RequeueExit={EXIT_NOT_REQUEUED} requeues it); otherwise {resume_hint}",
            )
        started = time.monotonic()
        try:
            proc = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=SCONTROL_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as err:
            return EXIT_NOT_REQUEUED, "not-requeued", f"WARNING: `scontrol requeue {job}` failed ({err}); {resume_hint}"
        if proc.returncode != 0:
            why = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
            return EXIT_NOT_REQUEUED, "not-requeued", f"WARNING: `scontrol requeue {job}` failed: {why}; {resume_hint}"
        took = time.monotonic() - started
        return EXIT_REQUEUED, "requeued", f"requeued job {job} ({took:.1f}s); it resumes from this checkpoint"
