"""Text -> tokenizer + token shards + manifest: parallel, resumable, idempotent.

Output folder (``data.out_dir``)::

    tokenizer.json          the tokenizer (trained BPE, or a byte copy of data.tokenizer)
    train_000000.bin ...    the token shards (format: :mod:`wbscale.data.shards`)
    val_000000.bin ...
    manifest.json           written last (fields: :mod:`wbscale.data.manifest`)

This module is the orchestration: the folder lock (:mod:`wbscale.locks`; the lock of a
killed prepare is taken over), the parallel tokenize pass (worker processes feeding the
shard writers in document order; they die with their parent), then the manifest. A crashed
or damaged run re-tokenizes only the documents of missing or corrupt shards (plus the
unfinished tail) and rewrites only shards whose checksum differs; a finished folder
with the same config is left alone. The train/val split of the documents is
:func:`wbscale.data.sources.val_mask`.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import multiprocessing
import os
import signal
import sys
import threading
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

from wbscale import locks
from wbscale.config import DataConfig
from wbscale.data.bpe import BPE_TRAIN_MAX_CHARS, train_tokenizer
from wbscale.data.manifest import (
    MANIFEST_FILE,
    STATE_FILE,
    build_manifest,
    manifest_intact,
    manifest_summary,
    read_json_or_none,
    write_manifest,
    write_state,
)
from wbscale.data.shards import (
    DISK_FULL_ERRNOS,
    FORMAT_VERSION,
    SPLITS,
    DiskFull,
    SourceChanged,
    SplitShards,
    dtype_for_vocab,
    shard_glob,
    write_file,
)
from wbscale.data.sources import (
    SplitPlan,
    iter_chunks,
    source_fingerprint,
    split_documents,
    val_mask,
    val_phase,
)
from wbscale.data.tokenizer import (
    CHAR,
    TOKENIZER_FILE,
    eot_id,
    load_tokenizer_file,
    tokenizer_path,
    vocab_size,
)
from wbscale.errors import UserError
from wbscale.io import sha256_file

__all__ = [
    "LOCK_FILE",
    "PassStats",
    "PrepareReport",
    "config_fingerprint",
    "new_tokenizer",
    "prepare",
    "prepare_data",
    "tokenize_pass",
    "worker_count",
]

LOCK_FILE = ".prepare.lock"


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
    fp.update(source_fingerprint(cfg))
    if cfg.tokenizer == "bpe":
        fp.update(tokenizer="bpe", vocab_size=cfg.vocab_size, bpe_train_max_chars=BPE_TRAIN_MAX_CHARS)
    elif cfg.tokenizer == CHAR:  # data.vocab_size is not used: not part of it
        fp.update(tokenizer=CHAR, char_train_max_chars=BPE_TRAIN_MAX_CHARS)
    else:
        fp.update(tokenizer="file", tokenizer_sha256=sha256_file(tokenizer_path(cfg.tokenizer)))
    return fp


# ---------------------------------------------------------------------------- workers

_worker_tok: Tokenizer | None = None
_worker_eot = 0
_worker_dtype = np.dtype("<u2")


def _die_with_parent(parent: int) -> None:
    """End this worker when the process that started it ends, however it ends.

    Linux: the kernel sends SIGKILL at the parent's death (``PR_SET_PDEATHSIG``). Elsewhere,
    or if prctl is refused, a daemon thread polls the parent pid every second.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0:  # 1 = PR_SET_PDEATHSIG
                if os.getppid() != parent:  # it died before prctl took effect
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="wbscale-parent-watch", daemon=True).start()


