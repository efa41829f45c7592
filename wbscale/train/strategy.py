"""How a run is spread over processes: one device, DDP, or DeepSpeed ZeRO 1/2/3 (+ CPU offload).

Everything comes from the recipe's ``distributed:`` section, so the same recipe runs on one
CPU process, two CPU processes, one GPU or many nodes by changing that section alone:

- ``auto``: Lightning's single-device strategy (one process).
- ``ddp``: Lightning's DDPStrategy; gloo on CPU, NCCL on GPU.
- ``deepspeed``: :class:`WBDeepSpeedStrategy`, Lightning's DeepSpeedStrategy with the
  DeepSpeed config generated from the recipe (:func:`deepspeed_config`), so micro batch,
  gradient accumulation, clipping and precision can never disagree with the trainer's;
  extra DeepSpeed keys pass through ``distributed.deepspeed_extra`` after validation.

DeepSpeed on CPU: Lightning refuses a non-CUDA accelerator for DeepSpeed. The subclass
accepts CPU (``DS_ACCELERATOR=cpu``, gloo) by overriding ``setup_environment``,
``setup_distributed`` and ``root_device``; nothing else differs, so the CPU path trains and
checkpoints exactly like the GPU path (same shard files, same universal conversion). It is
what the tests run.
"""

from __future__ import annotations

import functools
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy

from wbscale.config import Recipe
from wbscale.errors import UserError, did_you_mean, require

# Top-level keys of a DeepSpeed config (https://www.deepspeed.ai/docs/config-json/) that
# ``distributed.deepspeed_extra`` may set. Anything else is a typo or a key of another tool.
DEEPSPEED_KEYS = frozenset({
    "activation_checkpointing", "aio", "autotuning", "checkpoint", "comms_logger",
    "communication_data_type", "compression_training", "csv_monitor", "curriculum_learning",
    "data_efficiency", "data_types", "dataloader_drop_last", "disable_allgather", "dump_state",
    "eigenvalue", "elasticity", "flops_profiler", "gradient_predivide_factor", "graph_harvesting",
    "memory_breakdown", "nebula", "prescale_gradients", "progressive_layer_drop",
    "seq_parallel_communication_data_type", "sparse_attention", "sparse_gradients",
    "steps_per_print", "tensorboard", "timers", "torch_autocast", "wall_clock_breakdown",
    "wandb", "comet", "weight_quantization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "zero_optimization", "compile", "use_node_local_storage",
})

# Keys the recipe owns: setting them twice would let the two disagree.
RECIPE_OWNED_KEYS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "train.micro_batch_size and train.grad_accum (times the world size)",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "amp": "train.precision",
    "optimizer": "optim.* (wbscale builds AdamW with its parameter groups itself)",
    "scheduler": "optim.* (wbscale's warmup + cosine schedule)",
}
ZERO_OWNED_KEYS = {
    "stage": "distributed.zero_stage",
    "offload_optimizer": "distributed.offload_optimizer",
    "offload_param": "distributed.offload_params",
    "cpu_offload": "distributed.offload_optimizer",
    "cpu_offload_param": "distributed.offload_params",
}


# ---------------------------------------------------------------------------- config


