"""``manifest.json``: what a prepared data folder holds; written last, checked on load.

Fields (see :func:`build_manifest`): format and format_version, created_by, source,
tokenizer (file, kind, from), the config fingerprint, tokenizer_sha256, vocab_size,
eot_id, dtype, shard_tokens, documents, and per split its shard records (see
:mod:`wbscale.data.shards`), tokens and documents.

An unfinished prepare keeps its progress in ``.prepare-state.json`` instead: the same
header and the shard records written so far, with ``complete: false``. It is removed
once the manifest is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from wbscale import __version__
from wbscale.config import DataConfig
from wbscale.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    SPLITS,
    SplitShards,
    check_shard,
    write_file,
)
from wbscale.data.tokenizer import TOKENIZER_FILE
from wbscale.errors import UserError
from wbscale.io import sha256_file

__all__ = [
    "MANIFEST_FILE",
    "STATE_FILE",
    "build_manifest",
    "load_manifest",
    "manifest_intact",
    "manifest_summary",
    "read_json_or_none",
    "write_manifest",
    "write_state",
]

MANIFEST_FILE = "manifest.json"
STATE_FILE = ".prepare-state.json"  # progress of an unfinished run; removed at the end
_PREPARE_HINT = "run `wbscale data prepare <recipe>` first"


# ---------------------------------------------------------------------------- writing


def build_manifest(
    cfg: DataConfig,
    header: dict[str, Any],
    writers: dict[str, SplitShards],
    doc_counts: dict[str, int],
) -> dict[str, Any]:
    """The manifest of a finished prepare: ``header`` plus the shards of ``writers``."""
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
            "kind": cfg.tokenizer if cfg.tokenizer in ("bpe", "char") else "file",
            "from": cfg.tokenizer,
        },
        **header,
        "shard_tokens": cfg.shard_tokens,
        "documents": sum(doc_counts.values()),
        "splits": splits,
    }


def _write_json(path: Path, obj: Any) -> None:
    # Same bytes as wbscale.io.atomic_write_json; a full disk is a DiskFull naming the file.
    write_file(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` to ``out/manifest.json`` atomically."""
    _write_json(out / MANIFEST_FILE, manifest)


def write_state(out: Path, header: dict[str, Any], writers: dict[str, SplitShards]) -> None:
    """Record the progress of an unfinished prepare: ``header`` and the shards so far."""
    splits = {s: {"shards": w.records} for s, w in writers.items()}
    _write_json(out / STATE_FILE, {**header, "complete": False, "splits": splits})


# ---------------------------------------------------------------------------- reading


def read_json_or_none(path: Path) -> dict[str, Any] | None:
    """A manifest or state file's contents; None if it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # written atomically, so unreadable means foreign: start over
    return data if isinstance(data, dict) else None


def manifest_summary(manifest: dict[str, Any]) -> str:
    """One line of totals: tokens per split, documents, shards."""
    sp = manifest["splits"]
    n = sum(len(sp[s]["shards"]) for s in SPLITS)
    return (
        f"{sp['train']['tokens']:,} train + {sp['val']['tokens']:,} val tokens, "
        f"{manifest['documents']:,} documents, {n} shards"
    )


def manifest_intact(out: Path, manifest: dict[str, Any]) -> bool:
    """Whether the tokenizer and every shard of ``manifest`` match their sha256."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    tok_path = out / TOKENIZER_FILE
    if not tok_path.is_file() or sha256_file(tok_path) != manifest.get("tokenizer_sha256"):
        return False
    return all(
        check_shard(out, r, itemsize) is None
        for s in SPLITS
        for r in manifest["splits"][s]["shards"]
    )


def load_manifest(data_dir: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read ``manifest.json``; check every shard's size, and its sha256 if ``verify``."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data folder '{data_dir}' does not exist: {_PREPARE_HINT}")
    path = data_dir / MANIFEST_FILE
    if not path.is_file():
        if (data_dir / STATE_FILE).is_file():
            raise UserError(
                f"data in '{data_dir}' is not finished (prepare was interrupted): re-run "
                "`wbscale data prepare <recipe>`; it resumes where it stopped"
            )
        raise UserError(f"no {MANIFEST_FILE} in '{data_dir}': {_PREPARE_HINT}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(
            f"{path} is not valid JSON ({err}); delete it and re-run "
            "`wbscale data prepare <recipe>`"
        ) from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: format {manifest.get('format')!r} version "
            f"{manifest.get('format_version')!r}, this wbscale reads {FORMAT!r} version "
            f"{FORMAT_VERSION}. Prepare the data again into a new data.out_dir."
        )
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in SPLITS:
        for record in manifest["splits"][split]["shards"]:
            if verify:
                problem = check_shard(data_dir, record, itemsize)
            else:
                shard = data_dir / record["file"]
                ok = shard.is_file() and shard.stat().st_size == record["tokens"] * itemsize
                problem = None if ok else "missing or wrong size"
            if problem:
                raise UserError(
                    f"corrupt shard {data_dir / record['file']} ({problem}): delete it and "
                    "re-run `wbscale data prepare <recipe>`, which rebuilds it"
                )
    if verify:
        tok = data_dir / TOKENIZER_FILE
        if not tok.is_file() or sha256_file(tok) != manifest["tokenizer_sha256"]:
            raise UserError(
                f"{tok} is missing or differs from the one the shards were made with: "
                "delete it and re-run `wbscale data prepare <recipe>`"
            )
    return manifest
