"""Reading prepared token shards: memory maps, a stateless sampler, train/val batches.

Sampling is a pure function of a *global sample index* ``g`` (the number of training
windows drawn before this one, summed over all ranks): ``g`` -> epoch ``g // N`` and
position ``g % N`` -> a slot of a seeded pseudo-random permutation of the ``N``
non-overlapping windows of ``seq_len + 1`` tokens. Nothing else is state, so resuming
is "start at ``g = samples consumed``" and a change of world size just re-slices the
same global sequence of samples among the ranks.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from wbscale.data.manifest import MANIFEST_FILE, load_manifest
from wbscale.data.shards import SPLITS, map_shard
from wbscale.errors import UserError

__all__ = [
    "TokenShards",
    "TrainStream",
    "WindowSampler",
    "unigram_entropy",
    "val_batches",
]

_MASK64 = (1 << 64) - 1


class TokenShards:
    """Read-only memory maps of one split's shards."""

    def __init__(
        self, data_dir: str | Path, split: str, manifest: dict[str, Any] | None = None
    ) -> None:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.manifest = manifest if manifest is not None else load_manifest(data_dir, verify=False)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.records = self.manifest["splits"][split]["shards"]
        self.sizes = [int(r["tokens"]) for r in self.records]
        self.total_tokens = sum(self.sizes)
        self.vocab_size = int(self.manifest["vocab_size"])
        self._maps: list[np.memmap] | None = None

    @property
    def maps(self) -> list[np.memmap]:
        # Opened on first use, so the object pickles cheaply into DataLoader workers.
        if self._maps is None:
            self._maps = [
                map_shard(self.data_dir / r["file"], self.dtype, n)
                for r, n in zip(self.records, self.sizes, strict=True)
            ]
        return self._maps

    def __len__(self) -> int:
        return len(self.records)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}

    def window(self, shard_idx: int, start: int, length: int) -> np.ndarray:
        """``length`` tokens of shard ``shard_idx`` from ``start`` (a view into the map)."""
        if start < 0 or start + length > self.sizes[shard_idx]:
            raise IndexError(
                f"window [{start}, {start + length}) outside shard {shard_idx} "
                f"of {self.sizes[shard_idx]} tokens"
            )
        return self.maps[shard_idx][start:start + length]


# ---------------------------------------------------------------------------- sampler


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a cheap, well-mixing hash of uint64 values."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = int(_mix64(np.array([(h ^ (p & _MASK64)) & _MASK64], np.uint64))[0])
    return h


