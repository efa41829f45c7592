"""Swaps under DeepSpeed ZeRO-1/2: permute the fp32 master partition and its moments too.

ZeRO-1/2 keep full (bf16 or fp32) parameters on every rank, but the fp32 master weights and
the AdamW moments are one flat vector per parameter group, partitioned across ranks
(``DeepSpeedZeroOptimizer.single_partition_of_fp32_groups``). Permuting only the module's
parameters would be undone by the next step (the master copy is written back), so for each
parameter group holding a permuted tensor, every rank all-gathers the flat master vector and
each moment, permutes the parameter's slice (its offset in the flat buffer is DeepSpeed's
``round_robin_bit16_offsets``), and keeps its own partition. Every rank runs this with the
same permutation (decided on rank 0 and broadcast).

ZeRO-3 shards the parameters themselves; it is refused by the callback.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from wbscale.bimt.geometry import Geometry, tensor
from wbscale.bimt.swaps import apply_permutation, neuron_index
from wbscale.dist import deepspeed_engine


def zero_optimizer(trainer: Any) -> Any:
    engine = deepspeed_engine(trainer.strategy)
    opt = engine.optimizer
    for attr in ("single_partition_of_fp32_groups", "round_robin_bit16_groups", "round_robin_bit16_offsets"):
        if not hasattr(opt, attr):
            raise RuntimeError(
                f"bimt: DeepSpeed optimizer {type(opt).__name__} has no '{attr}'; swaps under DeepSpeed "
                "support the ZeRO-1/2 optimizer (DeepSpeedZeroOptimizer) only"
            )
    return opt


@torch.no_grad()
def apply_permutation_zero(trainer: Any, model: nn.Module, geom: Geometry, group: str, perm: Tensor) -> None:
    """Permute ``group``'s units in the module, the fp32 master partitions and their moments."""
    opt = zero_optimizer(trainer)
    g = geom.groups[group]
    # the replicated module parameters (views into DeepSpeed's flat bit16 buffers)
    apply_permutation(model, geom, group, perm, state_fn=lambda p: [])
    wanted: dict[int, list[tuple[int, Tensor]]] = {}
    for target in g.targets:
        t = tensor(model, target.name)
        if isinstance(t, nn.Parameter):
            wanted.setdefault(id(t), []).append((target.dim, neuron_index(perm, g, target.tile)))
    for i, params in enumerate(opt.round_robin_bit16_groups):
        hits = [(k, p) for k, p in enumerate(params) if id(p) in wanted]
        if not hits:
            continue
        pg = opt.real_dp_process_group[i]
        world, rank = dist.get_world_size(group=pg), dist.get_rank(group=pg)
        master = opt.single_partition_of_fp32_groups[i]
        state = opt.optimizer.state.get(master, {})
        flats = [master.data] + [v for v in state.values() if isinstance(v, Tensor) and v.shape == master.shape]
        for part in flats:
            pieces = [torch.empty_like(part) for _ in range(world)]
            dist.all_gather(pieces, part.contiguous(), group=pg)
            full = torch.cat(pieces)
            for k, p in hits:
                offset = opt.round_robin_bit16_offsets[i][k]
                view = full[offset: offset + p.numel()].view(p.shape)
                for dim, index in wanted[id(p)]:
                    view.copy_(view.index_select(dim, index.to(view.device)))
            n = part.numel()
            part.copy_(full[rank * n: (rank + 1) * n])
