"""White-box metrics: what each CRATE layer does to the tokens, measured.

One implementation, used by the training callback (:class:`wbscale.track.callbacks.WhiteBoxMetrics`)
and by ``wbscale metrics --ckpt``. Everything reads ``model.white_box_forward(idx)``, which
returns per-layer lists of tensors (docs/architecture.md, "CRATE language model"):

- CRATE: ``sparse_code`` (B, T, m) = the ISTA code z2 (>= 0; with ``model.ista_steps`` K
  the last code z_K), with a learned threshold / step size also ``ista_lambda`` (m,) and
  ``ista_eta`` (1,) (``model.ista_learn_lambda`` / ``ista_learn_eta``), ``head_projections``
  (B, n_head, T, p) = X U_k with X = LN1(x), ``mssa_input`` (B, T, d) = LN1(x),
  ``mssa_output`` (B, T, d) = the residual stream after MSSA, x + MSSA(LN1(x)); optionally
  ``mssa_projection`` (d, d) = U, with ``head_projections == mssa_input @ U`` split into heads
  (without it, U is looked up among the model's parameters, :func:`find_head_projection`).
- GPT-2: ``mlp_activation`` (B, T, 4d) = GELU output, ``head_projections``, ``mssa_input``,
  ``mssa_output``.

Metric definitions (per layer i, logged as ``whitebox/layer{i}/<name>``, plus
``whitebox/mean/<name>`` = the mean over layers):

``sparsity``
    CRATE: fraction of exact zeros in the sparse code z2 (z2 is a ReLU output, so this is
    also the fraction <= 0). GPT-2: fraction of MLP activations <= 0, i.e. of neurons whose
    pre-activation is <= 0 (GELU is never exactly 0, so "exact zeros" would always read 0).
``dead_atoms`` (CRATE) / ``dead_neurons`` (GPT-2)
    dictionary atoms (columns of z2) / MLP neurons that are inactive (z = 0, resp. <= 0) for
    every token of the batch.
``coding_rate``
    :func:`coding_rate` of the MSSA head projections X U_k, eps = 0.01, summed over heads
    and averaged over the sequences of the batch, in nats.
``coding_rate_after_mssa``, ``compression_gain`` (CRATE)
    the same coding rate of the stream after MSSA projected with the same U_k, and
    ``compression_gain = coding_rate - coding_rate_after_mssa`` (see :func:`compression_gain`).
``lambda_mean``, ``lambda_min``, ``eta`` (CRATE, learned lambda / eta only)
    the mean and the smallest of the layer's per-atom lambda, and its step size eta: the
    soft threshold of an ISTA step is eta * lambda (a lambda below 0 makes the code denser).
``head_coherence`` (CRATE)
    mean over head pairs j < k of ||Q_j^T Q_k||_F^2 / p, with Q_k an orthonormal basis of
    span(U_k): 0 = mutually orthogonal head subspaces (the incoherence CRATE's derivation
    assumes), 1 = identical subspaces; a random split of R^d reads about p/d.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_EPS = 0.01

# ----------------------------------------------------------------------------- primitives


def sparsity(z: Tensor) -> float:
    """Fraction of exact zeros in ``z`` (any shape)."""
    n = z.numel()
    if n == 0:
        return float("nan")
    # count_nonzero counts in int64: a float32 mean of 0/1 values loses exactness past 2**24
    return 1.0 - torch.count_nonzero(z).item() / n


def activation_sparsity(a: Tensor) -> float:
    """Fraction of entries ``<= 0`` (inactive units of a GELU/ReLU layer)."""
    n = a.numel()
    if n == 0:
        return float("nan")
    return torch.count_nonzero(a <= 0).item() / n


def dead_atoms(z: Tensor) -> int:
    """Number of atoms (last dimension of ``z``) that are zero for every token of the batch."""
    active = (z.reshape(-1, z.shape[-1]) != 0).any(dim=0)
    return int(active.numel() - torch.count_nonzero(active).item())


def dead_neurons(a: Tensor) -> int:
    """Number of units (last dimension of ``a``) that are ``<= 0`` for every token of the batch."""
    active = (a.reshape(-1, a.shape[-1]) > 0).any(dim=0)
    return int(active.numel() - torch.count_nonzero(active).item())


def coding_rate_per_head(Z: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Coding rate of each (sequence, head): a float64 tensor of shape ``Z.shape[:-2]``.

    ``Z`` is ``(..., T, p)``: T token features of dimension p per head. Each token is
    normalised to unit length, then (exactly as the published CRATE code, vis_utils/coding_rate.py)

        R(Z) = 1/2 * logdet(I_T + p / (T * eps) * Z Z^T).

    ``eps`` here multiplies directly (the CRATE code's convention; the paper writes eps^2).
    By Sylvester's identity logdet(I_T + c Z Z^T) = logdet(I_p + c Z^T Z), so the p x p Gram
    is used (cheap for long sequences). Computed in float64 via Cholesky (the matrix is
    symmetric positive definite); tokens of zero length stay zero and add nothing.
    """
    if Z.dim() < 2:
        raise ValueError(f"coding_rate needs (..., T, p) features, got shape {tuple(Z.shape)}")
    T, p = Z.shape[-2], Z.shape[-1]
    Z = F.normalize(Z.detach().to(torch.float64), dim=-1, eps=1e-12)
    c = p / (T * eps)
    if T >= p:
        gram = Z.transpose(-1, -2) @ Z  # (..., p, p)
    else:
        gram = Z @ Z.transpose(-1, -2)  # (..., T, T)
    k = gram.shape[-1]
    mat = torch.eye(k, dtype=torch.float64, device=Z.device) + c * gram
    L, info = torch.linalg.cholesky_ex(mat)
    if bool((info != 0).any()):  # cannot happen for finite inputs; keep a correct fallback
        return 0.5 * torch.linalg.slogdet(mat).logabsdet
    return torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)  # 1/2 logdet = sum log diag L


