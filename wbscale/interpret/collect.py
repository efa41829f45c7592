"""``wbscale interpret collect``: the top-activating contexts of every ISTA atom / MLP neuron.

N tokens of a prepared split are read as one stream (the split's shards concatenated in
manifest order; a token's *position* is its index in that stream), cut into consecutive
windows of ``block_size`` tokens (the last one may be shorter), and fed through the model
in batches. For every unit u of every requested layer (CRATE: ISTA atom = a coordinate of
the sparse code z2; GPT-2: MLP neuron = a coordinate of the GELU output) it keeps, on the
device:

- the ``top_k`` largest activations and their positions: a streaming top-k (per batch the
  batch's own top-k per unit, then merged with the running one), so memory is
  O(layers * m * k) whatever N is; no (N, m) tensor ever exists;
- the number of tokens with activation > 0 and the sum of activations (frequency, mean).

A state file is written after every chunk of batches; re-running the same command
continues from it. At the end the token windows around the kept positions are read back
from the shards (``context`` tokens each side; on the left never before the start of the
window the model saw, because the activation depends on those tokens only), each unit's
atom -> token readout is computed (:mod:`wbscale.interpret.readout`), and the results are
written as JSON lines, one file per layer, with ``summary.json``, a frequency histogram and
``manifest.json`` (written last: its presence marks a finished collection).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from wbscale.errors import UserError
from wbscale.hardware import resolve_device
from wbscale.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from wbscale.ranks import say

__all__ = [
    "MANIFEST_FILE",
    "STATE_FILE",
    "UNITS",
    "StreamingTopK",
    "TokenStream",
    "collect",
    "layer_file",
    "parse_layers",
    "token_entropy",
    "unit_activations",
]

MANIFEST_FILE = "manifest.json"
STATE_FILE = "collect_state.pt"
SUMMARY_FILE = "summary.json"
VOCAB_FILE = "vocab.json"
HISTOGRAM_FILE = "frequency_hist.png"
FORMAT = "wbscale-interpret"
FORMAT_VERSION = 1

# Which white-box record holds a model's units: ISTA sparse code or MLP activation.
UNITS = {"ista": "sparse_code", "mlp": "mlp_activation"}
_ARCH_UNITS = {"crate": "ista", "gpt2": "mlp"}
UNIT_NAMES = {"ista": "ISTA atom", "mlp": "MLP neuron"}
# log10(frequency) histogram bins stored in summary.json (compare reads them back).
HIST_EDGES = np.linspace(-7.0, 0.0, 29)


def layer_file(layer: int) -> str:
    """Name of the JSON-lines file of one layer's units."""
    return f"atoms-layer{layer:02d}.jsonl"


