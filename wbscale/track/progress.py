"""Progress people can read: a bar on a terminal, plain lines in a SLURM log.

- :class:`StepProgressBar` (a terminal): counts optimizer steps against ``train.max_steps``
  (Lightning's bar counts micro-batches, so with ``grad_accum > 1`` it shows ``8/?`` and no
  ETA), shows loss and tokens/s, and none of Lightning's ``v_num`` / ``Epoch 0`` noise.
- :class:`ProgressLines` (no terminal: SLURM ``.out``, nohup, CI): a logger that prints one
  plain line per logged step, ``step 120/400 (30%) | loss 2.314 | lr 1.9e-03 | 8,512 tok/s |
  MFU 41.2% | 0:01:12 elapsed | ETA 0:02:48``, and one per validation. Its clock starts when
  training starts (Lightning's ``on_train_start``, after a resume has restored the step), so
  elapsed and ETA count from there, not from the first logged step.
"""

from __future__ import annotations

import sys
import time
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_only


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(step: int, max_steps: int, metrics: Mapping[str, float], elapsed: float, start_step: int) -> str:
    """One line of training progress (``start_step``: where this process began, for the ETA)."""
    parts = [f"step {step}/{max_steps} ({100 * step / max(1, max_steps):.0f}%)"]
    if "train/loss" in metrics:
        parts.append(f"loss {metrics['train/loss']:.4f}")
    if "train/lr" in metrics:
        parts.append(f"lr {metrics['train/lr']:.2e}")
    if "train/tokens_per_second" in metrics:
        parts.append(f"{metrics['train/tokens_per_second']:,.0f} tok/s")
    if "train/mfu" in metrics:
        parts.append(f"MFU {100 * metrics['train/mfu']:.1f}%")
    parts.append(f"{_clock(elapsed)} elapsed")
    done = step - start_step
    if done > 0 and step < max_steps:
        parts.append(f"ETA {_clock(elapsed / done * (max_steps - step))}")
    return " | ".join(parts)


class _TrainClock(Callback):
    """Starts a :class:`ProgressLines` clock at ``on_train_start`` (the step a resume restored)."""

    def __init__(self, lines: ProgressLines) -> None:
        self.lines = lines

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.lines.start(int(trainer.global_step))


class ProgressLines(Logger):
    """Print a plain progress line for every logged training step and every validation.

    A logger gets no training hooks, so when Lightning hands it the module at fit start
    (``log_graph``) it adds a small callback to that trainer that starts the clock at
    ``on_train_start``.
    """

    def __init__(self, max_steps: int, stream: Any = None) -> None:
        super().__init__()
        self.max_steps = int(max_steps)
        self.stream = stream
        self._t0: float | None = None
        self._start_step = 0

    @property
    def name(self) -> str:
        return "progress"

    @property
    def version(self) -> int:
        return 0

    def start(self, step: int) -> None:
        """Start the clock: training begins (or resumes) at optimizer step ``step``."""
        self._t0, self._start_step = time.monotonic(), int(step)

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """Nothing: the recipe is in the run folder."""

    def log_graph(self, model: Any, input_array: Any = None) -> None:
        trainer = getattr(model, "_trainer", None)  # the property raises when detached
        if trainer is not None and not any(isinstance(c, _TrainClock) and c.lines is self for c in trainer.callbacks):
            trainer.callbacks.insert(0, _TrainClock(self))

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if step is None:
            return
        if self._t0 is None:  # no train-start hook reached us (used outside Trainer.fit)
            self.start(int(step) - 1)
        out = self.stream or sys.stderr
        if "train/loss" in metrics:
            print("[wbscale] " + progress_line(int(step), self.max_steps, metrics, time.monotonic() - self._t0,
                                               self._start_step), file=out, flush=True)
        elif "val/loss" in metrics:
            print(f"[wbscale] step {step}/{self.max_steps} | val loss {metrics['val/loss']:.4f} "
                  f"(perplexity {metrics.get('val/perplexity', float('nan')):.2f})", file=out, flush=True)


class StepProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, counting optimizer steps with a real total."""

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._t0: float | None = None
        self._start_step = 0

    def on_train_epoch_start(self, trainer: Any, *_: Any) -> None:
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.initial = trainer.global_step
        bar.n = trainer.global_step
        bar.set_description("train")
        self._t0, self._start_step = time.monotonic(), trainer.global_step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches != 0:
            return
        step = trainer.global_step
        if step % self.refresh_rate == 0 or step >= trainer.max_steps:
            bar = self.train_progress_bar
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        items = {k: v for k, v in super().get_metrics(trainer, pl_module).items() if k != "v_num"}
        if self._t0 is not None and trainer.global_step > self._start_step:
            from wbscale.sizing import tokens_per_step

            rate = (trainer.global_step - self._start_step) * tokens_per_step(pl_module.recipe, trainer.world_size)
            items["tok/s"] = f"{rate / max(1e-9, time.monotonic() - self._t0):,.0f}"
        return items
