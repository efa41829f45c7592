"""Bad input: exit status 2, one line that names what is wrong, no traceback, nothing written.

One table over every bad-input case the CLI has been tried with (issue 17's list); the
checkpoint-damage cases are in tests/test_faults_ckpt.py, the data ones in
tests/test_faults_data.py. Each case runs the real ``wbscale`` entry point in a fresh
working folder, which must be unchanged afterwards (apart from the case's own inputs).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from wbscale.cli import main
from wbscale.config import ModelConfig, Recipe


def _export(root: Path) -> Path:
    """A tiny inference folder (no training needed) for the eval/generate cases."""
    from wbscale.ckpt.load import export_folder
    from wbscale.models import build_model

    cfg = ModelConfig(arch="crate", n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64, ista_kernel="eager")
    return export_folder(build_model(cfg), dataclasses.replace(Recipe(), model=cfg), root / "export")


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the case is a machine without a CUDA GPU")

# (id, argv (EXPORT = a tiny export folder, FILE = a file, BIN = a binary file), what the line must say)
CASES = [
    ("empty-recipe", ["fit", "empty.yaml"], "the recipe is empty"),
    ("non-utf8-recipe", ["fit", "latin1.yaml"], "not UTF-8"),
    ("recipe-not-a-mapping", ["fit", "list.yaml"], "a recipe is a YAML mapping"),
    ("unknown-recipe", ["fit", "no-such-recipe"], "not found"),
    ("no-recipe", ["fit"], "needs a RECIPE"),
    ("unknown-key", ["fit", "demo", "--set", "optim.lr_max=1e-3"], "did you mean 'optim.max_lr'"),
    ("bad-type", ["fit", "demo", "--set", "train.max_steps=many"], "train.max_steps"),
    ("negative-eps", ["fit", "demo", "--set", "optim.eps=-1e-8"], "optim.eps must be > 0"),
    ("negative-sample-top-k", ["fit", "demo", "--set", "train.sample_top_k=-1"], "train.sample_top_k must be >= 0"),
    ("runs-dir-is-a-file", ["fit", "demo", "--set", "train.runs_dir=FILE"], "is a file, not a folder"),
    pytest.param("gpu-without-gpu", ["fit", "demo", "--set", "distributed.accelerator=gpu"], "no usable CUDA GPU",
                 marks=NO_CUDA),
    pytest.param("triton-on-cpu", ["fit", "demo", "--set", "model.ista_kernel=triton"], "triton needs a CUDA GPU",
                 marks=NO_CUDA),
    ("unknown-command", ["fitt", "demo"], "invalid choice"),
    ("eval-batch-size-negative", ["eval", "--ckpt", "EXPORT", "--batch-size", "-1"], "--batch-size: must be >= 1"),
    ("eval-batch-size-zero", ["eval", "--ckpt", "EXPORT", "--batch-size", "0"], "--batch-size: must be >= 1"),
    ("eval-batches-zero", ["eval", "--ckpt", "EXPORT", "--batches", "0"], "--batches: must be >= 1"),
    ("eval-missing-ckpt", ["eval", "--ckpt", "nowhere"], "no such checkpoint"),
    pytest.param("device-missing", ["eval", "--ckpt", "EXPORT", "--device", "cuda:7"], "cuda:7", marks=NO_CUDA),
    ("device-nonsense", ["eval", "--ckpt", "EXPORT", "--device", "tpu-ish"], "not a device"),
    ("generate-top-k-negative", ["generate", "--ckpt", "EXPORT", "--top-k", "-1"], "top-k"),
    ("generate-max-new-tokens-negative", ["generate", "--ckpt", "EXPORT", "--max-new-tokens", "-5"], "max-new-tokens"),
    ("generate-num-samples-negative", ["generate", "--ckpt", "EXPORT", "--num-samples", "-1"], "num-samples"),
    ("generate-top-p-out-of-range", ["generate", "--ckpt", "EXPORT", "--top-p", "1.5"], "top-p"),
    ("generate-binary-tokenizer", ["generate", "--ckpt", "EXPORT", "--tokenizer", "BIN"], "tokenizer"),
    ("generate-no-tokenizer", ["generate", "--ckpt", "EXPORT"], "tokenizer"),
    ("inspect-not-a-checkpoint", ["ckpt", "inspect", "FILE"], "not"),
    ("recipes-check-unknown-gpu", ["recipes", "check", "demo", "--gpu", "h1000"], "--gpu 'h1000' is not known"),
    ("slurm-bad-array", ["slurm", "submit", "demo", "--array", "zero-to-three", "--dry-run"], "--array"),
    ("slurm-bad-time", ["slurm", "submit", "demo", "--time", "tomorrow", "--dry-run"], "time"),
]


@pytest.mark.parametrize(("case", "argv", "says"), [pytest.param(*c, id=c[0]) if type(c) is tuple else c
                                                     for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, argv, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "latin1.yaml").write_bytes("model:\n  arch: crate # caf\xe9\n".encode("latin-1"))
    (tmp_path / "list.yaml").write_text("- model\n- data\n")
    (tmp_path / "FILE").write_text("just a file\n")
    (tmp_path / "BIN").write_bytes(bytes(range(256)) * 4)
    if "EXPORT" in argv:
        _export(tmp_path)
    before = _files(tmp_path)
    argv = [str(tmp_path / "export") if a == "EXPORT" else str(tmp_path / a) if a in ("FILE", "BIN") else
            a.replace("=FILE", f"={tmp_path / 'FILE'}") for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[wbscale] ")]
    assert code == 2, f"{case}: exit {code}, stderr:\n{err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"{case}: expected one error line, got:\n{err}"
    assert says in lines[0], f"{case}: {lines[0]!r} does not say {says!r}"
    assert _files(tmp_path) == before, f"{case}: wrote {sorted(_files(tmp_path) - before)}"


@pytest.mark.parametrize("override", ["slurm.preemption=on", "slurm.preemption=off", "data.separator=\\n\\n"])
def test_valid_string_values_given_with_set_are_taken_as_strings(override, capsys):
    assert main(["recipes", "show", "demo", "--set", override]) == 0
    shown = capsys.readouterr().out
    key, value = override.split("=", 1)
    assert f"{key.split('.')[1]}: " in shown
