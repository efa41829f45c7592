"""``wbscale ckpt consolidate``: any training checkpoint -> one inference (export) folder.

Works for every strategy and ZeRO stage: a DeepSpeed checkpoint's fp32 master weights are
gathered from its shards with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``
(no process group, no GPU needed); a single-device / DDP checkpoint is read directly.
The result is :func:`wbscale.ckpt.load.export_folder`'s layout::

    OUT/model.safetensors   weights (fp32 or bf16), tied LM head stored once
    OUT/recipe.yaml         the resolved recipe the model was trained with
    OUT/tokenizer.json      the tokenizer of the training data (when it is found)

which ``wbscale eval`` / ``wbscale generate`` load like any checkpoint.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Literal

import torch

from wbscale.ckpt.format import CheckpointInfo, read_checkpoint, verify_checkpoint
from wbscale.ckpt.load import TOKENIZER_FILE, export_folder
from wbscale.config import Recipe, recipe_from_dict
from wbscale.errors import UserError, require
from wbscale.models import build_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def full_state_dict(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """The LightningModule's full fp32 state dict (``model.…`` keys) of any checkpoint."""
    verify_checkpoint(info)
    if info.model_path.is_dir():
        require("deepspeed", "deepspeed", "reading a sharded (ZeRO) checkpoint")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        quiet = io.StringIO()
        try:
            with contextlib.redirect_stdout(quiet):
                state = get_fp32_state_dict_from_zero_checkpoint(str(info.model_path), tag=None)
        except Exception as err:  # a shard DeepSpeed cannot read: name the checkpoint
            raise UserError(
                f"{info.model_path}: DeepSpeed could not gather the weights ({type(err).__name__}: {err})"
            ) from err
        return dict(state)
    try:
        return torch.load(info.model_path, map_location="cpu", weights_only=False)["state_dict"]
    except Exception as err:
        raise UserError(f"{info.model_path}: unreadable checkpoint ({type(err).__name__}: {err})") from err


def model_weights(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """The language model's weights (keys as in ``build_model(...).state_dict()``)."""
    state = full_state_dict(info)
    # clone: DeepSpeed returns views into flat shard buffers, which safetensors refuses
    return {k.removeprefix("model."): v.detach().float().clone() for k, v in state.items() if k.startswith("model.")}


def consolidate(path: str | Path, out: str | Path, dtype: Literal["fp32", "bf16"] = "fp32") -> Path:
    """Write an export folder for the checkpoint at ``path`` (checkpoint or run folder)."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    info = read_checkpoint(Path(path))
    recipe: Recipe = recipe_from_dict(info.meta["recipe"])
    weights = model_weights(info)
    # Build on the meta device, then take the checkpoint's tensors: no second copy.
    with torch.device("meta"):
        model = build_model(recipe.model)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    # The tied LM head is one tensor under two names; assign=True re-ties it below.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise UserError(
            f"{info.path}: weights do not match the recipe's model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); the checkpoint's meta.json recipe is inconsistent"
        )
    model.lm_head.weight = model.transformer.wte.weight
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:  # non-persistent buffers (e.g. causal masks) are rebuilt on CPU
            raise UserError(f"{info.path}: model buffer {name} is not in the checkpoint")
    tokenizer = Path(info.meta.get("data_dir", recipe.data.out_dir)) / TOKENIZER_FILE
    return export_folder(
        model, recipe, Path(out), tokenizer_path=tokenizer if tokenizer.is_file() else None,
        dtype=DTYPES[dtype] if dtype != "fp32" else None,
    )
