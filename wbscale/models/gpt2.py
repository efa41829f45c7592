"""GPT-2 baseline (Radford et al. 2019) on the same skeleton as CRATE, with nanoGPT's names.

Per layer, pre-norm and causal: ``x = x + Attn(LN1(x))``, ``x = x + MLP(LN2(x))``; the MLP is
4d wide with tanh-GELU. ``GPT2.from_pretrained`` loads Hugging Face GPT-2 weights from
safetensors without importing transformers, so BIMT can fine-tune a real GPT-2.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from wbscale.config import ModelConfig
from wbscale.errors import UserError
from wbscale.models.base import (
    LanguageModel,
    LayerCache,
    LayerRoles,
    LinearMap,
    causal_attention,
    crop_positions,
    load_checked,
    rotary,
)


class CausalSelfAttention(nn.Module):
    """Standard multi-head causal attention; q, k, v from one ``c_attn`` (d -> 3d).

    ``model.rope``: q and k are rotated by their positions (``rotary``) before the scores;
    the cache holds the rotated keys.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.rope = config.rope
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> tuple[Tensor, Tensor]:
        """Returns the block output (B, T, d) and the keys per head (B, H, T, d/H).

        With ``cache`` (decoding), ``x`` holds only the new tokens; the earlier tokens' keys
        and values (two tensors per layer) come from the cache.
        """
        b, t, d = x.shape
        q, k, v = (
            z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
            for z in self.c_attn(x).split(d, dim=2)
        )
        if self.rope:
            start = 0 if cache is None else len(cache)
            q, k = rotary(q, start), rotary(k, start)
        k_all, v_all = (k, v) if cache is None else cache.extend(k, v)
        y = causal_attention(q, k_all, v_all, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(b, t, d)
        return self.resid_dropout(self.c_proj(y)), k


class MLP(nn.Module):
    """d -> 4d -> d with GPT-2's tanh approximation of GELU (HF ``gelu_new``)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the output (B, T, d) and the post-GELU activation (B, T, 4d)."""
        hidden = F.gelu(self.c_fc(x), approximate="tanh")
        return self.dropout(self.c_proj(hidden)), hidden


class Block(nn.Module):
    """One GPT-2 layer: ``x + Attn(LN1(x))``, then ``x + MLP(LN2(x))``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(
        self, x: Tensor, record: dict[str, Tensor] | None = None, cache: LayerCache | None = None
    ) -> Tensor:
        h = self.ln_1(x)
        a, k = self.attn(h, cache)
        x = x + a
        m, hidden = self.mlp(self.ln_2(x))
        if record is not None:
            # Names shared with CRATE so the same metrics read both models.
            record.update(mssa_input=h, head_projections=k, mssa_output=x, mlp_activation=hidden)
        return x + m

    def roles(self, prefix: str = "") -> LayerRoles:
        """q|k|v stacked in ``c_attn``; MLP neuron j reads row j of ``c_fc``, writes column j of ``c_proj``."""
        return LayerRoles(
            norms=(f"{prefix}ln_1", f"{prefix}ln_2"),
            attn_in=LinearMap(f"{prefix}attn.c_attn.weight", f"{prefix}attn.c_attn.bias", "c_attn"),
            qkv_slices=3,
            attn_out=LinearMap(f"{prefix}attn.c_proj.weight", f"{prefix}attn.c_proj.bias", "attn c_proj"),
            hidden_in=LinearMap(f"{prefix}mlp.c_fc.weight", f"{prefix}mlp.c_fc.bias", "c_fc"),
            hidden_out=LinearMap(f"{prefix}mlp.c_proj.weight", f"{prefix}mlp.c_proj.bias", "mlp c_proj"),
            hidden_units=self.mlp.c_fc.out_features,
        )


class GPT2(LanguageModel):
    """The GPT-2 baseline. ``white_box_forward`` records per layer: ``mlp_activation``
    (B, T, 4d), ``head_projections`` (keys, B, H, T, d/H), ``mssa_input`` (LN1 output) and
    ``mssa_output`` (residual stream after attention)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, Block)

    def gemm_macs_per_layer(self) -> int:
        """c_attn 3d^2 + c_proj d^2 + MLP 8d^2 = 12 d^2, as in 6N."""
        d = self.config.n_embd
        return 12 * d * d

    @classmethod
    def from_pretrained(cls, name_or_path: str, **overrides: Any) -> tuple[GPT2, ModelConfig]:
        """Load HF GPT-2 weights from a local folder (config.json + model.safetensors) or a
        hub id (downloaded with huggingface_hub when installed). Returns the model and its
        ModelConfig (sizes from config.json, dropout 0 unless overridden; a smaller
        ``block_size`` override crops the position table)."""
        from safetensors.torch import load_file

        folder = _resolve_folder(name_or_path)
        config = _config_from_hf(folder)
        for name in ("n_layer", "n_head", "n_embd", "vocab_size"):
            if name in overrides and overrides[name] != getattr(config, name):
                raise UserError(
                    f"{folder}: model.{name} is {overrides[name]} but the checkpoint has "
                    f"{getattr(config, name)}" + (" (use its tokenizer)" if name == "vocab_size" else "")
                )
        config = dataclasses.replace(config, pretrained=str(name_or_path), **overrides)
        index = folder / "model.safetensors.index.json"
        if index.is_file():  # sharded checkpoints (large models)
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise UserError(
                f"{folder}: no model.safetensors; GPT-2 weights are read from safetensors only "
                "(re-save with save_pretrained(..., safe_serialization=True))"
            )
        hf: dict[str, Tensor] = {}
        for name in files:
            hf.update(load_file(str(folder / name)))
        state_dict = _hf_to_wbscale(hf)
        crop_positions(state_dict, config.block_size, folder)
        model = cls(config)
        load_checked(model, state_dict, folder)
        return model, config


