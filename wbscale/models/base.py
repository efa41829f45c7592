"""What every wbscale language model shares: the GPT skeleton, init, loss, sampling, FLOPs.

A model is this skeleton plus one block class (``crate.Block``, ``gpt2.Block``):

    x = drop(wte(idx) + wpe(pos));  x = block_i(x) for each layer;  logits = lm_head(ln_f(x))

with the LM head tied to the token embedding. Blocks take ``(x, record=None)``; when
``record`` is a dict they write their white-box tensors into it (see ``white_box_forward``).
Blocks also say which of their parameters play which role (``roles``, a :class:`LayerRoles`),
so tools such as BIMT read that instead of branching on the architecture.

``generate`` decodes with a cache (``cache``, one :class:`LayerCache` per block): each block's
attention appends what it keeps of the new tokens and attends over all of them. GPT-2 keeps
keys and values, two tensors per layer; CRATE's MSSA has q = k = v = X U_k, so it keeps ONE
tensor per layer (the head projections), half the memory. The cached path gives the same
tokens as recomputing the whole context at every step (``use_cache=False``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from wbscale.config import ModelConfig
from wbscale.errors import UserError
from wbscale.models.loss import LMHead, cross_entropy


@dataclass(frozen=True)
class LinearMap:
    """A weight (out, in), as ``nn.Linear`` stores it, with its bias and a short plot label."""

    weight: str
    bias: str | None = None
    label: str = ""


@dataclass(frozen=True)
class LayerRoles:
    """Which parameters of one block play which role, by full parameter name.

    The block reads and writes a residual stream of d dimensions through:

    - ``norms``: LayerNorm modules (``.weight`` and ``.bias``) on the stream;
    - ``attn_in`` (``qkv_slices`` * d, d): ``qkv_slices`` stacked projections (q|k|v: 3;
      CRATE's U is query, key and value at once: 1), each d rows = heads x head_dim;
    - ``attn_out`` (d, d): writes the concatenated heads into the stream;
    - ``hidden_in`` (m, d): hidden unit j reads row j (GPT-2 ``c_fc``; CRATE's ISTA
      dictionary, which is encoder and decoder at once, so ``hidden_out`` is None);
    - ``hidden_out`` (d, m): hidden unit j writes column j (GPT-2 ``mlp.c_proj``); with
      ``hidden_out_rows_are_units`` it is stored (m, d) instead and unit j writes row j
      (CRATE's separate ISTA decoder W_out, stored like the dictionary);
    - ``hidden_is_residual``: the hidden units ARE the stream's dimensions (square ISTA:
      m = d and the code replaces x), so they cannot move on their own;
    - ``hidden_vectors``: per-unit parameters of shape (m,) that move with the hidden units
      (CRATE's learned per-atom lambda).
    """

    norms: tuple[str, ...]
    attn_in: LinearMap
    qkv_slices: int
    attn_out: LinearMap
    hidden_in: LinearMap
    hidden_out: LinearMap | None
    hidden_units: int
    hidden_is_residual: bool = False
    hidden_out_rows_are_units: bool = False
    hidden_vectors: tuple[str, ...] = ()


class LayerCache:
    """One layer's attention state for incremental decoding: its tensors for every token so far.

    The attention decides what it keeps: GPT-2 ``(k, v)``; CRATE's MSSA ``(w,)`` only, since
    its query, key and value are the same head projections W_k = X U_k.
    """

    def __init__(self) -> None:
        self.tensors: tuple[Tensor, ...] = ()

    def __len__(self) -> int:
        """Number of cached positions."""
        return self.tensors[0].size(-2) if self.tensors else 0

    def extend(self, *new: Tensor) -> tuple[Tensor, ...]:
        """Append the new tokens' tensors (B, H, t, p) along time; return the full ones (B, H, T, p)."""
        if self.tensors:
            new = tuple(torch.cat((old, n), dim=-2) for old, n in zip(self.tensors, new, strict=True))
        self.tensors = new
        return new


def rotary(x: Tensor, start: int = 0, base: float = 10000.0) -> Tensor:
    """Rotary position embedding of heads ``x`` (B, H, T, p), p even, at positions
    ``start .. start + T - 1``: pair (x_c, x_{c + p/2}) turns by angle pos * base^(-2c/p), so
    ``rotary(q, i) . rotary(k, j)`` depends on the positions only through i - j."""
    t, p = x.size(-2), x.size(-1)
    freq = base ** (-torch.arange(0, p, 2, device=x.device, dtype=torch.float32) / p)
    angle = torch.arange(start, start + t, device=x.device, dtype=torch.float32)[:, None] * freq
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., : p // 2], x[..., p // 2 :]
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(p) + causal mask) v per head; the t queries are the LAST t of the
    s positions of k and v (with a cache, the first s - t are earlier tokens)."""
    t, s = q.size(-2), k.size(-2)
    if t == s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    # Query i (position s - t + i) sees keys 0 .. s - t + i; a single query sees them all.
    mask = None if t == 1 else torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def check_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float, min_new_tokens: int = 0
) -> None:
    """UserError (one line, naming the CLI flag) for sampling options ``generate`` refuses."""
    if max_new_tokens < min_new_tokens:
        raise UserError(f"--max-new-tokens must be >= {min_new_tokens}, got {max_new_tokens}")
    if not temperature >= 0:  # also NaN
        raise UserError(f"--temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0: no top-k filtering), got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1] (1: no nucleus filtering), got {top_p}")


def sample_next(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids (B, 1) from last-position logits (B, V): greedy at ``temperature`` 0, else
    sampled from softmax(logits / temperature) restricted to the ``top_k`` most likely tokens
    (None or 0: all) and then to the nucleus: the fewest tokens whose probability reaches ``top_p``."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        probs, order = F.softmax(logits, dim=-1).sort(dim=-1, descending=True)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the mass before it already reaches p
        logits = logits.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), -float("inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


class LanguageModel(nn.Module):
    """Token + position embeddings, ``n_layer`` blocks, final LayerNorm, tied LM head."""

    # Block parameter names before a rename -> today's (block-relative, ``old`` matches a
    # name or a module prefix), so that checkpoints written under the old names still load.
    legacy_names: ClassVar[dict[str, str]] = {}

    def __init__(self, config: ModelConfig, block: Callable[[ModelConfig], nn.Module]):
        super().__init__()
        if config.vocab_size <= 0:
            raise UserError(
                f"model.vocab_size is {config.vocab_size}: set it in the recipe, or prepare the "
                "data first so that it is taken from the tokenizer"
            )
        if config.n_embd % config.n_head != 0:
            raise UserError(
                f"model.n_embd ({config.n_embd}) must be divisible by model.n_head ({config.n_head})"
            )
        self.config = config
        d = config.n_embd
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, d),
                wpe=nn.Embedding(config.block_size, d),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(d),
            )
        )
        self.lm_head = LMHead(d, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017), as GPT-2 / nanoGPT / the CRATE LM code do.
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2 paper: scale the residual-writing projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """GPT-2 init for Linear / Embedding; other parameters (ISTA dictionary) keep theirs."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ------------------------------------------------------------------ names
    def layer_roles(self) -> list[LayerRoles]:
        """Per layer, which parameters are the norms, attention maps and hidden units."""
        return [block.roles(f"transformer.h.{i}.") for i, block in enumerate(self.transformer.h)]

    @classmethod
    def upgrade_state_dict(cls, state_dict: dict[str, Any], prefix: str = "") -> None:
        """Rename, in place, keys ``{prefix}transformer.h.{i}.{old}`` to ``legacy_names``' new
        names. A key whose new name is also present is left alone (strict loading reports it)."""
        if not cls.legacy_names:
            return
        block = re.compile(rf"({re.escape(prefix)}transformer\.h\.\d+\.)(.+)")
        for key in list(state_dict):
            found = block.fullmatch(key)
            if found is None:
                continue
            head, rest = found.groups()
            for old, new in cls.legacy_names.items():
                if rest == old or rest.startswith(old + "."):
                    renamed = head + new + rest[len(old) :]
                    if renamed not in state_dict:
                        state_dict[renamed] = state_dict.pop(key)
                    break

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # torch's hook for upgrading old checkpoints (as BatchNorm does); it runs before the
        # children load, at any nesting (the Lightning module loads us under "model.").
        self.upgrade_state_dict(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ forward
    @property
    def block_size(self) -> int:
        return self.config.block_size

    def hidden_states(
        self, idx: Tensor, records: list[dict[str, Tensor]] | None = None, cache: list[LayerCache] | None = None
    ) -> Tensor:
        """The residual stream after ``ln_f``, (B, T, d); blocks fill ``records[i]`` if given.

        With ``cache`` (``new_cache()``), ``idx`` are the tokens after the cached ones: they sit
        at positions ``len(cache[0])`` onwards and block i's attention extends ``cache[i]``.
        """
        _, t = idx.shape
        past = 0 if cache is None else len(cache[0])
        if past + t > self.config.block_size:
            raise ValueError(f"sequence of length {past + t} exceeds block_size {self.config.block_size}")
        pos = torch.arange(past, past + t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            if cache is None:
                x = block(x, None if records is None else records[i])
            else:
                x = block(x, None if records is None else records[i], cache[i])
        return self.transformer.ln_f(x)

    def new_cache(self) -> list[LayerCache]:
        """An empty decoding cache, one :class:`LayerCache` per block (see ``hidden_states``)."""
        return [LayerCache() for _ in self.transformer.h]

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, loss_chunk: int = 0
    ) -> tuple[Tensor | None, Tensor | None]:
        """Logits (B, T, vocab) for every position, and the mean loss when ``targets`` is given.

        ``loss_chunk`` > 0 (with ``targets``): the loss is computed that many tokens at a time
        without ever holding the full logits (:func:`wbscale.models.loss.linear_cross_entropy`),
        and the logits returned are ``None``."""
        hidden = self.hidden_states(idx)
        if targets is not None and loss_chunk > 0:
            return None, self.lm_head(hidden, targets, chunk_tokens=loss_chunk)
        logits = self.lm_head(hidden)
        loss = None if targets is None else self.loss_fn(logits, targets)
        return logits, loss

    @staticmethod
    def loss_fn(logits: Tensor, targets: Tensor, ignore_index: int = -1) -> Tensor:
        """Mean next-token cross-entropy; targets equal to ``ignore_index`` are skipped."""
        return cross_entropy(logits, targets, ignore_index)

    @torch.no_grad()
    def white_box_forward(self, idx: Tensor) -> dict[str, list[Tensor]]:
        """Per-layer white-box tensors, ``{name: [layer_0, ..., layer_{L-1}]}`` (no autograd).

        The names are the block's (CRATE: sparse_code, head_projections, mssa_input,
        mssa_output; GPT-2: mlp_activation, head_projections, mssa_input, mssa_output).
        Call it in eval mode, or dropout changes what is recorded.
        """
        records: list[dict[str, Tensor]] = [{} for _ in range(self.config.n_layer)]
        self.hidden_states(idx, records)
        return {name: [r[name] for r in records] for name in records[0]}

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        top_p: float = 1.0,
        use_cache: bool = True,
    ) -> Tensor:
        """Append up to ``max_new_tokens`` tokens to ``idx`` (B, T); returns (B, T + n).

        Sampling is :func:`sample_next` (``temperature`` 0: greedy; ``top_k`` None or 0: no
        top-k; ``top_p`` 1: no nucleus). With ``eos_id``, a row that produced it is padded
        with ``eos_id`` and decoding stops early once every row has. The context is the last
        ``block_size`` tokens. ``use_cache`` feeds one new token per step through the blocks'
        attention caches while the sequence fits in ``block_size``; past it every position
        would move (learned absolute positions), so each step recomputes the cropped window,
        as ``use_cache=False`` does at every step: both give the same tokens. Call it in eval
        mode (dropout).
        """
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        block_size = self.config.block_size
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        cache = None
        for _ in range(max_new_tokens):
            if use_cache and idx.size(1) <= block_size:
                if cache is None:
                    cache, fed = self.new_cache(), idx  # the prompt, once
                else:
                    fed = idx[:, -1:]  # then only the newest token
                hidden = self.hidden_states(fed, cache=cache)
            else:
                cache = None
                hidden = self.hidden_states(idx[:, -block_size:])
            # Only the last position is needed: skip the LM head on the others.
            logits = self.lm_head(hidden[:, -1, :]).float()
            next_id = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                next_id = next_id.masked_fill(done[:, None], eos_id)
                done = done | (next_id[:, 0] == eos_id)
            idx = torch.cat((idx, next_id), dim=1)
            if eos_id is not None and bool(done.all()):
                break
        return idx

    # ------------------------------------------------------------------ accounting
    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (tied weights once); ``non_embedding`` drops the position table.

        As in nanoGPT, the token embedding stays in: it is also the LM head's weight.
        """
        # Under ZeRO-3 a parameter holds only its shard; DeepSpeed keeps the full size in ds_numel.
        n = sum(getattr(p, "ds_numel", p.numel()) for p in self.parameters())
        if non_embedding:
            n -= self.config.block_size * self.config.n_embd
        return n

    def gemm_macs_per_layer(self) -> int:
        """Multiply-accumulates per token of one block's weight GEMMs, forward only.

        A weight used by several GEMMs counts once per GEMM (CRATE's ISTA dictionary).
        """
        raise NotImplementedError

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per token at context ``seq_len``.

        nanoGPT's estimate_mfu / PaLM (Chowdhery et al. 2022, App. B) write this as
        ``6 N + 12 L d T``: 2 FLOPs per multiply-accumulate, backward = 2 x forward, and
        QK^T plus AV over the full T (no causal halving). Here N is replaced by the GEMM
        count of the actual forward pass (``gemm_macs_per_layer`` per block, plus the tied
        LM head d x vocab): for GPT-2 that equals 6N up to biases and norms; for CRATE's
        ISTA block it counts the 4 (overcomplete) or 2 (square) GEMMs its one dictionary
        takes, whose backward is again 2 x forward (docs/architecture.md, Kernels); with
        ``model.ista_steps`` K that is 2 K GEMMs (a separate decoder replaces the tied
        output GEMM, it adds none).
        """
        c = self.config
        macs = c.n_layer * self.gemm_macs_per_layer() + c.n_embd * c.vocab_size
        attention = 12 * c.n_layer * c.n_embd * seq_len
        return 6 * macs + attention

    # ------------------------------------------------------------------ optimiser
    # Parameter names (suffixes) never decayed whatever their shape: CRATE's learned ISTA
    # threshold and step size, which weight decay would pull towards 0 (a denser code, a
    # vanishing step), not towards a simpler function.
    no_decay_names: ClassVar[tuple[str, ...]] = ()

    def configure_param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Two AdamW groups: decay for weight matrices; none for biases, norms, embeddings
        and the names in ``no_decay_names``.

        ``named_parameters`` yields the tied LM head / token embedding once, as
        ``transformer.wte.weight``, so it sits in the no-decay group once.
        """
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            keep = id(p) in embeddings or name.endswith(self.no_decay_names)
            (decay if p.dim() >= 2 and not keep else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]


# ---------------------------------------------------------------------------- loading helpers


def crop_positions(state_dict: dict[str, Tensor], block_size: int, source: str | Path) -> None:
    """Keep the first ``block_size`` rows of the position table (nanoGPT's crop_block_size)."""
    key = "transformer.wpe.weight"
    if key not in state_dict:
        return
    n_positions = state_dict[key].size(0)
    if block_size > n_positions:
        raise UserError(
            f"{source}: model.block_size {block_size} is larger than the checkpoint's "
            f"{n_positions} positions; use block_size <= {n_positions}"
        )
    state_dict[key] = state_dict[key][:block_size]


def load_checked(model: nn.Module, state_dict: dict[str, Tensor], source: str | Path) -> None:
    """``load_state_dict`` that names every missing, unexpected or mis-shaped key.

    Old parameter names (``LanguageModel.legacy_names``) are accepted, as in ``load_state_dict``.
    """
    if isinstance(model, LanguageModel):
        state_dict = dict(state_dict)
        model.upgrade_state_dict(state_dict)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {'; '.join(shapes)}")
        raise UserError(
            f"{source}: the checkpoint does not match a {type(model).__name__} of this config "
            f"({'; '.join(parts)})"
        )
    model.load_state_dict(state_dict, strict=True)
