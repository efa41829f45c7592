"""``wbscale doctor``: one OK/WARN/FAIL line per capability; exit 0 unless something required
is broken; runs on a CPU-only machine without network."""

from __future__ import annotations

import contextlib
import io
import json
from collections import namedtuple

import pytest

from wbscale import doctor
from wbscale.cli import main

EXPECTED = ("python", "torch", "packages", "gpu", "bf16", "nccl", "triton", "deepspeed", "slurm", "wandb", "disk", "host")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One full doctor run through the CLI (it starts two probe processes: ~10 s)."""
    runs = tmp_path_factory.mktemp("doctor") / "runs"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["doctor", "--json", "--runs-dir", str(runs)])
    return code, json.loads(out.getvalue())


def test_doctor_passes_on_this_machine_with_one_line_per_check(report):
    code, data = report
    assert code == 0 == data["exit_code"], [c for c in data["checks"] if c["status"] == "FAIL"]
    names = [c["name"] for c in data["checks"]]
    for name in EXPECTED:
        assert name in names, f"doctor has no '{name}' line: {names}"
    assert all(c["status"] in ("OK", "WARN", "FAIL") and c["detail"] for c in data["checks"])


def test_doctor_on_cpu_names_the_cpu_paths(report):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    checks = {c["name"]: c for c in report[1]["checks"]}
    assert checks["gpu"]["status"] == "WARN" and "CPU training only" in checks["gpu"]["detail"]
    assert checks["triton"]["status"] == "OK" and "interpreter" in checks["triton"]["detail"], checks["triton"]
    assert "gloo" in checks["nccl"]["detail"]


def test_text_output_ends_with_the_verdict():
    checks = [doctor.Check("OK", "python", "3.11"), doctor.Check("WARN", "gpu", "none")]
    text = doctor.format_checks(checks)
    assert text.splitlines()[0].startswith("OK    python")
    assert text.splitlines()[-1] == "1 OK, 1 WARN, 0 FAIL: ready"
    assert doctor.exit_code(checks) == 0
    checks.append(doctor.Check("FAIL", "disk", "full"))
    assert doctor.exit_code(checks) == 1
    assert doctor.format_checks(checks).endswith("NOT ready: fix the FAIL lines")


def test_a_full_disk_fails_and_a_small_one_warns(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda p: usage(100e9, 99.5e9, 0.5e9))
    assert doctor.check_disk(tmp_path / "runs").status == "FAIL"
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda p: usage(100e9, 95e9, 5e9))
    check = doctor.check_disk(tmp_path / "runs")
    assert check.status == "WARN" and "5.0 GB free" in check.detail


def test_wandb_state_is_read_locally_and_the_key_never_printed(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert doctor.check_wandb().status == "WARN"
    secret = "0123456789abcdef" * 2
    (tmp_path / "netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {secret}\n")
    check = doctor.check_wandb()
    assert check.status == "OK" and secret not in check.detail
    monkeypatch.setenv("WANDB_API_KEY", secret)
    check = doctor.check_wandb()
    assert check.status == "OK" and "WANDB_API_KEY" in check.detail and secret not in check.detail
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert "offline" in doctor.check_wandb().detail


def test_missing_slurm_commands_warn_not_fail(monkeypatch):
    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)
    check = doctor.check_slurm()
    assert check.status == "WARN" and "not a login node" in check.detail
