"""Import of published CRATE-LM checkpoints (Bai et al. 2024; nanoGPT format) into ``CRATE``.

A published ``ckpt.pt`` is a ``torch.load``-able dict with ``model`` (a state dict under the
published code's names) and ``model_args`` (nanoGPT's keyword arguments). Its block names
differ from wbscale's (``_PUBLISHED_NAMES``); the rest of the layout is the same.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wbscale.config import ModelConfig
from wbscale.errors import UserError
from wbscale.models.base import crop_positions, load_checked
from wbscale.models.crate import CRATE

__all__ = ["load_published", "load_published_crate"]

# nanoGPT-style prefixes: torch.compile (``_orig_mod.``) and DDP (``module.``).
_PREFIX = re.compile(r"^(?:_orig_mod\.|module\.)+")
# Block names in the published code -> wbscale's. This is the file format, so it stays
# here even though CRATE.legacy_names happens to hold the same renames today.
_PUBLISHED_NAMES = {"prenorm_1": "ln_1", "prenorm_2": "ln_2", "ista.weight": "ista.dictionary"}
_BLOCK_KEY = re.compile(r"(transformer\.h\.\d+\.)(.+)")
# model_args names the published code may use for the ISTA hyper-parameters, besides ours.
_ARG_ALIASES = {
    "ista_eta": ("ista_eta", "eta", "step_size"),
    "ista_lambda": ("ista_lambda", "lambd", "lam", "lambda"),
}


def load_published_crate(path: str | Path, **overrides: Any) -> CRATE:
    """Build a CRATE from a published CRATE-LM checkpoint (see :func:`load_published`).

    ``overrides`` replace ModelConfig fields (e.g. ``ista_kernel``, ``dropout``, a smaller
    ``block_size``, or ``ista_variant`` where the shapes cannot tell).
    """
    config, state_dict = load_published(path)
    config = dataclasses.replace(config, **overrides)
    crop_positions(state_dict, config.block_size, path)
    model = CRATE(config)
    load_checked(model, state_dict, path)
    return model


def _wbscale_name(key: str) -> str:
    """A published state-dict key under wbscale's name (other keys unchanged)."""
    key = _PREFIX.sub("", key)
    found = _BLOCK_KEY.fullmatch(key)
    if found is None:
        return key
    head, rest = found.groups()
    for published, ours in _PUBLISHED_NAMES.items():
        if rest == published or rest.startswith(published + "."):
            return head + ours + rest[len(published) :]
    return key


def load_published(path: str | Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Read a published CRATE-LM checkpoint: a ``torch.load``-able dict with ``model`` (state
    dict) and ``model_args`` (nanoGPT names). Returns the ModelConfig and a state dict with
    wbscale's names; raises UserError when the file is missing or not in that format.

    The ISTA variant and expansion come from the dictionary's shape (m, d): m = d is read as
    ``square``, m = k d as ``overcomplete`` with expansion k. With ``bias: False`` the
    checkpoint has no LayerNorm / c_proj biases; they are filled with zeros (same function).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file (expected a published CRATE-LM ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a non-checkpoint file
        raise UserError(
            f"{path}: not a checkpoint torch.load can read with weights_only=True ({err})"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        found = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(
            f"{path}: not a published CRATE-LM checkpoint: expected a dict with keys 'model' "
            f"and 'model_args' (nanoGPT format), found {found}"
        )
    args = ckpt["model_args"]
    if not isinstance(args, dict) or not isinstance(ckpt["model"], dict):
        raise UserError(f"{path}: 'model' must be a state dict and 'model_args' a dict")
    state_dict = {
        _wbscale_name(k): v
        for k, v in ckpt["model"].items()
        # nanoGPT's non-flash attention keeps its causal mask as a buffer named attn.bias.
        if not (k.endswith(".attn.bias") and v.dim() == 4)
    }
    if "n_head" not in args:  # the only size the weights' shapes cannot tell
        raise UserError(f"{path}: model_args has no 'n_head'; cannot rebuild the model")

    wte = state_dict.get("transformer.wte.weight")
    fields: dict[str, Any] = {"arch": "crate"}
    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dropout"):
        if name in args:
            fields[name] = args[name]
    if wte is not None:
        fields.setdefault("vocab_size", wte.size(0))
        fields.setdefault("n_embd", wte.size(1))
    if "n_layer" not in fields:
        layers = {int(k.split(".")[2]) for k in state_dict if k.startswith("transformer.h.")}
        fields["n_layer"] = len(layers)
    if "block_size" not in fields and "transformer.wpe.weight" in state_dict:
        fields["block_size"] = state_dict["transformer.wpe.weight"].size(0)
    for field, aliases in _ARG_ALIASES.items():
        for alias in aliases:
            if alias in args:
                fields[field] = float(args[alias])
                break
    dictionary = state_dict.get("transformer.h.0.ista.dictionary")
    if dictionary is not None and dictionary.dim() == 2:
        m, d = dictionary.shape
        if m == d:
            fields["ista_variant"] = "square"
        elif m % d == 0:
            fields.update(ista_variant="overcomplete", ista_expansion=m // d)
    config = ModelConfig(**fields)

    if args.get("bias", True) is False:
        zeros = torch.zeros(config.n_embd, dtype=wte.dtype if wte is not None else torch.float32)
        names = ["transformer.ln_f.bias"]
        for i in range(config.n_layer):
            names += [f"transformer.h.{i}.{n}.bias" for n in ("ln_1", "ln_2", "attn.c_proj")]
        for name in names:
            state_dict.setdefault(name, zeros.clone())
    if wte is not None:
        head = state_dict.setdefault("lm_head.weight", wte)
        if head.shape != wte.shape or not torch.equal(head, wte):
            raise UserError(
                f"{path}: lm_head.weight differs from transformer.wte.weight; wbscale's CRATE "
                "ties them (as the published code does), so this checkpoint cannot be imported"
            )
    return config, state_dict
