"""Atom -> token readout: which tokens a unit's output direction promotes or suppresses.

A unit writes a fixed direction into the residual stream, scaled by its activation:

- CRATE, overcomplete ISTA: the block outputs ``z2 W`` with W (m, d), so atom j writes the
  dictionary row ``W[j]`` (a column of D = W^T); with a separate decoder
  (``model.ista_decoder: separate``) the block outputs ``z W_out`` and atom j writes the
  decoder's row ``W_out[j]`` (the encoder row only decides when the atom fires).
- CRATE, square ISTA: the block's output *is* the code (``out = relu(...)``, m = d), so unit
  j writes the basis vector e_j.
- GPT-2: the MLP outputs ``c_proj(h)``; ``c_proj.weight`` is (d, 4d), neuron j writes its
  column ``c_proj.weight[:, j]``.

The direction is read out through the final LayerNorm, linearised, and the tied
unembedding ``wte`` (the direct path to the logits, as in the logit lens):

    score(v) = wte @ (ln_f.weight * (v - mean(v)))

Centring is kept (it is linear and exact); the division by the per-token standard
deviation is dropped (a positive scalar per token: it rescales every score alike and does
not change which tokens rank first), and ln_f's bias is dropped (the same for every unit).
"""

from __future__ import annotations

import torch
from torch import Tensor

from wbscale.errors import UserError

__all__ = ["readout_scores", "token_readout", "unit_directions"]


def unit_directions(model: torch.nn.Module, layer: int, units: str) -> Tensor:
    """The residual-stream direction each unit of ``layer`` writes, (m, d), detached."""
    block = model.transformer.h[layer]
    if units == "ista":
        ista = getattr(block, "ista", None)
        if ista is None:
            raise UserError(f"layer {layer} has no ISTA block (is this a CRATE model?)")
        if ista.variant == "square":
            w = ista.dictionary
            return torch.eye(w.size(1), dtype=w.dtype, device=w.device)
        decoder = getattr(ista, "decoder", None)
        return (ista.dictionary if decoder is None else decoder).detach()
    mlp = getattr(block, "mlp", None)
    if mlp is None:
        raise UserError(f"layer {layer} has no MLP (is this a GPT-2 model?)")
    return mlp.c_proj.weight.detach().t()


@torch.no_grad()
def readout_scores(model: torch.nn.Module, directions: Tensor, vocab_limit: int | None = None) -> Tensor:
    """Linearised logit contribution of each direction, (m, vocab), float32 (see module doc)."""
    ln_f, wte = model.transformer.ln_f, model.transformer.wte.weight
    v = directions.float()
    u = (v - v.mean(dim=-1, keepdim=True)) * ln_f.weight.float()
    e = wte.float() if vocab_limit is None else wte[:vocab_limit].float()
    return u @ e.t()


@torch.no_grad()
def token_readout(
    model: torch.nn.Module, directions: Tensor, n: int = 10, vocab_limit: int | None = None,
    chunk: int = 512,
) -> tuple[list[list[list[float]]], list[list[list[float]]]]:
    """Per unit, the ``n`` most promoted and ``n`` most suppressed tokens as ``[id, score]``.

    Computed ``chunk`` units at a time, so a (m, 50k) score matrix is never held whole.
    ``vocab_limit`` excludes padded vocabulary rows the tokenizer never produces.
    """
    promote: list[list[list[float]]] = []
    suppress: list[list[list[float]]] = []
    for start in range(0, directions.size(0), chunk):
        scores = readout_scores(model, directions[start:start + chunk], vocab_limit)
        k = min(n, scores.size(1))
        for out, (vals, ids) in ((promote, scores.topk(k, dim=1)), (suppress, (-scores).topk(k, dim=1))):
            sign = 1.0 if out is promote else -1.0
            for row_v, row_i in zip(vals.cpu().tolist(), ids.cpu().tolist(), strict=True):
                out.append([[i, round(sign * v, 5)] for i, v in zip(row_i, row_v, strict=True)])
    return promote, suppress
