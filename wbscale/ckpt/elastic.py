"""Elastic resume: continue a run on another world size, ZeRO stage or strategy.

A checkpoint records its topology in ``meta.json`` (``world_size``, ``strategy``,
``zero_stage``). When the resuming run's topology differs, the checkpoint is converted
once, next to itself, and training loads the converted form:

======================  =====================  ============================================
saved                   resumed as             what happens
======================  =====================  ============================================
auto / ddp (one file)   auto / ddp, any size   loaded as is (full weights + AdamW state)
deepspeed N, stage s    deepspeed N, stage s   loaded as is (each rank reads its shards)
deepspeed N, stage s    deepspeed M / s'       ``step-…/universal/`` via DeepSpeed's
                                               ``ds_to_universal``, loaded with
                                               ``checkpoint.load_universal``
deepspeed, any          auto / ddp             ``step-…/full.ckpt``: a Lightning checkpoint
                                               built from the universal form
auto / ddp              deepspeed, any         ``step-…/universal/`` written from the full
                                               checkpoint, loaded like the row above
======================  =====================  ============================================

Optimizer state (AdamW's exp_avg, exp_avg_sq, step and the parameter groups' hyper-
parameters) is preserved in every row; the LR schedule, loop counters, sampler position
and wandb id come from the checkpoint's Lightning state. The data sampler is keyed on
global samples consumed, so it continues where the global stream stopped.

The universal form (DeepSpeed's format) is a folder per parameter holding ``fp32.pt``,
``exp_avg.pt``, ``exp_avg_sq.pt``, ``step.pt`` with the *full* (unpartitioned) tensors,
``zero/optimizer_state.pt`` (param groups), and the model-states file with the Lightning
client state. It is the hub every conversion goes through.

Only global rank 0 converts; the other ranks wait for the converted folder to appear (it
is renamed into place when complete), so this works under the Lightning launcher,
torchrun and srun alike.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from wbscale.ckpt.format import CheckpointInfo, read_checkpoint, verify_checkpoint
from wbscale.config import Recipe, recipe_from_dict
from wbscale.errors import UserError, require
from wbscale.models import CRATE, build_model
from wbscale.ranks import is_rank_zero, say, wait_for_rank_zero

UNIVERSAL_DIR = "universal"
FULL_FILE = "full.ckpt"
DS_TAG = "checkpoint"  # the tag Lightning's DeepSpeedStrategy saves under
# The training module holds the language model as ``.model``: Lightning state-dict keys
# are ``model.<parameter name>``.
MODULE_PREFIX = "model."
# Lightning-checkpoint keys that DeepSpeed stores itself (not client state)
_DS_MODEL_STATE_KEYS = {
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
    "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
    "ds_version", "checkpoint_parallel_dimensions", "universal_checkpoint_info",
}


@dataclass(frozen=True)
class Topology:
    """How a run was (or will be) spread: strategy family, world size, ZeRO stage."""

    sharded: bool  # DeepSpeed shards (True) or one full Lightning checkpoint file (False)
    world_size: int
    zero_stage: int | None

    def describe(self) -> str:
        if self.sharded:
            return f"DeepSpeed ZeRO-{self.zero_stage} on {self.world_size} process(es)"
        return f"a full checkpoint (single device / DDP) on {self.world_size} process(es)"


def saved_topology(ckpt: CheckpointInfo) -> Topology:
    """The topology a checkpoint was written with (meta.json, else the shard files)."""
    meta = ckpt.meta
    sharded = ckpt.model_path.is_dir()
    stage = meta.get("zero_stage")
    if sharded and stage is None:  # checkpoints written before zero_stage was recorded
        stage = _stage_from_shards(ckpt.model_path / DS_TAG)
    return Topology(sharded=sharded, world_size=int(meta.get("world_size") or 1), zero_stage=stage if sharded else None)


def current_topology(recipe: Recipe) -> Topology:
    """The topology the recipe (and launcher environment) will run with."""
    d = recipe.distributed
    world = d.devices * d.nodes
    env = os.environ
    # torchrun / srun decide the world, not the recipe (SLURM_NTASKS only inside an srun step)
    env_world = env.get("WORLD_SIZE") or (env.get("SLURM_NTASKS") if "SLURM_PROCID" in env else None)
    if env_world and env_world.isdigit() and int(env_world) > 1:
        world = int(env_world)
    sharded = d.strategy == "deepspeed"
    return Topology(sharded=sharded, world_size=world, zero_stage=d.zero_stage if sharded else None)


@dataclass(frozen=True)
class ResumePlan:
    """What ``trainer.fit`` should load, and how."""

    ckpt_path: str | None
    load_universal: bool = False
    converted: str | None = None  # a line for the user when a conversion happened


def plan_resume(recipe: Recipe, ckpt: CheckpointInfo | None) -> ResumePlan:
    """Decide how to load ``ckpt`` into the run ``recipe`` describes; convert if needed."""
    if ckpt is None:
        return ResumePlan(None)
    saved, now = saved_topology(ckpt), current_topology(recipe)
    if not saved.sharded and not now.sharded:
        return ResumePlan(str(ckpt.model_path))
    same = saved.sharded and now.sharded and (saved.world_size, saved.zero_stage) == (now.world_size, now.zero_stage)
    if same and os.environ.get("WBSCALE_FORCE_UNIVERSAL") != "1":  # the env: tests of the universal path
        return ResumePlan(str(ckpt.model_path))
    change = f"checkpoint step {ckpt.step} was written by {saved.describe()}; resuming with {now.describe()}"
    if now.sharded:
        universal = ensure_universal(ckpt, recipe)
        say(f"{change}: loading the universal checkpoint {universal}")
        return ResumePlan(str(universal), load_universal=True, converted=change)
    full = ensure_full_checkpoint(ckpt, recipe)
    say(f"{change}: loading the consolidated checkpoint {full}")
    return ResumePlan(str(full), converted=change)


# ---------------------------------------------------------------------------- rank 0 converts


def _build_once(final: Path, what: str, build) -> Path:
    """Rank 0 builds ``final`` via a temp path + rename; other ranks wait for it."""
    if final.exists():
        return final
    if not is_rank_zero():
        wait_for_rank_zero(final, what)
        return final
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    try:
        build(tmp)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()
    return final


# ---------------------------------------------------------------------------- to universal


def ensure_universal(ckpt: CheckpointInfo, recipe: Recipe | None = None) -> Path:
    """``step-…/universal/`` for any checkpoint (DeepSpeed shards or a full file)."""
    verify_checkpoint(ckpt)
    final = ckpt.path / UNIVERSAL_DIR
    if ckpt.model_path.is_dir():
        return _build_once(final, "universal checkpoint", lambda tmp: _shards_to_universal(ckpt, tmp))
    if recipe is None:
        recipe = recipe_from_dict(ckpt.meta["recipe"])
    return _build_once(final, "universal checkpoint", lambda tmp: _full_to_universal(ckpt, recipe, tmp))


def _shards_to_universal(ckpt: CheckpointInfo, out: Path) -> None:
    require("deepspeed", "deepspeed", "converting a DeepSpeed checkpoint to another topology")
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(
        input_folder=str(ckpt.model_path / DS_TAG),
        output_folder=str(out / DS_TAG),
        num_extract_workers=1,  # worker processes would re-import torch: slower for our sizes
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # Lightning's engine does not write DeepSpeed's universal-info block; it only
        # carries a format version, which this injects.
        inject_missing_state=True,
    )
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            ds_to_universal(args)
    except Exception as err:
        world, stage = ckpt.meta.get("world_size"), ckpt.meta.get("zero_stage")
        raise UserError(
            f"{ckpt.path}: DeepSpeed could not convert this checkpoint to the universal format "
            f"({type(err).__name__}: {err}). Resume it with the topology it was written with: "
            f"wbscale fit --resume {ckpt.path} --set distributed.strategy=deepspeed "
            f"--set distributed.devices={world} --set distributed.zero_stage={stage} "
            "(devices x nodes must equal that world size)"
        ) from err
    _normalise_universal(out)


def _normalise_universal(out: Path) -> None:
    """Make one universal folder loadable by ZeRO-1/2 and ZeRO-3 alike.

    DeepSpeed's two loaders look for different files: ZeRO-1/2 for
    ``mp_rank_00_model_states.pt`` and a top-level ``param_groups`` + per-parameter
    ``step.pt``; ZeRO-3 for ``zero_pp_rank_0_mp_rank_00_model_states.pt`` and
    ``optimizer_state_dict.state[0].step``. ``ds_to_universal`` writes only the layout of
    the stage it read, so a stage change (3 -> 2, 2 -> 3) needs both.
    """
    import deepspeed

    tag = out / DS_TAG
    zero = tag / "zero"
    states = sorted(tag.glob("*model_states.pt"))
    if not states:
        raise UserError(f"{tag}: no model-states file after conversion")
    source = next((p for p in states if p.name.startswith("mp_rank_")), states[0])
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if not (tag / name).exists():
            shutil.copyfile(source, tag / name)
    opt_path = zero / "optimizer_state.pt"
    sd = torch.load(opt_path, map_location="cpu", weights_only=False)
    step = _find_step(sd, zero)
    groups = sd.get("param_groups") or sd.get("optimizer_state_dict", {}).get("param_groups")
    sd["param_groups"] = groups
    sd.setdefault("optimizer_state_dict", {"state": {0: {"step": step}}, "param_groups": groups})
    sd.setdefault("ds_version", deepspeed.__version__)
    torch.save(sd, opt_path)
    # ZeRO-3 sources store flat tensors; ZeRO-1/2 loaders want {"param": full-shape tensor}.
    shapes: dict[str, Any] = {}
    for group in torch.load(source, map_location="cpu", weights_only=False).get("param_shapes") or []:
        shapes.update(group)
    for param_dir in (p for p in zero.iterdir() if p.is_dir()):
        for file in param_dir.glob("*.pt"):
            if file.name == "step.pt":
                continue
            value = torch.load(file, map_location="cpu", weights_only=False)
            if isinstance(value, dict):
                continue
            shape = shapes.get(param_dir.name)
            tensor = value.detach().reshape(shape) if shape is not None else value.detach()
            torch.save({"param": tensor, "cat_dim": 0}, file)
        if (param_dir / "exp_avg.pt").exists() and not (param_dir / "step.pt").exists():
            torch.save(torch.tensor(float(step)), param_dir / "step.pt")


def _find_step(sd: dict[str, Any], zero: Path) -> Any:
    try:
        return sd["optimizer_state_dict"]["state"][0]["step"]
    except (KeyError, IndexError, TypeError):
        pass
    for step_file in zero.glob("*/step.pt"):
        return torch.load(step_file, map_location="cpu", weights_only=False)
    raise UserError(f"{zero}: no optimizer step found in the universal checkpoint")


def _full_to_universal(ckpt: CheckpointInfo, recipe: Recipe, out: Path) -> None:
    """Write DeepSpeed's universal layout from a full Lightning checkpoint (auto/DDP)."""
    import deepspeed

    state = torch.load(ckpt.model_path, map_location="cpu", weights_only=False)
    weights: dict[str, torch.Tensor] = state["state_dict"]
    names, groups = optimizer_param_names(recipe)
    tag = out / DS_TAG
    zero = tag / "zero"
    zero.mkdir(parents=True)
    opt = (state.get("optimizer_states") or [None])[0]
    step = None
    moments: dict[str, dict[str, torch.Tensor]] = {}
    if opt is not None:
        for idx, name in enumerate(names):
            per_param = opt["state"].get(idx)
            if per_param:
                moments[name] = per_param
                step = per_param.get("step", step)
    if step is None:
        step = torch.tensor(0.0)
    step = torch.as_tensor(step, dtype=torch.float32)
    for name, tensor in weights.items():
        param_dir = zero / name
        param_dir.mkdir()
        torch.save({"param": tensor.detach().float().clone(), "cat_dim": 0}, param_dir / "fp32.pt")
        if name in moments:
            for key in ("exp_avg", "exp_avg_sq"):
                torch.save({"param": moments[name][key].float().clone(), "cat_dim": 0}, param_dir / f"{key}.pt")
            torch.save(step.clone(), param_dir / "step.pt")
    param_groups = []
    for i, group in enumerate(opt["param_groups"] if opt is not None else groups):
        param_groups.append({**{k: v for k, v in group.items() if k not in ("params", "count")}, "params": [i]})
    torch.save({
        "param_groups": param_groups,
        "optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": param_groups},
        "ds_version": deepspeed.__version__,
        "clip_grad": float(recipe.optim.grad_clip),
        "dynamic_loss_scale": False,
        "overflow": False,
    }, zero / "optimizer_state.pt")
    client = {k: v for k, v in state.items() if k not in ("state_dict", "optimizer_states")}
    samples = (state.get("TokenDataModule") or {}).get("samples", 0)
    model_states = {
        **client,
        "module": weights,
        "global_steps": int(state.get("global_step", ckpt.step)),
        "global_samples": int(samples),
        "skipped_steps": 0,
        "dp_world_size": int(ckpt.meta.get("world_size") or 1),
        "mp_world_size": 1,
        "ds_version": deepspeed.__version__,
    }
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        torch.save(model_states, tag / name)
    (out / "latest_universal").write_text(DS_TAG)


