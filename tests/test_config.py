"""Recipes: loading, overrides, validation, clear errors."""

from __future__ import annotations

import pytest

from wbscale.config import RECIPES_DIR, Recipe, load_recipe, recipe_from_dict
from wbscale.errors import UserError


def test_every_shipped_recipe_loads():
    paths = sorted(RECIPES_DIR.glob("*.yaml"))
    assert paths, "no recipes shipped"
    for path in paths:
        assert isinstance(load_recipe(str(path)), Recipe)


def test_recipe_by_name_and_overrides():
    r = load_recipe("demo", ["optim.max_lr=3e-4", "model.n_layer=2", "train.sample_prompts=[a, b]"])
    assert r.optim.max_lr == pytest.approx(3e-4)
    assert r.model.n_layer == 2
    assert r.train.sample_prompts == ["a", "b"]


def test_unknown_key_suggests_close_match():
    with pytest.raises(UserError, match=r"unknown key 'optim.lr_max' — did you mean 'optim.max_lr'\?"):
        recipe_from_dict({"optim": {"lr_max": 1e-3}})


def test_unknown_section_is_refused():
    with pytest.raises(UserError, match="unknown key 'modle'.*did you mean 'model'"):
        recipe_from_dict({"modle": {}})


def test_bad_override_syntax():
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        recipe_from_dict({}, ["optim.max_lr"])


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": {"n_embd": 100, "n_head": 3}}, "divisible by model.n_head"),
        ({"model": {"arch": "crate2"}}, "not one of 'crate', 'gpt2'.*did you mean 'crate'"),
        ({"model": {"n_layer": "four"}}, "model.n_layer: expected an integer"),
        ({"optim": {"max_lr": -1}}, "optim.max_lr must be > 0"),
        ({"data": {"val_fraction": 0.9}}, r"data.val_fraction must be in \(0, 0.5\)"),
        ({"distributed": {"zero_stage": 4}}, "zero_stage must be 1, 2 or 3"),
        ({"train": {"run_name": "a/b"}}, "train.run_name must be a plain name"),
    ],
)
def test_bad_values_name_the_field(data, message):
    with pytest.raises(UserError, match=message):
        recipe_from_dict(data)


def test_missing_recipe_lists_known_ones():
    with pytest.raises(UserError, match="recipe 'dmo' not found.*did you mean 'demo'"):
        load_recipe("dmo")


def test_yaml_round_trip(tmp_path):
    r = load_recipe("demo", ["train.max_steps=7"])
    path = tmp_path / "r.yaml"
    path.write_text(r.to_yaml())
    assert load_recipe(str(path)) == r


# ---------------------------------------------------------------------------- --set text values


@pytest.mark.parametrize(
    "override, section, key, want",
    [
        ("data.separator=\n", "data", "separator", "\n"),  # --set data.separator=$'\n'
        (r"data.separator=\n\n", "data", "separator", "\n\n"),  # --set 'data.separator=\n\n'
        ('data.separator="\\n\\n"', "data", "separator", "\n\n"),  # a YAML double-quoted string
        (r"data.separator=\t\\x", "data", "separator", "\t\\x"),
        ("data.separator=<|endoftext|>", "data", "separator", "<|endoftext|>"),
        ("slurm.preemption=on", "slurm", "preemption", "on"),  # YAML would read a boolean
        ("slurm.preemption=off", "slurm", "preemption", "off"),
        ("train.run_name=123", "train", "run_name", "123"),
        ("train.run_name=yes", "train", "run_name", "yes"),
        ("data.hf_config=null", "data", "hf_config", None),
        ("data.hf_config=~", "data", "hf_config", None),
        ("data.hf_config=en", "data", "hf_config", "en"),
        (r"data.source=C:\data\x.txt", "data", "source", r"C:\data\x.txt"),  # unknown escapes stay
        ("train.precision=32", "train", "precision", "32"),
        ("data.split=position", "data", "split", "position"),
    ],
)
def test_set_gives_text_fields_the_text_as_typed(override, section, key, want):
    r = load_recipe("demo", [override])
    assert getattr(getattr(r, section), key) == want


def test_set_keeps_yaml_for_numbers_lists_and_null():
    r = load_recipe("demo", ["optim.max_lr=3e-4", "train.sample_prompts=[a, b]", "data.max_documents=null",
                             "train.compile=true"])
    assert (r.optim.max_lr, r.train.sample_prompts, r.data.max_documents, r.train.compile) == (3e-4, ["a", "b"], None, True)
    assert load_recipe("demo", ["tracking.wandb.tags=on"]).tracking.wandb.tags == ["on"]  # one item of a text list


def test_on_off_in_a_recipe_file_mean_the_words_for_a_choice():
    assert recipe_from_dict({"slurm": {"preemption": True}}).slurm.preemption == "on"
    assert recipe_from_dict({"slurm": {"preemption": False}}).slurm.preemption == "off"


def test_an_empty_separator_in_a_recipe_file_says_how_to_quote_it():
    with pytest.raises(UserError, match=r"data.separator: expected a string, got nothing.*quote it"):
        recipe_from_dict({"data": {"separator": None}})


def test_char_tokenizer_does_not_use_data_vocab_size():
    assert load_recipe("demo", ["data.tokenizer=char"]).data.tokenizer == "char"
    with pytest.raises(UserError, match="data.vocab_size .65. is not used with data.tokenizer: char"):
        load_recipe("demo", ["data.tokenizer=char", "data.vocab_size=65"])
