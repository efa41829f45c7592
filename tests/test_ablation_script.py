"""bench/shakespeare_ablation.sh: the points ONLY selects, each one a valid `sweep run`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "shakespeare_ablation.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_only_selects_whole_configurations_and_single_points(tmp_path):
    log = tmp_path / "calls.txt"
    # the real CLI for `sweep run` (with --dry-run: it parses and validates every override);
    # `data prepare` and `sweep report` are only recorded (no Tiny Shakespeare in a CI clone)
    wrapper = tmp_path / "wbscale"
    wrapper.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {log}\n'
        'if [[ $1 == sweep && $2 == run ]]; then\n'
        f'  exec {sys.executable} -m wbscale.cli "$@" --dry-run\n'
        "fi\n"
    )
    wrapper.chmod(0o755)
    env = {**os.environ, "WBSCALE": str(wrapper), "ONLY": "gpt2-rope,crate-rope-6L@2e-3", "SEEDS": "2",
           "ROOT": str(tmp_path / "runs"), "OUT": str(tmp_path / "report"), "JOBS": "1"}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    calls = log.read_text().splitlines()
    runs = [c for c in calls if c.startswith("sweep run")]
    assert len(runs) == 3, calls
    assert any("--name crate-rope-6L-lr2e-3" in c and "model.rope=true" in c and "model.n_layer=6" in c for c in runs)
    assert sorted(c.split("--name ")[1].split()[0] for c in runs) == [
        "crate-rope-6L-lr2e-3", "gpt2-rope-lr4e-3", "gpt2-rope-lr8e-3"]
    assert calls[0].startswith("data prepare shakespeare-char-crate")
    assert calls[-1] == f"sweep report {tmp_path / 'runs' / 'all'} --out {tmp_path / 'report'}"
