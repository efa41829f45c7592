"""Read a wandb run back from its local ``run-<id>.wandb`` files, without network.

wandb 0.31 ships no Python reader. The file (verified with wandb 0.31.0) is a 7-byte header
(``:W&B``, u16 magic 0xBEE1, u8 version 0) followed by LevelDB-log blocks of 32 KiB
(counted from the start of the file, header included). Each chunk has a 7-byte header
(crc32 u32 LE over type byte + data, length u16 LE, type u8: 1 full, 2 first, 3 middle,
4 last); a block tail shorter than 7 bytes is zero padding. The reassembled payloads are
``wandb.proto.wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
BLOCK = 32768
MAGIC_IDENT = b":W&B"
MAGIC = 0xBEE1
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """The file is not a wandb transaction log, or is damaged before its end."""


def iter_records(path: str | os.PathLike[str]) -> Any:
    """Yield the ``Record`` protobufs of one ``.wandb`` file, in order.

    A torn tail (a process killed mid-write) ends the iteration quietly; a bad header or a
    checksum error before the end raises :class:`WandbFileError`.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if len(data) < HEADER.size:
        raise WandbFileError(f"{path}: too short to be a wandb file")
    ident, magic, version = HEADER.unpack_from(data, 0)
    if ident != MAGIC_IDENT or magic != MAGIC:
        raise WandbFileError(f"{path}: not a wandb transaction log (header {data[:7]!r})")
    pos = HEADER.size
    pending: bytes | None = None
    while pos < len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK.size:  # block trailer: zero padding
            pos += left
            continue
        if pos + CHUNK.size > len(data):
            return  # torn chunk header
        crc, length, kind = CHUNK.unpack_from(data, pos)
        if crc == 0 and length == 0 and kind == 0:
            # zero-filled rest of a block (pre-allocated or padded); go to the next block
            pos += left
            continue
        start, end = pos + CHUNK.size, pos + CHUNK.size + length
        if end > len(data):
            return  # torn chunk body
        body = data[start:end]
        if zlib.crc32(body, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            if end >= len(data):
                return
            raise WandbFileError(f"{path}: checksum mismatch in the chunk at byte {pos}")
        pos = end
        if kind == FULL:
            payload = body
        elif kind == FIRST:
            pending = body
            continue
        elif kind == MIDDLE:
            if pending is None:
                raise WandbFileError(f"{path}: middle chunk without a first one at byte {pos}")
            pending += body
            continue
        elif kind == LAST:
            if pending is None:
                raise WandbFileError(f"{path}: last chunk without a first one at byte {pos}")
            payload, pending = pending + body, None
        else:
            raise WandbFileError(f"{path}: unknown chunk type {kind} at byte {pos}")
        yield pb.Record.FromString(payload)


def _item_value(item: Any) -> Any:
    which = item.WhichOneof("value") if item.DESCRIPTOR.oneofs_by_name.get("value") else None
    if which == "none":
        return None
    if which == "json":
        return json.loads(item.json)
    if which is not None:
        return getattr(item, which)
    return json.loads(item.value_json) if item.value_json else None


def _item_path(item: Any) -> list[str]:
    return list(item.nested_key) if len(item.nested_key) else [item.key]


def _set(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[path[-1]] = value


def _remove(tree: dict[str, Any], path: list[str]) -> None:
    node: Any = tree
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(path[-1], None)


def _config_value(value: Any) -> Any:
    # config records hold {"value": v, "desc": ...} in some versions and v in others
    if isinstance(value, dict) and set(value) <= {"value", "desc"} and "value" in value:
        return value["value"]
    return value


def wandb_files(run_dir_or_file: str | os.PathLike[str]) -> list[Path]:
    """The ``.wandb`` files of a run folder (or of one wandb run dir), oldest first."""
    path = Path(run_dir_or_file)
    if path.is_file():
        return [path]
    candidates: list[Path] = []
    for root in (path, path / "wandb"):
        candidates += root.glob("*run-*/run-*.wandb")
        candidates += root.glob("run-*.wandb")
    # segment folders are named (offline-)run-<YYYYmmdd_HHMMSS>-<id>: sort by the timestamp
    def key(p: Path) -> tuple[str, str]:
        parent = p.parent.name.removeprefix("offline-")
        return (parent, p.name)

    return sorted(set(candidates), key=key)


def read_offline_run(run_dir_or_wandb_file: str | os.PathLike[str], run_id: str | None = None) -> dict[str, Any]:
    """Decode a run's config, history, summary and files from its ``.wandb`` files.

    Accepts one ``run-<id>.wandb`` file, one wandb run folder, or a wbscale run folder
    (``runs/<run>``, which holds ``wandb/``). Segments of the same run (resumes, requeues)
    are merged in time order; with several ids present, ``run_id`` picks one (default:
    the id of ``wandb_id.txt`` when present, else of the newest segment).

    Returns ``dict(run_id, project, name, config, history, summary, files, segments,
    exit_code)``; ``history`` is a list of rows ``{key: value, "_step": int, ...}`` where
    media values are nested dicts (``{"_type": "image-file", "path": ...}``).
    """
    files = wandb_files(run_dir_or_wandb_file)
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file under {run_dir_or_wandb_file}")
    if run_id is None:
        id_file = Path(run_dir_or_wandb_file) / "wandb_id.txt"
        if id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip() or None
    if run_id is None:
        run_id = files[-1].stem.removeprefix("run-")
    files = [f for f in files if f.stem.removeprefix("run-") == run_id]
    result: dict[str, Any] = {
        "run_id": run_id,
        "project": None,
        "name": None,
        "config": {},
        "history": [],
        "summary": {},
        "files": [],
        "segments": [str(f) for f in files],
        "exit_code": None,
    }
    config: dict[str, Any] = result["config"]
    summary: dict[str, Any] = result["summary"]
    seen_files: set[str] = set()
    for f in files:
        first_step: int | None = None  # a resumed segment replaces what earlier ones logged from here on
        for rec in iter_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run = rec.run
                result["project"] = run.project or result["project"]
                result["name"] = run.display_name or result["name"]
                for item in run.config.update:
                    _set(config, _item_path(item), _config_value(_item_value(item)))
            elif kind == "config":
                for item in rec.config.update:
                    _set(config, _item_path(item), _config_value(_item_value(item)))
                for item in rec.config.remove:
                    _remove(config, _item_path(item))
            elif kind == "history":
                row: dict[str, Any] = {}
                for item in rec.history.item:
                    _set(row, _item_path(item), _item_value(item))
                if "_step" not in row:
                    row["_step"] = rec.history.step.num
                if first_step is None:
                    # the same rule as metrics.jsonl: a killed process's rows past the
                    # checkpoint the next segment resumed from are dropped
                    first_step = int(row["_step"])
                    result["history"] = [r for r in result["history"] if int(r["_step"]) < first_step]
                result["history"].append(row)
            elif kind == "summary":
                for item in rec.summary.update:
                    _set(summary, _item_path(item), _item_value(item))
                for item in rec.summary.remove:
                    _remove(summary, _item_path(item))
            elif kind == "files":
                for fi in rec.files.files:
                    if fi.path not in seen_files:
                        seen_files.add(fi.path)
                        result["files"].append(fi.path)
            elif kind == "exit":
                result["exit_code"] = rec.exit.exit_code
    config.pop("_wandb", None)
    return result


def history_values(run: dict[str, Any], key: str) -> list[tuple[int, Any]]:
    """``[(step, value), ...]`` of one history key of a :func:`read_offline_run` result."""
    return [(int(row["_step"]), row[key]) for row in run["history"] if key in row]