def parse_layers(spec: str | Sequence[int] | None, n_layer: int) -> list[int]:
    """``"0,5,11"`` (or a list) -> sorted unique layer indices; ``None`` -> every layer.

    Negative indices count from the end (``-1`` = the last layer).
    """
    if spec is None or (isinstance(spec, str) and spec.strip() in ("", "all")):
        return list(range(n_layer))
    if isinstance(spec, str):
        try:
            values = [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--layers {spec!r}: expected comma-separated layer numbers, e.g. 0,5,11") from None
    else:
        values = [int(v) for v in spec]
    bad = [v for v in values if not -n_layer <= v < n_layer]
    if bad or not values:
        raise UserError(
            f"--layers {spec}: layer {bad[0] if bad else '(none)'} out of range; the model has "
            f"{n_layer} layers, numbered 0-{n_layer - 1}"
        )
    return sorted({v % n_layer for v in values})


# ---------------------------------------------------------------------------- data


class TokenStream:
    """One split of a prepared data folder read as a single stream of tokens."""

    def __init__(self, data_dir: str | Path, split: str = "val") -> None:
        from wbscale.data.loader import TokenShards
        from wbscale.data.manifest import load_manifest

        self.data_dir = Path(data_dir)
        self.split = split
        self.shards = TokenShards(self.data_dir, split, load_manifest(self.data_dir, verify=False))
        self.starts = np.concatenate([[0], np.cumsum(self.shards.sizes, dtype=np.int64)])
        self.total = int(self.starts[-1])
        self.vocab_size = self.shards.vocab_size

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream as int64 (crossing shard ends as needed)."""
        if not 0 <= start <= stop <= self.total:
            raise IndexError(f"tokens [{start}, {stop}) outside the stream of {self.total}")
        parts = []
        s = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            end = min(stop, int(self.starts[s + 1]))
            parts.append(self.shards.maps[s][start - self.starts[s]:end - self.starts[s]])
            start, s = end, s + 1
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """Tokens at arbitrary stream ``positions`` (any shape, all in range) as int64."""
        flat = positions.reshape(-1)
        out = np.empty(flat.shape, dtype=np.int64)
        shard = np.searchsorted(self.starts, flat, side="right") - 1
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.shards.maps[s][flat[sel] - self.starts[s]]
        return out.reshape(positions.shape)


def _batches(n_tokens: int, seq_len: int, batch_size: int) -> list[tuple[int, int, int]]:
    """(first token, rows, row length) of every batch: full windows, then the short tail."""
    full = n_tokens // seq_len
    out = [(w * seq_len, min(batch_size, full - w), seq_len) for w in range(0, full, batch_size)]
    if n_tokens % seq_len:
        out.append((full * seq_len, 1, n_tokens % seq_len))
    return out


# ---------------------------------------------------------------------------- streaming top-k


class StreamingTopK:
    """Per unit, the k largest activations seen so far and their positions, plus counts.

    ``values``/``positions`` are (k, m), best first; unfilled slots hold -inf / -1.
    """

    def __init__(self, m: int, k: int, device: torch.device | str = "cpu") -> None:
        self.k = k
        self.values = torch.full((k, m), -math.inf, device=device)
        self.positions = torch.full((k, m), -1, dtype=torch.int64, device=device)
        self.active = torch.zeros(m, dtype=torch.int64, device=device)
        self.total = torch.zeros(m, dtype=torch.float64, device=device)
        self.tokens = 0

    def update(self, acts: Tensor, positions: Tensor) -> None:
        """Fold in ``acts`` (N, m) of the tokens at stream ``positions`` (N,)."""
        acts = acts.float()
        v, i = acts.topk(min(self.k, acts.size(0)), dim=0)  # the batch's own top-k: (k, m)
        merged_v = torch.cat([self.values, v])
        merged_p = torch.cat([self.positions, positions[i]])
        self.values, j = merged_v.topk(self.k, dim=0)
        self.positions = merged_p.gather(0, j)
        self.active += (acts > 0).sum(0)
        # fp32 sum per batch (short), fp64 across batches (millions of tokens).
        self.total += acts.sum(0).double()
        self.tokens += acts.size(0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "values": self.values.cpu(), "positions": self.positions.cpu(),
            "active": self.active.cpu(), "total": self.total.cpu(), "tokens": self.tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.values.device
        self.values = state["values"].to(device)
        self.positions = state["positions"].to(device)
        self.active = state["active"].to(device)
        self.total = state["total"].to(device)
        self.tokens = int(state["tokens"])


def unit_activations(model: torch.nn.Module, idx: Tensor, layers: Sequence[int], record: str) -> Iterator[tuple[int, Tensor]]:
    """``(layer, activations (B, T, m))`` for each of ``layers``, one layer at a time.

    The same blocks and record names as ``LanguageModel.white_box_forward``, but only the
    requested layers record, the forward stops after the last of them, and a layer's
    tensors are dropped before the next layer runs, so peak memory is one layer's.
    """
    tr = model.transformer
    pos = torch.arange(idx.size(1), dtype=torch.long, device=idx.device)
    x = tr.drop(tr.wte(idx) + tr.wpe(pos))
    wanted = set(layers)
    for i, block in enumerate(tr.h[: max(layers) + 1]):
        rec: dict[str, Tensor] | None = {} if i in wanted else None
        x = block(x, rec)
        if rec is not None:
            yield i, rec[record]


def token_entropy(token_ids: Sequence[int]) -> float | None:
    """Entropy (bits) of the empirical distribution of ``token_ids``; None when empty.

    The monosemanticity proxy: an atom whose top contexts all fire on one token scores 0.
    """
    if len(token_ids) == 0:
        return None
    _, counts = np.unique(np.asarray(token_ids), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: no "-0.0"


# ---------------------------------------------------------------------------- collect


@dataclass
class _Plan:
    ckpt: str
    arch: str
    data_dir: Path
    split: str
    layers: list[int]
    units: str
    top_k: int
    tokens: int
    seq_len: int
    batch_size: int

    def fingerprint(self, weights_sha: str) -> dict[str, Any]:
        return {
            "ckpt": self.ckpt, "weights_sha256": weights_sha, "data_dir": str(self.data_dir.resolve()),
            "split": self.split, "layers": self.layers, "units": self.units, "top_k": self.top_k,
            "tokens": self.tokens, "seq_len": self.seq_len, "batch_size": self.batch_size,
        }


def _weights_sha(model: torch.nn.Module) -> str:
    """Identity of the weights, so a resumed collect never mixes two checkpoints."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def collect(
    ckpt: str | Path,
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    layers: str | Sequence[int] | None = None,
    tokens: int | None = 1_000_000,
    top_k: int = 20,
    context: int = 16,
    split: str = "val",
    batch_size: int = 8,
    units: str = "auto",
    device: str = "auto",
    save_every: int = 64,
    readout_tokens: int = 10,
    force: bool = False,
    progress: bool = True,
    stop_after_chunks: int | None = None,
) -> dict[str, Any]:
    """Collect top-activating contexts, frequencies and token readouts into ``out_dir``.

    ``tokens`` caps how much of the split is read (None: all of it). ``units``: ``auto``
    (CRATE -> ista, GPT-2 -> mlp), ``ista`` or ``mlp``. A state file is saved every
    ``save_every`` batches; a re-run with the same arguments continues from it (``force``
    starts over). ``stop_after_chunks`` returns after that many chunks without finishing
    (for time-boxed jobs and tests). Returns the manifest (``{"status": "partial", ...}``
    when stopped early).
    """
    if top_k < 1:
        raise UserError(f"--top-k {top_k}: must be at least 1")
    if context < 0:
        raise UserError(f"--context {context}: must be >= 0")
    if batch_size < 1 or save_every < 1:
        raise UserError("--batch-size and --save-every must be at least 1")
    if tokens is not None and tokens < 1:
        raise UserError(f"--tokens {tokens}: must be at least 1")
    dev = torch.device(resolve_device(device))
    model, plan, stream = _setup(ckpt, data_dir, layers, tokens, top_k, split, batch_size, units)
    out = Path(out_dir)
    fingerprint = plan.fingerprint(_weights_sha(model))
    model = model.to(dev)
    trackers = {layer: _tracker(model, layer, plan.units, top_k, dev) for layer in plan.layers}
    done = 0 if force else _resume(out / STATE_FILE, fingerprint, trackers)

    batches = _batches(plan.tokens, plan.seq_len, batch_size)
    if done < len(batches):  # the files on disk are about to be stale
        (out / MANIFEST_FILE).unlink(missing_ok=True)
    record = UNITS[plan.units]
    chunks = 0
    t0, tok0 = time.perf_counter(), sum(rows * length for _, rows, length in batches[:done])
    with torch.inference_mode():
        while done < len(batches):
            for first, rows, length in batches[done:done + save_every]:
                idx = torch.from_numpy(stream.read(first, first + rows * length).reshape(rows, length)).to(dev)
                positions = torch.arange(first, first + rows * length, device=dev)
                for layer, acts in unit_activations(model, idx, plan.layers, record):
                    trackers[layer].update(acts.reshape(rows * length, -1), positions)
                done += 1
            _save_state(out / STATE_FILE, fingerprint, done, trackers)
            chunks += 1
            if progress:
                seen = sum(rows * length for _, rows, length in batches[:done])
                rate = (seen - tok0) / max(time.perf_counter() - t0, 1e-9)
                say(f"{seen:,}/{plan.tokens:,} tokens, {rate:,.0f} tokens/s", topic="interpret collect")
            if stop_after_chunks is not None and chunks >= stop_after_chunks and done < len(batches):
                return {"status": "partial", "batches_done": done, "batches": len(batches)}
    stream_s = time.perf_counter() - t0
    manifest = _finalize(out, model, plan, stream, trackers, context, readout_tokens)
    # Timing of this session only (a resumed collect streamed just the rest).
    manifest["timing"] = {
        "device": str(dev), "streamed_tokens": plan.tokens - tok0, "stream_seconds": round(stream_s, 3),
        "tokens_per_second": round((plan.tokens - tok0) / max(stream_s, 1e-9), 1),
        "finalize_seconds": round(time.perf_counter() - t0 - stream_s, 3),
    }
    atomic_write_json(out / MANIFEST_FILE, manifest)
    if progress:
        print(format_summary(json.loads((out / SUMMARY_FILE).read_text())), file=sys.stderr)
    return manifest


