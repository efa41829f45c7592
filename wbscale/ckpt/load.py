"""Load a trained or imported model for inference; write and import export folders.

Two on-disk forms are accepted wherever a ``--ckpt`` is asked for:

- a training checkpoint (``runs/<run>/checkpoints/step-…`` or a run folder), and
- an inference folder: ``model.safetensors`` + ``recipe.yaml`` (+ ``tokenizer.json``),
  written by ``wbscale ckpt import`` and ``wbscale ckpt consolidate``.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_model, save_model
from tokenizers import Tokenizer

from wbscale.ckpt.format import read_checkpoint, verify_checkpoint
from wbscale.config import Recipe, recipe_from_dict, save_recipe
from wbscale.errors import UserError
from wbscale.models import build_model
from wbscale.models.base import LanguageModel
from wbscale.models.published import load_published_crate

WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "recipe.yaml"
TOKENIZER_FILE = "tokenizer.json"
FILE_MODE = 0o644  # every file an export writes (export folders here, Hugging Face folders in export_hf)


def _load_training_checkpoint(path: Path) -> tuple[LanguageModel, Recipe, Path | None]:
    info = read_checkpoint(path)
    recipe = recipe_from_dict(info.meta["recipe"])
    model_path = info.model_path
    if model_path.is_dir():
        raise UserError(
            f"{info.path} is a sharded (DeepSpeed) checkpoint; run `wbscale ckpt consolidate "
            f"{info.path} --out DIR` first and pass DIR"
        )
    verify_checkpoint(info)  # sizes and sha256 of every file: never evaluate corrupt weights
    model = build_model(recipe.model)
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=False)["state_dict"]
    except Exception as err:  # an older checkpoint (no checksums) with damaged content
        raise UserError(f"{model_path}: unreadable checkpoint ({type(err).__name__}: {str(err)[:200]})") from None
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    model.load_state_dict(weights)
    return model, recipe, _run_tokenizer(info.path, info.meta, recipe)


def _run_tokenizer(ckpt_dir: Path, meta: dict, recipe: Recipe) -> Path | None:
    """The tokenizer of a training checkpoint: the run folder's copy (so a moved or copied
    run still generates), else the training data folder's."""
    run_dir = ckpt_dir.parent.parent  # runs/<run>/checkpoints/step-…
    for folder in (ckpt_dir, run_dir, meta.get("data_dir"), recipe.data.out_dir):
        if folder is not None and (Path(folder) / TOKENIZER_FILE).is_file():
            return Path(folder) / TOKENIZER_FILE
    return None


def training_data_dir(path: str | Path) -> Path | None:
    """The prepared data folder a run / checkpoint / export was trained on, if it is here.

    Training checkpoints record it as an absolute path (so the run folder can move and
    commands work from any folder); older ones and export folders fall back to the recipe's
    ``data.out_dir`` (relative to the working folder). None when neither holds a manifest.
    """
    path = Path(path)
    candidates: list[str | None] = []
    if (path / WEIGHTS_FILE).is_file() and (path / RECIPE_FILE).is_file():
        candidates.append(recipe_from_dict(yaml.safe_load((path / RECIPE_FILE).read_text())).data.out_dir)
    else:
        info = read_checkpoint(path)
        candidates += [info.meta.get("data_dir"), recipe_from_dict(info.meta["recipe"]).data.out_dir]
    for folder in candidates:
        if folder is not None and (Path(folder) / "manifest.json").is_file():
            return Path(folder)
    return None


def require_training_data(path: str | Path, data: str | Path | None) -> Path:
    """``data`` (``--data``) if given, else the checkpoint's training data folder; a UserError
    saying to pass ``--data`` when that is not on this machine (a run copied elsewhere)."""
    if data is not None:
        return Path(data)
    found = training_data_dir(path)
    if found is None:
        raise UserError(
            f"{path}: the data it was trained on is not here (a moved or copied run?); pass --data DIR, "
            "a folder written by `wbscale data prepare` with the same tokenizer"
        )
    return found


def _load_inference_folder(path: Path) -> tuple[LanguageModel, Recipe, Path | None]:
    recipe = recipe_from_dict(yaml.safe_load((path / RECIPE_FILE).read_text()))
    # Weights come from the folder, not from the hub id the recipe may name.
    model = build_model(dataclasses.replace(recipe.model, pretrained=None))
    load_model(model, str(path / WEIGHTS_FILE))
    tokenizer = path / TOKENIZER_FILE
    return model, recipe, tokenizer if tokenizer.is_file() else None


def load_for_inference(
    path: str | Path, tokenizer: str | Path | None = None, device: str = "cpu"
) -> tuple[LanguageModel, Recipe, Tokenizer | None]:
    """Model (eval mode), its recipe, and its tokenizer (if one is known)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint; pass a checkpoint folder, a run folder or an export folder")
    if (path / WEIGHTS_FILE).is_file() and (path / RECIPE_FILE).is_file():
        model, recipe, tok_path = _load_inference_folder(path)
    else:
        model, recipe, tok_path = _load_training_checkpoint(path)
    if tokenizer is not None:
        tok_path = Path(tokenizer)
        if not tok_path.is_file():
            raise UserError(f"{tok_path}: tokenizer file not found (expected a tokenizer.json)")
    tok = None
    if tok_path is not None:
        try:
            tok = Tokenizer.from_file(str(tok_path))
        except Exception as err:  # the Rust side raises plain Exception for a bad file
            raise UserError(
                f"{tok_path}: not a valid tokenizer.json ({err}); pass --tokenizer with a file saved by "
                "the `tokenizers` library (e.g. the run's data folder's tokenizer.json)"
            ) from None
    return model.to(device).eval(), recipe, tok


def export_folder(
    model: LanguageModel, recipe: Recipe, out_dir: Path, tokenizer_path: Path | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write an inference folder atomically (tmp folder, then rename), files 0644 like the HF export."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if dtype is not None:
        model = model.to(dtype)
    save_model(model, str(tmp / WEIGHTS_FILE))
    save_recipe(recipe, tmp / RECIPE_FILE)
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
    for child in tmp.iterdir():
        child.chmod(FILE_MODE)  # safetensors' save_model leaves 0600 (and copyfile keeps the source's mode)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def import_checkpoint(fmt: str, file: Path, out_dir: Path, tokenizer: str | Path | None = None) -> Path:
    """Convert a published checkpoint into an export folder usable by eval/generate."""
    if fmt != "crate-lm":
        raise UserError(f"unknown checkpoint format {fmt!r}; supported: crate-lm")
    model = load_published_crate(file)
    recipe = Recipe(model=model.config)
    tok = Path(tokenizer) if tokenizer is not None else None
    if tok is not None and not tok.is_file():
        raise UserError(f"{tok}: tokenizer file not found (expected a tokenizer.json, e.g. GPT-2's)")
    return export_folder(model, recipe, out_dir, tokenizer_path=tok)
