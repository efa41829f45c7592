"""Benchmarks through lm-evaluation-harness (the optional extra ``wbscale[eval]``).

- :mod:`.harness`: ``wbscale evaluate`` (run tasks, save JSON next to the run, log to wandb);
  lm-eval is imported only when it runs;
- :mod:`.lm`: the lm-eval model ``wbscale`` (:class:`~.lm.WbscaleLM`); importing it imports
  lm-eval and registers the model.

A tool layer: it loads checkpoints through :mod:`wbscale.ckpt` and logs through
:mod:`wbscale.track`, never through :mod:`wbscale.train`.
"""