def _setup(
    ckpt: str | Path, data_dir: str | Path | None, layers: str | Sequence[int] | None, tokens: int | None,
    top_k: int, split: str, batch_size: int, units: str,
) -> tuple[torch.nn.Module, _Plan, TokenStream]:
    """Load the model (on CPU) and the data; check that they fit the request."""
    from wbscale.ckpt.load import load_for_inference, require_training_data
    from wbscale.data.shards import SPLITS

    if split not in SPLITS:
        raise UserError(f"--split {split!r}: use one of {', '.join(SPLITS)}")
    model, recipe, _ = load_for_inference(ckpt, device="cpu")
    arch = model.config.arch
    if units == "auto":
        units = _ARCH_UNITS[arch]
    if units not in UNITS:
        raise UserError(f"--units {units!r}: use auto, ista (CRATE) or mlp (GPT-2)")
    if units != _ARCH_UNITS[arch]:
        have, use = ("ISTA", "mlp") if units == "ista" else ("MLP", "ista")
        raise UserError(
            f"{ckpt}: --units {units} needs {have} layers, but this checkpoint is a {arch} model "
            f"with no {have} layers; use --units {use} or auto"
        )
    layer_ids = parse_layers(layers, model.config.n_layer)

    data = require_training_data(ckpt, data_dir)
    stream = TokenStream(data, split)
    if stream.total == 0:
        raise UserError(
            f"the {split} split of '{data}' has no tokens: prepare more data, or pass --split train"
        )
    if stream.vocab_size > model.config.vocab_size:
        raise UserError(
            f"'{data}' was tokenized with {stream.vocab_size} tokens but {ckpt} has a vocabulary "
            f"of {model.config.vocab_size}: pass the data the model was trained on (--data)"
        )
    plan = _Plan(
        ckpt=str(Path(ckpt).resolve()), arch=arch, data_dir=data, split=split, layers=layer_ids,
        units=units, top_k=top_k, tokens=stream.total if tokens is None else min(tokens, stream.total),
        seq_len=model.config.block_size, batch_size=batch_size,
    )
    return model, plan, stream


