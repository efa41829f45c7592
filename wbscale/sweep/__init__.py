"""Scaling sweeps: a grid of recipe overrides, trained point by point, read back as curves.

- :mod:`.facts`: what a recipe costs before it runs — parameters (built on the ``meta``
  device), tokens, training FLOPs — and the target its header states; ``recipes list``
  and the sweep report both read it.
- :mod:`.grid`: ``wbscale sweep RECIPE --set k=a,b …``: expands the grid, names one run per
  point, trains them one after another with :func:`wbscale.train.fit.fit` (or submits one
  SLURM job per point), and keeps ``sweep.json`` up to date so a rerun resumes.
- :mod:`.report`: ``wbscale sweep report DIR``: val loss against non-embedding parameters
  and against training compute, CRATE next to GPT-2, as a plot, a Markdown table and JSON.
"""

from wbscale.sweep.facts import RunFacts, recipe_facts, recipe_header, recipe_target
from wbscale.sweep.grid import SweepSpec, parse_grid, run_sweep
from wbscale.sweep.report import sweep_report

__all__ = [
    "RunFacts",
    "SweepSpec",
    "parse_grid",
    "recipe_facts",
    "recipe_header",
    "recipe_target",
    "run_sweep",
    "sweep_report",
]