def coding_rate(Z: Tensor, eps: float = DEFAULT_EPS) -> float:
    """Coding rate in nats of per-head token features, as in the CRATE code.

    ``Z``: ``(T, p)`` one head, ``(H, T, p)`` one sequence with H heads, or
    ``(B, H, T, p)`` a batch. The rate is :func:`coding_rate_per_head` summed over heads
    and averaged over the batch: R = 1/2 * sum_k logdet(I + p/(T*eps) Z_k Z_k^T).
    """
    per_head = coding_rate_per_head(Z, eps)
    if Z.dim() == 2:
        return float(per_head)
    if Z.dim() == 3:
        return float(per_head.sum())
    return float(per_head.sum(-1).mean())


def split_heads(x: Tensor, n_head: int) -> Tensor:
    """(B, T, H*p) -> (B, H, T, p), the layout of ``head_projections``."""
    B, T, D = x.shape
    return x.view(B, T, n_head, D // n_head).transpose(1, 2)


def compression_gain(before: Tensor, after: Tensor, eps: float = DEFAULT_EPS) -> float:
    """``coding_rate(before) - coding_rate(after)`` for two ``(B, H, T, p)`` head projections.

    In wbscale ``before`` = X U_k with X = LN1(x) (what MSSA reads) and ``after`` = the
    residual stream after MSSA, x + MSSA(LN1(x)), projected with the same U_k. MSSA is
    derived as a gradient step that lowers sum_k R(U_k^T Z), so a positive gain (nats) means
    the layer compressed the tokens against its own subspaces. Note the stream after MSSA
    is not layer-normalised; the unit normalisation of each token inside the coding rate
    removes its scale but not LN's centring and gain.
    """
    return coding_rate(before, eps) - coding_rate(after, eps)


def head_coherence(U: Tensor, n_head: int) -> float:
    """Mean ||Q_j^T Q_k||_F^2 / p over head pairs, Q_k an orthonormal basis of U's k-th block.

    ``U`` is ``(d, n_head * p)`` with ``X @ U`` = the concatenated head projections.
    """
    if n_head < 2:
        return float("nan")
    d, D = U.shape
    p = D // n_head
    blocks = U.to(torch.float64).reshape(d, n_head, p).permute(1, 0, 2)  # (H, d, p)
    Q = torch.linalg.qr(blocks).Q  # (H, d, p)
    overlap = torch.einsum("jdp,kdq->jkpq", Q, Q).pow(2).sum((-1, -2)) / p  # (H, H)
    iu = torch.triu_indices(n_head, n_head, offset=1, device=overlap.device)
    return float(overlap[iu[0], iu[1]].mean())


def find_head_projection(model: nn.Module, x: Tensor, heads: Tensor, rows: int = 16) -> Tensor | None:
    """Find U (d, H*p) among ``model``'s parameters such that ``x @ U`` gives ``heads``.

    Used when ``white_box_forward`` does not return ``mssa_projection``. U cannot be
    solved for from (x, heads): LN1's output is centred, so every x is orthogonal to the
    all-ones vector and U's component along it is undetermined, yet the stream after MSSA
    does have that component. Instead each square 2-D parameter (as W and as W^T) is tried
    on a few tokens; a relative error below 5 % (bf16 autocast) is a match. Returns
    ``None`` when nothing matches (e.g. ZeRO-3 shards the weights).
    """
    B, H, T, p = heads.shape
    d = x.shape[-1]
    X = x.reshape(-1, d)[:rows].float()
    P = heads.transpose(1, 2).reshape(-1, H * p)[:rows].float()
    scale = P.norm().clamp_min(1e-12)
    for param in (q.detach() for q in model.parameters()):
        if param.dim() != 2 or param.shape != (d, H * p) and param.shape != (H * p, d):
            continue
        for U in (param.T, param):
            if U.shape == (d, H * p) and float((X @ U.float() - P).norm() / scale) < 0.05:
                return U
    return None


# ----------------------------------------------------------------------------- model level


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile wraps the module; the hooks live on the original
    return getattr(model, "_orig_mod", model)


def _layers(out: Mapping[str, Any], key: str) -> Sequence[Tensor]:
    value = out.get(key)
    return list(value) if value is not None else []


def metrics_from_white_box(
    out: Mapping[str, Any], eps: float = DEFAULT_EPS, model: nn.Module | None = None
) -> dict[str, float]:
    """Compute the metrics from a ``white_box_forward`` result (see the module docstring).

    ``model`` is searched for the MSSA projections U when ``out`` has no ``mssa_projection``;
    without either, ``compression_gain`` and ``head_coherence`` are left out.
    """
    metrics: dict[str, float] = {}
    codes = _layers(out, "sparse_code")
    acts = _layers(out, "mlp_activation")
    heads = _layers(out, "head_projections")
    inputs = _layers(out, "mssa_input")
    outputs = _layers(out, "mssa_output")
    projections = _layers(out, "mssa_projection")
    lambdas = _layers(out, "ista_lambda")
    etas = _layers(out, "ista_eta")
    is_crate = len(codes) > 0
    n_layer = max(len(codes), len(acts), len(heads))
    for i in range(n_layer):
        pre = f"whitebox/layer{i}/"
        if is_crate and i < len(codes):
            metrics[pre + "sparsity"] = sparsity(codes[i])
            metrics[pre + "dead_atoms"] = float(dead_atoms(codes[i]))
            if i < len(lambdas):
                lam = lambdas[i].detach().float()
                metrics[pre + "lambda_mean"] = float(lam.mean())
                metrics[pre + "lambda_min"] = float(lam.min())
            if i < len(etas):
                metrics[pre + "eta"] = float(etas[i].detach().float().reshape(-1)[0])
        elif i < len(acts):
            metrics[pre + "sparsity"] = activation_sparsity(acts[i])
            metrics[pre + "dead_neurons"] = float(dead_neurons(acts[i]))
        if i < len(heads):
            h = heads[i]
            rate = coding_rate(h, eps)
            metrics[pre + "coding_rate"] = rate
            if is_crate and i < len(inputs) and i < len(outputs):
                n_head = h.shape[1]
                U = projections[i] if i < len(projections) else None
                d = inputs[i].shape[-1]
                if U is not None and tuple(U.shape) != (d, h.shape[1] * h.shape[-1]):
                    U = None  # e.g. an empty ZeRO-3 shard outside the forward
                if U is None and model is not None:
                    U = find_head_projection(model, inputs[i], h)
                if U is None:
                    continue
                U = U.to(torch.float64)
                after = split_heads((outputs[i].to(torch.float64) @ U), n_head)
                rate_after = coding_rate(after, eps)
                metrics[pre + "coding_rate_after_mssa"] = rate_after
                metrics[pre + "compression_gain"] = rate - rate_after
                metrics[pre + "head_coherence"] = head_coherence(U, n_head)
    names = sorted({k.rsplit("/", 1)[1] for k in metrics})
    for name in names:
        vals = [v for k, v in metrics.items() if k.endswith("/" + name) and math.isfinite(v)]
        if vals:
            metrics[f"whitebox/mean/{name}"] = sum(vals) / len(vals)
    return metrics


def whitebox_metrics(
    model: nn.Module, idx: Tensor, eps: float = DEFAULT_EPS
) -> dict[str, float]:
    """White-box metrics of ``model`` on the token batch ``idx`` (B, T).

    Runs ``model.white_box_forward(idx)`` in eval mode under ``torch.no_grad()`` and
    restores the previous train/eval mode. Keys: ``whitebox/layer{i}/<name>`` and
    ``whitebox/mean/<name>`` (names in the module docstring).
    """
    model = _unwrap(model)
    if not hasattr(model, "white_box_forward"):
        raise TypeError(f"{type(model).__name__} has no white_box_forward(idx); cannot compute white-box metrics")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.white_box_forward(idx)
            return metrics_from_white_box(out, eps, model)
    finally:
        model.train(was_training)
