"""The wandb run of a training run: online when a key is set, offline otherwise, one id forever.

- Mode (``tracking.wandb.mode``): ``auto`` = online when a W&B key is configured
  (``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE`` or a netrc entry for the W&B host),
  else offline with one line saying how to upload later (``wandb sync <dir>``);
  ``online`` without a key or without a route to the server falls back to offline with a
  warning; ``disabled`` gives no logger. wandb never prompts: wbscale only goes online
  when a key exists, and never blocks for long: an HTTP probe of the server (3 s) and a
  short ``init_timeout`` (20 s, ``WANDB_INIT_TIMEOUT``) bound the start, ``finish_timeout``
  (120 s) bounds the final upload. (One slow path remains inside wandb: when the server
  answers the probe but then stalls, wandb's own telemetry may delay process exit by ~30 s.)
- Identity: the run id is created once, stored in ``<run_dir>/wandb_id.txt`` (atomically)
  and reused with ``resume="allow"``, so a resumed or requeued job continues the same run.
  The checkpoint should carry the id too (pass it back as ``run_id=``).
- Steps: the wandb step is the trainer's global step (:class:`WandbStepLogger`), so
  resumed segments continue at the right x position; a step below the last one logged
  is dropped (wandb would drop it anyway), never written out of order.
- Files land under ``<run_dir>/wandb/`` (``offline-run-<time>-<id>/`` per process).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lightning.fabric.loggers.logger import _DummyExperiment
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from wbscale.errors import extra_requirement
from wbscale.io import atomic_write_text
from wbscale.provenance import run_environment
from wbscale.ranks import launch_rank, say_always

WANDB_ID_FILE = "wandb_id.txt"


def _say(msg: str) -> None:
    """wandb's lines keep their ``wbscale:`` prefix (what users grep their logs for)."""
    say_always(msg, prefix="wbscale:")

DEFAULT_INIT_TIMEOUT = 20.0
DEFAULT_FINISH_TIMEOUT = 120.0
PROBE_TIMEOUT = 3.0


# ----------------------------------------------------------------------------- run id


def wandb_run_id(run_dir: str | os.PathLike[str]) -> str | None:
    """The wandb run id stored in ``<run_dir>/wandb_id.txt``, or ``None``."""
    path = Path(run_dir) / WANDB_ID_FILE
    if not path.is_file():
        return None
    rid = path.read_text(encoding="utf-8").strip()
    return rid or None


def ensure_wandb_run_id(run_dir: str | os.PathLike[str], run_id: str | None = None) -> str:
    """Return the run's wandb id, creating and storing it on first use.

    ``run_id`` (e.g. read from a checkpoint) wins over the stored one and is written back.
    """
    stored = wandb_run_id(run_dir)
    if run_id is None:
        if stored is not None:
            return stored
        from wandb.sdk.lib import runid

        run_id = runid.generate_id()
    if run_id != stored:
        atomic_write_text(Path(run_dir) / WANDB_ID_FILE, run_id + "\n")
    return run_id


# ----------------------------------------------------------------------------- mode


def _base_url() -> str:
    url = os.environ.get("WANDB_BASE_URL")
    if url:
        return url
    try:
        from wandb.sdk.lib import urls

        return urls.DEFAULT_BASE_URL
    except Exception:  # noqa: BLE001 - an internal module may move; fall back to the classic host
        return "https://api.wandb.ai"


