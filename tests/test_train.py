"""Training end to end on CPU: smoke run, exact resume, checkpoint safety, eval/generate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import assert_same_train_losses, losses, tiny_overrides

from wbscale.ckpt.format import latest_checkpoint, list_checkpoints
from wbscale.config import load_recipe
from wbscale.errors import UserError
from wbscale.train.fit import fit


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory) -> Path:
    """Prepared once for the module; tests copy runs, not data."""
    return tmp_path_factory.mktemp("shared")


def test_smoke_run_writes_the_run_folder(shared_data):
    recipe = load_recipe("demo", tiny_overrides(shared_data, "smoke"))
    result = fit(recipe, progress=False)
    run = result.run_dir
    assert result.step == 8
    assert (run / "recipe.yaml").is_file()
    assert (run / "metrics.jsonl").is_file()
    assert (run / "samples.jsonl").is_file()
    assert (run / "plots" / "loss_curve.png").is_file()
    assert (run / "summary.json").is_file()
    ckpts = list_checkpoints(run)
    assert [c.step for c in ckpts] == [4, 8]
    assert latest_checkpoint(run).step == 8
    assert list((run / "wandb").glob("offline-run-*")), "no offline wandb run written"
    rows = losses(run)
    assert rows[8]["val/loss"] < rows[1]["train/loss"]


def test_rerun_of_a_complete_run_says_so(shared_data, capsys):
    recipe = load_recipe("demo", tiny_overrides(shared_data, "smoke"))
    result = fit(recipe, progress=False)
    assert result.already_complete
    assert "is complete" in capsys.readouterr().err


def test_resume_reproduces_uninterrupted_loss(shared_data):
    full = fit(load_recipe("demo", tiny_overrides(shared_data, "full")), progress=False)
    part = load_recipe("demo", tiny_overrides(shared_data, "parts", **{"train.exit_interval": 4}))
    first = fit(part, progress=False)
    assert first.step == 4
    second = fit(part, resume="auto", progress=False)
    assert second.resumed_from == 4 and second.step == 8
    a, b = losses(full.run_dir), losses(second.run_dir)
    assert_same_train_losses(a, b, range(1, 9))
    for step in (4, 8):
        assert a[step]["val/loss"] == b[step]["val/loss"]
    steps = [json.loads(line)["step"] for line in (second.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps), "metrics file has rewound steps after resume"


def test_resume_with_dropout_reproduces_uninterrupted_loss(shared_data):
    """The same exact resume with dropout on: every RNG training draws from is restored."""
    drop = {"model.dropout": 0.1}
    full = fit(load_recipe("demo", tiny_overrides(shared_data, "full-dropout", **drop)), progress=False)
    part = load_recipe("demo", tiny_overrides(shared_data, "parts-dropout", **{**drop, "train.exit_interval": 4}))
    first = fit(part, progress=False)
    assert first.step == 4
    second = fit(part, resume="auto", progress=False)
    assert second.resumed_from == 4 and second.step == 8
    a, b = losses(full.run_dir), losses(second.run_dir)
    assert_same_train_losses(a, b, range(1, 9))
    for step in (4, 8):
        assert a[step]["val/loss"] == b[step]["val/loss"]
    pairs = [(json.loads(line)["step"], key) for line in (second.run_dir / "metrics.jsonl").read_text().splitlines()
             for key in json.loads(line) if key != "step"]
    assert len(pairs) == len(set(pairs)), "a metric logged twice for one step after resume"


def test_resume_refuses_another_model_config(shared_data):
    src = shared_data / "runs" / "smoke"
    dst = shared_data / "runs" / "othermodel"
    shutil.copytree(src, dst, dirs_exist_ok=True)
    recipe = load_recipe(
        "demo", tiny_overrides(shared_data, "othermodel", **{"model.n_embd": 64, "train.max_steps": 12})
    )
    with pytest.raises(UserError, match=r"another model config \(model.n_embd: checkpoint 32 vs recipe 64"):
        fit(recipe, progress=False)


def test_resume_never_refuses_existing_checkpoints(shared_data):
    recipe = load_recipe("demo", tiny_overrides(shared_data, "smoke"))
    with pytest.raises(UserError, match="already has checkpoints"):
        fit(recipe, resume="never", progress=False)


def test_half_written_checkpoint_is_never_last(shared_data):
    run = shared_data / "runs" / "smoke"
    # A crash mid-save leaves a temp folder; it is ignored and `last` still names step 8.
    stray = run / "checkpoints" / ".tmp-step-00000012"
    stray.mkdir()
    (stray / "model.ckpt").write_bytes(b"partial")
    assert latest_checkpoint(run).step == 8
    # A `last` pointer to a folder without metadata falls back to the newest complete one.
    (run / "checkpoints" / "last").write_text("step-00000099\n")
    assert latest_checkpoint(run).step == 8
    shutil.rmtree(stray)
    (run / "checkpoints" / "last").write_text("step-00000008\n")


def test_eval_and_generate_from_checkpoint(shared_data, capsys):
    from wbscale.cli import main

    ckpt = shared_data / "runs" / "smoke"
    assert main(["eval", "--ckpt", str(ckpt), "--batches", "2", "--batch-size", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["loss"] > 0 and out["perplexity"] > 1
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "Once upon", "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Once upon")


def test_cli_user_errors_exit_2(shared_data, capsys, tmp_path):
    from wbscale.cli import main

    assert main(["fit", "--recipe", "demo", "--set", "optim.lr_max=1"]) == 2
    assert "did you mean 'optim.max_lr'" in capsys.readouterr().err
    assert main(["eval", "--ckpt", str(tmp_path / "nope")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert main(["fit", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_metrics_command_writes_json_and_plots(shared_data, capsys):
    from wbscale.cli import main

    ckpt = shared_data / "runs" / "smoke"
    out = shared_data / "wb"
    assert main(["metrics", "--ckpt", str(ckpt), "--out", str(out), "--batch-size", "2"]) == 0
    result = json.loads((out / "whitebox.json").read_text())
    metrics = result["metrics"]
    assert 0.0 < metrics["whitebox/layer0/sparsity"] <= 1.0
    assert metrics["whitebox/layer1/coding_rate"] > 0
    assert (out / "whitebox_layers.png").is_file()


def test_import_published_crate_lm_then_generate(shared_data, tmp_path, capsys):
    """A nanoGPT-style published checkpoint imports and runs through the CLI."""
    import torch

    from wbscale.cli import main
    from wbscale.config import ModelConfig
    from wbscale.models import build_model

    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=320)
    torch.manual_seed(0)
    model = build_model(cfg)
    published = {
        "model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()},
        "model_args": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 320,
                       "bias": True, "dropout": 0.0},
    }
    torch.save(published, tmp_path / "ckpt.pt")
    out = tmp_path / "imported"
    tokenizer = shared_data / "data" / "tokenizer.json"
    assert main(["ckpt", "import", "--format", "crate-lm", str(tmp_path / "ckpt.pt"), "--out", str(out),
                 "--tokenizer", str(tokenizer)]) == 0
    # normal permissions (safetensors alone writes 0600): consolidate and the BIMT export share this writer
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        "model.safetensors": 0o644, "recipe.yaml": 0o644, "tokenizer.json": 0o644}
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(out), "--prompt", "The", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("The")
    assert main(["eval", "--ckpt", str(out), "--data", str(shared_data / "data"), "--batches", "1",
                 "--batch-size", "2"]) == 0
    assert main(["ckpt", "import", "--format", "crate-lm", str(tmp_path / "nothing.pt"), "--out", str(out)]) == 2


def test_bench_train_compares_architectures_in_one_run(shared_data, tmp_path, capsys):
    from wbscale.cli import main

    sets = [a for o in tiny_overrides(shared_data, "bench") for a in ("--set", o)]
    out = tmp_path / "bench"
    assert main(["bench", "train", "demo", "--arch", "crate,gpt2", "--steps", "3", "--warmup", "1",
                 "--out", str(out), *sets]) == 0
    printed = capsys.readouterr().out
    assert "tokens/s ratio" in printed
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert sorted(r["model"].split()[0] for r in reports) == ["crate", "gpt2"]
    assert all(r["tokens_per_second"] > 0 for r in reports)