def _init_worker(tokenizer_json: str, eot: int, dtype: str, parent: int) -> None:
    global _worker_tok, _worker_eot, _worker_dtype
    _die_with_parent(parent)
    # The parent alone handles Ctrl-C and SIGTERM (it shuts the pool down, releases the
    # lock); a fork also inherited its Python-level handlers, which must not run here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
    """Tokenizing progress: a tqdm bar on a terminal (over documents when their number is
    known), otherwise a plain line every ``every_s`` seconds (SLURM logs, CI)."""

    def __init__(self, enabled: bool, total_documents: int | None = None, every_s: float = 10.0) -> None:
        self.enabled = enabled
        self.total = total_documents
        self.every_s = every_s
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_documents, desc="prepare", unit="doc", file=sys.stderr, dynamic_ncols=True)

    def update(self, docs: int, tokens: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = tokens / max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.n = docs
            self.bar.set_postfix_str(f"{tokens:,} tokens, {rate / 1e6:.2f}M tokens/s", refresh=False)
            self.bar.refresh()
            return
        if now - self.last < self.every_s and not force:
            return
        self.last = now
        done = f"{docs:,}" + (f"/{self.total:,} ({100 * docs / max(1, self.total):.0f}%)" if self.total else "")
        eta = ""
        if self.total and 0 < docs < self.total:
            eta = f", ETA {(now - self.t0) / docs * (self.total - docs):.0f}s"
        print(f"prepare: {done} documents, {tokens:,} tokens, {rate / 1e6:.2f}M tokens/s{eta}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def expected_documents(cfg: DataConfig) -> int | None:
    """How many documents the source will give, when that is known before reading it."""
    if cfg.source == "synthetic-stories":
        return cfg.synthetic_documents if cfg.max_documents is None else min(cfg.synthetic_documents, cfg.max_documents)
    return cfg.max_documents


@dataclass
class PassStats:
    """What one :func:`tokenize_pass` did."""

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
        initargs=(tok.to_str(), eot, dtype.str, os.getpid()),
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


def worker_count(workers: int) -> int:
    """Worker processes for ``data.workers`` (0: one per CPU core)."""
    return workers if workers > 0 else (os.cpu_count() or 1)


def tokenize_pass(
    docs: Iterable[str],
    tok: Tokenizer,
    eot: int,
    writers: dict[str, SplitShards],
    val_fraction: float,
    seed: int,
    workers: int,
    progress: _Progress | None = None,
    stop_early: bool = False,
    plan: SplitPlan | None = None,
) -> PassStats:
    """Stream ``docs`` through the workers into the shard writers, in document order.

    The main process only routes: per chunk of documents it decides (vectorised) which
    are needed by which split's job, ships those texts to a worker, and hands the returned
    id arrays to the writers, so the workers keep all cores busy tokenizing. ``plan``
    decides which documents are val (:func:`wbscale.data.sources.split_documents`);
    without it, ``val_fraction`` and ``seed`` do (the document split).
    """
    stats = PassStats(workers=worker_count(workers))
    dtype = writers[SPLITS[0]].dtype
    phase = val_phase(seed)
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
                "a tokenizer worker process died (killed, or out of memory?). Re-run prepare "
                "(it resumes), with fewer data.workers if memory ran out."
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
        for texts in iter_chunks(docs):
            index = np.arange(first, first + len(texts), dtype=np.int64)
            first += len(texts)
            stats.documents = first
            is_val = plan.is_val(index) if plan is not None else val_mask(index, val_fraction, phase)
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
    repaired: list[str] = field(default_factory=list)  # corrupt or missing shards rebuilt


def prepare(cfg: DataConfig, progress: bool = True, force: bool = False, wait: bool = False) -> Path:
    """Prepare ``cfg.out_dir`` (tokenizer, shards, manifest) and return it.

    Re-running with the same config checks the shards by checksum and does nothing if
    they are intact. ``force`` replaces a folder prepared with a different config.
    Another live prepare of the same folder is refused (UserError naming it), or with
    ``wait`` waited for: what ``fit`` does, since the runs of a sweep or a job array share
    one data folder and start together.
    Tokenization runs in worker processes (forked on Linux; spawned elsewhere, where a
    calling script needs the usual ``if __name__ == "__main__":`` guard).
    """
    return prepare_data(cfg, progress=progress, force=force, wait=wait).data_dir


def prepare_data(cfg: DataConfig, progress: bool = True, force: bool = False, wait: bool = False) -> PrepareReport:
    """:func:`prepare`, returning a :class:`PrepareReport` of the work done."""
    out = Path(cfg.out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"data.out_dir '{out}' is a file; set data.out_dir to a folder path")
    fingerprint = config_fingerprint(cfg)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with _sigterm_exits(out), _locked(out, wait):
            return _prepare_locked(cfg, out, fingerprint, progress, force)
    except OSError as err:
        if err.errno not in DISK_FULL_ERRNOS:
            raise
        # A write outside write_file (a folder, the BPE trainer's files): name what we can.
        raise DiskFull(Path(err.filename) if err.filename else out, None) from None


def _prepare_locked(
    cfg: DataConfig, out: Path, fingerprint: dict[str, Any], progress: bool, force: bool
) -> PrepareReport:
    _remove_temp_files(out)
    manifest = read_json_or_none(out / MANIFEST_FILE)
    state = read_json_or_none(out / STATE_FILE)
    prior = manifest if manifest is not None else state
    if prior is not None and prior.get("fingerprint") != fingerprint:
        if not force:
            raise UserError(_changed_message(out, prior.get("fingerprint") or {}, fingerprint))
        _clear(out)
        manifest = state = prior = None
    if manifest is not None and manifest_intact(out, manifest):
        report = PrepareReport(out, up_to_date=True, documents=int(manifest["documents"]))
        print(f"data in {out} is up to date ({manifest_summary(manifest)}); nothing to do", file=sys.stderr)
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
        split: SplitShards(
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
        write_state(out, header, writers)

    for w in writers.values():
        w.on_shard = save_state  # type: ignore[method-assign]
    save_state()  # records the tokenizer, so a crash from here on keeps it
    repaired = [name for w in writers.values() for name in w.problems]
    for w in writers.values():
        for name, why in w.problems.items():
            print(f"prepare: shard {out / name} is corrupt ({why}); rebuilding it", file=sys.stderr)

    bar = _Progress(progress, expected_documents(cfg))
    try:
        if not any(w.jobs for w in writers.values()):
            # Only the tokenizer needed replacing, and it came out the same.
            stats = PassStats(workers=0)
        else:
            docs, plan = split_documents(cfg)
            stats = tokenize_pass(
                docs,
                tok,
                eot,
                writers,
                cfg.val_fraction,
                cfg.seed,
                cfg.workers,
                bar,
                stop_early=complete,  # document counts are in the manifest already
                plan=plan,
            )
    except SourceChanged as err:
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
    new_manifest = build_manifest(cfg, header, writers, doc_counts)
    if new_manifest != manifest:  # after a repair it usually is the same: leave it be
        write_manifest(out, new_manifest)
    with contextlib.suppress(FileNotFoundError):
        (out / STATE_FILE).unlink()

    written = sum(w.shards_written for w in writers.values())
    rate = stats.tokens / stats.seconds if stats.seconds > 0 else 0.0
    rebuilt = f" (rebuilt {', '.join(repaired)})" if repaired else ""
    print(
        f"prepared {out}: {manifest_summary(new_manifest)}; tokenized {stats.documents_tokenized:,} "
        f"documents ({stats.tokens:,} tokens) in {stats.seconds:.1f}s = "
        f"{rate / 1e6:.2f}M tokens/s with {stats.workers} workers; {written} shards written{rebuilt}",
        file=sys.stderr,
    )
    return PrepareReport(
        out,
        up_to_date=False,
        repaired=repaired,
        documents=sum(doc_counts.values()),
        documents_tokenized=stats.documents_tokenized,
        tokens=stats.tokens,
        shards_written=written,
        seconds=stats.seconds,
        tokens_per_second=rate,
        workers=stats.workers,
    )


def new_tokenizer(cfg: DataConfig) -> tuple[Tokenizer, bytes]:
    """The tokenizer ``cfg`` asks for (BPE trained on the train split, or the file) and
    the bytes of its ``tokenizer.json``."""
    if cfg.tokenizer in ("bpe", CHAR):
        tok = train_tokenizer(cfg)
        return tok, tok.to_str(pretty=True).encode("utf-8")
    tok = load_tokenizer_file(cfg.tokenizer)
    return tok, tokenizer_path(cfg.tokenizer).read_bytes()  # a byte copy: same sha256 as the user's file


def _ensure_tokenizer(
    cfg: DataConfig, out: Path, prior: dict[str, Any] | None
) -> tuple[Tokenizer, str]:
    path = out / TOKENIZER_FILE
    if prior is not None and path.is_file() and sha256_file(path) == prior.get("tokenizer_sha256"):
        return load_tokenizer_file(path), prior["tokenizer_sha256"]
    if prior is not None:
        why = "differs from the one the shards were made with" if path.is_file() else "is missing"
        print(f"prepare: {path} {why}; rebuilding it", file=sys.stderr)
    tok, payload = new_tokenizer(cfg)
    eot_id(tok)  # no end-of-document token: fail before writing anything
    write_file(path, payload)
    return tok, hashlib.sha256(payload).hexdigest()


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
        f"{math.ceil(1 / cfg.val_fraction) + 1}), raise data.val_fraction, or set data.split: "
        "position (the last data.val_fraction of the text as val)."
    )


def _remove_temp_files(out: Path) -> None:
    # Left by a crashed run (io.atomic_write_* names them .<file>.tmp-<pid>); we hold the
    # lock, so no live writer owns them.
    for p in out.glob(".*.tmp-*"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _clear(out: Path) -> None:
    for pattern in (*map(shard_glob, SPLITS), TOKENIZER_FILE, MANIFEST_FILE, STATE_FILE):
        for p in out.glob(pattern):
            p.unlink()


LOCK_POLL_S = 2.0


@contextlib.contextmanager
def _locked(out: Path, wait: bool = False) -> Iterator[None]:
    """Hold ``out/.prepare.lock``; a lock left by a killed prepare is taken over. A live
    holder: UserError, or with ``wait`` poll until it is done (or dies: then taken over)."""
    said = False
    while True:
        try:
            lock = locks.acquire(out / LOCK_FILE, "wbscale data prepare")
            break
        except locks.LockHeld as err:
            if not wait:
                raise UserError(f"another `wbscale data prepare` is writing to '{out}': {err}") from None
            if not said:
                print(f"waiting for another process preparing '{out}' ({err.holder.describe()})",
                      file=sys.stderr, flush=True)
                said = True
            time.sleep(LOCK_POLL_S)
    with lock:
        yield


class _Terminated(SystemExit):
    """SIGTERM during prepare: unwinds like Ctrl-C, then exits with status 143."""


@contextlib.contextmanager
def _sigterm_exits(out: Path) -> Iterator[None]:
    """Turn SIGTERM into a clean stop: the pool is shut down, the lock released, temp
    files left for the next run to remove; the process exits 143 (128 + SIGTERM).
    Only where SIGTERM still has its default action, in the main thread."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise _Terminated(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except _Terminated:
        print(
            f"wbscale: data prepare stopped by SIGTERM; re-run it to resume ('{out}' keeps the "
            "shards written so far)",
            file=sys.stderr,
        )
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
