"""Crash-safe file writes: write to a temp name, fsync, rename into place."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import uuid
from pathlib import Path
from typing import Any


def fsync_file(path: Path) -> None:
    """fsync one file's data, or a directory's entries (so a rename inside it survives a power loss)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_file  # a directory is opened and fsynced the same way


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``; readers see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a signal: no stray temp file left behind
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """:func:`atomic_write_bytes` of indented, key-sorted JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks into one buffer (hashlib releases the GIL:
    threads hash files in parallel)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


SAFE_NAME = re.compile(r"[^A-Za-z0-9.+-]+")  # what may appear in a file name built from a host name


def write_unique(path: Path, data: bytes, sync: bool = True) -> None:
    """Write ``path`` whole through a temp name unique to this host and process, then rename;
    for files that many processes on a shared filesystem write side by side. ``sync``
    fsyncs the file and (where the filesystem can) its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    host = SAFE_NAME.sub("_", socket.gethostname())
    tmp = path.with_name(f".{path.name}.tmp-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        try:
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass  # some filesystems cannot fsync a directory; the rename is done either way


def read_json_folder(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(name, object)`` of every ``*.json`` in ``folder`` holding a JSON object, by name;
    temp files (leading dot) and unreadable or half-written files are skipped."""
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".json") and not n.startswith("."))
    except OSError:
        return []
    found = []
    for name in names:
        try:
            row = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if isinstance(row, dict):
            found.append((name, row))
    return found
