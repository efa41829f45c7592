"""Progress output: plain lines without a terminal, an optimizer-step bar on one."""

from __future__ import annotations

import re

from helpers import tiny_overrides

from wbscale.config import load_recipe
from wbscale.track.progress import progress_line
from wbscale.train.fit import fit


def test_progress_line_reads_like_a_log_line():
    line = progress_line(120, 400, {"train/loss": 2.3141, "train/lr": 1.9e-3, "train/tokens_per_second": 8512.4,
                                    "train/mfu": 0.412}, elapsed=72.0, start_step=0)
    assert line == ("step 120/400 (30%) | loss 2.3141 | lr 1.90e-03 | 8,512 tok/s | MFU 41.2% | "
                    "0:01:12 elapsed | ETA 0:02:48")
    assert "ETA" not in progress_line(400, 400, {"train/loss": 1.0}, elapsed=10.0, start_step=0)


def test_fit_without_a_terminal_prints_a_line_per_logged_step(tmp_path, capsys):
    recipe = load_recipe("demo", tiny_overrides(tmp_path, "lines", **{"train.log_every": 2, "train.max_steps": 6}))
    fit(recipe, progress=False)
    err = capsys.readouterr().err
    steps = [int(m) for m in re.findall(r"\[wbscale\] step (\d+)/6 \(\d+%\) \| loss", err)]
    assert steps == [2, 4, 6], err[-2000:]
    assert "ETA" in err and "tok/s" in err
    assert re.search(r"step 4/6 \| val loss \d", err), err[-2000:]


def test_progress_bar_counts_optimizer_steps_with_a_total(tmp_path, capsys):
    # grad_accum 2: Lightning's own bar would count 12 micro-batches against an unknown total
    recipe = load_recipe("demo", tiny_overrides(tmp_path, "bar", **{"train.max_steps": 6, "train.grad_accum": 2}))
    fit(recipe, progress=True)
    captured = capsys.readouterr()
    err = captured.out + captured.err  # Lightning's bars write to stdout
    assert "6/6" in err and "?" not in re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", err.split("train")[-1]).split("\n")[0]
    assert "v_num" not in err and "Epoch 0" not in err
