"""Shared test helpers: a tiny CPU recipe and reading a run's metrics back."""

from __future__ import annotations

import json
from pathlib import Path

from wbscale.config import DataConfig


def small_data_cfg(out_dir: Path, /, **kw: object) -> DataConfig:
    """A data section that prepares in about a second: 300 synthetic stories, a 400-token BPE."""
    base: dict[str, object] = dict(
        source="synthetic-stories",
        synthetic_documents=300,
        vocab_size=400,
        shard_tokens=4096,
        val_fraction=0.1,
        workers=1,
        out_dir=str(out_dir),
    )
    base.update(kw)
    return DataConfig(**base)


def tiny_overrides(tmp_path: Path, run_name: str = "tiny", **extra: object) -> list[str]:
    """A recipe small enough for a few seconds of CPU training."""
    values = {
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 32,
        "model.block_size": 32,
        "data.synthetic_documents": 400,
        "data.vocab_size": 320,
        "data.out_dir": str(tmp_path / "data"),
        "data.workers": 1,
        "train.runs_dir": str(tmp_path / "runs"),
        "train.run_name": run_name,
        "train.max_steps": 8,
        "train.micro_batch_size": 4,
        "train.grad_accum": 2,
        "train.log_every": 1,
        "train.val_every": 4,
        "train.val_batches": 2,
        "train.ckpt_every": 4,
        "train.keep_last": 2,
        "train.sample_max_new_tokens": 8,
        "optim.warmup_steps": 2,
        "tracking.metrics_every": 4,
        "tracking.wandb.mode": "offline",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def losses(run_dir: Path) -> dict[int, dict[str, float]]:
    by_step: dict[int, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_step.setdefault(row["step"], {}).update(row)
    return by_step


def assert_same_train_losses(a: dict, b: dict, steps) -> None:
    """Bitwise-equal train losses at ``steps``, with the numbers in the message."""
    for step in steps:
        assert a[step]["train/loss"] == b[step]["train/loss"], (
            f"step {step}: uninterrupted {a[step]['train/loss']!r} vs resumed {b[step]['train/loss']!r}"
        )
