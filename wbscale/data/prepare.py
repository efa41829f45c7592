"""Text -> tokenizer + token shards + manifest: parallel, resumable, idempotent.

Output folder (``data.out_dir``)::

    tokenizer.json          the tokenizer (trained BPE, or a byte copy of data.tokenizer)
    train_000000.bin ...    flat little-endian token ids (uint16 if vocab < 65536 else
    val_000000.bin ...      uint32); every document is followed by the EOT token
    manifest.json           written last; see ``_manifest`` for the fields

Shard ``k`` of a split holds tokens ``[k * shard_tokens, (k + 1) * shard_tokens)`` of
that split's token stream (documents in source order, each followed by EOT), so all
shards but the last are full, and each shard records where it starts and ends
(``[document index, token offset]``). A crashed or damaged run re-tokenizes only the
documents of missing or corrupt shards (plus the unfinished tail) and rewrites only
shards whose checksum differs; a finished folder with the same config is left alone.

Train/val split: by document, systematic sampling with a seeded phase
(``_val_mask``): document ``i`` is in val iff ``floor((i+1)f + u) > floor(i f + u)``, so
any ``n`` documents give ``floor(n f + u)`` val documents, at least one once ``n f >= 1``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from wbscale import __version__
from wbscale.config import DataConfig
from wbscale.data.sources import iter_documents, source_files, source_kind
from wbscale.data.tokenizer import (
    TOKENIZER_FILE,
    dtype_for_vocab,
    eot_id,
    load_tokenizer_file,
    tokenizer_path,
    train_bpe,
    vocab_size,
)
from wbscale.errors import UserError
from wbscale.io import atomic_write_bytes, atomic_write_json, sha256_file

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "SPLITS",
    "PrepareReport",
    "check_shard",
    "config_fingerprint",
    "measure_prepare_overhead",
    "prepare",
    "prepare_data",
    "document_split",
]

FORMAT = "wbscale-token-shards"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
STATE_FILE = ".prepare-state.json"  # progress of an unfinished run; removed at the end
LOCK_FILE = ".prepare.lock"
SPLITS = ("train", "val")
# BPE merges stop improving long before this; it bounds training time on web-scale sources.
BPE_TRAIN_MAX_CHARS = 1 << 30
# A task of ~0.5M characters keeps a worker busy ~0.3 s: long next to the pickling cost,
# short enough that a slow last chunk does not leave the other workers idle for long.
_CHUNK_CHARS = 1 << 19
_CHUNK_DOCS = 8192


# ---------------------------------------------------------------------------- config


def config_fingerprint(cfg: DataConfig) -> dict[str, Any]:
    """The settings that determine the prepared output (not out_dir, not workers).

    Local sources add their files' names and sizes, a tokenizer file its sha256, so an
    edited input is noticed as a change too.
    """
    fp: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "source": cfg.source,
        "max_documents": cfg.max_documents,
        "val_fraction": cfg.val_fraction,
        "shard_tokens": cfg.shard_tokens,
        "seed": cfg.seed,
    }
    kind = source_kind(cfg.source)
    if kind == "synthetic":
        fp["synthetic_documents"] = cfg.synthetic_documents
    elif kind == "hf":
        fp.update(hf_config=cfg.hf_config, hf_split=cfg.hf_split, text_field=cfg.text_field)
    else:
        files = source_files(cfg.source)
        root = Path(cfg.source).expanduser()
        suffixes = {p.suffix.lower() for p in files}
        if suffixes & {".jsonl", ".parquet"}:
            fp["text_field"] = cfg.text_field
        if ".txt" in suffixes:
            fp["separator"] = cfg.separator
        fp["source_files"] = [
            [p.name if p == root else str(p.relative_to(root)), p.stat().st_size] for p in files
        ]
    if cfg.tokenizer == "bpe":
        fp.update(tokenizer="bpe", vocab_size=cfg.vocab_size, bpe_train_max_chars=BPE_TRAIN_MAX_CHARS)
    else:
        fp.update(tokenizer="file", tokenizer_sha256=sha256_file(tokenizer_path(cfg.tokenizer)))
    return fp


def _val_phase(seed: int) -> float:
    # str seeds go through sha512 in random.Random: stable across Python versions.
    return random.Random(f"wbscale-val-split:{seed}").random()


def _val_mask(index: np.ndarray, fraction: float, phase: float) -> np.ndarray:
    i = np.asarray(index, dtype=np.float64)
    return np.floor((i + 1) * fraction + phase) > np.floor(i * fraction + phase)


def document_split(index: int, cfg: DataConfig) -> str:
    """``"train"`` or ``"val"``: the split of the ``index``-th document of ``cfg.source``."""
    return "val" if _val_mask(np.array([index]), cfg.val_fraction, _val_phase(cfg.seed))[0] else "train"


# ---------------------------------------------------------------------------- shards


def shard_name(split: str, k: int) -> str:
    return f"{split}_{k:06d}.bin"


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


@dataclass
class _Job:
    """A run of shards to (re)generate: documents ``start[0]..end_doc`` of one split."""

    first: int  # first shard index
    stop: int | None  # one past the last shard index; None: until the documents run out
    start: tuple[int, int]  # (document index, tokens of that document to skip)
    end_doc: int | None


class _SplitShards:
    """Cuts one split's token stream into shards; writes only what is missing or wrong.

    The buffer holds, per buffered document, its index, the offset of its first buffered
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
        self.valid = [check_shard(out_dir, r, dtype.itemsize) is None for r in self.records]
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
            raise _SourceChanged(shard_name(self.split, self._k))

    def finish(self) -> None:
        """Flush the last partial shard; check every recorded shard was reproduced."""
        self._finish_job()
        self._job = None
        if not all(self.valid):
            raise _SourceChanged(shard_name(self.split, self.valid.index(False)))

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
                raise _SourceChanged(record["file"])
            if self.valid[k]:
                return
            atomic_write_bytes(path, payload)
            self.valid[k] = True
        else:
            self.records.append(record)
            self.valid.append(True)
            # Written by a run that crashed before recording it: found by checksum.
            if check_shard(self.out_dir, record, self.dtype.itemsize) is None:
                self.on_shard()
                return
            atomic_write_bytes(path, payload)
        self.shards_written += 1
        self.on_shard()

    def on_shard(self) -> None:  # replaced by the owner to save progress
        pass

    @property
    def tokens(self) -> int:
        return sum(int(r["tokens"]) for r in self.records)