def _resume(path: Path, fingerprint: dict[str, Any], trackers: dict[int, StreamingTopK]) -> int:
    """Load the saved state into ``trackers``; the number of batches already done (0: none)."""
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["fingerprint"] != fingerprint:
        diff = [f"{k}: {state['fingerprint'].get(k)!r} vs {v!r}" for k, v in fingerprint.items()
                if state["fingerprint"].get(k) != v]
        raise UserError(
            f"{path.parent} holds a collection made with other settings ({'; '.join(diff)}); pass "
            "--force to start over, or choose another --out"
        )
    for layer, tracker in trackers.items():
        tracker.load_state_dict(state["layers"][layer])
    return int(state["batches_done"])


def _tracker(model: torch.nn.Module, layer: int, units: str, k: int, dev: torch.device) -> StreamingTopK:
    from wbscale.interpret.readout import unit_directions

    return StreamingTopK(unit_directions(model, layer, units).size(0), k, dev)


def _save_state(path: Path, fingerprint: dict[str, Any], done: int, trackers: dict[int, StreamingTopK]) -> None:
    buf = io.BytesIO()
    torch.save(
        {"fingerprint": fingerprint, "batches_done": done,
         "layers": {layer: t.state_dict() for layer, t in trackers.items()}},
        buf,
    )
    atomic_write_bytes(path, buf.getvalue())


