"""Where documents come from: built-in synthetic stories, HF datasets, or local files.

``data.source`` is one of

- ``synthetic-stories``: :mod:`wbscale.data.synthetic` (``data.synthetic_documents``,
  ``data.seed``); works offline;
- ``hf:<name>``: ``datasets.load_dataset(name, data.hf_config, split=data.hf_split,
  streaming=True)``, field ``data.text_field``; ``<name>`` may also be a local folder of
  .jsonl/.parquet/.csv files, which ``datasets`` reads without the network;
- a path to a ``.txt`` file (documents separated by ``data.separator``), a ``.jsonl``
  file (one JSON object per line, text in ``data.text_field``), a ``.parquet`` file
  (column ``data.text_field``), or a folder of such files (read in sorted order).

Empty documents are skipped. ``data.max_documents`` caps how many are read.

Train/val split (``data.split``, :func:`split_documents`), ``f = data.val_fraction``:

- ``documents``: by document, systematic sampling with a seeded phase (:func:`val_mask`):
  document ``i`` is in val iff ``floor((i+1)f + u) > floor(i f + u)``, so any ``n``
  documents give ``floor(n f + u)`` val documents, at least one once ``n f >= 1``.
- ``position``: by position in the text, as nanoGPT splits a book: the documents' text,
  in order, is cut at character ``floor(N (1 - f))`` of its ``N`` characters; everything
  before the cut is train, everything after it val (the one document the cut falls in is
  cut in two there). With ``data.tokenizer: char`` one character is one token, so val is
  exactly the last ``f`` of the token stream (each split then ends with one
  ``<|endoftext|>``, as every document does); with BPE it is the last ``f`` of the text.
- ``auto`` (the default): ``position`` for a local source (file or folder) that gives
  exactly one document (a ``.txt`` without ``data.separator`` in it: a book, Tiny
  Shakespeare), ``documents`` otherwise. ``hf:`` and synthetic sources are always
  multi-document under ``auto``; set ``data.split: position`` to cut them by position.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from wbscale.config import DataConfig
from wbscale.data.synthetic import iter_stories
from wbscale.errors import UserError, did_you_mean, require

__all__ = [
    "SUFFIXES",
    "SplitPlan",
    "document_split",
    "iter_chunks",
    "iter_documents",
    "source_files",
    "source_fingerprint",
    "source_kind",
    "split_documents",
    "split_mode",
    "split_plan",
    "val_mask",
    "val_phase",
]

SYNTHETIC = "synthetic-stories"
HF_PREFIX = "hf:"
SUFFIXES = (".txt", ".jsonl", ".parquet")
_READ_BLOCK = 1 << 20
# A task of ~0.5M characters keeps a worker busy ~0.3 s: long next to the pickling cost,
# short enough that a slow last chunk does not leave the other workers idle for long.
_CHUNK_CHARS = 1 << 19
_CHUNK_DOCS = 8192


def source_kind(source: str) -> str:
    """``synthetic``, ``hf`` or ``local``."""
    if source == SYNTHETIC:
        return "synthetic"
    if source.startswith(HF_PREFIX):
        return "hf"
    return "local"


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """Documents of ``cfg.source`` in a fixed order, capped at ``cfg.max_documents``.

    Paths, names and fields are checked when called (not on first ``next``), so a bad
    source fails before any work is done.
    """
    kind = source_kind(cfg.source)
    if kind == "synthetic":
        n = cfg.synthetic_documents
        if cfg.max_documents is not None:
            n = min(n, cfg.max_documents)
        return iter_stories(n, cfg.seed)
    if kind == "hf":
        docs = _iter_hf(cfg)
    else:
        files = source_files(cfg.source)
        docs = _iter_files(files, cfg)
    if cfg.max_documents is not None:
        docs = islice(docs, cfg.max_documents)
    return docs


def source_files(source: str) -> list[Path]:
    """The local files a path source reads, in order; UserError if there are none."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise UserError(
                f"data.source '{source}': unsupported file type '{path.suffix or '(none)'}'. "
                f"Use a {', '.join(SUFFIXES)} file or a folder of them, "
                f"'{HF_PREFIX}<dataset name>', or '{SYNTHETIC}'."
            )
        return [path]
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise UserError(
                f"data.source '{source}': the folder has no {', '.join(SUFFIXES)} files. "
                "Put the text files there or point data.source at another folder."
            )
        return files
    hint = did_you_mean(source, [SYNTHETIC]) if HF_PREFIX not in source else ""
    raise UserError(
        f"data.source '{source}': no such file or folder{hint}. Give a path to a "
        f"{', '.join(SUFFIXES)} file or folder, '{HF_PREFIX}<dataset name>' for a Hugging "
        f"Face dataset, or '{SYNTHETIC}' for the built-in stories."
    )


def source_fingerprint(cfg: DataConfig) -> dict[str, Any]:
    """The source settings that determine the documents read (part of the prepare fingerprint).

    Local sources add their files' names and sizes, so an edited file is noticed as a change.
    """
    fp: dict[str, Any] = {}
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
    if split_mode(cfg) == "position":  # documents mode: no key, as before data.split existed
        fp["split"] = "position"
    return fp


