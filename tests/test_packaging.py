"""A wheel built from this tree works outside the checkout: recipes, job scripts, training.

The wheel is installed into a fresh virtualenv that sees the test environment's
dependencies (torch, lightning, …) but not the editable checkout, and every command runs
from a folder outside the repository.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} exited {out.returncode}\nstdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
         cwd=out)
    (found,) = out.glob("wbscale-*.whl")
    return found


def test_every_subpackage_is_listed_in_pyproject():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "wbscale").rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject.toml (a wheel would not ship them): {sorted(found - listed)}"


def test_wheel_ships_recipes_job_templates_and_license(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "wbscale/recipes/demo.yaml" in names
    assert "wbscale/sbatch/single_node.sbatch" in names and "wbscale/sbatch/multi_node.sbatch" in names
    assert "wbscale/kernels/ista_triton.py" in names
    assert any(n.endswith("licenses/LICENSE") for n in names), names[-10:]


@pytest.mark.slow
def test_installed_wheel_runs_the_demo_recipe_from_any_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)], cwd=tmp_path)
    # The dependencies come from this environment's site-packages, read as a plain path
    # (its .pth files, among them the editable checkout's, are not processed there).
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="2")
    wbscale = str(venv / "bin" / "wbscale")

    where = _run([str(py), "-c", "import wbscale, wbscale.config as c; print(wbscale.__file__); print(c.RECIPES_DIR)"],
                 cwd=elsewhere, env=env).stdout
    assert str(ROOT) not in where, f"the wheel's wbscale must be imported, not the checkout's:\n{where}"

    shown = _run([wbscale, "recipes", "show", "demo"], cwd=elsewhere, env=env).stdout
    assert "run_name: demo" in shown
    script = _run([wbscale, "slurm", "submit", "demo", "--dry-run"], cwd=elsewhere, env=env).stdout
    assert script.startswith("#!/bin/bash") and "wbscale.cli fit" in script
    _run([wbscale, "fit", "demo", "--no-progress",
          "--set", "train.max_steps=5", "--set", "train.val_every=5", "--set", "train.ckpt_every=5",
          "--set", "train.log_every=1", "--set", "data.synthetic_documents=300", "--set", "data.vocab_size=300",
          "--set", "train.sample_max_new_tokens=0", "--set", "tracking.metrics_every=0",
          "--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.n_head=2",
          "--set", "model.block_size=32", "--set", "train.micro_batch_size=4"],
         cwd=elsewhere, env=env)
    assert (elsewhere / "runs" / "demo" / "checkpoints" / "last").is_file()
    assert (elsewhere / "runs" / "demo" / "summary.json").is_file()
