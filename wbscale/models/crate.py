"""CRATE language model: a white-box transformer of compression (MSSA) and sparsification (ISTA).

Yu et al., "White-Box Transformers via Sparse Rate Reduction" (NeurIPS 2023) and Bai et al.,
"CRATE-LM" (2024); the layout, names and sizes follow the published CRATE LM code (nanoGPT
based). Per layer, pre-norm and causal:

    x = x + MSSA(LN1(x))        # compress the tokens against K learned subspaces U_k
    x = ISTA(LN2(x))            # sparse-code them in a learned dictionary; NO residual

The ISTA block is a single call into ``wbscale.kernels.ista``: eager on CPU, fused Triton on
CUDA, picked by ``model.ista_kernel`` (DESIGN.md, Kernels).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from wbscale.config import ModelConfig
from wbscale.errors import UserError
from wbscale.kernels import ista
from wbscale.models.base import LanguageModel, crop_positions, load_checked


class MSSA(nn.Module):
    """Multi-head subspace self-attention: q = k = v = W_k = X U_k per head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, config.n_embd, bias=False)  # U = [U_1 .. U_K]
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the block output (B, T, d) and the head projections W_k (B, K, T, d/K)."""
        b, t, d = x.shape
        w = self.c_attn(x).view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
        # softmax_causal(W_k W_k^T / sqrt(p)) W_k: the gradient step on the coding rate of
        # the tokens in subspace k (Yu et al. 2023, eq. 9), with the key as query and value.
        y = F.scaled_dot_product_attention(
            w, w, w, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(b, t, d)
        return self.resid_dropout(self.c_proj(y)), w


class ISTA(nn.Module):
    """Sparse coding by unrolled ISTA on the dictionary D = W^T, W: (m, d) (DESIGN.md).

    overcomplete (m = expansion * d), two steps from z = 0, output D z2:
        z1 = relu(eta x W^T - eta lam);  z2 = relu(z1 + eta (x - z1 W) W^T - eta lam);  out = z2 W
    square (m = d), one step from z = x, the output is the code itself:
        out = relu(x + eta (x - x W^T) W - eta lam)
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.n_embd
        m = config.ista_expansion * d if config.ista_variant == "overcomplete" else d
        self.variant = config.ista_variant
        self.eta = config.ista_eta
        self.lam = config.ista_lambda
        self.kernel = config.ista_kernel
        self.save_activations = config.ista_save_activations
        self.weight = nn.Parameter(torch.empty(m, d))
        # The published CRATE code's init; the GPT-2 N(0, 0.02) init is not applied here.
        nn.init.kaiming_uniform_(self.weight)

    def forward(self, x: Tensor, return_code: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The block output (B, T, d); with ``return_code`` also the sparse code z (B, T, m)."""
        return ista(
            x,
            self.weight,
            variant=self.variant,
            eta=self.eta,
            lam=self.lam,
            kernel=self.kernel,
            return_code=return_code,
            save_activations=self.save_activations,
        )


class Block(nn.Module):
    """One CRATE layer: ``x + MSSA(LN1(x))``, then ``ISTA(LN2(x))`` with no residual."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.prenorm_1 = nn.LayerNorm(config.n_embd)
        self.attn = MSSA(config)
        self.prenorm_2 = nn.LayerNorm(config.n_embd)
        self.ista = ISTA(config)

    def forward(self, x: Tensor, record: dict[str, Tensor] | None = None) -> Tensor:
        h = self.prenorm_1(x)
        a, w = self.attn(h)
        x = x + a
        if record is None:
            return self.ista(self.prenorm_2(x))
        out, z = self.ista(self.prenorm_2(x), return_code=True)
        # mssa_projection U (d, d) with head_projections == mssa_input @ U, split into heads.
        u = self.attn.c_attn.weight.detach().t()
        record.update(mssa_input=h, head_projections=w, mssa_output=x, sparse_code=z, mssa_projection=u)
        return out


class CRATE(LanguageModel):
    """The CRATE LM. ``white_box_forward`` records per layer: ``sparse_code`` (B, T, m),
    ``head_projections`` (B, K, T, d/K), ``mssa_input`` and ``mssa_output`` (B, T, d), and
    ``mssa_projection`` U (d, d) with ``head_projections == mssa_input @ U`` split into heads."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, Block)

    def gemm_macs_per_layer(self) -> int:
        """U and c_proj (d x d each) plus the ISTA GEMMs: overcomplete 4 of d x m, square 2 of d x d."""
        c = self.config
        if c.ista_variant == "overcomplete":
            return 2 * c.n_embd**2 + 4 * c.n_embd * (c.ista_expansion * c.n_embd)
        return 2 * c.n_embd**2 + 2 * c.n_embd**2

    @classmethod
    def from_published(cls, path: str | Path, **overrides: Any) -> CRATE:
        """Build a CRATE from a published CRATE-LM checkpoint (see ``load_published``).

        ``overrides`` replace ModelConfig fields (e.g. ``ista_kernel``, ``dropout``, a smaller
        ``block_size``, or ``ista_variant`` where the shapes cannot tell).
        """
        config, state_dict = load_published(path)
        config = dataclasses.replace(config, **overrides)
        crop_positions(state_dict, config.block_size, path)
        model = cls(config)
        load_checked(model, state_dict, path)
        return model


# ---------------------------------------------------------------------------- published import

# nanoGPT-style prefixes: torch.compile (``_orig_mod.``) and DDP (``module.``).
_PREFIX = re.compile(r"^(?:_orig_mod\.|module\.)+")
# model_args names the published code may use for the ISTA hyper-parameters, besides ours.
_ARG_ALIASES = {
    "ista_eta": ("ista_eta", "eta", "step_size"),
    "ista_lambda": ("ista_lambda", "lambd", "lam", "lambda"),
}


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
        _PREFIX.sub("", k): v
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
    dictionary = state_dict.get("transformer.h.0.ista.weight")
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
            names += [f"transformer.h.{i}.{n}.bias" for n in ("prenorm_1", "prenorm_2", "attn.c_proj")]
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