def iter_chunks(docs: Iterable[str]) -> Iterator[list[str]]:
    """``docs`` in consecutive lists of about 0.5M characters (at most 8192 documents)."""
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


# ---------------------------------------------------------------------------- train/val split


def val_phase(seed: int) -> float:
    """The seeded phase ``u`` of the train/val split."""
    # str seeds go through sha512 in random.Random: stable across Python versions.
    return random.Random(f"wbscale-val-split:{seed}").random()


def val_mask(index: np.ndarray, fraction: float, phase: float) -> np.ndarray:
    """Whether each document index is in the val split (vectorised)."""
    i = np.asarray(index, dtype=np.float64)
    return np.floor((i + 1) * fraction + phase) > np.floor(i * fraction + phase)


def document_split(index: int, cfg: DataConfig) -> str:
    """``"train"`` or ``"val"``: the split of the ``index``-th document of
    :func:`split_documents` (of ``iter_documents`` itself in ``documents`` mode)."""
    return "val" if split_plan(cfg).is_val(np.array([index]))[0] else "train"


@dataclass(frozen=True)
class SplitPlan:
    """Which documents of :func:`split_documents` are validation.

    ``documents`` mode: :func:`val_mask` with ``fraction`` and ``phase``. ``position``
    mode: the documents from index ``first_val`` on (the pieces after the cut).
    """

    mode: str  # "documents" | "position"
    fraction: float
    phase: float = 0.0
    first_val: int = 0
    cut: int = 0  # position: the character the val split starts at (of ``chars``)
    chars: int = 0  # position: characters of the source's documents, in total

    def is_val(self, index: np.ndarray) -> np.ndarray:
        if self.mode == "position":
            return np.asarray(index) >= self.first_val
        return val_mask(index, self.fraction, self.phase)


def split_mode(cfg: DataConfig) -> str:
    """``data.split`` resolved: ``documents`` or ``position`` (``auto``: see the module doc)."""
    if cfg.split != "auto":
        return cfg.split
    if source_kind(cfg.source) != "local":
        return "documents"
    return "position" if len(_document_lengths(cfg, limit=2)) == 1 else "documents"


def split_plan(cfg: DataConfig) -> SplitPlan:
    """The split of ``cfg``'s documents (``position`` mode counts the source's characters)."""
    mode = split_mode(cfg)
    if mode == "documents":
        return SplitPlan("documents", cfg.val_fraction, val_phase(cfg.seed))
    lengths = _document_lengths(cfg, limit=None)
    chars = int(lengths.sum())
    cut = int(chars * (1.0 - cfg.val_fraction))  # nanoGPT: data[:int(n * 0.9)]
    ends = np.cumsum(lengths)
    whole_train = int(np.searchsorted(ends, cut, side="right"))  # documents ending at or before the cut
    straddles = whole_train < len(lengths) and ends[whole_train] - lengths[whole_train] < cut
    return SplitPlan("position", cfg.val_fraction, first_val=whole_train + int(straddles), cut=cut, chars=chars)


def split_documents(cfg: DataConfig) -> tuple[Iterator[str], SplitPlan]:
    """The documents to tokenize, in order, and which of them are validation.

    ``documents`` mode: :func:`iter_documents` itself. ``position`` mode: the same text, the
    one document the cut falls in given as two (its part before the cut, its part after).
    """
    plan = split_plan(cfg)
    docs = iter_documents(cfg)
    if plan.mode == "documents":
        return docs, plan
    return _cut_at(docs, plan.cut), plan


def _cut_at(docs: Iterable[str], cut: int) -> Iterator[str]:
    offset = 0
    for text in docs:
        if offset < cut < offset + len(text):
            yield text[: cut - offset]
            yield text[cut - offset:]
        else:
            yield text
        offset += len(text)


def _document_lengths(cfg: DataConfig, limit: int | None) -> np.ndarray:
    """Character counts of the first ``limit`` documents (all: ``None``); cached per source state."""
    key = (cfg.source, cfg.hf_config, cfg.hf_split, cfg.text_field, cfg.separator, cfg.max_documents,
           cfg.synthetic_documents, cfg.seed, _source_stamp(cfg))
    cached = _LENGTHS.get(key)
    if cached is not None and (cached[1] or (limit is not None and len(cached[0]) >= limit)):
        return cached[0][:limit] if limit is not None else cached[0]
    lengths: list[int] = []
    complete = True
    for text in iter_documents(cfg):
        lengths.append(len(text))
        if limit is not None and len(lengths) >= limit:
            complete = False  # there may be more
            break
    array = np.asarray(lengths, dtype=np.int64)
    if len(_LENGTHS) >= 8:
        _LENGTHS.clear()
    _LENGTHS[key] = (array, complete)
    return array


# (source settings, file stamps) -> (document lengths, whether that is every document)
_LENGTHS: dict[tuple, tuple[np.ndarray, bool]] = {}


def _source_stamp(cfg: DataConfig) -> tuple:
    if source_kind(cfg.source) != "local":
        return ()
    return tuple((str(p), st.st_size, st.st_mtime_ns) for p in source_files(cfg.source) for st in [p.stat()])


