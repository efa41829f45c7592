"""The kernels on the GPU image's Triton (3.6): interpreter numerics and the sm_90 compile.

The GPU image ships triton 3.6 while this environment has a newer one, so a side virtualenv
gets triton==3.6.0 (and numpy < 2.3: triton 3.6's interpreter fails on numpy 2.4) on top
of this environment's packages, plus wbscale from a wheel of this tree, and runs the kernel
tests that matter there: fp32 forward/backward against the reference, every save mode with
split epilogues and split-K, and the ahead-of-time sm_90 compile.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRITON = "triton==3.6.0"


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:6])} … exited {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


@pytest.mark.slow
def test_kernels_pass_under_triton_3_6(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("triton wheels exist for Linux only")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], 120)
    py = venv / "bin" / "python"
    try:
        _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", TRITON, "numpy<2.3"], 900)
    except AssertionError as err:
        if "No matching distribution" in str(err) or "Could not find" in str(err):
            pytest.skip(f"{TRITON} cannot be installed here: {str(err)[-300:]}")
        raise
    wheels = tmp_path / "wheel"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)], 600)
    (wheel,) = wheels.glob("wbscale-*.whl")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)], 300)
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, pytest, …
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("PYTHONPATH", None)
    version = _run([str(py), "-c", "import triton, wbscale.kernels as k; print(triton.__version__, k.__file__)"],
                   120, env=env, cwd=tmp_path).stdout
    assert version.startswith("3.6.0") and str(ROOT) not in version, version
    kernel_tests = ROOT / "tests" / "test_kernels.py"
    tests = [f"{kernel_tests}::{name}" for name in (
        "test_fp32_forward_backward_and_code_match_reference",
        "test_every_save_mode_matches_reference_with_split_epilogue_and_split_k",
        "test_relaxed_atomics_are_used_where_triton_supports_them",
        "test_kernels_compile_for_gpu_without_a_gpu",
    )]
    # From a folder outside the checkout: `python -m` puts the working folder on sys.path,
    # and the checkout's wbscale/ (without kernels/ mapped into it) must not shadow the wheel.
    out = _run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *tests],
               1500, env=env, cwd=tmp_path)
    assert " passed" in out.stdout and "failed" not in out.stdout, out.stdout[-2000:]
