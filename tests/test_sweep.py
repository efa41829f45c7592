"""``wbscale sweep``: grid parsing and naming, sweep.json bookkeeping, SLURM dry runs, and a
real two-point CRATE-vs-GPT-2 sweep on CPU read back into a report with its plot."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import tiny_overrides

from wbscale.cli import main
from wbscale.config import load_recipe
from wbscale.errors import UserError
from wbscale.slurm.site import JobOptions
from wbscale.sweep.grid import (
    SWEEP_FILE,
    SweepSpec,
    parse_grid,
    run_sweep,
    split_values,
)
from wbscale.sweep.report import sweep_report


def tiny_fixed(tmp_path: Path) -> list[str]:
    """Everything but the axes: a 2-step tiny run on built-in data, no wandb."""
    keep = {"model.", "data.", "optim.", "tracking.metrics_every"}
    items = [
        o for o in tiny_overrides(tmp_path)
        if any(o.startswith(k) for k in keep)
    ]
    return items + [
        "train.max_steps=2", "train.micro_batch_size=2", "train.grad_accum=1", "train.val_every=2",
        "train.val_batches=1", "train.ckpt_every=2", "train.log_every=1", "train.sample_max_new_tokens=0",
        "tracking.wandb.mode=disabled",
    ]


# ---------------------------------------------------------------------------- grid


def test_split_values_keeps_lists_and_quoted_commas_whole():
    assert split_values("2,4, 8") == ["2", "4", "8"]
    assert split_values("[1, 2],[3]") == ["[1, 2]", "[3]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]


def test_single_values_are_fixed_and_lists_are_axes_arch_first():
    fixed, axes = parse_grid(["model.n_layer=2,4", "optim.max_lr=1e-3", "model.n_embd=32,64"], arch="crate,gpt2")
    assert fixed == ["optim.max_lr=1e-3"]
    assert axes == [("model.arch", ["crate", "gpt2"]), ("model.n_layer", ["2", "4"]), ("model.n_embd", ["32", "64"])]


@pytest.mark.parametrize("sets, match", [
    (["model.n_layer"], "expected KEY=VALUE"),
    (["model.n_layer=2,,4"], "empty value"),
    (["model.n_layer=2,2"], "listed twice"),
    (["model.n_layer=2,4", "model.n_layer=8"], "given twice"),
])
def test_bad_grids_are_refused_with_the_reason(sets, match):
    with pytest.raises(UserError, match=match):
        parse_grid(sets)


def test_a_sweep_without_an_axis_is_refused(tmp_path):
    with pytest.raises(UserError, match="at least one axis"):
        SweepSpec("demo", ["model.n_layer=2"], [], out=str(tmp_path))


def test_points_are_the_product_named_after_their_values(tmp_path):
    fixed, axes = parse_grid(["model.n_layer=1,2", "model.n_embd=32,64"], arch="crate,gpt2")
    spec = SweepSpec("demo", fixed, axes, name="grid", out=str(tmp_path / "sw"))
    points = spec.points()
    assert [p.name for p in points] == [
        "crate-L1-d32", "crate-L1-d64", "crate-L2-d32", "crate-L2-d64",
        "gpt2-L1-d32", "gpt2-L1-d64", "gpt2-L2-d32", "gpt2-L2-d64",
    ]
    last = load_recipe("demo", points[-1].overrides)
    assert (last.model.arch, last.model.n_layer, last.model.n_embd) == ("gpt2", 2, 64)
    assert last.run_dir == tmp_path / "sw" / "gpt2-L2-d64"
    assert spec.command() == (
        f"wbscale sweep demo --arch crate,gpt2 --set model.n_layer=1,2 --set model.n_embd=32,64 --name grid --out {tmp_path / 'sw'}"
    )


def test_a_data_axis_gives_each_data_config_its_own_folder(tmp_path):
    fixed, axes = parse_grid(["data.vocab_size=300,400"])
    spec = SweepSpec("demo", fixed, axes, out=str(tmp_path))
    dirs = {load_recipe("demo", p.overrides).data.out_dir for p in spec.points()}
    assert dirs == {"data/synthetic-stories-V300", "data/synthetic-stories-V400"}


def test_an_invalid_point_fails_before_anything_runs(tmp_path):
    fixed, axes = parse_grid(["model.n_embd=32,30", "model.n_head=4"])
    spec = SweepSpec("demo", fixed, axes, out=str(tmp_path / "sw"))
    calls = []
    with pytest.raises(UserError, match=r"sweep point 'crate-d30'.*divisible"):
        run_sweep(spec, fit_fn=lambda *a, **k: calls.append(a), progress=False)
    assert not calls and not (tmp_path / "sw").exists()


# ---------------------------------------------------------------------------- bookkeeping


def fake_fit(fail: set[str]):
    calls = []

    def fit_fn(recipe, resume, progress):
        calls.append(recipe.train.run_name)
        if recipe.train.run_name in fail:
            raise RuntimeError("out of memory")
        recipe.run_dir.mkdir(parents=True, exist_ok=True)
        (recipe.run_dir / "summary.json").write_text(json.dumps({"step": 2, "val_loss": 1.0 + recipe.model.n_layer}))
        return SimpleNamespace(already_complete=False)

    return fit_fn, calls


def test_a_failed_point_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr("wbscale.data.prepare.prepare", lambda cfg, progress=True: None)
    fixed, axes = parse_grid(["model.n_layer=1,2,3"])
    spec = SweepSpec("demo", fixed, axes, out=str(tmp_path / "sw"))
    fit_fn, calls = fake_fit({"crate-L2"})
    result = run_sweep(spec, fit_fn=fit_fn, progress=False)
    assert calls == ["crate-L1", "crate-L2", "crate-L3"]
    assert result.failed == ["crate-L2"]
    state = json.loads((tmp_path / "sw" / SWEEP_FILE).read_text())
    assert [p["status"] for p in state["points"]] == ["done", "failed", "done"]
    assert state["points"][1]["error"] == "RuntimeError: out of memory"
    assert state["points"][2]["val_loss"] == 4.0
    assert state["command"] == spec.command() and state["environment"]["torch"]


def test_rerunning_keeps_the_record_and_another_grid_needs_another_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("wbscale.data.prepare.prepare", lambda cfg, progress=True: None)
    fixed, axes = parse_grid(["model.n_layer=1,2"])
    out = str(tmp_path / "sw")
    run_sweep(SweepSpec("demo", fixed, axes, out=out), fit_fn=fake_fit(set())[0], progress=False)
    first = json.loads((tmp_path / "sw" / SWEEP_FILE).read_text())
    run_sweep(SweepSpec("demo", fixed, axes, out=out), fit_fn=fake_fit(set())[0], progress=False)
    again = json.loads((tmp_path / "sw" / SWEEP_FILE).read_text())
    assert again["created"] == first["created"]
    other_fixed, other_axes = parse_grid(["model.n_layer=1,4"])
    with pytest.raises(UserError, match="holds another sweep"):
        run_sweep(SweepSpec("demo", other_fixed, other_axes, out=out), fit_fn=fake_fit(set())[0], progress=False)


def test_slurm_dry_run_renders_one_job_per_point(tmp_path):
    fixed, axes = parse_grid(["model.n_layer=1,2"], arch="crate,gpt2")
    spec = SweepSpec("demo", fixed, axes, out=str(tmp_path / "sw"))
    result = run_sweep(spec, slurm=JobOptions(time="01:00:00"), dry_run=True)
    assert len(result.scripts) == 4
    for point, script in zip(spec.points(), result.scripts, strict=True):
        assert f"#SBATCH --job-name=wbscale-{point.name}" in script
        assert "#SBATCH --time=01:00:00" in script
    assert not (tmp_path / "sw").exists(), "a dry run must not write anything"


# ---------------------------------------------------------------------------- end to end


def test_cpu_sweep_of_crate_and_gpt2_produces_report_and_plot(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "demo", "--arch", "crate,gpt2", "--name", "tiny", "--out", str(out), "--no-progress"]
    for item in tiny_fixed(tmp_path):
        args += ["--set", item]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "crate: done (val loss" in printed and "gpt2: done (val loss" in printed

    report_dir = tmp_path / "report"
    assert main(["sweep", "report", str(out), "--out", str(report_dir)]) == 0
    png, md, js = (report_dir / f"scaling.{ext}" for ext in ("png", "md", "json"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    report = json.loads(js.read_text())
    runs = {r["run"]: r for r in report["runs"]}
    assert set(runs) == {"crate", "gpt2"}
    for name, row in runs.items():
        summary = json.loads((out / name / "summary.json").read_text())
        assert row["val_loss"] == summary["val_loss"] and row["status"] == "done"
        assert row["tokens"] == 2 * 2 * 32 and row["compute_flops"] == row["flops_per_token"] * row["tokens"]
    assert runs["crate"]["non_embedding_params"] < runs["gpt2"]["non_embedding_params"]
    (pair,) = report["equal_shape"]
    assert pair["delta"] == pytest.approx(runs["crate"]["val_loss"] - runs["gpt2"]["val_loss"])
    text = md.read_text()
    assert "| crate | CRATE |" in text and "| gpt2 | GPT-2 |" in text
    assert "wbscale sweep demo --arch crate,gpt2" in text, "the report must say how to reproduce it"
    assert "## CRATE vs GPT-2 at equal shape" in text


def test_report_of_a_folder_without_runs_says_so(tmp_path):
    with pytest.raises(UserError, match="no run folders"):
        sweep_report(tmp_path)
