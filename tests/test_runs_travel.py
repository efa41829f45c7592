"""A run folder travels: moved, and used from another folder, it still evals, generates, exports,
measures (metrics) and is interpreted (interpret collect / report)."""

from __future__ import annotations

import shutil

from helpers import tiny_overrides

from wbscale.cli import main
from wbscale.config import load_recipe
from wbscale.train.fit import fit


def test_a_moved_run_folder_still_works_from_anywhere(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    # relative data and runs folders, as in the shipped recipes
    overrides = tiny_overrides(tmp_path, "travel", **{"data.out_dir": "data/tiny", "train.runs_dir": "runs",
                                                      "train.max_steps": 4, "tracking.wandb.mode": "disabled"})
    fit(load_recipe("demo", overrides), progress=False)
    assert (work / "runs" / "travel" / "tokenizer.json").is_file()
    moved = tmp_path / "elsewhere" / "travel"
    moved.parent.mkdir()
    shutil.move(str(work / "runs" / "travel"), moved)
    other = tmp_path / "other-cwd"
    other.mkdir()
    monkeypatch.chdir(other)
    capsys.readouterr()

    assert main(["generate", "--ckpt", str(moved), "--max-new-tokens", "5", "--prompt", "Once"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["eval", "--ckpt", str(moved), "--batches", "1", "--batch-size", "2"]) == 0  # data by absolute path
    assert '"loss"' in capsys.readouterr().out
    assert main(["ckpt", "export", "--format", "hf", str(moved), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert main(["metrics", "--ckpt", str(moved), "--out", str(tmp_path / "wb"), "--batch-size", "2"]) == 0
    assert (tmp_path / "wb" / "whitebox.json").is_file()
    acts = tmp_path / "acts"
    assert main(["interpret", "collect", "--ckpt", str(moved), "--out", str(acts), "--tokens", "256",
                 "--top-k", "2", "--context", "2", "--batch-size", "2"]) == 0
    assert main(["interpret", "report", str(acts)]) == 0
    assert "<html" in (acts / "report.html").read_text(encoding="utf-8").lower()
    capsys.readouterr()

    # on a machine without the data: eval says to pass --data, and --data works
    shutil.move(str(work / "data"), tmp_path / "data-copy")
    assert main(["eval", "--ckpt", str(moved)]) == 2
    assert "pass --data DIR" in capsys.readouterr().err
    for cmd in (["metrics", "--ckpt", str(moved)], ["interpret", "collect", "--ckpt", str(moved), "--out", str(acts)]):
        assert main(cmd) == 2, cmd
        assert "pass --data DIR" in capsys.readouterr().err, cmd
    assert main(["eval", "--ckpt", str(moved), "--data", str(tmp_path / "data-copy" / "tiny"), "--batches", "1",
                 "--batch-size", "2"]) == 0
    assert main(["generate", "--ckpt", str(moved), "--max-new-tokens", "3"]) == 0  # the run carries its tokenizer