def _decode_vocab(data_dir: Path, vocab_size: int) -> list[str]:
    """Each token id's text (decoded alone, special tokens kept) for the report."""
    from tokenizers import Tokenizer

    from wbscale.data.tokenizer import TOKENIZER_FILE

    path = data_dir / TOKENIZER_FILE
    if not path.is_file():
        return [f"<{i}>" for i in range(vocab_size)]
    tok = Tokenizer.from_file(str(path))
    return tok.decode_batch([[i] for i in range(vocab_size)], skip_special_tokens=False)


def _finalize(
    out: Path, model: torch.nn.Module, plan: _Plan, stream: TokenStream,
    trackers: dict[int, StreamingTopK], context: int, readout_tokens: int,
) -> dict[str, Any]:
    """Contexts, readouts, per-layer JSON lines, summary, histogram, then the manifest."""
    from wbscale.interpret.readout import token_readout, unit_directions

    n_vocab = stream.vocab_size
    summary_layers = []
    offsets = np.arange(-context, context + 1)
    for layer, tracker in trackers.items():
        values = tracker.values.t().cpu().numpy()  # (m, k)
        positions = tracker.positions.t().cpu().numpy()
        frequency = (tracker.active.double() / tracker.tokens).cpu().numpy()
        mean = (tracker.total / tracker.tokens).cpu().numpy()
        m = values.shape[0]
        kept = (values > 0) & (positions >= 0)
        # Context windows of every kept entry, read in one vectorised gather.
        pos = np.where(kept, positions, 0)
        window = pos[..., None] + offsets  # (m, k, 2c+1)
        window_start = (pos // plan.seq_len * plan.seq_len)[..., None]
        valid = (window >= window_start) & (window < stream.total) & kept[..., None]
        ids = stream.gather(np.where(valid, window, 0))
        promote, suppress = token_readout(model, unit_directions(model, layer, plan.units), readout_tokens, n_vocab)
        lines = []
        entropies = []
        for u in range(m):
            top = []
            act_tokens = []
            for r in np.flatnonzero(kept[u]):
                v = valid[u, r]
                first = int(np.argmax(v))
                top.append({
                    "activation": round(float(values[u, r]), 6),
                    "position": int(positions[u, r]),
                    "tokens": ids[u, r][v].tolist(),
                    "index": context - first,
                })
                act_tokens.append(int(ids[u, r, context]))
            entropy = token_entropy(act_tokens)
            if len(act_tokens) == plan.top_k:
                entropies.append(entropy)
            lines.append(json.dumps({
                "layer": layer, "atom": u,
                "frequency": float(frequency[u]), "mean": float(mean[u]),
                "max": float(values[u, 0]) if kept[u, 0] else 0.0,
                "dead": bool(frequency[u] == 0), "token_entropy": entropy,
                "promotes": promote[u], "suppresses": suppress[u], "top": top,
            }, separators=(",", ":")))
        atomic_write_text(out / layer_file(layer), "\n".join(lines) + "\n")
        summary_layers.append(_layer_summary(layer, frequency, entropies))

    atomic_write_json(out / VOCAB_FILE, _decode_vocab(plan.data_dir, n_vocab))
    summary = {
        "arch": plan.arch, "units": plan.units, "unit_name": UNIT_NAMES[plan.units], "tokens": plan.tokens,
        "top_k": plan.top_k, "hist_edges_log10": HIST_EDGES.tolist(), "layers": summary_layers,
    }
    atomic_write_json(out / SUMMARY_FILE, summary)
    plot_frequency_histogram(summary, out / HISTOGRAM_FILE)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "status": "complete",
        "ckpt": plan.ckpt, "arch": plan.arch, "units": plan.units, "n_layer": model.config.n_layer,
        "n_embd": model.config.n_embd, "data_dir": str(plan.data_dir), "split": plan.split,
        "tokens": plan.tokens, "seq_len": plan.seq_len, "batch_size": plan.batch_size,
        "top_k": plan.top_k, "context": context, "readout_tokens": readout_tokens,
        "vocab_size": n_vocab, "layers": plan.layers,
        "files": {str(layer): layer_file(layer) for layer in plan.layers},
        "position": "index of the token in the split's shards concatenated in manifest order",
        "readout": "wte @ (ln_f.weight * (direction - mean(direction))): final LayerNorm linearised, "
                   "centring kept, 1/std dropped (a positive per-token scale: ranks unchanged)",
    }
    atomic_write_json(out / MANIFEST_FILE, manifest)
    return manifest