# ---------------------------------------------------------------------------- to full


def optimizer_param_names(recipe: Recipe) -> tuple[list[str], list[dict[str, Any]]]:
    """Names (``model.…``) of the optimizer's parameters in AdamW's index order, and its
    groups (hyper-parameters + ``count`` of parameters).

    Built on the meta device: no memory is allocated for the weights.
    """
    with torch.device("meta"):
        model = build_model(recipe.model)
    by_id = {id(p): f"{MODULE_PREFIX}{n}" for n, p in model.named_parameters()}
    groups = model.configure_param_groups(recipe.optim.weight_decay)
    names, meta_groups = [], []
    for group in groups:
        names.extend(by_id[id(p)] for p in group["params"])
        meta_groups.append({**{k: v for k, v in group.items() if k != "params"}, "count": len(group["params"])})
    return names, meta_groups


def tied_aliases(recipe: Recipe) -> dict[str, str]:
    """``{alias: canonical name}`` of parameters shared under two names (``model.…`` keys)."""
    with torch.device("meta"):
        model = build_model(recipe.model)
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        name = MODULE_PREFIX + name
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def read_universal(universal: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """(fp32 weights, per-parameter optimizer moments, optimizer_state.pt) of a universal folder."""
    zero = universal / DS_TAG / "zero"
    weights: dict[str, torch.Tensor] = {}
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for param_dir in sorted(p for p in zero.iterdir() if p.is_dir()):
        name = param_dir.name
        weights[name] = torch.load(param_dir / "fp32.pt", map_location="cpu", weights_only=False)["param"]
        if (param_dir / "exp_avg.pt").exists():
            moments[name] = {
                key: torch.load(param_dir / f"{key}.pt", map_location="cpu", weights_only=False)["param"]
                for key in ("exp_avg", "exp_avg_sq")
            }
            step_file = param_dir / "step.pt"
            if step_file.exists():
                moments[name]["step"] = torch.load(step_file, map_location="cpu", weights_only=False)
    opt = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
    # folders written before CRATE's block renames (prenorm_1/2, ista.weight)
    CRATE.upgrade_state_dict(weights, prefix=MODULE_PREFIX)
    CRATE.upgrade_state_dict(moments, prefix=MODULE_PREFIX)
    return weights, moments, opt


def ensure_full_checkpoint(ckpt: CheckpointInfo, recipe: Recipe | None = None) -> Path:
    """``step-…/full.ckpt``: a Lightning checkpoint (weights + AdamW state) of a sharded one."""
    if not ckpt.model_path.is_dir():
        return ckpt.model_path
    if recipe is None:
        recipe = recipe_from_dict(ckpt.meta["recipe"])
    universal = ensure_universal(ckpt, recipe)
    return _build_once(ckpt.path / FULL_FILE, "consolidated checkpoint",
                       lambda tmp: _universal_to_full(universal, recipe, tmp))


def _universal_to_full(universal: Path, recipe: Recipe, out: Path) -> None:
    weights, moments, opt = read_universal(universal)
    tag = universal / DS_TAG
    client = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    names, meta_groups = optimizer_param_names(recipe)
    step = _find_step(opt, tag / "zero")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for idx, name in enumerate(names):
        if name not in moments:
            raise UserError(f"{universal}: no optimizer state for parameter {name}")
        m = moments[name]
        state[idx] = {
            "step": torch.as_tensor(m.get("step", step), dtype=torch.float32).clone(),
            "exp_avg": m["exp_avg"].reshape(weights[name].shape).clone(),
            "exp_avg_sq": m["exp_avg_sq"].reshape(weights[name].shape).clone(),
        }
    saved_groups = opt.get("param_groups") or []
    param_groups, start = [], 0
    for i, group in enumerate(meta_groups):
        count = group["count"]
        source = saved_groups[i] if i < len(saved_groups) else group
        hyper = {k: v for k, v in source.items() if k not in ("params", "count")}
        # weight decay is per group by construction; never trust a loader that flattened it
        hyper["weight_decay"] = group["weight_decay"]
        param_groups.append({**hyper, "params": list(range(start, start + count))})
        start += count
    checkpoint = {k: v for k, v in client.items() if k not in _DS_MODEL_STATE_KEYS}
    state_dict = {k: v.clone() for k, v in weights.items()}
    for alias, canonical in tied_aliases(recipe).items():
        # ZeRO-3 shards hold a tied tensor once (the LM head is the token embedding)
        if alias not in state_dict and canonical in state_dict:
            state_dict[alias] = state_dict[canonical]
    checkpoint["state_dict"] = state_dict
    checkpoint["optimizer_states"] = [{"state": state, "param_groups": param_groups}]
    torch.save(checkpoint, out)


def _stage_from_shards(tag_dir: Path) -> int | None:
    for path in sorted(tag_dir.glob("*optim_states.pt"))[:1]:
        sd = torch.load(path, map_location="cpu", weights_only=False)
        stage = sd.get("optimizer_state_dict", {}).get("zero_stage")
        if stage is not None:
            return int(stage)
    return None


def full_training_state(path: Path) -> dict[str, Any]:
    """Weights and AdamW moments by parameter name, for any checkpoint (tests, inspection).

    Returns ``{"weights": {name: fp32}, "moments": {name: {"exp_avg", "exp_avg_sq"}},
    "step": int}``; a sharded checkpoint is read through its universal form.
    """
    ckpt = read_checkpoint(path)
    recipe = recipe_from_dict(ckpt.meta["recipe"])
    if ckpt.model_path.is_dir():
        weights, moments, _ = read_universal(ensure_universal(ckpt, recipe))
        names = optimizer_param_names(recipe)[0]
        return {
            "weights": weights,
            "moments": {n: {k: moments[n][k].reshape(weights[n].shape) for k in ("exp_avg", "exp_avg_sq")} for n in names},
            "step": ckpt.step,
        }
    state = torch.load(ckpt.model_path, map_location="cpu", weights_only=False)
    names = optimizer_param_names(recipe)[0]
    opt = state["optimizer_states"][0]["state"]
    return {
        "weights": {k: v.float() for k, v in state["state_dict"].items()},
        "moments": {n: {k: opt[i][k].float() for k in ("exp_avg", "exp_avg_sq")} for i, n in enumerate(names)},
        "step": ckpt.step,
    }


# ---------------------------------------------------------------------------- loop counters


class AccumulationChange(L.Callback):
    """Re-count Lightning's micro-batch progress when ``train.grad_accum`` changed on resume.

    Lightning counts *micro-batches* in its loop state and derives optimizer-step
    boundaries and validation times from that count modulo ``accumulate_grad_batches``.
    An elastic resume often changes the accumulation to keep the global batch (2 processes
    x 1 -> 1 process x 2); without this, steps would close after the wrong number of
    micro-batches and validation would run at the wrong steps. Checkpoints are written on
    step boundaries, so the counts scale exactly.
    """

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = (((checkpoint.get("wbscale") or {}).get("recipe") or {}).get("train") or {}).get("grad_accum")
        new = trainer.accumulate_grad_batches
        if saved and saved != new and "loops" in checkpoint:
            rescale_batch_progress(checkpoint["loops"], int(saved), int(new))


def rescale_batch_progress(loops: dict[str, Any], old_accum: int, new_accum: int) -> None:
    """Scale the fit loop's micro-batch counters from ``old_accum`` to ``new_accum`` per step."""
    progress = loops.get("fit_loop", {}).get("epoch_loop.batch_progress")
    if not progress:
        return
    for scope in ("total", "current"):
        counts = progress.get(scope)
        if not counts:
            continue
        ready = counts["ready"]
        for key in ("ready", "started", "processed", "completed"):
            if key in counts:
                # keep each counter's offset from `ready` (completed lags by one at save time)
                counts[key] = ready // old_accum * new_accum - (ready - counts[key])
