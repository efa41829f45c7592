"""Lightning callbacks that track a run: white-box metrics, sample generations, plots.

They are callbacks, not branches in ``training_step`` (docs/architecture.md, "Callbacks, not branches"). Each logs through every
logger of the trainer (``trainer.loggers``), so ``metrics.jsonl`` and wandb receive the same
values at the same step (``trainer.global_step``, the number of optimizer steps done).

Distributed runs: the forward passes run on every rank (under ZeRO-3 the parameters are
sharded and a forward on rank 0 alone would wait forever for the others), only rank 0
writes files and logs. Sampling and metrics never touch the training RNG streams
(:func:`lightning.pytorch.utilities.seed.isolate_rng`), so a run resumed from a checkpoint
reproduces the same batches and dropout masks whether or not it sampled in between.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn

from wbscale.track.jsonl_logger import truncate_jsonl
from wbscale.track.plots import plot_run
from wbscale.track.step_metrics import log_step_metrics
from wbscale.track.whitebox import DEFAULT_EPS, whitebox_metrics

SAMPLES_FILE = "samples.jsonl"


def _lm(pl_module: pl.LightningModule) -> nn.Module:
    model = getattr(pl_module, "model", pl_module)
    return getattr(model, "_orig_mod", model)


def _forward_context(trainer: pl.Trainer) -> Any:
    # the precision plugin's context gives the same autocast as the training forward
    plugin = getattr(trainer, "precision_plugin", None)
    if plugin is not None and hasattr(plugin, "forward_context"):
        return plugin.forward_context()
    return contextlib.nullcontext()


def _due(step: int, every: int) -> bool:
    return every > 0 and step > 0 and step % every == 0


class WhiteBoxMetrics(Callback):
    """White-box metrics (:mod:`wbscale.track.whitebox`) every ``every`` optimizer steps.

    Args:
        batch: a fixed held-out token batch (B, T), e.g. the first validation batch; keep it
            small (a few sequences): the cost is one extra forward of it.
        every: cadence in optimizer steps (``tracking.metrics_every``); 0 disables.
        eps: the coding-rate distortion (0.01, as in the CRATE code).

    Also logs ``whitebox/seconds`` (wall time of the metrics step) so the overhead can be
    read off any run: overhead = whitebox/seconds / (every * seconds per step).
    """

    def __init__(self, batch: Tensor, every: int, eps: float = DEFAULT_EPS) -> None:
        self.batch = batch
        self.every = int(every)
        self.eps = eps
        self.last_seconds: float | None = None
        self.last_metrics: dict[str, float] = {}
        self._last_step = -1
        self._device_batch: Tensor | None = None

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Compute the metrics now (all ranks) and return them."""
        if self._device_batch is None or self._device_batch.device != pl_module.device:
            self._device_batch = self.batch.to(pl_module.device, non_blocking=True)
        t0 = time.perf_counter()
        with isolate_rng(), _forward_context(trainer):
            metrics = whitebox_metrics(_lm(pl_module), self._device_batch, eps=self.eps)
        self.last_seconds = time.perf_counter() - t0
        metrics["whitebox/seconds"] = self.last_seconds
        self.last_metrics = metrics
        return metrics

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        log_step_metrics(trainer, self.compute(trainer, pl_module))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # called once per micro-batch; global_step moves only on optimizer steps, and the
        # step guard in _run keeps gradient accumulation from repeating a step
        if _due(trainer.global_step, self.every):
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every > 0 and trainer.global_step > 0:
            self._run(trainer, pl_module)


