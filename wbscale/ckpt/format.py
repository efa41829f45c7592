"""The checkpoint format: one folder per step, a ``last`` pointer; reading and verifying it.

Layout under ``runs/<run>/checkpoints/``::

    step-00000100/
        model.ckpt      Lightning checkpoint (a folder of shards under DeepSpeed)
        rng/            rank-00000.pt …: each rank's RNG states (wbscale.ckpt.rng)
        meta.json       step, samples, topology, recipe, tokenizer hash, wandb id,
                        ``files`` (size of every file) and ``sha256`` (checksum of every file)
    last                text file naming the newest published checkpoint folder

A checkpoint is written into ``.tmp-step-…``, hashed and fsynced, then renamed; ``last`` is
replaced atomically after that (:mod:`wbscale.ckpt.writer`). A crash at any point leaves
``last`` naming a complete checkpoint (or no ``last`` at all), never a half-written one.

Integrity (:func:`checkpoint_problems`): every file listed in ``meta.json`` must exist with
its recorded size and sha256; ``meta.json`` carries a checksum of its own content
(``meta_sha256``, checked whenever it is read; delete that entry to accept a hand-edited file). Checkpoints written before checksums were recorded are checked by size
and by reading the zip directory of each torch file. ``WBSCALE_CKPT_VERIFY=size`` skips the
sha256 pass (sizes only) for very large checkpoints on slow filesystems.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wbscale.errors import UserError
from wbscale.io import sha256_file

STEP_DIR = re.compile(r"^step-(\d{8})$")
MODEL_FILE = "model.ckpt"
META_FILE = "meta.json"
RNG_DIR = "rng"  # rng/rank-00000.pt …: each rank's RNG states (wbscale.ckpt.rng)
LAST_FILE = "last"
SIZES_KEY = "files"  # meta["files"]: {relative path: size in bytes}
SHA_KEY = "sha256"  # meta["sha256"]: {relative path: hex sha256}
META_SHA_KEY = "meta_sha256"  # sha256 of meta.json's own content (without this key)
VERIFY_ENV = "WBSCALE_CKPT_VERIFY"  # "sha256" (default) or "size"
# Set by rank 0 for the processes it launches (Lightning's launcher): the checkpoint it
# has verified, so they do not hash it again ("<path>|<signature>").
VERIFIED_ENV = "WBSCALE_CKPT_VERIFIED"

Warn = Callable[[str], None]


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint folder and its metadata."""

    path: Path
    step: int
    meta: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


# ---------------------------------------------------------------------------- checksums


def meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of a checkpoint's metadata, canonical JSON, without its own checksum key."""
    body = {k: v for k, v in meta.items() if k != META_SHA_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_files(paths: Iterable[Path], workers: int | None = None) -> dict[Path, str]:
    """sha256 of each file, a few files at a time."""
    paths = list(paths)
    if not paths:
        return {}
    workers = workers or min(4, os.cpu_count() or 1, len(paths))
    if workers <= 1:
        return {p: sha256_file(p) for p in paths}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wbscale-sha256") as pool:
        return dict(zip(paths, pool.map(sha256_file, paths), strict=True))


def _signature(info: CheckpointInfo) -> str:
    """What identifies the files of a checkpoint as last verified: paths, sizes, mtimes."""
    h = hashlib.sha256(str(info.path.resolve()).encode())
    h.update(info.meta.get(META_SHA_KEY, "").encode())
    for rel in sorted(info.meta.get(SIZES_KEY) or {}):
        try:
            st = (info.path / rel).stat()
        except OSError:
            return ""
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
    return h.hexdigest()


_verified: set[str] = set()  # signatures this process has verified (fit, then plan_resume)


def mark_verified_for_children(info: CheckpointInfo) -> None:
    """Tell the ranks this process launches that ``info`` verified (they skip re-hashing)."""
    sig = _signature(info)
    if sig:
        os.environ[VERIFIED_ENV] = f"{info.path.resolve()}|{sig}"


def _already_verified(info: CheckpointInfo) -> bool:
    sig = _signature(info)
    if not sig:
        return False
    if sig in _verified:
        return True
    inherited = os.environ.get(VERIFIED_ENV, "")
    return inherited == f"{info.path.resolve()}|{sig}"


# ---------------------------------------------------------------------------- reading


def _read_meta(folder: Path) -> dict[str, Any]:
    meta_path = folder / META_FILE
    try:
        text = meta_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{meta_path}: missing (the checkpoint's metadata was deleted or never written)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{meta_path}: unreadable checkpoint metadata ({type(err).__name__}: {err})") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{meta_path}: corrupt checkpoint metadata (not valid JSON: {err})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path}: corrupt checkpoint metadata (not a JSON object)")
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise UserError(f"{meta_path}: corrupt checkpoint metadata (no valid 'step', got {step!r})")
    if not isinstance(meta.get("recipe"), dict):
        raise UserError(f"{meta_path}: corrupt checkpoint metadata (no 'recipe' mapping)")
    if META_SHA_KEY in meta and meta[META_SHA_KEY] != meta_digest(meta):
        raise UserError(
            f"{meta_path}: checksum mismatch, the metadata is corrupt or was edited (if you edited "
            f"it on purpose, delete its \"{META_SHA_KEY}\" entry)"
        )
    return meta


def read_checkpoint(path: Path) -> CheckpointInfo:
    """Open a checkpoint folder (or its ``model.ckpt``); UserError if incomplete or unreadable."""
    path = Path(path)
    if path.name == MODEL_FILE:
        path = path.parent
    if path.is_dir() and (path / "checkpoints").is_dir():  # a run folder: take its newest
        found = latest_checkpoint(path)
        if found is None:
            raise UserError(f"{path}: run folder has no complete checkpoint")
        return found
    if path.is_dir() and (path / LAST_FILE).is_file():  # a checkpoints/ folder
        found = latest_checkpoint(path.parent)
        if found is not None:
            return found
    if not path.is_dir() or not ((path / META_FILE).is_file() or (path / MODEL_FILE).exists()):
        raise UserError(
            f"{path}: not a complete wbscale checkpoint (expected {META_FILE} and {MODEL_FILE}); "
            "pass a folder like runs/<run>/checkpoints/step-00000100 or a run folder"
        )
    meta = _read_meta(path)
    if not (path / MODEL_FILE).exists():
        raise UserError(f"{path / MODEL_FILE}: missing (the checkpoint is incomplete)")
    return CheckpointInfo(path=path, step=int(meta["step"]), meta=meta)


def step_folders(run_dir: Path) -> list[Path]:
    """Every ``step-*`` folder of a run (readable or not), by name."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir())


def list_checkpoints(run_dir: Path, warn: Warn | None = None) -> list[CheckpointInfo]:
    """Readable checkpoints of a run, oldest first (temp and trash folders are ignored).

    A ``step-*`` folder whose metadata is missing or unreadable is skipped, with a warning
    (``warn(msg)``) naming the file when ``warn`` is given.
    """
    found = []
    for child in step_folders(run_dir):
        try:
            found.append(read_checkpoint(child))
        except UserError as err:
            if warn is not None:
                warn(f"warning: skipping checkpoint {child}: {err}")
    return sorted(found, key=lambda c: c.step)


def _last_target(run_dir: Path) -> tuple[str | None, str | None]:
    """(folder name ``last`` names, or None; why it cannot be used, or None)."""
    pointer = checkpoints_dir(run_dir) / LAST_FILE
    if not pointer.is_file():
        return None, None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        return None, f"{pointer} is unreadable ({type(err).__name__})"
    if not STEP_DIR.match(name):
        return None, f"{pointer} does not name a checkpoint folder (holds {name[:40]!r})"
    return name, None


def latest_checkpoint(run_dir: Path, warn: Warn | None = None) -> CheckpointInfo | None:
    """The checkpoint ``last`` names; the newest readable one if ``last`` is stale or broken.

    With ``warn``, a stale or broken ``last`` and every skipped folder is reported.
    """
    root = checkpoints_dir(run_dir)
    name, problem = _last_target(run_dir)
    if name is not None:
        try:
            return read_checkpoint(root / name)
        except UserError as err:
            problem = f"{root / LAST_FILE} names {name}, which is not usable ({err})"
    found = list_checkpoints(run_dir, warn=warn)
    if problem and warn is not None:
        newest = f"step {found[-1].step}" if found else "none left"
        warn(f"warning: {problem}; falling back to the newest readable checkpoint ({newest})")
    return found[-1] if found else None


def step_dir_name(step: int) -> str:
    """The folder name of the checkpoint of optimizer step ``step``."""
    return f"step-{step:08d}"


# ---------------------------------------------------------------------------- integrity


def _zip_problem(path: Path) -> str | None:
    """A torch file whose zip directory cannot be read (what torch.load would crash on)."""
    try:
        with zipfile.ZipFile(path) as z:
            z.infolist()
    except Exception as err:  # BadZipFile, UnicodeDecodeError, OSError, …
        return f"{path}: unreadable ({type(err).__name__}: {err})"
    return None


def checkpoint_problems(info: CheckpointInfo, checksums: bool | None = None) -> list[str]:
    """Missing, truncated or corrupt files of a checkpoint, each naming its file.

    Sizes always; sha256 of every file when the checkpoint recorded them (``checksums``:
    default on unless ``WBSCALE_CKPT_VERIFY=size``). Older checkpoints without checksums:
    sizes and the zip directory of each torch file.
    """
    if checksums is None:
        checksums = os.environ.get(VERIFY_ENV, "sha256").lower() != "size"
    problems = []
    meta_path = info.path / META_FILE
    if META_SHA_KEY in info.meta and info.meta[META_SHA_KEY] != meta_digest(info.meta):
        problems.append(f"{meta_path}: checksum mismatch (the metadata was modified or is corrupt)")
        return problems  # the sizes and checksums it lists cannot be trusted
    dir_step = STEP_DIR.match(info.path.name)
    if dir_step and int(dir_step.group(1)) != info.step:
        problems.append(f"{meta_path}: says step {info.step}, but the folder is {info.path.name}")
    files = info.meta.get(SIZES_KEY)
    if not isinstance(files, dict):  # written before sizes were recorded: check the shard count at least
        tag = info.model_path / "checkpoint"
        if info.model_path.is_dir():
            found = len(list(tag.glob("*optim_states.pt")))
            expected = int(info.meta.get("world_size") or 1)
            if found < expected:
                problems.append(f"{tag}: {found} optimizer shard(s), expected {expected} (one per rank)")
        elif info.model_path.is_file() and (p := _zip_problem(info.model_path)):
            problems.append(p)
        return problems
    sums = info.meta.get(SHA_KEY)
    sums = sums if isinstance(sums, dict) else {}
    to_hash = []
    for rel, size in sorted(files.items()):
        path = info.path / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != size:
            problems.append(f"{path}: {path.stat().st_size} bytes, expected {size} (truncated or corrupt)")
        elif rel in sums:
            to_hash.append(rel)
        elif rel.endswith((".pt", ".ckpt")) and (p := _zip_problem(path)):
            problems.append(p)
    if problems or not checksums or not to_hash or _already_verified(info):
        return problems
    digests = hash_files([info.path / rel for rel in to_hash])
    for rel in to_hash:
        got = digests[info.path / rel]
        if got != sums[rel]:
            problems.append(
                f"{info.path / rel}: sha256 mismatch (recorded {sums[rel][:12]}…, found {got[:12]}…): "
                "the file is corrupt"
            )
    if not problems:
        sig = _signature(info)
        if sig:
            _verified.add(sig)
    return problems


def verify_checkpoint(info: CheckpointInfo) -> None:
    """Raise a UserError naming the first missing, truncated or corrupt file of a checkpoint."""
    problems = checkpoint_problems(info)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise UserError(
            f"checkpoint {info.path} is damaged: {problems[0]}{more}. Resume from an earlier "
            f"checkpoint (pass --resume {info.path.parent}/step-… or delete {info.path} and use --resume auto)"
        )


def latest_intact_checkpoint(run_dir: Path, warn: Warn | None = None) -> CheckpointInfo | None:
    """The newest checkpoint whose files are all present, complete and uncorrupted.

    ``last``'s checkpoint first, then older ones; every checkpoint skipped (damaged files,
    unreadable metadata, a stale ``last``) is reported through ``warn(msg)``, naming the
    file at fault.
    """
    newest = latest_checkpoint(run_dir, warn=warn)
    readable = list_checkpoints(run_dir)  # (latest_checkpoint has warned about the rest)
    if newest is None:
        if step_folders(run_dir):
            raise UserError(
                f"no readable checkpoint in {checkpoints_dir(run_dir)} (see the warnings above); "
                "start a new train.run_name or restore the files"
            )
        return None
    candidates = [newest] + [c for c in reversed(readable) if c.step < newest.step]
    for info in candidates:
        problems = checkpoint_problems(info)
        if not problems:
            return info
        if warn is not None:
            warn(f"warning: skipping damaged checkpoint {info.path}: {problems[0]}")
    raise UserError(
        f"no intact checkpoint in {checkpoints_dir(run_dir)}: every one has missing, truncated or "
        "corrupt files (see the warnings above); start a new train.run_name or restore the files"
    )


def inspect_checkpoint(path: Path) -> dict[str, Any]:
    """Step, topology, size, tokens seen and an integrity check (checksums) of a checkpoint.

    A checkpoint folder whose metadata is missing or unreadable is reported (``ok: false``
    and the problem), not refused; a path that is no checkpoint at all is a UserError.
    """
    path = Path(path)
    folder = path.parent if path.name == MODEL_FILE else path
    try:
        info = read_checkpoint(path)
    except UserError as err:
        if not (folder.is_dir() and ((folder / META_FILE).exists() or (folder / MODEL_FILE).exists())):
            raise
        return {"path": str(folder), "step": None, "ok": False, "problems": [str(err)]}
    files = [p for p in info.path.rglob("*") if p.is_file()]
    recipe = info.meta.get("recipe", {})
    block = recipe.get("model", {}).get("block_size")
    samples = info.meta.get("samples")
    problems = checkpoint_problems(info)
    model_path = info.model_path
    shards = sorted(p.name for p in (model_path / "checkpoint").glob("*.pt")) if model_path.is_dir() else []
    if model_path.is_file() and not problems:
        import torch

        try:
            state = torch.load(model_path, map_location="cpu", weights_only=False)
            if "state_dict" not in state:
                problems.append(f"{model_path}: no state_dict")
        except Exception as err:  # a truncated or foreign file: report, don't crash
            problems.append(f"{model_path}: unreadable ({type(err).__name__}: {err})")
    return {
        "path": str(info.path),
        "step": info.step,
        "samples": samples,
        "tokens_seen": samples * block if isinstance(samples, int) and isinstance(block, int) else None,
        "world_size": info.meta.get("world_size"),
        "strategy": info.meta.get("strategy"),
        "zero_stage": info.meta.get("zero_stage"),
        "sharded": model_path.is_dir(),
        "shards": shards,
        # folders derived by elastic resume / consolidation (not part of the integrity check)
        "derived": sorted(p.name for p in info.path.iterdir() if p.name in ("universal", "full.ckpt")),
        "size_bytes": sum(p.stat().st_size for p in files),
        "files": len(files),
        "checksums": "sha256" if isinstance(info.meta.get(SHA_KEY), dict) else "none (sizes only)",
        "model": recipe.get("model", {}),
        "tokenizer_sha256": info.meta.get("tokenizer_sha256"),
        "wandb_id": info.meta.get("wandb_id"),
        "ok": not problems,
        "problems": problems,
    }