class _FeistelPermutation:
    """A seeded bijection of ``[0, n)`` in O(1) memory (4-round Feistel, cycle walking).

    Needs no table of ``n`` entries, so epochs over billions of windows cost nothing.
    """

    def __init__(self, n: int, key: int) -> None:
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.half = np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        self.keys = [np.uint64(_key(key, r)) for r in range(4)]

    def _round(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        y = self._round(np.asarray(idx, dtype=np.uint64))
        out_of_range = y >= np.uint64(self.n)
        # Cycle walking: the domain is at most 4n, so a few extra rounds on average.
        while out_of_range.any():
            y[out_of_range] = self._round(y[out_of_range])
            out_of_range = y >= np.uint64(self.n)
        return y.astype(np.int64)


class WindowSampler:
    """Global sample index -> (shard, start) of a window of ``window`` tokens.

    Each shard of ``n`` tokens has ``(n - window + 1) // window`` non-overlapping slots
    (one if it only fits one), leaving at least ``window - 1`` spare tokens, so every
    epoch shifts each shard's slots by a seeded offset and sees a new phase of the text.
    An epoch is a seeded permutation of all slots; ``windows_per_epoch`` is constant.
    """

    def __init__(
        self, shard_sizes: list[int], window: int, seed: int, random_offset: bool = True
    ) -> None:
        self.window = window
        self.seed = seed
        self.random_offset = random_offset
        sizes = np.asarray(shard_sizes, dtype=np.int64)
        slots = np.where(sizes >= window, np.maximum((sizes - window + 1) // window, 1), 0)
        if not random_offset:
            slots = sizes // window
        self.shard_sizes = sizes
        self.slots = slots
        self.spare = sizes - slots * window
        self.cum_slots = np.cumsum(slots)
        self.windows_per_epoch = int(self.cum_slots[-1]) if len(slots) else 0
        self._epoch: int | None = None
        self._perm: _FeistelPermutation | None = None
        self._offsets: np.ndarray | None = None

    def _for_epoch(self, epoch: int) -> tuple[_FeistelPermutation, np.ndarray]:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = _FeistelPermutation(self.windows_per_epoch, _key(self.seed, epoch))
            if self.random_offset:
                h = _mix64(np.arange(len(self.slots), dtype=np.uint64) ^ np.uint64(_key(self.seed, epoch, 1)))
                self._offsets = (h % (self.spare + 1).astype(np.uint64)).astype(np.int64)
            else:
                self._offsets = np.zeros(len(self.slots), dtype=np.int64)
        assert self._perm is not None and self._offsets is not None
        return self._perm, self._offsets

    def epoch_of(self, g: int) -> int:
        return g // self.windows_per_epoch

    def sample_windows(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised :meth:`sample_window`: arrays of shard indices and start offsets."""
        g = np.asarray(g, dtype=np.int64)
        n = self.windows_per_epoch
        epochs, positions = g // n, g % n
        shards = np.empty_like(g)
        starts = np.empty_like(g)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            perm, offsets = self._for_epoch(int(epoch))
            slot = perm(positions[sel])
            shard = np.searchsorted(self.cum_slots, slot, side="right")
            first = self.cum_slots[shard] - self.slots[shard]
            shards[sel] = shard
            starts[sel] = offsets[shard] + (slot - first) * self.window
        return shards, starts

    def sample_window(self, g: int) -> tuple[int, int]:
        """(shard index, start token) of global sample ``g``."""
        shards, starts = self.sample_windows(np.array([g]))
        return int(shards[0]), int(starts[0])


# ---------------------------------------------------------------------------- streams


def _too_small(data_dir: Path, split: str, tokens: int, window: int, what: str) -> UserError:
    return UserError(
        f"the {split} split of '{data_dir}' has {tokens:,} tokens in its shards, fewer than "
        f"one {what} of block_size + 1 = {window} tokens. Lower model.block_size, or "
        "prepare more data (data.synthetic_documents / data.max_documents / a bigger "
        "source, or a larger data.val_fraction for the val split)."
    )


class TrainStream(IterableDataset):
    """Infinite micro-batches ``(x, y)`` (int64, ``(B, T)``) for one rank.

    Global micro-batch ``k`` (counted from ``start_sample``) covers global samples
    ``start_sample + [k*B*world, (k+1)*B*world)``; rank ``r`` takes the contiguous
    ``B`` of them starting at ``k*B*world + r*B``. With DataLoader workers, worker ``w``
    of ``m`` yields micro-batches ``w, w+m, ...``, which the DataLoader's round-robin
    turns back into ``0, 1, 2, ...``.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        seq_len: int,
        micro_batch_size: int,
        seed: int,
        start_sample: int = 0,
        rank: int = 0,
        world_size: int = 1,
        random_offset: bool = True,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.data_dir = Path(data_dir)
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.start_sample = start_sample
        self.rank = rank
        self.world_size = world_size
        self.shards = TokenShards(data_dir, split)
        self.sampler = WindowSampler(self.shards.sizes, seq_len + 1, seed, random_offset)
        if self.sampler.windows_per_epoch == 0:
            raise _too_small(self.data_dir, split, self.shards.total_tokens, seq_len + 1, "window")

    @property
    def windows_per_epoch(self) -> int:
        return self.sampler.windows_per_epoch

    def first_sample(self, k: int) -> int:
        """Global index of this rank's first sample in micro-batch ``k``."""
        b = self.micro_batch_size
        return self.start_sample + k * b * self.world_size + self.rank * b

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's micro-batch number ``k`` (``k = 0`` is the first after start_sample)."""
        g0 = self.first_sample(k)
        shards, starts = self.sampler.sample_windows(np.arange(g0, g0 + self.micro_batch_size))
        w = self.seq_len + 1
        rows = np.stack([self.shards.window(int(s), int(o), w) for s, o in zip(shards, starts, strict=True)])
        data = torch.from_numpy(rows.astype(np.int64))
        return data[:, :-1], data[:, 1:]

    def __iter__(self):
        info = get_worker_info()
        k, step = (info.id, info.num_workers) if info is not None else (0, 1)
        while True:
            yield self.batch(k)
            k += step

    def state_at(self, samples_consumed: int) -> dict[str, int]:
        """Sampler state after ``samples_consumed`` global samples (for checkpoints).

        Resume with ``TrainStream(..., start_sample=state["samples"])``.
        """
        n = self.windows_per_epoch
        return {
            "epoch": samples_consumed // n,
            "position": samples_consumed % n,
            "seed": self.seed,
            "samples": samples_consumed,
            "windows_per_epoch": n,
            "seq_len": self.seq_len,
        }


def val_batches(
    data_dir: str | Path, seq_len: int, batch_size: int, n_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n_batches`` batches of consecutive non-overlapping val windows.

    Always the same windows, so validation losses are comparable across runs and steps.
    Fewer batches (the last one possibly smaller) when the val split is short.
    """
    shards = TokenShards(data_dir, "val")
    w = seq_len + 1
    wanted = batch_size * n_batches
    rows: list[np.ndarray] = []
    for idx, size in enumerate(shards.sizes):
        for start in range(0, size - w + 1, w):
            if len(rows) == wanted:
                break
            rows.append(shards.window(idx, start, w))
    if not rows:
        raise _too_small(Path(data_dir), "val", shards.total_tokens, w, "validation window")
    batches = []
    for i in range(0, len(rows), batch_size):
        data = torch.from_numpy(np.stack(rows[i:i + batch_size]).astype(np.int64))
        batches.append((data[:, :-1], data[:, 1:]))
    if len(batches) > 1 and batches[-1][0].shape[0] < batch_size:
        batches.pop()  # every batch full once there are several
    return batches


def unigram_entropy(data_dir: str | Path, split: str = "train") -> float:
    """Entropy of the split's token frequencies, in nats per token.

    The loss of the best model that ignores context: a trained LM's val loss should sit
    well below it. Cached per process while the data folder's manifest is unchanged (a
    run's plots and its summary both ask).
    """
    manifest = Path(data_dir) / MANIFEST_FILE
    stamp = manifest.stat().st_mtime_ns if manifest.is_file() else 0
    return _unigram_entropy(str(Path(data_dir).resolve()), split, stamp)


@functools.lru_cache(maxsize=8)
def _unigram_entropy(data_dir: str, split: str, stamp: int) -> float:
    shards = TokenShards(data_dir, split)
    counts = np.zeros(shards.vocab_size, dtype=np.int64)
    chunk = 1 << 24
    for m in shards.maps:
        for i in range(0, len(m), chunk):
            counts += np.bincount(m[i:i + chunk], minlength=shards.vocab_size)[: shards.vocab_size]
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())