# ---------------------------------------------------------------------------- local files


def _iter_files(files: list[Path], cfg: DataConfig) -> Iterator[str]:
    readers: dict[str, Callable[[Path, DataConfig], Iterator[str]]] = {
        ".txt": _iter_txt,
        ".jsonl": _iter_jsonl,
        ".parquet": _iter_parquet,
    }
    if len(files) > 1:
        # Check every parquet schema up front: a missing column in the last file should not
        # surface after an hour of tokenizing the first ones.
        for path in files:
            if path.suffix.lower() == ".parquet":
                _parquet_file(path, cfg.text_field)
    for path in files:
        yield from readers[path.suffix.lower()](path, cfg)


def _iter_txt(path: Path, cfg: DataConfig) -> Iterator[str]:
    try:
        yield from _split_txt(path, cfg.separator)
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not valid UTF-8 ({err}). Convert the file to UTF-8.") from None


def _split_txt(path: Path, sep: str) -> Iterator[str]:
    with open(path, encoding="utf-8", newline="") as f:
        if not sep:
            text = f.read().strip()
            if text:
                yield text
            return
        # Streamed in blocks so a multi-GB file never sits in memory at once.
        buf = ""
        while block := f.read(_READ_BLOCK):
            start = max(0, len(buf) - len(sep) + 1)
            buf += block
            if buf.find(sep, start) < 0:
                continue
            *docs, buf = buf.split(sep)
            for doc in docs:
                doc = doc.strip()
                if doc:
                    yield doc
        doc = buf.strip()
        if doc:
            yield doc


def _text_of(value: Any, where: str, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    raise UserError(
        f"{where}: field '{field}' holds {type(value).__name__}, not text. "
        "Set data.text_field to the field with the document text."
    )


def _iter_jsonl(path: Path, cfg: DataConfig) -> Iterator[str]:
    field = cfg.text_field
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(
                    f"{where}: not valid JSON ({err.msg}). A .jsonl file holds one JSON "
                    "object per line."
                ) from None
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
            if field not in row:
                raise UserError(
                    f"{where}: no field '{field}' (fields: {', '.join(map(str, row)) or 'none'})"
                    + did_you_mean(field, [str(k) for k in row])
                    + ". Set data.text_field to the field with the document text."
                )
            text = _text_of(row[field], where, field)
            if text:
                yield text


def _parquet_file(path: Path, field: str) -> Any:
    require("pyarrow", "hf", "a .parquet data source")
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError for non-parquet bytes
        raise UserError(f"{path}: not a readable parquet file ({err})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise UserError(
            f"{path}: no column '{field}' (columns: {', '.join(names)})"
            + did_you_mean(field, names)
            + ". Set data.text_field to the column with the document text."
        )
    return pf


def _iter_parquet(path: Path, cfg: DataConfig) -> Iterator[str]:
    field = cfg.text_field
    pf = _parquet_file(path, field)
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            text = _text_of(value, str(path), field)
            if text:
                yield text


# ---------------------------------------------------------------------------- HF datasets


def _iter_hf(cfg: DataConfig) -> Iterator[str]:
    name = cfg.source[len(HF_PREFIX):].strip()
    if not name:
        raise UserError(
            f"data.source '{cfg.source}': no dataset name after '{HF_PREFIX}', "
            "e.g. hf:roneneldan/TinyStories"
        )
    try:
        require("datasets", "hf", "data.source: hf:…")
        import datasets
    except ImportError:
        raise UserError(
            "data.source uses a Hugging Face dataset but the `datasets` package is not "
            "installed: pip install datasets"
        ) from None
    try:
        ds = datasets.load_dataset(name, cfg.hf_config, split=cfg.hf_split, streaming=True)
    except Exception as err:  # network, missing dataset, bad config/split: all user-fixable
        raise UserError(
            f"data.source '{cfg.source}' (hf_config={cfg.hf_config!r}, "
            f"hf_split={cfg.hf_split!r}): could not load the dataset: "
            f"{type(err).__name__}: {err}. Check the dataset name, data.hf_config and "
            "data.hf_split; without network, have the dataset in the local HF cache "
            "(HF_DATASETS_OFFLINE=1) or point data.source at local files."
        ) from None
    columns = getattr(ds, "column_names", None)
    if columns and cfg.text_field not in columns:
        raise UserError(_hf_field_error(cfg, list(columns)))
    return _iter_hf_rows(ds, cfg)


def _hf_field_error(cfg: DataConfig, columns: list[str]) -> str:
    return (
        f"data.source '{cfg.source}': no field '{cfg.text_field}' "
        f"(fields: {', '.join(columns)})"
        + did_you_mean(cfg.text_field, columns)
        + ". Set data.text_field to the field with the document text."
    )


def _iter_hf_rows(ds: Any, cfg: DataConfig) -> Iterator[str]:
    field = cfg.text_field
    for row in ds:
        if field not in row:
            raise UserError(_hf_field_error(cfg, list(row)))
        text = _text_of(row[field], f"data.source '{cfg.source}'", field)
        if text:
            yield text