class _SourceChanged(Exception):
    def __init__(self, shard: str) -> None:
        super().__init__(shard)
        self.shard = shard


# ---------------------------------------------------------------------------- workers

_worker_tok: Tokenizer | None = None
_worker_eot = 0
_worker_dtype = np.dtype("<u2")


def _init_worker(tokenizer_json: str, eot: int, dtype: str) -> None:
    global _worker_tok, _worker_eot, _worker_dtype
    # One thread per worker process: the processes are the parallelism, and tokenizers'
    # own thread pool on top would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tok = Tokenizer.from_str(tokenizer_json)
    _worker_eot, _worker_dtype = eot, np.dtype(dtype)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _worker_tok is not None
    return _encode_texts(_worker_tok, texts, _worker_eot, _worker_dtype)


def _encode_texts(
    tok: Tokenizer, texts: list[str], eot: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens per document incl. EOT, all ids flat) for a chunk of documents."""
    ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    for row in ids:
        row.append(eot)
    lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype, count=int(lengths.sum()))
    return lengths, flat


# ---------------------------------------------------------------------------- the pass


class _Progress:
    """A live status line on a terminal; nothing otherwise (the summary comes at the end)."""

    def __init__(self, enabled: bool) -> None:
        self.live = enabled and sys.stderr.isatty()
        self.last = 0.0
        self.t0 = time.perf_counter()

    def update(self, docs: int, tokens: int, force: bool = False) -> None:
        if not self.live:
            return
        now = time.perf_counter()
        if now - self.last < 0.5 and not force:
            return
        self.last = now
        rate = tokens / max(now - self.t0, 1e-9)
        sys.stderr.write(
            f"\rprepare: {docs:,} documents read, {tokens:,} tokens, {rate / 1e6:.2f}M tokens/s  "
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.live:
            sys.stderr.write("\n")
            sys.stderr.flush()


@dataclass
class _PassStats:
    documents: int = 0
    documents_tokenized: int = 0
    tokens: int = 0
    seconds: float = 0.0
    workers: int = 1
    per_split_documents: dict[str, int] = field(default_factory=dict)


def _start_pool(n: int, tok: Tokenizer, eot: int, dtype: np.dtype) -> ProcessPoolExecutor:
    # fork on Linux: workers start in milliseconds and do not re-import the caller's
    # __main__ (spawn would, and the CLI's pulls in torch); spawn elsewhere (macOS).
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    pool = ProcessPoolExecutor(
        n,
        mp_context=multiprocessing.get_context(method),
        initializer=_init_worker,
        initargs=(tok.to_str(), eot, dtype.str),
    )
    # A fork executor forks all workers on its first task. tokenizers prints a warning in
    # a child forked after its thread pool ran (BPE training) unless this variable is set;
    # the workers turn parallelism off themselves, and the parent's setting is restored.
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = old or "false"
    try:
        pool.submit(int).result()
    finally:
        if old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
    return pool


def _n_workers(workers: int) -> int:
    return workers if workers > 0 else (os.cpu_count() or 1)


def _chunks(docs: Iterable[str]) -> Iterator[list[str]]:
    texts: list[str] = []
    chars = 0
    for text in docs:
        texts.append(text)
        chars += len(text)
        if chars >= _CHUNK_CHARS or len(texts) >= _CHUNK_DOCS:
            yield texts
            texts, chars = [], 0
    if texts:
        yield texts


def _tokenize_pass(
    docs: Iterable[str],
    tok: Tokenizer,
    eot: int,
    writers: dict[str, _SplitShards],
    val_fraction: float,
    seed: int,
    workers: int,
    progress: _Progress | None = None,
    stop_early: bool = False,
) -> _PassStats:
    """Stream ``docs`` through the workers into the shard writers, in document order.

    The main process only routes: per chunk of documents it decides (vectorised) which
    are needed by which split's job, ships those texts to a worker, and hands the returned
    id arrays to the writers, so the workers keep all cores busy tokenizing.
    """
    stats = _PassStats(workers=_n_workers(workers))
    dtype = writers[SPLITS[0]].dtype
    phase = _val_phase(seed)
    counts = dict.fromkeys(SPLITS, 0)
    t0 = time.perf_counter()
    pool: ProcessPoolExecutor | None = None
    Meta = tuple[np.ndarray, np.ndarray, np.ndarray]  # doc index, is-val, job per document
    pending: deque[tuple[Any, Meta]] = deque()
    max_pending = 2 * stats.workers + 2
    if stats.workers > 1:
        pool = _start_pool(stats.workers, tok, eot, dtype)

    def collect() -> None:
        result, (doc_ids, is_val, jobs) = pending.popleft()
        try:
            lengths, flat = result.result() if pool is not None else result
        except BrokenProcessPool:
            raise UserError(
                "a tokenizer worker process died (out of memory?). Re-run prepare (it "
                "resumes) with fewer data.workers."
            ) from None
        for code, split in ((False, "train"), (True, "val")):
            sel = is_val == code
            if not sel.any():
                continue
            d_ids, d_lens, d_jobs = doc_ids[sel], lengths[sel], jobs[sel]
            d_toks = flat[np.repeat(sel, lengths)]
            # Runs of documents needed by the same job (more than one only when repairing).
            cuts = np.flatnonzero(np.diff(d_jobs)) + 1
            tok_at = np.concatenate([[0], np.cumsum(d_lens)])
            for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(d_ids)], strict=True):
                writers[split].feed(
                    int(d_jobs[a]), d_ids[a:b], d_lens[a:b], d_toks[tok_at[a]:tok_at[b]]
                )
        stats.tokens += len(flat)
        stats.documents_tokenized += len(doc_ids)
        if progress is not None:
            progress.update(stats.documents, stats.tokens)

    try:
        first = 0
        for texts in _chunks(docs):
            index = np.arange(first, first + len(texts), dtype=np.int64)
            first += len(texts)
            stats.documents = first
            is_val = _val_mask(index, val_fraction, phase)
            n_val = int(is_val.sum())
            counts["val"] += n_val
            counts["train"] += len(texts) - n_val
            jobs = np.full(len(texts), -1, dtype=np.int64)
            for code, split in ((False, "train"), (True, "val")):
                sel = is_val == code
                jobs[sel] = writers[split].jobs_of(index[sel])
            needed = jobs >= 0
            if needed.any():
                if not needed.all():
                    texts = [t for t, keep in zip(texts, needed.tolist(), strict=True) if keep]
                meta = (index[needed], is_val[needed], jobs[needed])
                if pool is None:
                    pending.append((_encode_texts(tok, texts, eot, dtype), meta))
                else:
                    pending.append((pool.submit(_encode_chunk, texts), meta))
                while len(pending) >= max_pending:
                    collect()
            if stop_early and not any(w.needs_after(first - 1) for w in writers.values()):
                break
        while pending:
            collect()
        for w in writers.values():
            w.finish()
        if progress is not None:
            progress.update(stats.documents, stats.tokens, force=True)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    stats.seconds = time.perf_counter() - t0
    stats.per_split_documents = counts
    return stats


# ---------------------------------------------------------------------------- prepare


@dataclass
class PrepareReport:
    """What a prepare run did (``tokens_per_second`` covers tokenizing + writing only)."""

    data_dir: Path
    up_to_date: bool
    documents: int = 0
    documents_tokenized: int = 0
    tokens: int = 0
    shards_written: int = 0
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    workers: int = 0


def prepare(cfg: DataConfig, progress: bool = True, force: bool = False) -> Path:
    """Prepare ``cfg.out_dir`` (tokenizer, shards, manifest) and return it.

    Re-running with the same config checks the shards by checksum and does nothing if
    they are intact. ``force`` replaces a folder prepared with a different config.
    Tokenization runs in worker processes (forked on Linux; spawned elsewhere, where a
    calling script needs the usual ``if __name__ == "__main__":`` guard).
    """
    return prepare_data(cfg, progress=progress, force=force).data_dir


def prepare_data(cfg: DataConfig, progress: bool = True, force: bool = False) -> PrepareReport:
    """:func:`prepare`, returning a :class:`PrepareReport` of the work done."""
    out = Path(cfg.out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"data.out_dir '{out}' is a file; set data.out_dir to a folder path")
    fingerprint = config_fingerprint(cfg)
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        _remove_temp_files(out)
        manifest = _read_json(out / MANIFEST_FILE)
        state = _read_json(out / STATE_FILE)
        prior = manifest if manifest is not None else state
        if prior is not None and prior.get("fingerprint") != fingerprint:
            if not force:
                raise UserError(_changed_message(out, prior.get("fingerprint") or {}, fingerprint))
            _clear(out)
            manifest = state = prior = None
        if manifest is not None and _intact(out, manifest):
            report = PrepareReport(out, up_to_date=True, documents=int(manifest["documents"]))
            print(f"data in {out} is up to date ({_totals(manifest)}); nothing to do", file=sys.stderr)
            return report
        return _build(cfg, out, fingerprint, manifest, prior, progress)


def _build(
    cfg: DataConfig,
    out: Path,
    fingerprint: dict[str, Any],
    manifest: dict[str, Any] | None,
    prior: dict[str, Any] | None,
    progress: bool,
) -> PrepareReport:
    tok, tok_sha = _ensure_tokenizer(cfg, out, prior)
    if prior is not None and prior.get("tokenizer_sha256") != tok_sha:
        prior = manifest = None  # shards of another tokenizer: all of them are redone
    eot = eot_id(tok)
    n_vocab = vocab_size(tok)
    dtype = dtype_for_vocab(n_vocab)
    complete = manifest is not None
    writers = {
        split: _SplitShards(
            split,
            out,
            dtype,
            cfg.shard_tokens,
            (prior or {}).get("splits", {}).get(split, {}).get("shards", []),
            complete,
        )
        for split in SPLITS
    }
    header = {
        "fingerprint": fingerprint,
        "tokenizer_sha256": tok_sha,
        "vocab_size": n_vocab,
        "eot_id": eot,
        "dtype": dtype.name,
    }

    def save_state() -> None:
        splits = {s: {"shards": w.records} for s, w in writers.items()}
        atomic_write_json(out / STATE_FILE, {**header, "complete": False, "splits": splits})

    for w in writers.values():
        w.on_shard = save_state  # type: ignore[method-assign]
    save_state()  # records the tokenizer, so a crash from here on keeps it

    bar = _Progress(progress)
    try:
        if not any(w.jobs for w in writers.values()):
            # Only the tokenizer needed replacing, and it came out the same.
            stats = _PassStats(workers=0)
        else:
            stats = _tokenize_pass(
                iter_documents(cfg),
                tok,
                eot,
                writers,
                cfg.val_fraction,
                cfg.seed,
                cfg.workers,
                bar,
                stop_early=complete,  # document counts are in the manifest already
            )
    except _SourceChanged as err:
        raise UserError(
            f"data.source '{cfg.source}' no longer gives the documents that {out} was "
            f"prepared from ({err.shard} differs). Re-run with --force to prepare it again "
            "from scratch, or set data.out_dir to a new folder."
        ) from None
    finally:
        bar.close()

    if complete:
        assert manifest is not None
        doc_counts = {s: int(manifest["splits"][s]["documents"]) for s in SPLITS}
    else:
        doc_counts = stats.per_split_documents
    for split in SPLITS:
        if not writers[split].records:
            _clear(out)  # unusable, and a fixed config would be refused as a change
            raise UserError(_empty_split_message(cfg, split, stats.documents))
    new_manifest = _manifest(cfg, header, writers, doc_counts)
    if new_manifest != manifest:  # after a repair it usually is the same: leave it be
        atomic_write_json(out / MANIFEST_FILE, new_manifest)
    with contextlib.suppress(FileNotFoundError):
        (out / STATE_FILE).unlink()

    written = sum(w.shards_written for w in writers.values())
    rate = stats.tokens / stats.seconds if stats.seconds > 0 else 0.0
    print(
        f"prepared {out}: {_totals(new_manifest)}; tokenized {stats.documents_tokenized:,} "
        f"documents ({stats.tokens:,} tokens) in {stats.seconds:.1f}s = "
        f"{rate / 1e6:.2f}M tokens/s with {stats.workers} workers; {written} shards written",
        file=sys.stderr,
    )
    return PrepareReport(
        out,
        up_to_date=False,
        documents=sum(doc_counts.values()),
        documents_tokenized=stats.documents_tokenized,
        tokens=stats.tokens,
        shards_written=written,
        seconds=stats.seconds,
        tokens_per_second=rate,
        workers=stats.workers,
    )


def _manifest(
    cfg: DataConfig,
    header: dict[str, Any],
    writers: dict[str, _SplitShards],
    doc_counts: dict[str, int],
) -> dict[str, Any]:
    splits = {
        s: {"shards": w.records, "tokens": w.tokens, "documents": doc_counts[s]}
        for s, w in writers.items()
    }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"wbscale {__version__}",
        "source": cfg.source,
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "kind": "bpe" if cfg.tokenizer == "bpe" else "file",
            "from": cfg.tokenizer,
        },
        **header,
        "shard_tokens": cfg.shard_tokens,
        "documents": sum(doc_counts.values()),
        "splits": splits,
    }


def _totals(manifest: dict[str, Any]) -> str:
    sp = manifest["splits"]
    n = sum(len(sp[s]["shards"]) for s in SPLITS)
    return (
        f"{sp['train']['tokens']:,} train + {sp['val']['tokens']:,} val tokens, "
        f"{manifest['documents']:,} documents, {n} shards"
    )


def _intact(out: Path, manifest: dict[str, Any]) -> bool:
    itemsize = np.dtype(manifest["dtype"]).itemsize
    tok_path = out / TOKENIZER_FILE
    if not tok_path.is_file() or sha256_file(tok_path) != manifest.get("tokenizer_sha256"):
        return False
    return all(
        check_shard(out, r, itemsize) is None
        for s in SPLITS
        for r in manifest["splits"][s]["shards"]
    )


def _ensure_tokenizer(
    cfg: DataConfig, out: Path, prior: dict[str, Any] | None
) -> tuple[Tokenizer, str]:
    path = out / TOKENIZER_FILE
    if prior is not None and path.is_file() and sha256_file(path) == prior.get("tokenizer_sha256"):
        return load_tokenizer_file(path), prior["tokenizer_sha256"]
    if cfg.tokenizer == "bpe":
        tok = train_bpe(_bpe_training_text(cfg), cfg.vocab_size)
        payload = tok.to_str(pretty=True).encode("utf-8")
    else:
        tok = load_tokenizer_file(cfg.tokenizer)
        payload = tokenizer_path(cfg.tokenizer).read_bytes()  # a byte copy: same sha256 as the user's file
    eot_id(tok)  # no end-of-document token: fail before writing anything
    atomic_write_bytes(path, payload)
    return tok, hashlib.sha256(payload).hexdigest()


def _bpe_training_text(cfg: DataConfig) -> Iterator[str]:
    """The training split's documents (val is never seen by the tokenizer), capped."""
    phase, chars, first = _val_phase(cfg.seed), 0, 0
    for texts in _chunks(iter_documents(cfg)):
        index = np.arange(first, first + len(texts))
        first += len(texts)
        for text, is_val in zip(texts, _val_mask(index, cfg.val_fraction, phase).tolist(), strict=True):
            if is_val:
                continue
            yield text
            chars += len(text)
            if chars >= BPE_TRAIN_MAX_CHARS:
                return


