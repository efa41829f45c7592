"""A missing optional extra is named, with the pip command, instead of an ImportError."""

from __future__ import annotations

import importlib.util

import pytest

from wbscale.config import load_recipe
from wbscale.errors import UserError


@pytest.fixture
def without(monkeypatch):
    def hide(*names: str) -> None:
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))

    return hide


def test_deepspeed_strategy_without_deepspeed_names_the_extra(without):
    from wbscale.train.strategy import build_strategy

    without("deepspeed")
    recipe = load_recipe("demo", ["distributed.strategy=deepspeed"])
    with pytest.raises(UserError, match=r"pip install 'wbscale\[deepspeed\]'"):
        build_strategy(recipe, "cpu")


def test_hf_source_without_datasets_names_the_extra(without, tmp_path):
    from wbscale.data.prepare import prepare

    without("datasets")
    recipe = load_recipe("demo", ["data.source=hf:roneneldan/TinyStories", f"data.out_dir={tmp_path / 'd'}"])
    with pytest.raises(UserError, match=r"pip install 'wbscale\[hf\]'"):
        prepare(recipe.data, progress=False)


def test_tracking_without_wandb_logs_to_jsonl_and_says_so(without, tmp_path, capsys):
    from wbscale.track.wandb_run import make_wandb_logger

    without("wandb")
    recipe = load_recipe("demo", ["tracking.wandb.mode=offline"])
    assert make_wandb_logger(recipe, tmp_path, rank=0) is None
    assert "pip install 'wbscale[wandb]'" in capsys.readouterr().err


def test_parquet_source_without_pyarrow_names_the_extra(without, tmp_path):
    from wbscale.data.prepare import prepare

    (tmp_path / "docs.parquet").write_bytes(b"PAR1")  # never read: the extra is checked first
    without("pyarrow")
    recipe = load_recipe("demo", [f"data.source={tmp_path / 'docs.parquet'}", f"data.out_dir={tmp_path / 'd'}"])
    with pytest.raises(UserError, match=r"parquet.*'pyarrow'.*pip install 'wbscale\[hf\]'"):
        prepare(recipe.data, progress=False)


def test_wbscale_imports_and_crate_runs_without_triton():
    # Triton is a Linux-only dependency, imported lazily for the CUDA kernels: a machine
    # without it (macOS, a CPU-only install) imports wbscale and runs CRATE on the eager path.
    import subprocess
    import sys

    code = "\n".join([
        "import sys",
        "sys.modules['triton'] = None  # import triton raises ImportError",
        "import torch",
        "import wbscale, wbscale.cli",
        "from wbscale.config import ModelConfig",
        "from wbscale.models import build_model",
        "m = build_model(ModelConfig(arch='crate', n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64))",
        "x = torch.randint(0, 64, (2, 16))",
        "with torch.no_grad():",
        "    logits = m.eval()(x)[0]",
        "assert logits.shape == (2, 16, 64) and torch.isfinite(logits).all(), logits.shape",
        "assert sys.modules['triton'] is None",
        "print('ok')",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
