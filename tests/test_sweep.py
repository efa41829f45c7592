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
    monkeypatch.setattr("wbscale.data.prepare.prepare", lambda cfg, progress=True, **kw: None)
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
    monkeypatch.setattr("wbscale.data.prepare.prepare", lambda cfg, progress=True, **kw: None)
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


def test_slurm_dry_run_renders_one_job_array_for_the_sweep(tmp_path):
    """(Was: one job per point.) The grid is ONE job array; task i trains point i's folder."""
    fixed, axes = parse_grid(["model.n_layer=1,2"], arch="crate,gpt2")
    spec = SweepSpec("demo", fixed, axes, name="grid", out=str(tmp_path / "sw"))
    result = run_sweep(spec, slurm=JobOptions(time="01:00:00"), dry_run=True, max_concurrent=2)
    (script,) = result.scripts
    lines = script.splitlines()
    points_file = tmp_path / "sw" / "slurm" / "points.txt"
    for line in [
        "#SBATCH --job-name=wbscale-sweep-grid",
        "#SBATCH --time=01:00:00",
        "#SBATCH --array=0-3%2",
        f"#SBATCH --output={tmp_path / 'sw'}/slurm/job-%A_%a.out",
        f'WBSCALE_TASK_RUN_DIR=$(sed -n "$(( SLURM_ARRAY_TASK_ID + 1 ))p" {points_file})',
        'export WBSCALE_SLURM_RUN_DIR="$WBSCALE_TASK_RUN_DIR"',
    ]:
        assert line in lines, f"missing line {line!r} in:\n{script}"
    assert '-m wbscale.cli fit "$WBSCALE_TASK_RUN_DIR/recipe.yaml" --resume auto --no-progress &' in script
    assert '-m wbscale.cli slurm record start "$WBSCALE_TASK_RUN_DIR"' in script
    assert "train.run_name=" not in script, "each task trains its own saved recipe, not an override"
    assert not (tmp_path / "sw").exists(), "a dry run must not write anything"
    with pytest.raises(UserError, match="use it with --slurm"):
        run_sweep(spec, dry_run=True, max_concurrent=2)


def test_the_points_of_one_array_must_share_the_job_resources(tmp_path):
    fixed, axes = parse_grid(["distributed.devices=1,2"])
    spec = SweepSpec("demo", fixed, axes, out=str(tmp_path / "sw"))
    with pytest.raises(UserError, match="must share distributed.devices"):
        run_sweep(spec, slurm=JobOptions(), dry_run=True)


def test_array_spec_compresses_task_lists():
    from wbscale.slurm.submit import array_spec

    assert array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert array_spec([3], max_concurrent=4) == "3%4"


def test_slurm_submit_array_without_sbatch_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    args = ["sweep", "run", "demo", "--set", "model.n_layer=1,2", "--out", str(tmp_path / "sw"), "--slurm"]
    assert main(args) == 2
    assert "'sbatch' not found on PATH" in capsys.readouterr().err
    assert not (tmp_path / "sw" / "crate-L1" / "recipe.yaml").exists()


# ---------------------------------------------------------------------------- end to end


