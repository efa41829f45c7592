"""CRATE language model: a white-box transformer of compression (MSSA) and sparsification (ISTA).

Yu et al., "White-Box Transformers via Sparse Rate Reduction" (NeurIPS 2023) and Bai et al.,
"CRATE-LM" (2024); the layout and sizes follow the published CRATE LM code (nanoGPT based),
the names GPT-2's where the role is the same. Per layer, pre-norm and causal:

    x = x + MSSA(LN1(x))        # compress the tokens against K learned subspaces U_k
    x = ISTA(LN2(x))            # sparse-code them in a learned dictionary; NO residual

The ISTA block is a single call into ``wbscale.kernels.ista``: eager on CPU, fused Triton on
CUDA, picked by ``model.ista_kernel`` (docs/architecture.md, Kernels). Published CRATE-LM checkpoints are
read by ``wbscale.models.published``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from wbscale.config import ModelConfig
from wbscale.kernels import ista
from wbscale.models.base import LanguageModel, LayerCache, LayerRoles, LinearMap, causal_attention


class MSSA(nn.Module):
    """Multi-head subspace self-attention: q = k = v = W_k = X U_k per head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, config.n_embd, bias=False)  # U = [U_1 .. U_K]
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> tuple[Tensor, Tensor]:
        """Returns the block output (B, T, d) and the head projections W_k (B, K, T, d/K).

        With ``cache`` (decoding), ``x`` holds only the new tokens and the earlier tokens' W_k
        come from the cache. Since q = k = v = W_k, that is ONE tensor per layer, where
        GPT-2's attention caches two (keys and values).
        """
        b, t, d = x.shape
        w = self.c_attn(x).view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
        (w_all,) = (w,) if cache is None else cache.extend(w)  # W_k of every token so far
        # softmax_causal(W_k W_k^T / sqrt(p)) W_k: the gradient step on the coding rate of
        # the tokens in subspace k (Yu et al. 2023, eq. 9), with the key as query and value.
        y = causal_attention(w, w_all, w_all, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(b, t, d)
        return self.resid_dropout(self.c_proj(y)), w


class ISTA(nn.Module):
    """Sparse coding by unrolled ISTA on the dictionary D = W^T, W: (m, d) (docs/architecture.md).

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
        self.dictionary = nn.Parameter(torch.empty(m, d))  # W; the dictionary D is W^T
        # The published CRATE code's init; the GPT-2 N(0, 0.02) init is not applied here.
        nn.init.kaiming_uniform_(self.dictionary)

    def forward(self, x: Tensor, return_code: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The block output (B, T, d); with ``return_code`` also the sparse code z (B, T, m)."""
        return ista(
            x,
            self.dictionary,
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
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = MSSA(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.ista = ISTA(config)

    def forward(
        self, x: Tensor, record: dict[str, Tensor] | None = None, cache: LayerCache | None = None
    ) -> Tensor:
        h = self.ln_1(x)
        a, w = self.attn(h, cache)
        x = x + a
        if record is None:
            return self.ista(self.ln_2(x))
        out, z = self.ista(self.ln_2(x), return_code=True)
        # mssa_projection U (d, d) with head_projections == mssa_input @ U, split into heads.
        u = self.attn.c_attn.weight.detach().t()
        record.update(mssa_input=h, head_projections=w, mssa_output=x, sparse_code=z, mssa_projection=u)
        return out

    def roles(self, prefix: str = "") -> LayerRoles:
        """U is query, key and value (one slice, no bias); the dictionary W (m, d) is the ISTA
        encoder (x W^T) and decoder (z W) at once, so atom j is row j and there is no
        separate output map. Square ISTA: the code replaces x, so atom k is stream dim k."""
        return LayerRoles(
            norms=(f"{prefix}ln_1", f"{prefix}ln_2"),
            attn_in=LinearMap(f"{prefix}attn.c_attn.weight", None, "c_attn"),
            qkv_slices=1,
            attn_out=LinearMap(f"{prefix}attn.c_proj.weight", f"{prefix}attn.c_proj.bias", "attn c_proj"),
            hidden_in=LinearMap(f"{prefix}ista.dictionary", None, "dictionary"),
            hidden_out=None,
            hidden_units=self.ista.dictionary.size(0),
            hidden_is_residual=self.ista.variant == "square",
        )


class CRATE(LanguageModel):
    """The CRATE LM. ``white_box_forward`` records per layer: ``sparse_code`` (B, T, m),
    ``head_projections`` (B, K, T, d/K), ``mssa_input`` and ``mssa_output`` (B, T, d), and
    ``mssa_projection`` U (d, d) with ``head_projections == mssa_input @ U`` split into heads."""

    # Checkpoints written before the block norms took GPT-2's names and the ISTA weight its own.
    legacy_names = {"prenorm_1": "ln_1", "prenorm_2": "ln_2", "ista.weight": "ista.dictionary"}

    def __init__(self, config: ModelConfig):
        super().__init__(config, Block)

    def gemm_macs_per_layer(self) -> int:
        """U and c_proj (d x d each) plus the ISTA GEMMs: overcomplete 4 of d x m, square 2 of d x d."""
        c = self.config
        if c.ista_variant == "overcomplete":
            return 2 * c.n_embd**2 + 4 * c.n_embd * (c.ista_expansion * c.n_embd)
        return 2 * c.n_embd**2 + 2 * c.n_embd**2
