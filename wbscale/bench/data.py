"""Throughput of ``wbscale data prepare``'s tokenize pass vs. raw ``tokenizers`` encoding."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from wbscale.config import DataConfig
from wbscale.data.prepare import new_tokenizer, tokenize_pass, worker_count
from wbscale.data.shards import SPLITS, SplitShards, dtype_for_vocab
from wbscale.data.sources import iter_documents
from wbscale.data.tokenizer import eot_id, vocab_size

__all__ = ["bench_prepare"]


def bench_prepare(
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
    ``workers`` overrides ``cfg.workers`` (0: one per CPU core).
    """
    import resource

    def cpu_now() -> float:
        child = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + child.ru_utime + child.ru_stime

    docs = list(iter_documents(cfg))
    tok, _ = new_tokenizer(cfg)
    eot = eot_id(tok)
    dtype = dtype_for_vocab(vocab_size(tok))
    n_workers = worker_count(cfg.workers if workers is None else workers)

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
            writers = {s: SplitShards(s, tmp, dtype, cfg.shard_tokens, [], False) for s in SPLITS}
            c0 = cpu_now()
            stats = tokenize_pass(docs, tok, eot, writers, cfg.val_fraction, cfg.seed, n_workers)
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
