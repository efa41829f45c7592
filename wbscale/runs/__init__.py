"""The run registry: every run, local or on SLURM, in one table, without a server.

- :mod:`.store`: the files (one event per file in ``<run>/events/``, ``<run>/progress.json``,
  membership files and a reader-built index under ``<runs_dir>/.registry/``) and why
  concurrent writers on a shared filesystem cannot corrupt or lose them; rebuild by scan;
- :mod:`.recorder`: :class:`RunRecorder`, the callback through which ``fit`` records its
  start, progress and exit reason (and :func:`recording_failures` for the CLI);
- :mod:`.state`: the state of each run (pending, running, preempted-requeued, failed,
  finished, stale) from its events, files, lock and SLURM; ``wbscale runs`` / ``runs show``;
- :mod:`.heal`: ``wbscale runs resubmit`` (and ``--watch``).

A tool at the level of :mod:`wbscale.slurm` (which it uses to resubmit): imports
``ckpt``, ``slurm``, ``locks``, ``config``, ``io`` and ``errors``, never ``train``.
Submodules are imported lazily: ``wbscale runs`` does not load torch.
"""

from __future__ import annotations

from wbscale import lazy_exports

_EXPORTS = {
    "RunRecorder": "recorder",
    "recording_failures": "recorder",
    "RunRow": "state",
    "list_runs": "state",
    "STATES": "state",
    "resubmit": "heal",
    "watch": "heal",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
