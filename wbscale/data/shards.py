"""The token shard format: file names, on-disk dtype, checks, the reader and the writer.

A split's token stream is its documents in source order, each followed by the EOT
token, as flat little-endian token ids (uint16 if vocab < 65536 else uint32). Shard
``k`` of a split (``<split>_<k:06d>.bin``) holds tokens ``[k * shard_tokens,
(k + 1) * shard_tokens)`` of that stream, so all shards but the last are full. Each
shard's record in the manifest gives its file, token count, sha256, and where it starts
and ends (``[document index, token offset]``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wbscale.errors import UserError
from wbscale.io import atomic_write_bytes, sha256_file

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SPLITS",
    "DiskFull",
    "SourceChanged",
    "SplitShards",
    "check_shard",
    "dtype_for_vocab",
    "map_shard",
    "shard_glob",
    "shard_name",
    "write_file",
]

FORMAT = "wbscale-token-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


def dtype_for_vocab(n_vocab: int) -> np.dtype:
    """uint16 when every id fits in it, uint32 otherwise (little-endian on disk)."""
    return np.dtype("<u2") if n_vocab < 65536 else np.dtype("<u4")


def shard_name(split: str, k: int) -> str:
    """File name of shard ``k`` of ``split``."""
    return f"{split}_{k:06d}.bin"


def shard_glob(split: str) -> str:
    """Glob pattern matching every shard file of ``split``."""
    return f"{split}_*.bin"


def check_shard(data_dir: Path, record: dict[str, Any], itemsize: int) -> str | None:
    """Why the shard file of ``record`` is unusable, or None if its size and sha256 match."""
    path = Path(data_dir) / record["file"]
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != record["tokens"] * itemsize:
        return f"size {size} bytes, expected {record['tokens'] * itemsize}"
    if sha256_file(path) != record["sha256"]:
        return "sha256 mismatch"
    return None


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


class DiskFull(UserError):
    """The disk (or quota) of a data folder ran out while writing ``path``."""

    def __init__(self, path: Path, needed: int | None, quota: bool = False) -> None:
        try:
            free: int | None = shutil.disk_usage(path.parent).free
        except OSError:
            free = None
        what = "disk quota exceeded" if quota else "no space left on the disk"
        need = f"it needs {_size(needed)}" if needed is not None else "it needs more space"
        have = f", {_size(free)} free" if free is not None else ""
        super().__init__(
            f"{what} writing {path} ({need}{have}). Free up space or set data.out_dir to a "
            "disk with more room, then re-run `wbscale data prepare`: it resumes, keeping the "
            "shards written so far."
        )
        self.path, self.needed, self.free = path, needed, free


def write_file(path: Path, payload: bytes) -> None:
    """:func:`wbscale.io.atomic_write_bytes`; a full disk raises :class:`DiskFull` and
    leaves no temp file (the previous version of ``path``, if any, stays)."""
    try:
        atomic_write_bytes(path, payload)
    except OSError as err:
        if err.errno not in DISK_FULL_ERRNOS:
            raise
        with contextlib.suppress(OSError):  # io names its temp files like this
            path.with_name(f".{path.name}.tmp-{os.getpid()}").unlink()
        raise DiskFull(path, len(payload), quota=err.errno == errno.EDQUOT) from None


def map_shard(path: Path, dtype: np.dtype, tokens: int) -> np.memmap:
    """A read-only memory map of the ``tokens`` ids of the shard file at ``path``."""
    return np.memmap(path, dtype=dtype, mode="r", shape=(tokens,))


@dataclass
class _Job:
    """A run of shards to (re)generate: documents ``start[0]..end_doc`` of one split."""

    first: int  # first shard index
    stop: int | None  # one past the last shard index; None: until the documents run out
    start: tuple[int, int]  # (document index, tokens of that document to skip)
    end_doc: int | None


class SplitShards:
    """Cuts one split's token stream into shards; writes only what is missing or wrong.

    Each shard file is written atomically, so a crash leaves it whole or absent. The
    buffer holds, per buffered document, its index, the offset of its first buffered
    token within the document, and its buffered length, so every cut knows the exact
    ``[document, offset]`` where a shard starts and ends.
    """

    def __init__(
        self,
        split: str,
        out_dir: Path,
        dtype: np.dtype,
        shard_tokens: int,
        records: list[dict[str, Any]],
        complete: bool,
    ) -> None:
        self.split = split
        self.out_dir = out_dir
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.records = [dict(r) for r in records]
        #: why each recorded shard is unusable (its file name -> reason); rebuilt by the pass
        self.problems = {
            r["file"]: why
            for r in self.records
            if (why := check_shard(out_dir, r, dtype.itemsize)) is not None
        }
        self.valid = [r["file"] not in self.problems for r in self.records]
        self.complete = complete
        self.jobs = self._plan()
        self._job_starts = np.array([j.start[0] for j in self.jobs], dtype=np.int64)
        self._job_ends = np.array(
            [j.end_doc if j.end_doc is not None else np.iinfo(np.int64).max for j in self.jobs],
            dtype=np.int64,
        )
        self.shards_written = 0
        self._job: int | None = None
        self._k = 0
        self._reset_buffer()

    def _plan(self) -> list[_Job]:
        jobs: list[_Job] = []
        n, k = len(self.records), 0
        while k < n:
            if self.valid[k]:
                k += 1
                continue
            j = k
            while j < n and not self.valid[j]:
                j += 1
            start = self.records[k]["start"]
            jobs.append(_Job(k, j, (start[0], start[1]), self.records[j - 1]["end"][0]))
            k = j
        if not self.complete:
            start = tuple(self.records[-1]["end"]) if self.records else (0, 0)
            jobs.append(_Job(n, None, (start[0], start[1]), None))
        merged: list[_Job] = []
        for job in jobs:
            # Jobs sharing a document become one, so every document feeds at most one job;
            # the good shards in between are regenerated and then found equal by checksum.
            prev = merged[-1] if merged else None
            if prev is not None and prev.end_doc is not None and job.start[0] <= prev.end_doc:
                prev.stop, prev.end_doc = job.stop, job.end_doc
            else:
                merged.append(job)
        return merged

    # -- dispatch side: which documents need tokenizing

    def jobs_of(self, docs: np.ndarray) -> np.ndarray:
        """Job index needing each document (ascending indices of this split), -1 if none."""
        if not self.jobs:
            return np.full(len(docs), -1, dtype=np.int64)
        j = np.searchsorted(self._job_starts, docs, side="right") - 1
        inside = (j >= 0) & (docs <= self._job_ends[np.maximum(j, 0)])
        return np.where(inside, j, -1)

    def needs_after(self, doc: int) -> bool:
        """Whether any document after ``doc`` may still be needed."""
        return bool(len(self.jobs)) and int(self._job_ends[-1]) > doc

    # -- result side: tokens of needed documents, in document order

    def _reset_buffer(self) -> None:
        self._ids: list[np.ndarray] = []
        self._bases: list[np.ndarray] = []
        self._lens: list[np.ndarray] = []
        self._toks: list[np.ndarray] = []
        self._buffered = 0

    def feed(self, job: int, docs: np.ndarray, lengths: np.ndarray, tokens: np.ndarray) -> None:
        """Tokens of consecutive documents of this split, all needed by ``job``."""
        if job != self._job:
            self._finish_job()
            self._job, self._k = job, self.jobs[job].first
            self._reset_buffer()
        spec = self.jobs[job]
        if spec.stop is not None and self._k >= spec.stop:
            return
        bases = np.zeros(len(docs), dtype=np.int64)
        if docs[0] == spec.start[0] and spec.start[1]:
            # The job starts inside this document: its head is in the previous shard.
            skip = spec.start[1]
            tokens, lengths, bases = tokens[skip:], lengths.copy(), bases
            lengths[0] -= skip
            bases[0] = skip
        self._ids.append(docs)
        self._bases.append(bases)
        self._lens.append(lengths)
        self._toks.append(tokens)
        self._buffered += len(tokens)
        while self._buffered and self._buffered >= self._target():
            self._cut(self._target())
            if spec.stop is not None and self._k >= spec.stop:
                self._reset_buffer()
                break

    def _target(self) -> int:
        if self._k < len(self.records):
            return int(self.records[self._k]["tokens"])
        return self.shard_tokens

    def _finish_job(self) -> None:
        if self._job is None:
            return
        spec = self.jobs[self._job]
        if spec.stop is None:
            if self._buffered:
                self._cut(self._buffered)
        elif self._k < spec.stop:
            raise SourceChanged(shard_name(self.split, self._k))

    def finish(self) -> None:
        """Flush the last partial shard; check every recorded shard was reproduced."""
        self._finish_job()
        self._job = None
        if not all(self.valid):
            raise SourceChanged(shard_name(self.split, self.valid.index(False)))

    def _cut(self, n: int) -> None:
        def cat(parts: list[np.ndarray]) -> np.ndarray:
            return parts[0] if len(parts) == 1 else np.concatenate(parts)

        ids, bases, lens, toks = (cat(x) for x in (self._ids, self._bases, self._lens, self._toks))
        ends = np.cumsum(lens)
        j = int(np.searchsorted(ends, n))  # the document holding the shard's last token
        take = n - (int(ends[j - 1]) if j else 0)
        first = int(np.argmax(lens > 0))  # a fully skipped document holds no token
        start = (int(ids[first]), int(bases[first]))
        end = (int(ids[j]), int(bases[j]) + take)
        if take < lens[j]:
            keep = slice(j, None)
            bases, lens = bases[keep].copy(), lens[keep].copy()
            bases[0] += take
            lens[0] -= take
            ids = ids[keep]
        else:
            ids, bases, lens = ids[j + 1:], bases[j + 1:], lens[j + 1:]
        self._ids, self._bases, self._lens, self._toks = [ids], [bases], [lens], [toks[n:]]
        self._buffered -= n
        self._emit(self._k, toks[:n], start, end)
        self._k += 1

    def _emit(self, k: int, data: np.ndarray, start: tuple[int, int], end: tuple[int, int]) -> None:
        payload = data.astype(self.dtype, copy=False).tobytes()
        record = {
            "file": shard_name(self.split, k),
            "tokens": len(data),
            "sha256": hashlib.sha256(payload).hexdigest(),
            "start": list(start),
            "end": list(end),
        }
        path = self.out_dir / record["file"]
        if k < len(self.records):
            if self.records[k] != record:
                raise SourceChanged(record["file"])
            if self.valid[k]:
                return
            write_file(path, payload)
            self.valid[k] = True
        else:
            self.records.append(record)
            self.valid.append(True)
            # Written by a run that crashed before recording it: found by checksum.
            if check_shard(self.out_dir, record, self.dtype.itemsize) is None:
                self.on_shard()
                return
            write_file(path, payload)
        self.shards_written += 1
        self.on_shard()

    def on_shard(self) -> None:  # replaced by the owner to save progress
        pass

    @property
    def tokens(self) -> int:
        """Tokens in this split's shards so far."""
        return sum(int(r["tokens"]) for r in self.records)


class SourceChanged(Exception):
    """A regenerated shard differs from its record: the source gives other documents now."""

    def __init__(self, shard: str) -> None:
        super().__init__(shard)
        self.shard = shard
