"""``wbscale metrics``: the white-box metrics of a saved checkpoint, as JSON + PNG.

Uses the same :func:`wbscale.track.whitebox.whitebox_metrics` as training does, on the
same kind of batch (the first held-out validation batch), so the numbers are comparable
with the ones a run logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wbscale.errors import UserError
from wbscale.io import atomic_write_json


def checkpoint_metrics(
    ckpt: str | Path, data_dir: str | Path | None = None, out_dir: str | Path | None = None,
    batch_size: int = 8, device: str = "cpu",
) -> dict[str, Any]:
    """Compute white-box metrics for ``ckpt`` on held-out data; write JSON + PNGs to ``out_dir``."""
    from wbscale.ckpt.load import load_for_inference, require_training_data
    from wbscale.data.loader import val_batches
    from wbscale.track.plots import plot_whitebox
    from wbscale.track.whitebox import whitebox_metrics

    model, recipe, _ = load_for_inference(ckpt, device=device)
    data = require_training_data(ckpt, data_dir)
    if not (data / "manifest.json").is_file():
        raise UserError(f"{data}: no prepared data here; pass --data DIR (a folder written by `wbscale data prepare`)")
    x, _ = val_batches(data, recipe.model.block_size, batch_size, 1)[0]
    metrics = whitebox_metrics(model, x.to(device))
    step = _trained_steps(ckpt)
    result = {"ckpt": str(ckpt), "data": str(data), "arch": recipe.model.arch, "step": step, "metrics": metrics}
    # Next to the checkpoint, never inside it: a checkpoint folder stays as training wrote it.
    ckpt_path = Path(ckpt).resolve()
    out = Path(out_dir) if out_dir is not None else ckpt_path.with_name(ckpt_path.name + "-whitebox")
    atomic_write_json(out / "whitebox.json", result)
    result["plots"] = [str(p) for p in plot_whitebox([{"step": step or 0, **metrics}], out)]
    return result


def _trained_steps(ckpt: str | Path) -> int | None:
    """The optimizer step a training checkpoint was saved at; None for an export folder."""
    from wbscale.ckpt.format import read_checkpoint

    try:
        return read_checkpoint(Path(ckpt)).step
    except UserError:  # an export / inference folder: it has no step
        return None


__all__ = ["checkpoint_metrics"]
