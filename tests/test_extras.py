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