def _layer_summary(layer: int, frequency: np.ndarray, entropies: list[float | None]) -> dict[str, Any]:
    live = frequency[frequency > 0]
    hist, _ = np.histogram(np.log10(np.clip(live, 10.0 ** HIST_EDGES[0], 1.0)), bins=HIST_EDGES)
    ent = [e for e in entropies if e is not None]
    return {
        "layer": layer, "atoms": int(frequency.size), "dead": int(frequency.size - live.size),
        "dead_fraction": float(1 - live.size / frequency.size),
        "mean_frequency": float(frequency.mean()),
        "median_frequency": float(np.median(frequency)),
        "mean_token_entropy": float(np.mean(ent)) if ent else None,
        "entropy_atoms": len(ent),
        "frequency_hist": hist.tolist(),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of the per-layer summary."""
    head = f"{'layer':>5}  {'units':>6}  {'dead':>6}  {'dead %':>7}  {'median freq':>11}  {'token entropy (bits)':>20}"
    rows = [f"{summary['arch']} {summary['unit_name']}s, {summary['tokens']:,} tokens, top-{summary['top_k']}", head]
    for s in summary["layers"]:
        ent = "-" if s["mean_token_entropy"] is None else f"{s['mean_token_entropy']:.2f}"
        rows.append(f"{s['layer']:>5}  {s['atoms']:>6}  {s['dead']:>6}  {100 * s['dead_fraction']:>6.1f}%  "
                    f"{s['median_frequency']:>11.4g}  {ent:>20}")
    return "\n".join(rows)


def plot_frequency_histogram(summary: dict[str, Any], path: Path) -> Path:
    """Step histograms of log10(activation frequency) of the live units, one line per layer."""
    from matplotlib.figure import Figure

    edges = np.asarray(summary["hist_edges_log10"])
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot(1, 1, 1)
    for s in summary["layers"]:
        ax.stairs(s["frequency_hist"], edges, label=f"layer {s['layer']} ({s['dead']} dead)")
    ax.set_xlabel("log10(activation frequency)")
    ax.set_ylabel(f"{summary['unit_name']}s")
    ax.set_title(f"{summary['arch']}: activation frequency over {summary['tokens']:,} tokens")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_collection(path: str | Path) -> dict[str, Any]:
    """The manifest of a finished collection; UserError if ``path`` is not one."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        hint = (" (unfinished: re-run the same `wbscale interpret collect` to complete it)"
                if (path / STATE_FILE).is_file() else
                ": run `wbscale interpret collect --ckpt CKPT --out DIR` first")
        raise UserError(f"{path}: no finished collection here{hint}")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise UserError(f"{manifest_path}: not a wbscale interpret manifest")
    return manifest
