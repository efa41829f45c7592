"""Questions about a running Lightning strategy, asked by callbacks that must not branch on it.

Tools above the trainer (BIMT, tracking, checkpoints) need a few facts that depend on how
the run is spread: is this DeepSpeed, which ZeRO stage, where the gradients live when the
optimizer is about to step, the global gradient norm. They ask here instead of testing
strategy classes themselves; :mod:`wbscale.train.strategy` builds the strategies. A callback
that edits full weights (BIMT's gradient term and swaps) does it through one
:class:`WeightEditor`, which holds every strategy-specific step.
"""

from __future__ import annotations

from collections.abc import Callable
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


def optimizer_moments(optimizer: Any, p: Any) -> list[Any]:
    """The optimizer's per-element state of ``p`` (AdamW's two moments): every tensor in
    ``optimizer.state[p]`` shaped like ``p``."""
    import torch

    if optimizer is None:
        return []
    return [v for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor) and v.shape == p.shape]


class WeightEditor:
    """Edits a callback makes to full weights during training, the same calls under every strategy.

    BIMT adds a term to some gradients every step and permutes units of weights between
    steps; where the gradients and the optimizer state live depends on the strategy, and is
    known only here:

    - gradient term (:meth:`add_gradient_term`, :meth:`set_coefficient`,
      :meth:`before_optimizer_step`): without DeepSpeed ``p.grad`` holds the full, averaged
      gradient in ``on_before_optimizer_step``, where the term is added once. Under DeepSpeed
      the gradients live in DeepSpeed's (partitioned) buffers by then, so gradient hooks add
      it during backward instead, per micro-batch, divided by the accumulation steps;
    - optimizer state of permuted weights (:meth:`permute_optimizer_state`): the moments in
      ``optimizer.state[p]``; under ZeRO-1/2 the fp32 master weights and the moments are one
      flat vector per parameter group, partitioned across ranks: every rank all-gathers
      each, permutes the parameter's slice (at DeepSpeed's ``round_robin_bit16_offsets``)
      and keeps its own partition (the replicated module parameters are the caller's);
    - refused (UserError, in the constructor): ZeRO-3 (no rank holds full parameters) and
      DeepSpeed fp16 (its loss scale is in the gradients the hooks see).
    """

    def __init__(self, strategy: Any, what: str) -> None:
        from wbscale.errors import UserError

        self.strategy = strategy
        self.what = what
        self.info = strategy_info(strategy)
        if self.info.params_sharded:
            raise UserError(
                f"{what} under DeepSpeed ZeRO-3 is not supported (parameters are sharded, so "
                "neither the gradient term nor the swaps can see full weights); use "
                "distributed.strategy: ddp, or deepspeed with distributed.zero_stage 1 or 2"
            )
        if self.info.deepspeed and self.info.fp16:
            raise UserError(f"{what} under DeepSpeed needs train.precision bf16-mixed or 32 (not 16-mixed)")
        self._hooks: list[Any] = []
        self._coef = 0.0
        self._add_all: Callable[[float], None] | None = None

    # ------------------------------------------------------------------ gradient term
    def add_gradient_term(
        self,
        params: dict[str, Any],
        term: Callable[[str, float], Any],
        add_all: Callable[[float], None],
        accumulate: int,
    ) -> None:
        """Add ``coef x`` the term to the gradients of ``params`` every optimizer step.

        ``add_all(coef)`` adds it to every ``p.grad`` at once (used where the gradients are
        whole at optimizer time); ``term(name, coef)`` is the tensor to add to one
        parameter's gradient (used by the hooks).
        """
        if self.info.grads_in_params:
            self._add_all = add_all
            return
        accum = max(1, accumulate)
        for name, p in params.items():

            def hook(grad: Any, name: str = name) -> Any:
                if self._coef == 0.0:
                    return grad
                return grad + term(name, self._coef / accum).to(grad.dtype)

            self._hooks.append(p.register_hook(hook))

    def set_coefficient(self, coef: float) -> None:
        """The term's coefficient for the micro-batches to come (the hooks read it)."""
        self._coef = coef

    def before_optimizer_step(self, coef: float) -> None:
        """Call from ``on_before_optimizer_step``: adds the term where the gradients are whole."""
        if self._add_all is not None:
            self._add_all(coef)

    def close(self) -> None:
        """Remove the gradient hooks (``on_fit_end``)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ------------------------------------------------------------------ optimizer state
    def permute_optimizer_state(self, moves: list[tuple[Any, int, Any]]) -> None:
        """Permute the optimizer state of weights: each ``(param, dim, index)`` in order,
        ``new[q] = old[index[q]]`` along ``dim`` (every rank, with the same moves)."""
        import torch

        with torch.no_grad():
            if not self.info.deepspeed:
                optimizer = self.strategy.optimizers[0] if self.strategy.optimizers else None
                for p, dim, index in moves:
                    for s in optimizer_moments(optimizer, p):
                        s.copy_(s.index_select(dim, index.to(s.device)))
                return
            self._permute_zero_partitions(moves)

    def _zero_optimizer(self) -> Any:
        opt = deepspeed_engine(self.strategy).optimizer
        for attr in ("single_partition_of_fp32_groups", "round_robin_bit16_groups", "round_robin_bit16_offsets"):
            if not hasattr(opt, attr):
                raise RuntimeError(
                    f"{self.what}: DeepSpeed optimizer {type(opt).__name__} has no '{attr}'; permuting weights "
                    "under DeepSpeed supports the ZeRO-1/2 optimizer (DeepSpeedZeroOptimizer) only"
                )
        return opt

    def _permute_zero_partitions(self, moves: list[tuple[Any, int, Any]]) -> None:
        import torch
        import torch.distributed as tdist

        opt = self._zero_optimizer()
        wanted: dict[int, list[tuple[int, Any]]] = {}
        for p, dim, index in moves:
            wanted.setdefault(id(p), []).append((dim, index))
        for i, params in enumerate(opt.round_robin_bit16_groups):
            hits = [(k, p) for k, p in enumerate(params) if id(p) in wanted]
            if not hits:
                continue
            pg = opt.real_dp_process_group[i]
            world, rank = tdist.get_world_size(group=pg), tdist.get_rank(group=pg)
            master = opt.single_partition_of_fp32_groups[i]
            state = opt.optimizer.state.get(master, {})
            flats = [master.data] + [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == master.shape]
            for part in flats:
                pieces = [torch.empty_like(part) for _ in range(world)]
                tdist.all_gather(pieces, part.contiguous(), group=pg)
                full = torch.cat(pieces)
                for k, p in hits:
                    offset = opt.round_robin_bit16_offsets[i][k]
                    view = full[offset: offset + p.numel()].view(p.shape)
                    for dim, index in wanted[id(p)]:
                        view.copy_(view.index_select(dim, index.to(view.device)))
                n = part.numel()
                part.copy_(full[rank * n: (rank + 1) * n])
