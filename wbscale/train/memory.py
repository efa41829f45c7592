"""``wbscale recipes check``: will this recipe fit, per GPU, under each ZeRO stage?

Nothing is allocated: the model is built on PyTorch's ``meta`` device, which gives the
exact parameter count and, through a forward pass with saved-tensor hooks, the bytes
autograd keeps for backward (activations) — measured from the real model code, so CRATE's
ISTA dictionary size, GPT-2's MLP, tied weights and the LM head are all counted.

Model states per GPU follow the ZeRO paper's accounting (Rajbhandari et al. 2020) as
DeepSpeed's own estimators write it (``estimate_zero2/3_model_states_mem_needs``), with
Psi parameters on N data-parallel GPUs, bf16 mixed precision (DeepSpeed keeps 16-bit
params/grads plus fp32 master weights, fp32 gradient partition and Adam's two moments):

=========================  ===================  =======================  ==================
strategy                   weights              gradients                optimizer (+fp32)
=========================  ===================  =======================  ==================
DDP (Lightning bf16-mixed)  4 Psi (fp32)         4 Psi                    8 Psi
ZeRO-1                     2 Psi                2 Psi                    16 Psi / N
ZeRO-2                     2 Psi                2 Psi / N                16 Psi / N
ZeRO-3                     2 Psi / N + working  working (one layer)      16 Psi / N
=========================  ===================  =======================  ==================

``offload_optimizer`` moves the fp32 part (16 Psi / N) to CPU RAM; ``offload_params``
(stage 3) also the 16-bit weights, leaving only the working set of gathered layers (4 bytes
x largest layer, DeepSpeed's figure). In fp32 (no mixed precision) weights and gradients
take 4 bytes and the optimizer 8 (no master copy).

Activations: bytes saved for backward per micro-batch (B sequences of T tokens), with
flash/SDPA attention (no T x T matrix kept), the eager ISTA block (the Triton kernel keeps
less: an upper bound). With ``activation_checkpointing`` only each block's input is kept,
plus one block's activations while it is recomputed. A transient of one block's
activations is added for backward either way.

"Fits" compares the total with the GPU's memory minus a reserve (10 % + 1.5 GB for the CUDA
context, NCCL buffers and allocator fragmentation). These are estimates: measure with
``wbscale bench train`` before committing to a configuration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from wbscale.config import Recipe
from wbscale.errors import UserError, did_you_mean
from wbscale.hardware import GB, GPUS
from wbscale.sizing import model_vocab
from wbscale.sizing import tokens_per_step as tokens_per_step_of

RESERVE_FRACTION = 0.10
RESERVE_BYTES = 1.5 * GB


@dataclass(frozen=True)
class ModelFacts:
    """What the meta-device model tells: sizes and saved-for-backward bytes."""

    params: int  # unique parameters (tied once), all of them
    largest_layer_params: int  # the biggest single module's own parameters (ZeRO-3 working set)
    flops_per_token: int
    activation_bytes_per_sequence: float  # no checkpointing, one sequence of block_size tokens
    checkpointed_bytes_per_sequence: float  # with per-block activation checkpointing
    vocab_size: int


@dataclass(frozen=True)
class Estimate:
    """Per-GPU memory of one configuration, in bytes."""

    strategy: str  # "ddp" | "zero1" | "zero2" | "zero3"
    offload: str  # "none" | "optimizer" | "optimizer+params"
    weights: float
    gradients: float
    optimizer: float
    activations: float
    cpu_per_node: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


class _FlashSDPA(torch.autograd.Function):
    """Stands in for SDPA on the meta device: saves what flash attention saves.

    q, k, v, the output and a (B, h, T) fp32 log-sum-exp; never the T x T scores the math
    fallback (the only SDPA kernel meta tensors reach) would keep.
    """

    @staticmethod
    def forward(ctx, q, k, v):  # noqa: D401
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - never run on meta
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _saved_bytes(
    model: torch.nn.Module, batch: int, seq: int, vocab: int, dtype: torch.dtype, loss_chunk: int = 0
) -> float:
    """Bytes autograd saves for backward in one forward of ``batch x seq`` tokens (meta)."""
    import torch.nn.functional as F

    saved: dict[int, int] = {}
    keep: list[torch.Tensor] = []

    def pack(t: torch.Tensor):
        if id(t) not in saved:  # one tensor saved by several ops is stored once
            saved[id(t)] = t.numel() * t.element_size()
            keep.append(t)
        return t

    def sdpa(q, k, v, *args, **kwargs):
        return _FlashSDPA.apply(q, k, v)

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = sdpa
    try:
        idx = torch.zeros(batch, seq, dtype=torch.long, device="meta")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.to(dtype)
            model(idx, idx, loss_chunk=loss_chunk)
    finally:
        F.scaled_dot_product_attention = original
    return float(sum(saved.values()))


def model_facts(recipe: Recipe, dtype: torch.dtype = torch.bfloat16) -> tuple[ModelFacts, list[str]]:
    """Sizes, FLOPs/token and activation bytes of the recipe's model, on the meta device."""
    from wbscale.models import build_model

    notes: list[str] = []
    from wbscale.data.tokenizer import expected_vocab_size

    vocab, note = model_vocab(recipe, expected_vocab_size(recipe.data))
    if note:
        notes.append(note)
    cfg = dataclasses.replace(recipe.model, vocab_size=vocab, pretrained=None, ista_kernel="eager")
    if recipe.model.pretrained:
        notes.append("model.pretrained: sizes taken from the recipe's model section, not the checkpoint")

    def build(n_layer: int):
        with torch.device("meta"):
            return build_model(dataclasses.replace(cfg, n_layer=n_layer))

    model = build(cfg.n_layer)
    params = sum(dict((id(p), p.numel()) for p in model.parameters()).values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    flops = int(model.flops_per_token(cfg.block_size))
    # One and two layers: the difference is one block, the rest is embeddings + head + loss.
    seq = cfg.block_size
    chunk = recipe.train.loss_chunk
    one = _saved_bytes(build(1), 1, seq, vocab, dtype, chunk)
    two = _saved_bytes(build(2), 1, seq, vocab, dtype, chunk)
    per_block = two - one
    outside = one - per_block
    block_input = seq * cfg.n_embd * torch.finfo(dtype).bits / 8
    full = outside + cfg.n_layer * per_block
    checkpointed = outside + cfg.n_layer * block_input + per_block
    return ModelFacts(params, largest, flops, full, checkpointed, vocab), notes


def estimate(
    facts: ModelFacts, strategy: str, offload: str, world: int, gpus_per_node: int,
    micro_batch: int, activation_checkpointing: bool, mixed: bool = True,
) -> Estimate:
    """Per-GPU bytes of one (strategy, offload) choice on ``world`` GPUs."""
    psi, n = float(facts.params), float(world)
    w16, g16 = (2.0, 2.0) if mixed else (4.0, 4.0)
    fp32_states = 16.0 if mixed else 8.0  # (fp32 grad + master +) m + v
    seq_bytes = facts.checkpointed_bytes_per_sequence if activation_checkpointing else facts.activation_bytes_per_sequence
    # backward transient: about one block's activations, already in the checkpointed figure
    acts = micro_batch * seq_bytes
    working = 4.0 * facts.largest_layer_params  # ZeRO-3 gathered layer (16-bit param + grad)
    cpu = 0.0
    if strategy == "ddp":
        weights, grads, opt = 4 * psi, 4 * psi, 8 * psi
    elif strategy == "zero1":
        weights, grads, opt = w16 * psi, g16 * psi, fp32_states * psi / n
    elif strategy == "zero2":
        weights, grads, opt = w16 * psi, g16 * psi / n, fp32_states * psi / n
    elif strategy == "zero3":
        # gradients are reduce-scattered straight into the fp32 partition (counted in the
        # optimizer's 16 bytes); only the gathered layer's 16-bit gradient lives on the GPU
        weights, grads, opt = w16 * psi / n + working / 2, working / 2, fp32_states * psi / n
    else:
        raise ValueError(strategy)
    if offload in ("optimizer", "optimizer+params"):
        cpu += opt * gpus_per_node
        opt = 0.0
        if strategy == "zero2":
            grads = 0.0  # ZeRO-Offload keeps the reduced gradient partition on the CPU too
    if offload == "optimizer+params":
        cpu += (weights + grads - working) * gpus_per_node
        weights, grads = working / 2, working / 2
    return Estimate(strategy, offload, weights, grads, opt, acts, cpu)


def check_recipe(recipe: Recipe, nodes: int | None = None, devices: int | None = None, gpu: str = "h100-80gb") -> dict[str, Any]:
    """Parameters, FLOPs/token and a per-GPU memory table for every strategy choice."""
    if gpu not in GPUS:
        raise UserError(f"--gpu {gpu!r} is not known" + did_you_mean(gpu, GPUS) + f" (known: {', '.join(GPUS)})")
    nodes = nodes or recipe.distributed.nodes
    devices = devices or recipe.distributed.devices
    world = nodes * devices
    capacity, peak = GPUS[gpu].memory, GPUS[gpu].peak_bf16
    usable = capacity * (1 - RESERVE_FRACTION) - RESERVE_BYTES
    mixed = recipe.train.precision in ("auto", "bf16-mixed", "16-mixed", "bf16-true")
    facts, notes = model_facts(recipe, torch.bfloat16 if mixed else torch.float32)
    t, d = recipe.train, recipe.distributed
    rows = []
    choices = [("ddp", "none")] + [(f"zero{s}", "none") for s in (1, 2, 3)]
    choices += [(f"zero{s}", "optimizer") for s in (1, 2, 3)] + [("zero3", "optimizer+params")]
    configured = "ddp" if d.strategy in ("auto", "ddp") else f"zero{d.zero_stage}"
    configured_offload = "optimizer+params" if d.offload_params else ("optimizer" if d.offload_optimizer else "none")
    for strategy, offload in choices:
        e = estimate(facts, strategy, offload, world, devices, t.micro_batch_size, d.activation_checkpointing, mixed)
        rows.append({
            "strategy": strategy, "offload": offload,
            "weights_gb": e.weights / GB, "gradients_gb": e.gradients / GB, "optimizer_gb": e.optimizer / GB,
            "activations_gb": e.activations / GB, "total_gb": e.total / GB, "cpu_per_node_gb": e.cpu_per_node / GB,
            "fits": e.total <= usable,
            "configured": (strategy, offload) == (configured, configured_offload),
        })
    tokens_per_step = tokens_per_step_of(recipe, world)
    return {
        "recipe": recipe.train.run_name,
        "model": f"{recipe.model.arch} {recipe.model.n_layer}L-{recipe.model.n_embd}d-{recipe.model.n_head}h",
        "params": facts.params,
        "largest_layer_params": facts.largest_layer_params,
        "vocab_size": facts.vocab_size,
        "flops_per_token": facts.flops_per_token,
        "tokens_per_step": tokens_per_step,
        # time per step at 40 % MFU: a planning number, not a measurement
        "step_seconds_at_40pct_mfu": facts.flops_per_token * tokens_per_step / (0.4 * peak * world),
        "gpu": gpu, "gpu_memory_gb": capacity / GB, "usable_gb": usable / GB,
        "nodes": nodes, "devices_per_node": devices,
        "micro_batch_size": t.micro_batch_size, "block_size": recipe.model.block_size,
        "activation_checkpointing": d.activation_checkpointing,
        "precision": "bf16 mixed" if mixed else "fp32",
        "rows": rows,
        "configured_fits": next(r["fits"] for r in rows if r["configured"]),
        "notes": notes,
    }


def format_report(report: dict[str, Any]) -> str:
    """The check as a human-readable table."""
    r = report
    lines = [
        f"{r['model']}: {r['params'] / 1e6:.1f}M parameters (largest layer {r['largest_layer_params'] / 1e6:.1f}M), "
        f"vocab {r['vocab_size']}, {r['flops_per_token'] / 1e9:.2f} GFLOPs/token (train)",
        f"{r['nodes']} node(s) x {r['devices_per_node']} {r['gpu']} ({r['gpu_memory_gb']:.0f} GB, "
        f"{r['usable_gb']:.1f} GB usable), micro batch {r['micro_batch_size']} x {r['block_size']} tokens, "
        f"{r['precision']}, activation checkpointing {'on' if r['activation_checkpointing'] else 'off'}",
        f"{r['tokens_per_step']:,} tokens/step; ~{r['step_seconds_at_40pct_mfu']:.3f} s/step at 40% MFU",
        "",
        f"{'per GPU (GB)':<26} weights  grads  optim  activ  total  CPU/node  fits",
    ]
    for row in r["rows"]:
        name = row["strategy"] + ("" if row["offload"] == "none" else f" offload {row['offload']}")
        mark = " <- recipe" if row["configured"] else ""
        lines.append(
            f"{name:<26} {row['weights_gb']:7.2f} {row['gradients_gb']:6.2f} {row['optimizer_gb']:6.2f} "
            f"{row['activations_gb']:6.2f} {row['total_gb']:6.2f} {row['cpu_per_node_gb']:9.1f}  "
            f"{'yes' if row['fits'] else 'NO '}{mark}"
        )
    lines.append("")
    lines.append(
        "the recipe's configuration " + ("fits." if r["configured_fits"] else
        "does NOT fit: pick a row marked yes (distributed.zero_stage / offload_*), lower "
        "train.micro_batch_size (raise train.grad_accum to keep the batch), or turn on "
        "distributed.activation_checkpointing")
    )
    lines.extend(f"note: {n}" for n in r["notes"])
    return "\n".join(lines)