class SampleGeneration(Callback):
    """Generate from fixed prompts with a fixed seed; append to ``samples.jsonl``.

    Each row is ``{"step", "prompt", "text"}`` (``text`` = the continuation, without the
    prompt). With a WandbLogger present the rows of one step are also logged as a
    ``wandb.Table`` under ``samples``. ``every`` = 0 samples only at the end of training
    (``on_train_end``, while the model is still on its device); otherwise every ``every``
    optimizer steps and at the end.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompts: Sequence[str],
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        every: int,
        out_path: str | os.PathLike[str],
        *,
        seed: int = 1234,
        eos_token: str | None = "<|endoftext|>",
        top_p: float = 1.0,
    ) -> None:
        self.tokenizer = tokenizer
        self.prompts = list(prompts)
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_k = top_k if top_k else None
        self.top_p = float(top_p)
        self.every = int(every)
        out_path = Path(out_path)
        self.out_path = out_path / SAMPLES_FILE if out_path.suffix != ".jsonl" else out_path
        self.seed = seed
        self.eos_id = tokenizer.token_to_id(eos_token) if eos_token and hasattr(tokenizer, "token_to_id") else None
        self._last_step = -1
        self._truncated = False

    def generate(self, pl_module: pl.LightningModule, trainer: pl.Trainer | None = None) -> list[str]:
        """The continuations of every prompt (same seed -> same text for the same weights)."""
        model = _lm(pl_module)
        was_training = model.training
        model.eval()
        texts = []
        try:
            with isolate_rng(), torch.no_grad(), (_forward_context(trainer) if trainer else contextlib.nullcontext()):
                for i, prompt in enumerate(self.prompts):
                    torch.manual_seed(self.seed + i)
                    ids = self.tokenizer.encode(prompt).ids or ([self.eos_id] if self.eos_id is not None else [0])
                    idx = torch.tensor([ids], dtype=torch.long, device=pl_module.device)
                    nucleus = {"top_p": self.top_p} if self.top_p < 1 else {}  # 1: off
                    out = model.generate(
                        idx, self.max_new_tokens, temperature=self.temperature, top_k=self.top_k, eos_id=self.eos_id,
                        **nucleus,
                    )
                    new = out[0, len(ids):].tolist()
                    if self.eos_id is not None and self.eos_id in new:
                        new = new[: new.index(self.eos_id)]
                    texts.append(self.tokenizer.decode(new))
        finally:
            model.train(was_training)
        return texts

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step or not self.prompts or self.max_new_tokens == 0:
            return
        self._last_step = step
        texts = self.generate(pl_module, trainer)
        if not trainer.is_global_zero:
            return
        if not self._truncated:
            truncate_jsonl(self.out_path, step - 1)  # a resumed run rewrites what it redoes, from this step on
            self._truncated = True
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"step": step, "prompt": p, "text": t} for p, t in zip(self.prompts, texts, strict=True)]
        with open(self.out_path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_text(
                    key="samples",
                    columns=["step", "prompt", "text"],
                    data=[[r["step"], r["prompt"], r["text"]] for r in rows],
                    step=step,
                )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if _due(trainer.global_step, self.every):
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, pl_module)


class Plots(Callback):
    """At the end of fit: ``<run_dir>/plots/loss_curve.png`` and the white-box PNGs.

    Drawn from ``metrics.jsonl`` (``metrics_path``, default ``<run_dir>/metrics.jsonl``) and
    logged as wandb images (key ``plots/<name>``) when a WandbLogger is present.
    """

    def __init__(
        self, run_dir: str | os.PathLike[str], metrics_path: str | os.PathLike[str] | None = None,
        data_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.metrics_path = Path(metrics_path) if metrics_path is not None else self.run_dir / "metrics.jsonl"
        self.data_dir = Path(data_dir) if data_dir is not None else None  # for the unigram-entropy line
        self.paths: list[Path] = []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.save()  # flush metrics.jsonl before reading it
        entropy = None
        if self.data_dir is not None:
            from wbscale.data.loader import unigram_entropy

            entropy = unigram_entropy(self.data_dir, "train")
        self.paths = plot_run(self.run_dir, self.metrics_path, unigram_entropy=entropy)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                for path in self.paths:
                    logger.log_image(key=f"plots/{path.stem}", images=[str(path)], step=trainer.global_step)