def _changed_message(out: Path, old: dict[str, Any], new: dict[str, Any]) -> str:
    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."

    diffs = [
        f"{key}: {short(old.get(key))} -> {short(new.get(key))}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]
    return (
        f"data.out_dir '{out}' holds data prepared with different settings "
        f"({'; '.join(diffs)}). Set data.out_dir to another folder, delete '{out}', "
        "or re-run with --force to replace it."
    )


def _empty_split_message(cfg: DataConfig, split: str, n_docs: int) -> str:
    if n_docs == 0:
        return (
            f"data.source '{cfg.source}' gave no documents (all empty, or "
            "data.max_documents is 0). Check the source and data.text_field."
        )
    return (
        f"the {split} split is empty: data.source '{cfg.source}' gave {n_docs} document(s) "
        f"and data.val_fraction is {cfg.val_fraction}. Use more documents (at least "
        f"{math.ceil(1 / cfg.val_fraction) + 1}) or raise data.val_fraction."
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # written atomically, so unreadable means foreign: start over
    return data if isinstance(data, dict) else None


def _remove_temp_files(out: Path) -> None:
    # Left by a crashed run (io.atomic_write_* names them .<file>.tmp-<pid>); we hold the
    # lock, so no live writer owns them.
    for p in out.glob(".*.tmp-*"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _clear(out: Path) -> None:
    for pattern in ("train_*.bin", "val_*.bin", TOKENIZER_FILE, MANIFEST_FILE, STATE_FILE):
        for p in out.glob(pattern):
            p.unlink()


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent prepares are on the user
        yield
        return
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another `wbscale data prepare` is writing to '{out}' (it holds "
                f"{out / LOCK_FILE}). Wait for it to finish, or stop it and re-run."
            ) from None
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- benchmark


def measure_prepare_overhead(
    cfg: DataConfig, repeats: int = 3, workers: int | None = None
) -> dict[str, Any]:
    """Tokens/s of prepare's parallel pass vs. one raw ``encode_batch`` on the same text.

    The raw number is ``tokenizers``' own multi-threaded ``encode_batch`` over all
    documents held in memory (ids produced, nothing else); the prepare number is the
    pass that ``prepare`` runs (worker start-up, worker processes, id arrays, sharding,
    sha256, fsynced writes) over the same in-memory documents. The two alternate
    ``repeats`` times and the best of each counts, so load from other processes hits
    both alike. ``overhead`` = prepare time / raw time - 1; ``cpu_overhead`` compares
    CPU seconds (all threads and worker processes), which other load does not inflate.
    """
    import resource

    def cpu_now() -> float:
        child = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + child.ru_utime + child.ru_stime

    docs = list(iter_documents(cfg))
    if cfg.tokenizer == "bpe":
        tok = train_bpe(_bpe_training_text(cfg), cfg.vocab_size)
    else:
        tok = load_tokenizer_file(cfg.tokenizer)
    eot = eot_id(tok)
    dtype = dtype_for_vocab(vocab_size(tok))
    n_workers = _n_workers(cfg.workers if workers is None else workers)

    raw_s = prep_s = raw_cpu = prep_cpu = math.inf
    tokens = 0
    for _ in range(repeats):
        c0, t0 = cpu_now(), time.perf_counter()
        encodings = tok.encode_batch(docs, add_special_tokens=False)
        raw_s = min(raw_s, time.perf_counter() - t0)
        raw_cpu = min(raw_cpu, cpu_now() - c0)
        tokens = sum(len(e.ids) for e in encodings) + len(docs)  # + one EOT per document
        del encodings

        tmp = Path(tempfile.mkdtemp(prefix="wbscale-prepare-bench-"))
        try:
            writers = {s: _SplitShards(s, tmp, dtype, cfg.shard_tokens, [], False) for s in SPLITS}
            c0 = cpu_now()
            stats = _tokenize_pass(docs, tok, eot, writers, cfg.val_fraction, cfg.seed, n_workers)
            prep_cpu = min(prep_cpu, cpu_now() - c0)
            assert stats.tokens == tokens, (stats.tokens, tokens)
            prep_s = min(prep_s, stats.seconds)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {
        "documents": len(docs),
        "tokens": tokens,
        "workers": n_workers,
        "cpu_count": os.cpu_count(),
        "raw_encode_batch_tokens_per_second": tokens / raw_s,
        "prepare_tokens_per_second": tokens / prep_s,
        "overhead": prep_s / raw_s - 1.0,
        "raw_cpu_seconds": raw_cpu,
        "prepare_cpu_seconds": prep_cpu,
        "cpu_overhead": prep_cpu / raw_cpu - 1.0,
    }