def _zero_keys() -> set[str]:
    """Names (and aliases) DeepSpeed's ZeRO config accepts, from its own pydantic model."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    keys = set()
    for name, info in DeepSpeedZeroConfig.model_fields.items():
        keys.add(name)
        if info.alias:
            keys.add(info.alias)
    return keys


def validate_deepspeed_extra(extra: dict[str, Any]) -> None:
    """Refuse unknown or recipe-owned keys in ``distributed.deepspeed_extra``, naming them."""
    where = "distributed.deepspeed_extra"
    for key, value in extra.items():
        if key in RECIPE_OWNED_KEYS:
            raise UserError(
                f"{where}.{key}: set by wbscale from {RECIPE_OWNED_KEYS[key]}; change that recipe "
                f"value instead and remove '{key}' from {where}"
            )
        if key not in DEEPSPEED_KEYS:
            raise UserError(
                f"{where}.{key}: not a DeepSpeed config key"
                + did_you_mean(key, sorted(DEEPSPEED_KEYS | set(RECIPE_OWNED_KEYS)))
                + " (see https://www.deepspeed.ai/docs/config-json/)"
            )
        if key == "zero_optimization":
            if not isinstance(value, dict):
                raise UserError(f"{where}.zero_optimization: expected a mapping, got {value!r}")
            known = _zero_keys()
            for sub in value:
                if sub in ZERO_OWNED_KEYS:
                    raise UserError(
                        f"{where}.zero_optimization.{sub}: set by wbscale from {ZERO_OWNED_KEYS[sub]}; "
                        f"change that recipe value instead"
                    )
                if sub not in known:
                    raise UserError(
                        f"{where}.zero_optimization.{sub}: not a DeepSpeed ZeRO key"
                        + did_you_mean(sub, sorted(known))
                    )


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def deepspeed_config(recipe: Recipe, accelerator: str, precision: str) -> dict[str, Any]:
    """The DeepSpeed JSON config of a recipe (validated ``deepspeed_extra`` merged in)."""
    d, t, o = recipe.distributed, recipe.train, recipe.optim
    if d.offload_params and d.zero_stage != 3:
        raise UserError(
            f"distributed.offload_params needs distributed.zero_stage: 3 (got {d.zero_stage}); "
            "ZeRO-1/2 keep full parameters on every device. Use offload_optimizer instead, or stage 3"
        )
    validate_deepspeed_extra(d.deepspeed_extra)
    on_gpu = accelerator == "gpu"
    # Buckets: 5e8 elements (DeepSpeed's default) would allocate 2 GB of fp32 buffers per
    # rank, far more than a small model needs; 5e7 keeps GPU comms efficient.
    bucket = int(5e7)
    zero: dict[str, Any] = {
        "stage": d.zero_stage,
        "contiguous_gradients": True,
        # Overlapping reduction with backward needs a second stream; gloo on CPU has none.
        "overlap_comm": on_gpu,
        "reduce_scatter": True,
        "allgather_partitions": True,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
    }
    if d.zero_stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": bucket,
            "stage3_param_persistence_threshold": 0 if not on_gpu else int(1e5),
            # Save full 16-bit weights too? No: consolidation reads the fp32 shards.
            "stage3_gather_16bit_weights_on_model_save": False,
        })
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": float(o.grad_clip),
        "zero_optimization": zero,
        # torch AdamW is not on DeepSpeed's list of "tested" ZeRO optimizers; it works.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # wbscale logs throughput itself
        "wall_clock_breakdown": False,
    }
    if precision.startswith("bf16"):
        cfg["bf16"] = {"enabled": True}
    elif precision.startswith("16"):
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if d.offload_optimizer:
        # The strategy swaps in DeepSpeedCPUAdam on GPU runs when that op builds; on CPU runs
        # (and where it cannot be built) the offloaded step runs torch AdamW, which
        # DeepSpeed refuses unless told this.
        cfg["zero_force_ds_cpu_optimizer"] = False
    return _merge(cfg, d.deepspeed_extra)


@functools.cache
def cpu_adam_available() -> bool:
    """True when DeepSpeed's CPU Adam op loads (it compiles once, ~1 min, with ninja + g++)."""
    if os.environ.get("WBSCALE_NO_CPU_ADAM"):
        return False
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        if not CPUAdamBuilder().is_compatible(verbose=False):
            return False
        CPUAdamBuilder().load(verbose=False)
        return True
    except Exception:  # any build/import failure means: use torch AdamW instead
        return False


# ---------------------------------------------------------------------------- strategies


class WBDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy with wbscale's fixes; runs on CPU (gloo) and GPU.

    - CPU: skips Lightning's CUDA-only checks (the DeepSpeed CPU accelerator does the rest).
    - Gradient accumulation: Lightning already divides the loss by ``accumulate_grad_batches``
      and DeepSpeed's ``engine.backward`` divides again by default; backward is called with
      ``scale_wrt_gas=False`` so gradients equal the single-process run's.
    - The generated config already holds micro batch / accumulation / clipping; they are
      checked against the trainer instead of being refused by Lightning.
    - Offload (GPU): the module's torch AdamW is swapped for DeepSpeedCPUAdam (same
      hyper-parameters, same state keys) when that op builds; otherwise, and on CPU runs,
      torch AdamW runs the offloaded step.
    - ``load_universal``: resume from a universal checkpoint (world size or stage changed).
    """

    def __init__(self, *args: Any, load_universal: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.load_universal = load_universal
        if load_universal:
            self.config.setdefault("checkpoint", {})["load_universal"] = True

    # ---- CPU support
    @property
    def on_cpu(self) -> bool:
        return self.parallel_devices is not None and self.parallel_devices[0].type == "cpu"

    def setup_environment(self) -> None:
        if self.on_cpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            DDPStrategy.setup_environment(self)  # DDP's: setup_distributed + device setup
        else:
            super().setup_environment()

    def setup_distributed(self) -> None:
        if not self.on_cpu:
            super().setup_distributed()
            return
        from lightning.fabric.utilities.seed import reset_seed

        # Lightning's version validates CUDA device indices, which CPU devices lack.
        reset_seed()
        self.set_world_ranks()
        self._process_group_backend = "gloo"
        _skip_shm_comm_op()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        if self.on_cpu:
            return torch.device("cpu")
        return super().root_device

    def _get_process_group_backend(self) -> str:
        return "gloo" if self.on_cpu else super()._get_process_group_backend()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        if not self.on_cpu:
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import argparse

        import deepspeed

        # Lightning passes the CUDA device index (None on CPU); DeepSpeed then needs the
        # local rank to pick its device and read the world size from the process group.
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    # ---- universal checkpoints
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        client_state = super().load_checkpoint(checkpoint_path, weights_only)
        if self.load_universal:
            self._repair_universal_load(Path(checkpoint_path))
        return client_state

    def _repair_universal_load(self, universal: Path) -> None:
        """Undo two slips of DeepSpeed's ZeRO-3 universal loader (0.19).

        - It copies group 0's hyper-parameters into every AdamW group, so the no-decay
          group (norms, biases, embeddings) would be decayed after the resume: each group
          gets its own saved values back.
        - It assigns one ``step`` tensor object to every group's state; AdamW increments
          it in place once per group, so bias correction would run ahead (2 groups: twice
          per step). Each state gets its own copy.

        ZeRO-1/2's loader does both right; re-applying is harmless there.
        """
        base = getattr(self.deepspeed_engine.optimizer, "optimizer", None)
        if base is None:
            return
        path = universal / "checkpoint" / "zero" / "optimizer_state.pt"
        saved = torch.load(path, map_location="cpu", weights_only=False).get("param_groups") or []
        if len(base.param_groups) == len(saved):
            for live, group in zip(base.param_groups, saved, strict=True):
                live.update({k: v for k, v in group.items() if k != "params"})
        for state in base.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

    # ---- accumulation: one scaling only
    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def _format_batch_size_and_grad_accum_config(self) -> None:
        if self.lightning_module is None:
            return
        trainer = self.lightning_module.trainer
        assert self.config is not None
        if self.config.get("gradient_accumulation_steps") != trainer.accumulate_grad_batches:
            raise UserError(
                f"DeepSpeed config gradient_accumulation_steps={self.config.get('gradient_accumulation_steps')} "
                f"but the trainer accumulates {trainer.accumulate_grad_batches} batches"
            )

    # ---- optimizer: DeepSpeedCPUAdam under offload
    def _init_optimizers(self):
        optimizer, scheduler_config = super()._init_optimizers()
        offload = (self.config or {}).get("zero_optimization", {}).get("offload_optimizer")
        # Not on CPU runs: the op's JIT build costs minutes there and buys nothing, the
        # "offloaded" state already lives in the same memory.
        if offload and not self.on_cpu and cpu_adam_available() and isinstance(optimizer, torch.optim.AdamW):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            groups = [dict(g) for g in optimizer.param_groups]
            defaults = optimizer.defaults
            new = DeepSpeedCPUAdam(
                groups, lr=defaults["lr"], betas=defaults["betas"], eps=defaults["eps"],
                weight_decay=defaults["weight_decay"], adamw_mode=True,
            )
            if scheduler_config is not None:
                scheduler_config.scheduler.optimizer = new
            optimizer = new
        return optimizer, scheduler_config


def _skip_shm_comm_op() -> None:
    """Keep DeepSpeed's CPU backend on plain gloo collectives.

    DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op at its first
    ``init_distributed`` (minutes on a small machine, once per fresh cache) and then uses
    it for some all-reduces. Plain gloo is fast enough for CPU runs and keeps startup
    short; ``WBSCALE_DS_SHM=1`` restores DeepSpeed's default.
    """
    if os.environ.get("WBSCALE_DS_SHM") == "1":
        return
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            deepspeed.ops.__compatible_ops__[builder.NAME] = False
    except Exception:  # older/newer DeepSpeed without this op: nothing to skip
        pass


def build_strategy(recipe: Recipe, accelerator: str, precision: str = "32-true", load_universal: bool = False) -> str | Strategy:
    """The Lightning strategy for ``recipe.distributed`` on ``accelerator`` (cpu | gpu)."""
    d = recipe.distributed
    if d.strategy == "auto":
        if d.devices * d.nodes > 1:
            raise UserError(
                f"distributed.strategy: auto runs one process, but distributed.devices={d.devices} "
                f"and distributed.nodes={d.nodes}; set distributed.strategy to ddp or deepspeed"
            )
        return "auto"
    # A hung rank makes the others' next collective fail after this long (default 30 min).
    timeout = timedelta(seconds=d.timeout_s)
    if d.strategy == "ddp":
        return DDPStrategy(
            process_group_backend="gloo" if accelerator == "cpu" else None,
            # every parameter gets a gradient on every step: no unused-parameter search
            find_unused_parameters=False,
            timeout=timeout,
        )
    require("deepspeed", "deepspeed", "distributed.strategy: deepspeed")
    if accelerator == "cpu":
        # must be set before DeepSpeed picks its accelerator (at its first use)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    config = deepspeed_config(recipe, accelerator, precision)
    import logging

    return WBDeepSpeedStrategy(
        config=config, load_universal=load_universal, logging_level=logging.WARNING, timeout=timeout
    )
