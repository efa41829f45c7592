"""Questions about a running Lightning strategy, asked by callbacks that must not branch on it.

Tools above the trainer (BIMT, tracking, checkpoints) need a few facts that depend on how
the run is spread: is this DeepSpeed, which ZeRO stage, where the gradients live when the
optimizer is about to step, the global gradient norm. They ask here instead of testing
strategy classes themselves; :mod:`wbscale.train.strategy` builds the strategies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StrategyInfo:
    """How a strategy holds parameters and gradients."""

    deepspeed: bool
    zero_stage: int | None  # None: not DeepSpeed
    fp16: bool = False

    @property
    def grads_in_params(self) -> bool:
        """True when ``p.grad`` holds the full gradient in ``on_before_optimizer_step``.

        Under DeepSpeed the gradients live in DeepSpeed's own (partitioned) buffers by then,
        so a term added to the gradient must be added by a hook during backward instead.
        """
        return not self.deepspeed

    @property
    def params_sharded(self) -> bool:
        """True when no rank holds full parameters between steps (ZeRO-3)."""
        return self.deepspeed and (self.zero_stage or 0) >= 3


def zero_stage_of(strategy: Any) -> int | None:
    """The ZeRO stage a DeepSpeed strategy runs with; None for any other strategy."""
    config = getattr(strategy, "config", None)
    if isinstance(config, dict) and isinstance(config.get("zero_optimization"), dict):
        return int(config["zero_optimization"].get("stage", 0))
    return None


def strategy_info(strategy: Any) -> StrategyInfo:
    """What :class:`StrategyInfo` says about a Lightning strategy instance."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if not isinstance(strategy, DeepSpeedStrategy):
        return StrategyInfo(deepspeed=False, zero_stage=None)
    fp16 = bool(((getattr(strategy, "config", None) or {}).get("fp16") or {}).get("enabled"))
    return StrategyInfo(deepspeed=True, zero_stage=zero_stage_of(strategy) or 0, fp16=fp16)


def deepspeed_global_grad_norm(strategy: Any) -> float | None:
    """The global gradient norm DeepSpeed computed for clipping; None if not DeepSpeed/unknown.

    Under ZeRO the gradients are partitioned (``p.grad`` is empty), so only the engine knows.
    """
    engine = getattr(strategy, "deepspeed_engine", None)
    if engine is None:
        return None
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else None


def deepspeed_engine(strategy: Any) -> Any:
    """The DeepSpeed engine of a running DeepSpeed strategy (its optimizer holds the shards)."""
    return strategy.deepspeed_engine