def has_wandb_credentials() -> bool:
    """True when a W&B key is configured (env var or netrc entry); never prompts."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        return read_netrc_auth(host=_base_url()) is not None
    except Exception:  # noqa: BLE001 - internal API or a malformed netrc: read it ourselves
        pass
    import netrc

    try:
        entries = netrc.netrc(os.environ.get("NETRC")).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    host = urlsplit(_base_url()).netloc
    return any(h == host or "wandb" in h for h in entries)


def server_reachable(url: str | None = None, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether the W&B server answers an HTTP request within ``timeout`` seconds.

    Any HTTP status counts (the server is there); so does a TLS failure (let wandb judge
    it). A refused or timed-out connection, a DNS failure, or a server that accepts but
    never answers does not. Runs in a daemon thread so a stuck DNS lookup cannot hold the
    caller longer than ``timeout``. Honours the usual proxy variables (urllib).
    """
    import ssl
    import urllib.error
    import urllib.request

    target = url or _base_url()
    result: list[bool] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(target, method="GET"), timeout=timeout):
                result.append(True)
        except urllib.error.HTTPError:
            result.append(True)
        except urllib.error.URLError as err:
            result.append(isinstance(err.reason, ssl.SSLError))
        except (OSError, ValueError):
            result.append(False)

    thread = threading.Thread(target=probe, name="wbscale-wandb-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def resolve_wandb_mode(mode: str) -> tuple[str, str]:
    """``(mode, reason)`` with mode in online | offline | disabled for a recipe's mode."""
    env_mode = os.environ.get("WANDB_MODE", "").lower()
    if env_mode in ("disabled", "offline", "dryrun"):
        return ("disabled" if env_mode == "disabled" else "offline"), f"WANDB_MODE={env_mode}"
    if mode == "disabled":
        return "disabled", "tracking.wandb.mode: disabled"
    if mode == "offline":
        return "offline", "tracking.wandb.mode: offline"
    if not has_wandb_credentials():
        if mode == "online":
            return "offline", "tracking.wandb.mode is online but no W&B key is set (WANDB_API_KEY or `wandb login`)"
        return "offline", "no W&B key found"
    return "online", "a W&B key is set"


# ----------------------------------------------------------------------------- logger


class WandbStepLogger(WandbLogger):
    """Lightning's WandbLogger with the global step as wandb's step, and an explicit rank.

    Lightning's logger passes the step only as a ``trainer/global_step`` column, so wandb's
    own ``_step`` restarts at 0 in every offline segment of a resumed run; here it is the
    global step itself. Rows whose step is below the run's current step are dropped (once
    warned) instead of being logged out of order.
    """

    def __init__(self, *args: Any, rank: int = 0, init_fn: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rank = rank
        self._init_fn = init_fn
        self._warned_rewind = False

    @property
    def experiment(self) -> Any:  # type: ignore[override]
        if self._rank != 0 or rank_zero_only.rank > 0:
            return _DummyExperiment()
        if self._experiment is None:
            if self._init_fn is None:
                return super().experiment
            self._experiment = self._init_fn()
        return self._experiment

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        if self._rank == 0:
            super().log_hyperparams(params)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self._rank != 0:
            return
        run = self.experiment
        metrics = {f"{self._prefix}{self.LOGGER_JOIN_CHAR}{k}" if self._prefix else k: v for k, v in metrics.items()}
        if step is None:
            run.log(dict(metrics))
            return
        step = int(step)
        current = int(getattr(run, "step", 0) or 0)
        if step < current:
            if not self._warned_rewind:
                _say(
                    f"wandb: dropping metrics at step {step} < wandb's current step {current} "
                    "(already logged by an earlier segment of this run)"
                )
                self._warned_rewind = True
            return
        run.log({**metrics, "trainer/global_step": step}, step=step)

    def finish(self, exit_code: int = 0) -> None:
        """Finish the wandb run (flush and close); the logger can be used no more."""
        if self._rank == 0 and self._experiment is not None:
            sync_file = getattr(self._experiment.settings, "sync_file", None)
            self._experiment.finish(exit_code=exit_code)
            if sync_file:
                wait_for_exit_record(Path(sync_file))


def wait_for_exit_record(path: Path, timeout: float = 30.0) -> bool:
    """Wait until wandb's service has written the run's exit record to ``path``.

    ``run.finish()`` can return before the service process has flushed the offline
    ``.wandb`` file; readers (tests, a requeued job) must not see it half-written.
    """
    from wbscale.track.wandb_reader import iter_records

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if path.is_file() and any(r.WhichOneof("record_type") == "exit" for r in iter_records(path)):
                return True
        except Exception:  # a torn tail while the service is still writing: try again
            pass
        time.sleep(0.1)
    return False


def _init_run(
    *,
    mode: str,
    reason: str,
    run_id: str,
    run_dir: Path,
    init_kwargs: dict[str, Any],
    init_timeout: float,
    finish_timeout: float,
) -> Any:
    """``wandb.init`` with the online -> offline fallback; prints one line about the mode."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    active = wandb.run
    if active is not None and active.id == run_id:
        return active
    # A run belongs to the process that trains it: never register it with a service that
    # another process started (WANDB_SERVICE is inherited through fork and exec). If this
    # process is killed, that service would hold the run id, and the resumed run would be
    # refused with "run ID ... is in use". A service this process started is kept: wandb
    # reuses its own connection without reading the variable again.
    os.environ.pop("WANDB_SERVICE", None)

    def settings(m: str) -> Any:
        kw: dict[str, Any] = dict(silent=True, init_timeout=init_timeout)
        if m == "online":
            kw["finish_timeout"] = finish_timeout
        return wandb.Settings(**kw)

    def init(m: str) -> Any:
        return wandb.init(
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=m,
            reinit="finish_previous",
            settings=settings(m),
            **init_kwargs,
        )

    warning = None
    if mode == "online":
        if not server_reachable():
            warning = f"cannot reach {_base_url()}"
        else:
            try:
                run = init("online")
                _say(f"wandb: online run {run_id}: {getattr(run, 'url', '')}")
                return run
            except Exception as err:  # noqa: BLE001 - any failure to start online means offline
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                warning = f"could not start online ({first})"
                # the failed attempt keeps the run id busy in the wandb service: stop it
                wandb.teardown()
                try:  # and the half-started run's error telemetry with it
                    from wandb.analytics.opentelemetry import opentelemetry_proxy

                    opentelemetry_proxy.disable()
                except Exception:  # noqa: BLE001 - internal API; only output noise is at stake
                    pass
    # wandb's error telemetry posts to the server at exit (10 s timeout per try); an offline
    # run has no business calling home, and with a black-holed network it stalls the exit
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    run = init("offline")
    sync_dir = getattr(run.settings, "sync_dir", None) or str(run_dir / "wandb")
    if warning:
        _say(f"wandb: WARNING {warning}; logging offline run {run_id}, upload it later with: wandb sync {sync_dir}")
    else:
        _say(f"wandb: offline run {run_id} ({reason}); upload it later with: wandb sync {sync_dir}")
    return run


def make_wandb_logger(
    recipe: Any,
    run_dir: str | os.PathLike[str],
    *,
    rank: int | None = None,
    run_id: str | None = None,
    init_timeout: float | None = None,
    finish_timeout: float | None = None,
) -> WandbStepLogger | None:
    """The wandb logger of a run, or ``None`` when wandb is disabled.

    ``recipe`` is a :class:`wbscale.config.Recipe`; its resolved dict plus
    :func:`wbscale.provenance.run_environment` becomes the wandb config. On rank 0 the run starts now (so the
    mode line prints before training); other ranks get a logger that never touches wandb.
    ``rank`` defaults to :func:`~wbscale.track.jsonl_logger.launch_rank` (the launcher's
    environment), so every process of a DDP/ZeRO/SLURM job may call this.
    ``run_id`` (from a checkpoint) overrides the id stored in ``run_dir``.
    """
    cfg = recipe.tracking.wandb
    if rank is None:
        rank = launch_rank()
    mode, reason = resolve_wandb_mode(cfg.mode)
    if mode == "disabled":
        return None
    if importlib.util.find_spec("wandb") is None:
        if rank == 0:
            _say(
                "wandb is not installed: metrics go to metrics.jsonl only "
                f"(pip install '{extra_requirement('wandb')}' to track runs in wandb)"
            )
        return None
    run_dir = Path(run_dir)
    if init_timeout is None:
        init_timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", DEFAULT_INIT_TIMEOUT))
    if finish_timeout is None:
        finish_timeout = DEFAULT_FINISH_TIMEOUT
    name = cfg.name or recipe.train.run_name
    init_kwargs: dict[str, Any] = {
        "project": cfg.project,
        "entity": cfg.entity,
        "name": name,
        "group": cfg.group,
        "tags": list(cfg.tags) or None,
    }
    if rank != 0:
        return WandbStepLogger(
            save_dir=str(run_dir), project=cfg.project, name=name, id=run_id or wandb_run_id(run_dir), rank=rank
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    rid = ensure_wandb_run_id(run_dir, run_id)
    config = dict(recipe.to_dict())
    config["env"] = run_environment()
    init_kwargs["config"] = config

    init_fn = functools.partial(
        _init_run,
        mode=mode,
        reason=reason,
        run_id=rid,
        run_dir=run_dir,
        init_kwargs=init_kwargs,
        init_timeout=init_timeout,
        finish_timeout=finish_timeout,
    )  # a partial, not a closure: the logger stays picklable (ddp_spawn)
    logger = WandbStepLogger(save_dir=str(run_dir), project=cfg.project, name=name, id=rid, rank=0, init_fn=init_fn)
    _ = logger.experiment
    return logger


def finish_wandb(logger: Any, exit_code: int = 0) -> None:
    """Finish the run of a :class:`WandbStepLogger` (no-op for anything else or ``None``)."""
    if isinstance(logger, WandbStepLogger):
        logger.finish(exit_code)
