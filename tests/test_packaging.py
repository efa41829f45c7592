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


def _requires_dist(wheel: Path) -> list:
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as zf:
        (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        text = zf.read(meta).decode()
    return [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines() if line.startswith("Requires-Dist:")]


def _extra(req) -> str | None:
    """The extra a Requires-Dist line belongs to (None: a core dependency)."""
    for extra in ("deepspeed", "hf", "wandb", "eval", "completion", "all", "dev"):
        if req.marker is not None and req.marker.evaluate({"extra": extra, "platform_system": "Linux"}) \
                and not req.marker.evaluate({"extra": "", "platform_system": "Linux"}):
            return extra
    return None


def test_wheel_declares_core_dependencies_extras_and_a_linux_only_triton(wheel):
    import importlib.metadata

    from packaging.utils import canonicalize_name

    reqs = _requires_dist(wheel)
    by_extra: dict[str | None, dict[str, object]] = {}
    for req in reqs:
        by_extra.setdefault(_extra(req), {})[canonicalize_name(req.name)] = req
    core = by_extra[None]
    assert {"torch", "lightning", "tokenizers", "safetensors", "huggingface-hub", "tqdm", "pyyaml", "matplotlib",
            "numpy", "triton"} <= set(core), sorted(core)
    assert all(core[name].marker is None for name in core if name != "triton")
    triton = core["triton"].marker  # imported lazily for the CUDA kernels: pip install works on macOS
    assert triton is not None and triton.evaluate({"platform_system": "Linux", "extra": ""})
    assert not triton.evaluate({"platform_system": "Darwin", "extra": ""})
    assert not triton.evaluate({"platform_system": "Windows", "extra": ""})
    assert set(by_extra["deepspeed"]) == {"deepspeed"}
    assert set(by_extra["wandb"]) == {"wandb"}
    assert set(by_extra["hf"]) == {"datasets", "pyarrow", "transformers"}
    assert set(by_extra["eval"]) == {"lm-eval"}
    assert set(by_extra["completion"]) == {"shtab"}
    (everything,) = by_extra["all"].values()
    assert canonicalize_name(everything.name) == "wbscale" and everything.extras == {"deepspeed", "eval", "hf", "wandb", "completion"}
    assert "<" in str(core["lightning"].specifier)  # wbscale overrides private Lightning hooks
    # the floors are ones CI proves: what this environment installed satisfies every declared range
    for extra, named in by_extra.items():
        for name, req in named.items():
            if name == "wbscale":
                continue
            try:
                installed = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue  # e.g. triton on a CPU-only machine
            assert req.specifier.contains(installed, prereleases=True), f"[{extra}] {req}: {installed} installed"


def test_docs_use_hf_download_not_the_removed_huggingface_cli():
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "recipes").rglob("*.yaml")]
    stale = [str(f.relative_to(ROOT)) for f in files if "huggingface-cli" in f.read_text(encoding="utf-8")]
    assert not stale, f"huggingface_hub >= 1.0 has no huggingface-cli (use `hf download`): {stale}"


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
