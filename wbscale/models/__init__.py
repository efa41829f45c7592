"""Model zoo: the CRATE LM and the GPT-2 baseline, one interface (``LanguageModel``)."""

from __future__ import annotations

from wbscale.config import ModelConfig
from wbscale.errors import UserError
from wbscale.models.base import LanguageModel, LayerRoles, LinearMap
from wbscale.models.crate import CRATE
from wbscale.models.gpt2 import GPT2
from wbscale.models.published import load_published, load_published_crate

__all__ = [
    "CRATE",
    "GPT2",
    "MODEL_CLASSES",
    "LanguageModel",
    "LayerRoles",
    "LinearMap",
    "build_model",
    "load_published",
    "load_published_crate",
]

MODEL_CLASSES: dict[str, type[LanguageModel]] = {"crate": CRATE, "gpt2": GPT2}


def build_model(cfg: ModelConfig) -> LanguageModel:
    """The model a recipe's ``model`` section describes, freshly initialised or pretrained.

    With ``cfg.pretrained`` (GPT-2 only) the sizes come from the checkpoint's config.json;
    the recipe still sets dropout, may crop ``block_size``, and a non-zero ``vocab_size``
    must match the checkpoint's (the model's ``config`` holds the resolved sizes).
    """
    if cfg.arch not in MODEL_CLASSES:
        raise UserError(f"model.arch {cfg.arch!r} is not one of {', '.join(MODEL_CLASSES)}")
    if cfg.pretrained is None:
        return MODEL_CLASSES[cfg.arch](cfg)
    if cfg.arch != "gpt2":
        raise UserError("model.pretrained is only supported for model.arch: gpt2")
    overrides = {"dropout": cfg.dropout, "block_size": cfg.block_size}
    if cfg.vocab_size:
        overrides["vocab_size"] = cfg.vocab_size
    model, _ = GPT2.from_pretrained(cfg.pretrained, **overrides)
    return model