# ---------------------------------------------------------------------------- HF import

# HF GPT-2 uses Conv1D, whose weight is (in, out): the transpose of nn.Linear's (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _hf_to_wbscale(hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF GPT-2 names -> ours. HF saves the base model's keys with or without the
    ``transformer.`` prefix; ours always have it. The causal-mask buffers (attn.bias,
    attn.masked_bias) are dropped, and lm_head is the token embedding (tied)."""
    state_dict = {}
    for key, value in hf.items():
        name = key.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue
        state_dict[f"transformer.{name}"] = value.t() if name.endswith(_CONV1D) else value
    if "transformer.wte.weight" in state_dict:
        state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]
    return state_dict


def _config_from_hf(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: no config.json; expected a Hugging Face GPT-2 model folder")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if hf.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{path}: model_type is {hf['model_type']!r}; only GPT-2 ('gpt2') can be loaded")
    # Variants this model does not implement would load but compute something else.
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{path}: activation_function {hf['activation_function']!r} is not GPT-2's tanh GELU")
    if hf.get("layer_norm_epsilon", 1e-5) != 1e-5 or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise UserError(f"{path}: layer_norm_epsilon != 1e-5 or scale_attn_by_inverse_layer_idx is not supported")
    try:
        return ModelConfig(
            arch="gpt2",
            n_layer=int(hf["n_layer"]),
            n_head=int(hf["n_head"]),
            n_embd=int(hf["n_embd"]),
            block_size=int(hf.get("n_positions", hf.get("n_ctx"))),
            vocab_size=int(hf["vocab_size"]),
            dropout=0.0,
        )
    except (KeyError, TypeError) as err:
        raise UserError(f"{path}: missing GPT-2 size field {err}") from None


def _resolve_folder(name_or_path: str) -> Path:
    """A local model folder as is; otherwise a hub id, fetched with huggingface_hub."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith(("/", ".", "~")):
        raise UserError(f"{name_or_path}: not a model folder (expected config.json + model.safetensors)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(
            f"'{name_or_path}' is not a local folder and huggingface_hub is not installed: "
            "download config.json and model.safetensors into a folder and pass its path"
        ) from None
    try:
        return Path(
            snapshot_download(
                repo_id=name_or_path,
                allow_patterns=["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"],
            )
        )
    except Exception as err:  # network, auth, unknown repo: all mean "get the folder yourself"
        raise UserError(
            f"could not fetch '{name_or_path}' from the Hugging Face hub ({type(err).__name__}: {err}); "
            "download config.json and model.safetensors into a folder and pass its path"
        ) from None