def test_cpu_sweep_of_crate_and_gpt2_produces_report_and_plot(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "demo", "--arch", "crate,gpt2", "--name", "tiny", "--out", str(out), "--no-progress"]
    fixed = [o for o in tiny_fixed(tmp_path) if not o.startswith("tracking.metrics_every=")]
    for item in [*fixed, "tracking.metrics_every=2"]:
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
        metrics = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        speeds = sorted(m["train/tokens_per_second"] for m in metrics if m.get("train/tokens_per_second"))
        assert row["tokens_per_s"] == (speeds[len(speeds) // 2] if speeds else None)
        white = [m for m in metrics if any(k.endswith("/sparsity") and "/layer" in k for k in m)]
        assert white, f"{name}: no white-box rows at metrics_every=2"
        assert row["sparsity_layers"] == [white[-1][f"whitebox/layer{i}/sparsity"] for i in range(2)]
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


# ---------------------------------------------------------------------------- seeds, per-arch LR


def test_seeds_and_per_arch_learning_rates_make_named_points_with_min_lr_following(tmp_path):
    from wbscale.sweep.grid import parse_scoped

    plain, scoped = parse_scoped([], ["crate=1e-3,2e-3", "gpt2=5e-4"])
    fixed, axes = parse_grid(plain, arch="crate,gpt2")
    spec = SweepSpec("demo", fixed, axes, out=str(tmp_path / "sw"), seeds=2, scoped=scoped)
    points = spec.points()
    assert [p.name for p in points] == [
        "crate-lr1e-3-s0", "crate-lr1e-3-s1", "crate-lr2e-3-s0", "crate-lr2e-3-s1", "gpt2-s0", "gpt2-s1",
    ]
    recipes = {p.name: load_recipe("demo", p.overrides) for p in points}
    base_seed = load_recipe("demo").train.seed
    r = recipes["crate-lr2e-3-s1"]
    assert (r.model.arch, r.optim.max_lr, r.optim.min_lr, r.train.seed) == ("crate", 2e-3, 2e-4, base_seed + 1)
    r = recipes["gpt2-s0"]
    assert (r.model.arch, r.optim.max_lr, r.optim.min_lr, r.train.seed) == ("gpt2", 5e-4, 5e-5, base_seed)
    assert r.run_dir == tmp_path / "sw" / "gpt2-s0"
    assert "--set crate:optim.max_lr=1e-3,2e-3 --set gpt2:optim.max_lr=5e-4 --seeds 2" in spec.command()
    # an explicit min_lr wins; a plain --lr axis is --set optim.max_lr
    plain, scoped = parse_scoped(["optim.min_lr=1e-5"], ["1e-3,3e-3"])
    fixed, axes = parse_grid(plain)
    spec = SweepSpec("demo", fixed, axes, out=str(tmp_path / "sw2"))
    assert [(p.name, load_recipe("demo", p.overrides).optim.min_lr) for p in spec.points()] == [
        ("crate-lr1e-3", 1e-5), ("crate-lr3e-3", 1e-5),
    ]
    # seeds alone are an axis
    spec = SweepSpec("demo", [], [], out=str(tmp_path / "sw3"), seeds=3)
    assert [p.name for p in spec.points()] == ["crate-s0", "crate-s1", "crate-s2"]


@pytest.mark.parametrize("sets, lrs, seeds, match", [
    (["crate:optim.max_lr=1e-3,2e-3"], [], None, None),
    (["gpt2:optim.max_lr=1e-3,2e-3"], [], None, "no gpt2 points"),
    (["crate:optim.max_lr=1e-3,2e-3", "optim.max_lr=1e-3"], [], None, "both set optim.max_lr"),
    (["train.seed=1,2"], [], 3, "--seeds and --set train.seed"),
    (["crate:data.vocab_size=300,400"], [], None, "cannot be set per architecture"),
    ([], ["=1e-3"], None, "expected ARCH=V1,V2"),
    (["crate:optim.max_lr=1e-3,1e-3"], [], None, "repeated value"),
    (["model.n_layer=1,2"], [], 0, "give 1 or more"),
])
def test_scoped_settings_and_seeds_are_checked(tmp_path, sets, lrs, seeds, match):
    from wbscale.sweep.grid import parse_scoped

    def build():
        plain, scoped = parse_scoped(sets, lrs)
        fixed, axes = parse_grid(plain)
        return SweepSpec("demo", fixed, axes, out=str(tmp_path), seeds=seeds, scoped=scoped)

    if match is None:
        assert len(build().points()) == 2
    else:
        with pytest.raises(UserError, match=match):
            build()


def fabricate(out: Path, name: str, loss: float, **sets: object) -> None:
    """A finished run folder (recipe.yaml + summary.json) without training."""
    from wbscale.config import save_recipe

    overrides = [f"{k}={v}" for k, v in sets.items()]
    recipe = load_recipe("demo", [*overrides, f"train.run_name={name}", f"train.runs_dir={out}", "model.vocab_size=128",
                                  "train.max_steps=10"])
    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, recipe.run_dir / "recipe.yaml")
    (recipe.run_dir / "summary.json").write_text(json.dumps({"step": 10, "val_loss": loss}))


def test_report_takes_each_architectures_best_lr_mean_over_seeds(tmp_path):
    losses = {("gpt2", 1e-3): [2.0, 2.1, 2.2], ("gpt2", 2e-3): [1.9, 2.0, 2.1],
              ("crate", 1e-3): [2.3, 2.4, 2.5], ("crate", 2e-3): [2.5, 2.6, 2.7]}
    for (arch, lr), values in losses.items():
        for i, loss in enumerate(values):
            fabricate(tmp_path, f"{arch}-lr{lr:g}-s{i}", loss, **{"model.arch": arch, "optim.max_lr": lr,
                      "optim.min_lr": lr / 10, "train.seed": 1337 + i})
    fabricate(tmp_path, "crate-x2-s0", 2.6, **{"model.ista_expansion": 2, "optim.max_lr": 1e-3, "optim.min_lr": 1e-4})
    report = sweep_report(tmp_path)
    configs = {(c["variant"], c["lr"]): c for c in report["configurations"]}
    assert set(configs) == {("GPT-2", 1e-3), ("GPT-2", 2e-3), ("CRATE (ista_expansion=4)", 1e-3),
                            ("CRATE (ista_expansion=4)", 2e-3), ("CRATE (ista_expansion=2)", 1e-3)}
    best = configs[("GPT-2", 2e-3)]
    assert best["best_lr"] and best["lr_at_edge"] and not configs[("GPT-2", 1e-3)]["best_lr"]
    assert best["n"] == 3 and best["val_loss_mean"] == pytest.approx(2.0) and best["val_loss_std"] == pytest.approx(0.1)
    assert configs[("CRATE (ista_expansion=2)", 1e-3)]["needs_seeds"]
    pairs = {p["variant"]: p for p in report["equal_shape"]}
    crate = pairs["CRATE (ista_expansion=4)"]
    assert (crate["crate_lr"], crate["gpt2_lr"]) == (1e-3, 2e-3)
    assert crate["delta"] == pytest.approx(0.4) and crate["delta_se"] == pytest.approx((0.02 / 3) ** 0.5)
    assert crate["verdict"] == "GPT-2 lower"
    assert pairs["CRATE (ista_expansion=2)"]["verdict"] == "needs 3 seeds"
    text = (tmp_path / "scaling.md").read_text()
    assert "| GPT-2 | 4L-128d-4h | 10 | 0.002 | 3 | 2.000 ± 0.100 (3) |" in text
    assert "needs 3 seeds" in text and "## At equal non-embedding parameters" in text


def test_equal_params_and_compute_interpolate_in_log_space_or_say_nearest(tmp_path):
    import math

    fabricate(tmp_path, "gpt2", 2.0, **{"model.arch": "gpt2"})
    for width, loss in ((160, 2.3), (192, 2.1)):
        fabricate(tmp_path, f"crate-d{width}", loss, **{"model.n_embd": width})
    report = sweep_report(tmp_path)
    runs = {r["run"]: r for r in report["runs"]}
    (at_params,) = report["equal_params"]
    x, a, b = (float(runs[n]["non_embedding_params"]) for n in ("gpt2", "crate-d160", "crate-d192"))
    assert a < x < b
    t = (math.log(x) - math.log(a)) / (math.log(b) - math.log(a))
    assert at_params["crate_val_loss"] == pytest.approx(2.3 + t * (2.1 - 2.3))
    assert at_params["method"].startswith("interpolated in log-parameters between 4L-160d-4h")
    (at_compute,) = report["equal_compute"]  # GPT-2's FLOPs are below both CRATE points
    assert at_compute["method"].startswith("nearest: 4L-160d-4h") and at_compute["crate_val_loss"] == 2.3
    assert report["equal_shape"] == []  # no CRATE at GPT-2's shape


def test_cpu_sweep_with_seeds_and_per_arch_lrs_reports_mean_and_std(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "run", "demo", "--arch", "crate,gpt2", "--lr", "crate=2e-3,4e-3", "--lr", "gpt2=1e-3,2e-3",
            "--seeds", "3", "--name", "lr", "--out", str(out), "--no-progress"]
    fixed = [o for o in tiny_fixed(tmp_path) if not o.startswith(("train.max_steps", "train.val_every", "train.ckpt_every",
                                                                  "train.log_every", "model.", "tracking.metrics_every"))]
    for item in [*fixed, "train.max_steps=6", "train.val_every=6", "train.ckpt_every=6", "train.log_every=6",
                 "tracking.metrics_every=0", "model.n_layer=1",
                 "model.n_embd=16", "model.n_head=2", "model.block_size=16"]:
        args += ["--set", item]
    assert main(args) == 0
    capsys.readouterr()
    runs = sorted(p.name for p in out.iterdir() if (p / "recipe.yaml").is_file())
    assert len(runs) == 12 and "crate-lr4e-3-s2" in runs and "gpt2-lr1e-3-s0" in runs
    seeds = {load_recipe(str(out / r / "recipe.yaml")).train.seed for r in runs if r.startswith("gpt2-lr1e-3")}
    assert len(seeds) == 3
    r = load_recipe(str(out / "crate-lr4e-3-s1" / "recipe.yaml"))
    assert (r.optim.max_lr, r.optim.min_lr) == (4e-3, 4e-4)

    assert main(["sweep", "report", str(out)]) == 0
    report = json.loads((out / "scaling.json").read_text())
    configs = report["configurations"]
    assert len(configs) == 4 and all(c["n"] == 3 and c["val_loss_std"] is not None for c in configs)
    for arch in ("crate", "gpt2"):
        mine = [c for c in configs if c["arch"] == arch]
        assert [c["best_lr"] for c in mine].count(True) == 1
        best = next(c for c in mine if c["best_lr"])
        assert best["val_loss_mean"] == min(c["val_loss_mean"] for c in mine)
    (pair,) = report["equal_shape"]
    assert pair["crate_seeds"] == pair["gpt2_seeds"] == 3 and pair["verdict"] != "needs 3 seeds"
    assert "--seeds 3" in (out / "scaling.md").read_text()
