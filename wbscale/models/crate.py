"""CRATE language model: a white-box transformer of compression (MSSA) and sparsification (ISTA).

Yu et al., "White-Box Transformers via Sparse Rate Reduction" (NeurIPS 2023) and Bai et al.,
"CRATE-LM" (2024); the layout and sizes follow the published CRATE LM code (nanoGPT based),
the names GPT-2's where the role is the same. Per layer, pre-norm and causal:

    x = x + MSSA(LN1(x))        # compress the tokens against K learned subspaces U_k
    x = ISTA(LN2(x))            # sparse-code them in a learned dictionary; NO residual

The ISTA block is a single call into ``wbscale.kernels.ista``: eager on CPU, fused Triton on
CUDA, picked by ``model.ista_kernel`` (docs/architecture.md, Kernels). Published CRATE-LM checkpoints are
read by ``wbscale.models.published``.

The CRATE block options (``model.ista_residual``, ``ista_decoder``, ``ista_learn_lambda``,
``ista_learn_eta``, ``ista_steps``, ``ista_init_scale``) and ``model.rope`` (MSSA's rotary option;
docs/architecture.md, "CRATE block options") are all off by default. The ones that change the block's function (a separate
decoder, a learned lambda or eta, a step count other than the published one) run the
general block ``wbscale.kernels.general.ista_general`` (same kernel choice, same fused Triton
path); the residual and the init scale keep the published kernel.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
from torch import Tensor

from wbscale.config import ModelConfig
from wbscale.errors import UserError
from wbscale.kernels import ista
from wbscale.kernels.general import ista_general, published_steps
from wbscale.models.base import (
    LanguageModel,
    LayerCache,
    LayerRoles,
    LinearMap,
    causal_attention,
    rotary,
)


class MSSA(nn.Module):
    """Multi-head subspace self-attention: q = k = v = W_k = X U_k per head.

    ``model.rope``: the query and key copies of W_k are rotated by their positions
    (``rotary``), the value is W_k itself. The published scores <U x_i, U x_j> form a Gram
    matrix, so no token can score another above itself by more than the norms allow; rotated,
    a head can prefer the token k places back (a previous-token head) at no parameter cost.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.rope = config.rope
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
        q, k = (rotary(w, w_all.size(2) - t), rotary(w_all)) if self.rope else (w, w_all)
        y = causal_attention(q, k, w_all, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(b, t, d)
        return self.resid_dropout(self.c_proj(y)), w


def ista_steps(config: ModelConfig) -> int:
    """ISTA iterations of the block: ``model.ista_steps``, or the published count (2 / 1)."""
    return published_steps(config.ista_variant) if config.ista_steps is None else config.ista_steps


def ista_atoms(config: ModelConfig) -> int:
    """Atoms m of the dictionary: ``ista_expansion * n_embd`` (overcomplete) or ``n_embd`` (square)."""
    return config.ista_expansion * config.n_embd if config.ista_variant == "overcomplete" else config.n_embd


def uses_general_block(config: ModelConfig) -> bool:
    """Whether an option changes the ISTA block's function (the general kernel runs it)."""
    return (
        config.ista_decoder == "separate"
        or config.ista_learn_lambda
        or config.ista_learn_eta
        or ista_steps(config) != published_steps(config.ista_variant)
    )


def nondefault_options(config: ModelConfig) -> list[str]:
    """The CRATE block options set away from the published block, by ModelConfig field name
    (``ista_steps`` counts only when it differs from the published count). Empty: this is the
    published CRATE LM (what the Hugging Face export and the published format describe)."""
    on = [
        ("ista_residual", config.ista_residual),
        ("ista_decoder", config.ista_decoder != "tied"),
        ("ista_learn_lambda", config.ista_learn_lambda),
        ("ista_learn_eta", config.ista_learn_eta),
        ("ista_steps", ista_steps(config) != published_steps(config.ista_variant)),
        ("ista_init_scale", config.ista_init_scale is not None),
        ("rope", config.rope),
    ]
    return [name for name, is_on in on if is_on]


def check_ista_options(config: ModelConfig) -> None:
    """UserError for option combinations the block cannot build (the recipe checks them too)."""
    if config.ista_steps is not None and config.ista_steps < 1:
        raise UserError(f"model.ista_steps must be >= 1 (got {config.ista_steps}); null = the published count")
    if config.ista_init_scale is not None and not 0 < config.ista_init_scale < math.inf:
        raise UserError(f"model.ista_init_scale must be > 0 (got {config.ista_init_scale})")
    if config.ista_decoder not in ("tied", "separate"):
        raise UserError(f"model.ista_decoder must be tied or separate (got {config.ista_decoder!r})")
    if config.ista_decoder == "separate" and config.ista_variant != "overcomplete":
        raise UserError(
            "model.ista_decoder: separate needs model.ista_variant: overcomplete (the square "
            "block's output is the code itself: it has no decoder)"
        )
    if config.ista_learn_eta and not config.ista_eta > 0:
        raise UserError(f"model.ista_learn_eta learns log(eta): model.ista_eta must be > 0 (got {config.ista_eta})")


class ISTA(nn.Module):
    """Sparse coding by unrolled ISTA on the dictionary D = W^T, W: (m, d) (docs/architecture.md).

    overcomplete (m = expansion * d), two steps from z = 0, output D z2:
        z1 = relu(eta x W^T - eta lam);  z2 = relu(z1 + eta (x - z1 W) W^T - eta lam);  out = z2 W
    square (m = d), one step from z = x, the output is the code itself:
        out = relu(x + eta (x - x W^T) W - eta lam)

    Options (each off by default): ``ista_steps`` K steps (the code returned is z_K);
    ``ista_decoder: separate`` a decoder W_out (m, d), parameter ``decoder``: out = z_K W_out;
    ``ista_learn_lambda`` a per-atom lambda (m,), parameter ``atom_lambda``; ``ista_learn_eta``
    a scalar step size learned as ``log_eta`` (1,), so that eta stays > 0;
    ``ista_init_scale`` the dictionary's init N(0, scale) instead of kaiming-uniform.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        check_ista_options(config)
        d = config.n_embd
        m = ista_atoms(config)
        self.variant = config.ista_variant
        self.eta = config.ista_eta
        self.lam = config.ista_lambda
        self.kernel = config.ista_kernel
        self.save_activations = config.ista_save_activations
        self.steps = ista_steps(config)
        self.general = uses_general_block(config)
        if self.general and config.ista_save_activations not in (True, "all"):
            warnings.warn(
                f"model.ista_save_activations: {config.ista_save_activations} applies to the published "
                "ISTA block only; with the block options on, the Triton kernel keeps every code "
                "(save mode 'all')",
                stacklevel=2,
            )
        self.dictionary = nn.Parameter(torch.empty(m, d))  # W; the dictionary D is W^T
        # The published CRATE code's init; the GPT-2 N(0, 0.02) init is not applied here.
        if config.ista_init_scale is None:
            nn.init.kaiming_uniform_(self.dictionary)
        else:
            nn.init.normal_(self.dictionary, mean=0.0, std=config.ista_init_scale)
        self.decoder: nn.Parameter | None = None
        if config.ista_decoder == "separate":
            self.decoder = nn.Parameter(torch.empty(m, d))
            if config.ista_residual:
                # Writes into the residual stream: GPT-2's rule for c_proj, N(0, 0.02 / sqrt(2 L)),
                # so each layer starts by adding about the stream's own scale (docs/architecture.md).
                nn.init.normal_(self.decoder, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
            else:
                # Without the residual the decoder's output IS the stream: start from the tied
                # model's function (a copy of W, no random draw) and let the two drift apart.
                with torch.no_grad():
                    self.decoder.copy_(self.dictionary)
        self.atom_lambda: nn.Parameter | None = None
        if config.ista_learn_lambda:
            self.atom_lambda = nn.Parameter(torch.full((m,), float(config.ista_lambda)))
        self.log_eta: nn.Parameter | None = None
        if config.ista_learn_eta:
            self.log_eta = nn.Parameter(torch.full((1,), math.log(config.ista_eta)))

    def step_size(self) -> float | Tensor:
        """eta: the recipe's float, or exp(log_eta) (a (1,) tensor) when learned."""
        return self.eta if self.log_eta is None else self.log_eta.exp()

    def threshold_lambda(self) -> float | Tensor:
        """lambda: the recipe's float, or the learned per-atom (m,) tensor."""
        return self.lam if self.atom_lambda is None else self.atom_lambda

    def output_dictionary(self) -> Tensor:
        """The (m, d) matrix the code is decoded through: the decoder when separate, else W."""
        return self.dictionary if self.decoder is None else self.decoder

    def forward(self, x: Tensor, return_code: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The block output (B, T, d); with ``return_code`` also the sparse code z (B, T, m)."""
        if self.general:
            return ista_general(
                x,
                self.dictionary,
                variant=self.variant,
                steps=self.steps,
                decoder=self.decoder,
                eta=self.step_size(),
                lam=self.threshold_lambda(),
                kernel=self.kernel,
                return_code=return_code,
            )
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
    """One CRATE layer: ``x + MSSA(LN1(x))``, then ``ISTA(LN2(x))`` with no residual
    (``model.ista_residual``: ``x + ISTA(LN2(x))``)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = MSSA(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.ista = ISTA(config)
        self.residual = config.ista_residual

    def forward(
        self, x: Tensor, record: dict[str, Tensor] | None = None, cache: LayerCache | None = None
    ) -> Tensor:
        h = self.ln_1(x)
        a, w = self.attn(h, cache)
        x = x + a
        if record is None:
            out = self.ista(self.ln_2(x))
            return x + out if self.residual else out
        out, z = self.ista(self.ln_2(x), return_code=True)
        # mssa_projection U (d, d) with head_projections == mssa_input @ U, split into heads.
        u = self.attn.c_attn.weight.detach().t()
        record.update(mssa_input=h, head_projections=w, mssa_output=x, sparse_code=z, mssa_projection=u)
        if self.ista.atom_lambda is not None:
            record["ista_lambda"] = self.ista.atom_lambda.detach()
        if self.ista.log_eta is not None:
            record["ista_eta"] = self.ista.log_eta.detach().exp()
        return x + out if self.residual else out

    def roles(self, prefix: str = "") -> LayerRoles:
        """U is query, key and value (one slice, no bias); the dictionary W (m, d) is the ISTA
        encoder (x W^T) and decoder (z W) at once, so atom j is row j and there is no
        separate output map. Square ISTA: the code replaces x, so atom k is stream dim k.
        A separate decoder W_out (m, d) is the output map, stored like W (atom j writes row
        j: ``hidden_out_rows_are_units``); a learned per-atom lambda moves with its atom."""
        decoder = self.ista.decoder is not None
        return LayerRoles(
            norms=(f"{prefix}ln_1", f"{prefix}ln_2"),
            attn_in=LinearMap(f"{prefix}attn.c_attn.weight", None, "c_attn"),
            qkv_slices=1,
            attn_out=LinearMap(f"{prefix}attn.c_proj.weight", f"{prefix}attn.c_proj.bias", "attn c_proj"),
            hidden_in=LinearMap(f"{prefix}ista.dictionary", None, "dictionary"),
            hidden_out=LinearMap(f"{prefix}ista.decoder", None, "decoder") if decoder else None,
            hidden_units=self.ista.dictionary.size(0),
            hidden_is_residual=self.ista.variant == "square",
            hidden_out_rows_are_units=decoder,
            hidden_vectors=(f"{prefix}ista.atom_lambda",) if self.ista.atom_lambda is not None else (),
        )


class CRATE(LanguageModel):
    """The CRATE LM. ``white_box_forward`` records per layer: ``sparse_code`` (B, T, m),
    ``head_projections`` (B, K, T, d/K), ``mssa_input`` and ``mssa_output`` (B, T, d), and
    ``mssa_projection`` U (d, d) with ``head_projections == mssa_input @ U`` split into heads;
    with a learned lambda / eta also ``ista_lambda`` (m,) and ``ista_eta`` (1,)."""

    # Checkpoints written before the block norms took GPT-2's names and the ISTA weight its own.
    legacy_names = {"prenorm_1": "ln_1", "prenorm_2": "ln_2", "ista.weight": "ista.dictionary"}
    no_decay_names = ("ista.atom_lambda", "ista.log_eta")

    def __init__(self, config: ModelConfig):
        super().__init__(config, Block)

    def gemm_macs_per_layer(self) -> int:
        """U and c_proj (d x d each) plus the ISTA GEMMs, 2 K of d x m for K steps:
        overcomplete K encodings (x W^T, u W^T), K - 1 reconstructions (z W) and the decoder
        (z_K W_out, tied or separate: one GEMM either way), 4 at the published K = 2; square
        2 K of d x d (u = x - z W^T, then u W per step), 2 at the published K = 1."""
        c = self.config
        d, k = c.n_embd, ista_steps(c)
        return 2 * d**2 + 2 * k * d * ista_atoms(c)
