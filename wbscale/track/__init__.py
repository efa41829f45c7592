"""Run tracking: wandb (online/offline, one run id per run), metrics.jsonl, white-box
metrics, sample generations and plots.

Submodules (imported lazily, so ``import wbscale.track`` stays cheap):

- :mod:`~wbscale.track.whitebox`: sparsity, coding rate, compression gain, dead atoms.
- :mod:`~wbscale.track.jsonl_logger`: ``JSONLLogger``, ``read_metrics``.
- :mod:`~wbscale.track.wandb_run`: ``make_wandb_logger``, ``wandb_run_id``.
- :mod:`~wbscale.track.wandb_reader`: ``read_offline_run``.
- :mod:`~wbscale.track.plots`: ``plot_loss_curves``, ``plot_whitebox``, ``plot_run``.
- :mod:`~wbscale.track.callbacks`: ``WhiteBoxMetrics``, ``SampleGeneration``, ``Plots``.
"""

from __future__ import annotations

from wbscale import lazy_exports

_EXPORTS = {
    "sparsity": "whitebox",
    "coding_rate": "whitebox",
    "dead_atoms": "whitebox",
    "compression_gain": "whitebox",
    "whitebox_metrics": "whitebox",
    "JSONLLogger": "jsonl_logger",
    "read_metrics": "jsonl_logger",
    "make_wandb_logger": "wandb_run",
    "wandb_run_id": "wandb_run",
    "finish_wandb": "wandb_run",
    "read_offline_run": "wandb_reader",
    "plot_loss_curves": "plots",
    "plot_whitebox": "plots",
    "plot_run": "plots",
    "WhiteBoxMetrics": "callbacks",
    "SampleGeneration": "callbacks",
    "Plots": "callbacks",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
