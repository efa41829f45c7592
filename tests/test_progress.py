"""Progress output: plain lines without a terminal, an optimizer-step bar on one."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

from helpers import tiny_overrides

from wbscale.config import load_recipe
from wbscale.track import progress as progress_mod
from wbscale.track.progress import ProgressLines, progress_line
from wbscale.train.fit import fit


def test_progress_line_reads_like_a_log_line():
    line = progress_line(120, 400, {"train/loss": 2.3141, "train/lr": 1.9e-3, "train/tokens_per_second": 8512.4,
                                    "train/mfu": 0.412}, elapsed=72.0, start_step=0)
    assert line == ("step 120/400 (30%) | loss 2.3141 | lr 1.90e-03 | 8,512 tok/s | MFU 41.2% | "
                    "0:01:12 elapsed | ETA 0:02:48")
    assert "ETA" not in progress_line(400, 400, {"train/loss": 1.0}, elapsed=10.0, start_step=0)


def test_progress_lines_clock_starts_at_train_start_from_the_resumed_step(monkeypatch):
    # The clock starts at on_train_start (setup before the first logged step counts; a resume
    # at step 100 counts steps done from 100), not at the first logged step, whose first line
    # used to read "0:00:00 elapsed | ETA 0:00:00".
    now = [1000.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    lines = ProgressLines(max_steps=400, stream=out)
    trainer = SimpleNamespace(callbacks=[object()], global_step=100)
    lines.log_graph(SimpleNamespace(_trainer=trainer))
    lines.log_graph(SimpleNamespace(_trainer=trainer))  # once per trainer
    clocks = [c for c in trainer.callbacks if isinstance(c, progress_mod._TrainClock)]
    assert len(clocks) == 1 and trainer.callbacks[0] is clocks[0]
    clocks[0].on_train_start(trainer, None)
    now[0] += 30.0  # 30 s for the 10 steps 100 -> 110
    lines.log_metrics({"train/loss": 2.0}, step=110)
    line = out.getvalue().strip()
    assert line.endswith("step 110/400 (28%) | loss 2.0000 | 0:00:30 elapsed | ETA 0:14:30"), line


def test_fit_without_a_terminal_prints_a_line_per_logged_step(tmp_path, capsys):
    recipe = load_recipe("demo", tiny_overrides(tmp_path, "lines", **{"train.log_every": 2, "train.max_steps": 6}))
    fit(recipe, progress=False)
    err = capsys.readouterr().err
    steps = [int(m) for m in re.findall(r"\[wbscale\] step (\d+)/6 \(\d+%\) \| loss", err)]
    assert steps == [2, 4, 6], err[-2000:]
    first = next(line for line in err.splitlines() if "[wbscale] step 2/6" in line)
    assert "ETA" in first, first
    elapsed, eta = (sum(int(x) * 60 ** i for i, x in enumerate(reversed(t.split(":"))))
                    for t in re.search(r"(\d+:\d\d:\d\d) elapsed \| ETA (\d+:\d\d:\d\d)", first).groups())
    assert eta <= 2 * elapsed + 1, first  # 4 steps left after 2 done since train start: about 2x elapsed
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
