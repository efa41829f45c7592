"""Data pipeline: sources -> tokenizer -> token shards + manifest -> deterministic loader.

Public API (imported lazily, so ``import wbscale.data`` stays cheap and tokenizer
worker processes never import torch). ``prepare()`` itself is
``wbscale.data.prepare.prepare``: here the name ``prepare`` is the module's::

    iter_documents(cfg) -> Iterator[str]                       # sources
    generate_stories(n, seed) -> list[str]                     # synthetic
    prepare_data(cfg, progress=True, force=False) -> PrepareReport
    load_tokenizer(data_dir), eot_id(tok), encode, decode      # tokenizer
    tokenizer_sha256(path)
    load_manifest(data_dir, verify=True) -> dict               # manifest
    TokenShards, WindowSampler, TrainStream, val_batches, unigram_entropy   # loader

Modules, lowest first (each imports only those above it): ``synthetic``, ``sources``
(documents, train/val split), ``tokenizer`` (loading), ``shards`` (the shard format and
writer), ``bpe`` (tokenizer training), ``manifest``, ``loader``, ``prepare`` (the
orchestration). The prepare benchmark is :func:`wbscale.bench.data.bench_prepare`.
"""

from __future__ import annotations

from wbscale import lazy_exports

_EXPORTS = {
    "generate_stories": "synthetic",
    "iter_stories": "synthetic",
    "iter_documents": "sources",
    "EOT": "tokenizer",
    "decode": "tokenizer",
    "encode": "tokenizer",
    "eot_id": "tokenizer",
    "load_tokenizer": "tokenizer",
    "tokenizer_sha256": "tokenizer",
    "PrepareReport": "prepare",
    "config_fingerprint": "prepare",
    "prepare_data": "prepare",
    "TokenShards": "loader",
    "TrainStream": "loader",
    "WindowSampler": "loader",
    "load_manifest": "manifest",
    "unigram_entropy": "loader",
    "val_batches": "loader",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
