"""The shipped recipes: each loads, states what it is, has the size its name says, fits the
hardware it names (per the memory estimator), and a few train 2 steps on CPU when shrunk."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from helpers import tiny_overrides

from wbscale.cli import main
from wbscale.config import RECIPES_DIR, ModelConfig, load_recipe
from wbscale.sweep.facts import recipe_facts, recipe_header, recipe_target
from wbscale.train.fit import fit
from wbscale.train.memory import check_recipe

ALL = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
LADDER = sorted(n for n in ALL if re.match(r"(tinystories-|gpt2-|crate-)", n))
# Which GPT-2-scale CRATE recipe has the shape of which GPT-2 one.
PAIRS = {"crate-base": "gpt2-124m", "crate-medium": "gpt2-350m", "crate-large": "gpt2-774m", "crate-xl": "gpt2-1.5b"}
LADDER_SIZES = ("1m", "3m", "8m", "15m", "33m", "42m", "110m")
# Named CRATE variants (docs/ablation.md): each has a twin of every TinyStories-ladder recipe.
VARIANTS = {"crate-rope": {"rope": True}}


def closed_form_params(m: ModelConfig) -> int:
    """Parameter count of the model a ``model:`` section describes (tied head once)."""
    d, V, T, L = m.n_embd, m.vocab_size, m.block_size, m.n_layer
    if m.arch == "gpt2":  # attention 4d^2 + 4d, MLP 8d^2 + 5d, two LayerNorms 4d
        return V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d
    atoms = m.ista_expansion * d if m.ista_variant == "overcomplete" else d
    # LN1 + U + c_proj (weight, bias) + LN2 + dictionary, per layer; ln_f; tied head
    return V * d + T * d + L * (2 * d + d * d + d * d + d + 2 * d + atoms * d) + 2 * d


def size_of(name: str) -> float:
    """'tinystories-gpt2-15m' -> 15e6, 'gpt2-1.5b' -> 1.5e9."""
    number, unit = re.search(r"(\d+(?:\.\d+)?)([mb])$", name).groups()
    return float(number) * (1e6 if unit == "m" else 1e9)


def test_the_ladder_is_complete():
    for size in LADDER_SIZES:
        for arch in ("crate", "gpt2"):
            assert f"tinystories-{arch}-{size}" in ALL, f"missing recipes/tinystories-{arch}-{size}.yaml"
        for variant, options in VARIANTS.items():
            twin, base = load_recipe(f"tinystories-{variant}-{size}"), load_recipe(f"tinystories-crate-{size}")
            # the published recipe with the variant's options and its own run name, nothing else
            assert twin.model == dataclasses.replace(base.model, **options)
            assert twin.to_dict()["data"] == base.to_dict()["data"] and twin.optim == base.optim
            assert (twin.train.max_steps, twin.train.micro_batch_size) == (base.train.max_steps, base.train.micro_batch_size)
    for crate, gpt2 in PAIRS.items():
        assert crate in ALL and gpt2 in ALL, f"missing {crate} or {gpt2}"


@pytest.mark.parametrize("name", ALL)
def test_every_recipe_loads(name):
    recipe = load_recipe(name)
    if name in LADDER:  # its run folder is named after it: runs/<recipe>/
        assert recipe.train.run_name == name, f"{name}: train.run_name is {recipe.train.run_name!r}"


@pytest.mark.parametrize("name", LADDER)
def test_recipe_header_states_what_data_tokens_hardware_and_target(name):
    header = recipe_header(name)
    for entry in ("What it trains:", "Data:", "Tokens:", "Hardware/time:", "Target:", "Pair:"):
        assert entry in header, f"recipes/{name}.yaml: header has no '{entry}' line"
    target, text = recipe_target(name)
    assert text, f"{name}: empty target"
    if target is None:
        assert "record the first run" in text, f"{name}: a recipe without a published target must say so"
    else:
        assert re.search(r"nanoGPT|llama2\.c", text), f"{name}: target {target} does not say where it comes from"


@pytest.mark.parametrize("name", LADDER)
def test_meta_param_count_matches_closed_form_and_name(name):
    recipe = load_recipe(name)
    facts = recipe_facts(recipe)
    m = recipe.model
    vocab = m.vocab_size or (recipe.data.vocab_size + 63) // 64 * 64
    want = closed_form_params(ModelConfig(**{**m.__dict__, "vocab_size": vocab}))
    assert facts.params == want, f"{name}: meta model has {facts.params:,} parameters, the formula {want:,}"
    assert facts.non_embedding_params == want - (vocab + m.block_size) * m.n_embd
    # The size in the name is the GPT-2 model's (and the CRATE pair has the same shape).
    if name.startswith("tinystories-"):
        gpt2 = load_recipe(re.sub(r"-crate(-[a-z]+)?-", "-gpt2-", name))
        size, params = size_of(name), recipe_facts(gpt2).params
        assert abs(params - size) / size < 0.12, f"{gpt2.train.run_name}: {params:,} parameters for a '{size:,.0f}' label"
    if name in PAIRS or name in PAIRS.values():
        gpt2_name = PAIRS.get(name, name)
        gpt2, size = load_recipe(gpt2_name), size_of(gpt2_name)
        assert abs(recipe_facts(gpt2).params - size) / size < 0.05
        other = load_recipe(next(c for c, g in PAIRS.items() if g == gpt2_name))
        assert (other.model.n_layer, other.model.n_head, other.model.n_embd) == (gpt2.model.n_layer, gpt2.model.n_head, gpt2.model.n_embd)


def test_crate_base_has_the_published_82m_size():
    assert 81e6 < recipe_facts(load_recipe("crate-base")).params < 83e6


@pytest.mark.parametrize("name", ALL)
def test_recipe_fits_its_hardware_per_the_memory_estimator(name):
    recipe = load_recipe(name)
    report = check_recipe(recipe, gpu="h100-80gb")
    row = next(r for r in report["rows"] if r["configured"])
    assert report["configured_fits"], (
        f"{name}: {row['strategy']} ({row['offload']}) needs {row['total_gb']:.1f} GB per GPU, "
        f"{report['usable_gb']:.1f} GB usable on an 80 GB GPU"
    )
    assert report["params"] == recipe_facts(recipe).params


@pytest.mark.parametrize("name", sorted(set(PAIRS) | set(PAIRS.values())))
def test_gpt2_scale_recipes_use_deepspeed_on_8_gpu_nodes(name):
    d = load_recipe(name).distributed
    assert (d.strategy, d.accelerator, d.devices) == ("deepspeed", "gpu", 8), f"{name}: {d}"


def test_recipe_target_reads_the_header_entry_and_its_continuation(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("# r: a recipe\n# Target: 1.072 is llama2.c's, not directly\n#   comparable.\n# Pair: x\nmodel: {}\n")
    assert recipe_target(path) == (1.072, "1.072 is llama2.c's, not directly comparable.")
    path.write_text("# Target: none published; record the first run.\nmodel: {}\n")
    assert recipe_target(path) == (None, "none published; record the first run.")
    path.write_text("model: {}\n# Target: 3.0\n")
    assert recipe_target(path) == (None, "")


def test_recipes_list_shows_params_tokens_and_target(capsys):
    assert main(["recipes", "list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert re.search(r"\b124M\b.*\b10\.5B\b.*\b3\.120\b", rows["gpt2-124m"]), rows["gpt2-124m"]
    assert "(1.072)" in rows["tinystories-gpt2-15m"], "a not-comparable reference must be marked"
    assert rows["tinystories-crate-1m"].rstrip().endswith("-")
    assert main(["recipes", "list", "--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(listed) == set(ALL)
    assert listed["crate-base"]["params"] == recipe_facts(load_recipe("crate-base")).params


# ---------------------------------------------------------------------------- 2 steps on CPU


def shrunk(tmp_path: Path, name: str, **extra: object) -> list[str]:
    """A recipe's own settings, shrunk: built-in data, tiny model, 2 steps, one CPU process."""
    return tiny_overrides(
        tmp_path, name,
        **{
            "data.source": "synthetic-stories",
            "data.tokenizer": "bpe",
            "data.hf_config": "null",
            "data.out_dir": str(tmp_path / f"data-{name}"),
            "model.vocab_size": 0,
            "train.max_steps": 2,
            "train.micro_batch_size": 2,
            "train.grad_accum": 1,
            "train.val_every": 2,
            "train.val_batches": 1,
            "train.ckpt_every": 2,
            "train.precision": "32",
            "tracking.metrics_every": 2,
            "tracking.wandb.mode": "disabled",
            "distributed.accelerator": "cpu",
            "distributed.devices": 1,
            "distributed.nodes": 1,
            **extra,
        },
    )


@pytest.mark.parametrize("name", ALL)
def test_every_recipe_shrinks_to_a_valid_cpu_recipe(tmp_path, name):
    recipe = load_recipe(name, shrunk(tmp_path, name))
    assert recipe.model.arch == load_recipe(name).model.arch
    assert recipe_facts(recipe).params < 1e6


@pytest.mark.parametrize("name", ["tinystories-crate-15m", "tinystories-gpt2-15m"])
def test_tinystories_recipe_trains_two_steps_on_cpu(tmp_path, name):
    recipe = load_recipe(name, shrunk(tmp_path, name))
    result = fit(recipe, progress=False)
    assert result.step == 2
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["val_loss"] is not None and summary["val_loss"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["crate-base", "gpt2-124m"])
def test_gpt2_scale_recipe_trains_two_steps_with_its_deepspeed_stage_on_cpu(tmp_path, name):
    """Keeps the recipe's DeepSpeed ZeRO stage (one CPU process, gloo) rather than `auto`."""
    recipe = load_recipe(name, shrunk(tmp_path, name))
    assert recipe.distributed.strategy == "deepspeed"
    result = fit(recipe, progress=False)
    assert result.step == 2
    assert json.loads((result.run_dir / "summary.json").read_text())["val_loss"] is not None
