"""CRATE block options (docs/architecture.md, "CRATE block options"): each off by default.

Defaults must stay the published CRATE LM bit for bit; each option must change what it says
and nothing else; parameter and FLOP counts, checkpoints, white-box metrics, the interpret
readout and BIMT must all follow. Eager kernel throughout (tests/test_kernels_options.py
checks the fused Triton path against the same reference).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import losses, tiny_overrides
from wbscale.kernels import reference

import wbscale.models.crate as crate_module
from wbscale.bimt.geometry import lm_geometry
from wbscale.bimt.swaps import apply_permutation
from wbscale.config import ModelConfig, load_recipe, recipe_from_dict
from wbscale.errors import UserError
from wbscale.interpret.readout import unit_directions
from wbscale.models import CRATE
from wbscale.models.base import load_checked
from wbscale.models.crate import ista_steps, nondefault_options, uses_general_block
from wbscale.track.whitebox import whitebox_metrics

TINY = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=50, ista_kernel="eager")
PUBLISHED = dict(ista_residual=False, ista_decoder="tied", ista_learn_lambda=False, ista_learn_eta=False,
                 ista_steps=None, ista_init_scale=None)
ALL_ON = dict(ista_residual=True, ista_decoder="separate", ista_learn_lambda=True, ista_learn_eta=True,
              ista_steps=3, ista_init_scale=0.02)
OPTIONS = {
    "residual": dict(ista_residual=True),
    "separate": dict(ista_decoder="separate"),
    "learn_lambda": dict(ista_learn_lambda=True),
    "learn_eta": dict(ista_learn_eta=True),
    "steps1": dict(ista_steps=1),
    "steps3": dict(ista_steps=3),
    "init_scale": dict(ista_init_scale=0.02),
    "rope": dict(rope=True),
    "all": ALL_ON,
    "square_all": dict(ista_variant="square", ista_residual=True, ista_learn_lambda=True,
                       ista_learn_eta=True, ista_steps=2, ista_init_scale=0.05),
}


def cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


def make(seed: int = 0, **kw) -> CRATE:
    torch.manual_seed(seed)
    return CRATE(cfg(**kw)).eval()


def tokens(b: int = 2, t: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50, (b, t), generator=torch.Generator().manual_seed(seed))


def perturbed(model: CRATE, scale: float = 0.05, seed: int = 3) -> CRATE:
    """Random non-trivial values everywhere (biases, norms, a spread of lambdas)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


# ---------------------------------------------------------------------------- defaults


def test_defaults_are_the_published_model_bit_for_bit(monkeypatch):
    # Every option spelled out at its published value builds the same weights and logits.
    default, explicit = make(), make(**{**PUBLISHED, "ista_steps": 2})
    assert not uses_general_block(default.config) and not uses_general_block(explicit.config)
    assert nondefault_options(default.config) == [] and nondefault_options(explicit.config) == []
    sd, sd2 = default.state_dict(), explicit.state_dict()
    assert list(sd) == list(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    idx = tokens()
    assert torch.equal(default(idx)[0], explicit(idx)[0])
    # today's parameter names, nothing more (one layer shown; the others alike)
    names = [n for n, _ in default.named_parameters() if n.startswith("transformer.h.0.")]
    assert names == [f"transformer.h.0.{n}" for n in (
        "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_proj.weight", "attn.c_proj.bias",
        "ln_2.weight", "ln_2.bias", "ista.dictionary")]
    # the published kernel runs, never the general one
    general_calls = []
    monkeypatch.setattr(crate_module, "ista_general", lambda *a, **k: general_calls.append(k))
    default(idx)
    assert general_calls == []
    # pinned from the commit before the options (torch 2.x CPU RNG): tiny model, seed 0
    logits = default(idx)[0].double()
    assert abs(logits.sum().item() - 14.171997019300761) < 1e-4
    assert abs(logits.abs().sum().item() - 79.44691191815218) < 1e-4


@pytest.mark.parametrize("variant", ["overcomplete", "square"])
def test_general_block_at_published_values_is_the_published_block_bit_for_bit(variant):
    g = torch.Generator().manual_seed(0)
    d = 16
    m = 4 * d if variant == "overcomplete" else d
    x = torch.randn(3, 5, d, generator=g)
    w = torch.randn(m, d, generator=g) / d**0.5
    published = getattr(reference, f"ista_{variant}_reference")(x, w, 0.1, 0.1, True)
    general = reference.ista_general_reference(x, w, 0.1, 0.1, True, variant=variant)
    assert torch.equal(published[0], general[0]) and torch.equal(published[1], general[1])
    model = make(ista_variant=variant)
    forced = copy.deepcopy(model)
    for block in forced.transformer.h:
        block.ista.general = True
    idx = tokens()
    assert torch.equal(model(idx)[0], forced(idx)[0])


# ---------------------------------------------------------------------------- each option


def ista_out(model: CRATE, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return model.transformer.h[layer].ista(x, return_code=True)


def test_residual_adds_the_block_input_and_changes_no_weight():
    base, res = make(), make(ista_residual=True)
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), res.state_dict().values(), strict=True))
    x = torch.randn(2, 5, 16)
    for model, residual in ((base, False), (res, True)):
        block = model.transformer.h[0]
        h = x + block.attn(block.ln_1(x))[0]
        want = block.ista(block.ln_2(h)) + (h if residual else 0)
        torch.testing.assert_close(block(x), want, atol=0, rtol=0)
    assert not torch.allclose(base(tokens())[0], res(tokens())[0])


def test_separate_decoder_starts_as_the_tied_model_then_decouples():
    tied, sep = make(), make(ista_decoder="separate")
    ista = sep.transformer.h[0].ista
    assert ista.decoder is not None and ista.decoder.shape == ista.dictionary.shape
    assert torch.equal(ista.decoder, ista.dictionary) and ista.decoder.data_ptr() != ista.dictionary.data_ptr()
    idx, tgt = tokens(), tokens(seed=2)
    torch.testing.assert_close(sep(idx)[0], tied(idx)[0], atol=1e-6, rtol=0)
    sep.train()
    sep(idx, tgt)[1].backward()
    assert ista.decoder.grad is not None and not torch.equal(ista.decoder.grad, ista.dictionary.grad)
    # the output is decoded through W_out, the steps through W
    x = torch.randn(7, 16)
    with torch.no_grad():
        ista.decoder.mul_(2.0)
    y, z = ista_out(sep, 0, x)
    want_y, want_z = reference.ista_general_reference(x, ista.dictionary, 0.1, 0.1, True, decoder=ista.decoder)
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(z, want_z)
    torch.testing.assert_close(y, z @ ista.decoder)


def test_residual_with_separate_decoder_scales_the_decoder_like_c_proj():
    model = make(seed=1, n_layer=4, n_embd=64, ista_residual=True, ista_decoder="separate")
    for block in model.transformer.h:
        std = block.ista.decoder.std().item()
        assert abs(std - 0.02 / math.sqrt(8)) < 0.1 * 0.02 / math.sqrt(8), std
        # the encoder keeps the published kaiming-uniform init (bound sqrt(6 / d))
        assert block.ista.dictionary.abs().max().item() <= math.sqrt(6 / 64) + 1e-6


def test_learned_lambda_and_eta_start_at_the_recipe_values_and_get_gradients():
    base, learn = make(), make(ista_learn_lambda=True, ista_learn_eta=True, ista_lambda=0.1, ista_eta=0.1)
    ista = learn.transformer.h[0].ista
    assert ista.atom_lambda.shape == (64,) and torch.all(ista.atom_lambda == 0.1)
    assert ista.log_eta.shape == (1,) and abs(ista.log_eta.exp().item() - 0.1) < 1e-7
    idx, tgt = tokens(), tokens(seed=2)
    torch.testing.assert_close(learn(idx)[0], base(idx)[0], atol=1e-6, rtol=0)
    learn.train()
    learn(idx, tgt)[1].backward()
    assert ista.atom_lambda.grad.abs().sum() > 0 and ista.log_eta.grad.abs().sum() > 0
    # per atom: a larger lambda on one atom silences exactly that atom more
    x = torch.randn(9, 16)
    with torch.no_grad():
        ista.atom_lambda[3] = 100.0
    _, z = ista_out(learn, 0, x)
    assert torch.all(z[:, 3] == 0)


@pytest.mark.parametrize("variant, steps", [("overcomplete", 1), ("overcomplete", 3), ("square", 2)])
def test_steps_runs_k_ista_iterations(variant, steps):
    model = make(ista_variant=variant, ista_steps=steps)
    assert ista_steps(model.config) == steps and model.transformer.h[0].ista.steps == steps
    x = torch.randn(2, 5, 16)
    ista = model.transformer.h[0].ista
    y, z = ista_out(model, 0, x)
    w = ista.dictionary
    # written out step by step (docs/architecture.md)
    if variant == "overcomplete":
        code = torch.relu(0.1 * x @ w.t() - 0.01)
        for _ in range(steps - 1):
            code = torch.relu(code + 0.1 * (x - code @ w) @ w.t() - 0.01)
        want = code @ w
    else:
        code = x
        for _ in range(steps):
            code = torch.relu(code + 0.1 * (x - code @ w.t()) @ w - 0.01)
        want = code
    torch.testing.assert_close(z, code, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-5)


def test_init_scale_draws_the_dictionary_from_a_normal():
    model = make(n_embd=64, ista_init_scale=0.02)
    w = model.transformer.h[0].ista.dictionary
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert w.abs().max().item() > 0.05  # a normal, not a uniform of bound ~0.035
    assert not uses_general_block(model.config)  # init only: the published kernel runs


# ---------------------------------------------------------------------------- counts


def closed_form_params(c: ModelConfig) -> int:
    d, V, T, L = c.n_embd, c.vocab_size, c.block_size, c.n_layer
    m = c.ista_expansion * d if c.ista_variant == "overcomplete" else d
    ista = m * d
    ista += m * d if c.ista_decoder == "separate" else 0
    ista += m if c.ista_learn_lambda else 0
    ista += 1 if c.ista_learn_eta else 0
    return V * d + T * d + L * (2 * d + 2 * d * d + d + 2 * d + ista) + 2 * d


@pytest.mark.parametrize("name", list(OPTIONS))
def test_param_and_flop_counts(name):
    model = make(**OPTIONS[name])
    c = model.config
    assert model.num_params(non_embedding=False) == closed_form_params(c)
    assert model.num_params() == closed_form_params(c) - c.block_size * c.n_embd
    d, L, T = c.n_embd, c.n_layer, c.block_size
    m = c.ista_expansion * d if c.ista_variant == "overcomplete" else d
    k = ista_steps(c)
    # 2 K dictionary GEMMs per block (encodings, reconstructions, the one decoder GEMM)
    assert model.gemm_macs_per_layer() == 2 * d * d + 2 * k * d * m
    assert model.flops_per_token(T) == 6 * (L * (2 * d * d + 2 * k * d * m) + d * c.vocab_size) + 12 * L * d * T


def test_published_flops_are_unchanged():
    over, square = make(), make(ista_variant="square")
    d, m = 16, 64
    assert over.gemm_macs_per_layer() == 2 * d * d + 4 * d * m
    assert square.gemm_macs_per_layer() == 2 * d * d + 2 * d * d


def test_learned_lambda_and_eta_are_not_weight_decayed_the_decoder_is():
    model = make(**ALL_ON)
    decay, no_decay = model.configure_param_groups(0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "transformer.h.0.ista.decoder" in decayed and "transformer.h.0.ista.dictionary" in decayed
    assert {"transformer.h.0.ista.atom_lambda", "transformer.h.1.ista.log_eta"} <= kept
    assert len(decayed) + len(kept) == len(list(model.parameters()))


# ---------------------------------------------------------------------------- MSSA rope


def test_rotary_scores_depend_on_relative_position_only():
    from wbscale.models.base import rotary

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)
    scores = [float((rotary(q, i) * rotary(k, j)).sum()) for i, j in ((3, 1), (9, 7), (40, 38))]
    assert scores == pytest.approx([scores[0]] * 3, abs=1e-5)
    assert float((rotary(q, 0) * rotary(k, 0)).sum()) == pytest.approx(float((q * k).sum()), abs=1e-6)
    torch.testing.assert_close(rotary(q, 5).norm(), q.norm())  # a rotation: norms kept


def test_rope_rotates_mssa_query_and_key_copies_and_keeps_the_value():
    from wbscale.models.base import rotary

    rope = perturbed(make(rope=True))
    published = make(rope=False)
    published.load_state_dict(rope.state_dict())  # same weights: rope adds no parameter
    attn = rope.transformer.h[0].attn
    x = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(4))
    out, w = attn(x)
    q = k = rotary(w)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(w.size(-1))
    scores = scores.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ w).transpose(1, 2).reshape(2, 10, 16)  # the value is W_k itself
    torch.testing.assert_close(out, attn.c_proj(y), atol=1e-5, rtol=1e-5)
    published_out, published_w = published.transformer.h[0].attn(x)
    assert torch.equal(w, published_w)  # the recorded head projections are unrotated
    assert not torch.allclose(out, published_out)


# ---------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", ["all", "square_all"])
def test_state_dict_round_trip(name, tmp_path):
    model = perturbed(make(**OPTIONS[name]))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    fresh = make(seed=5, **OPTIONS[name])
    load_checked(fresh, torch.load(tmp_path / "w.pt", weights_only=True), tmp_path / "w.pt")
    idx = tokens()
    assert torch.equal(model(idx)[0], fresh(idx)[0])
    # a published-shape model refuses it, naming the option parameters
    with pytest.raises(UserError, match=r"unexpected keys: .*ista\.(atom_lambda|decoder|log_eta)"):
        load_checked(make(), model.state_dict(), "w.pt")


def test_published_import_config_has_every_option_off(tmp_path):
    from wbscale.models.published import load_published_crate

    model = make()
    sd = {k.replace("ln_1", "prenorm_1").replace("ln_2", "prenorm_2").replace("ista.dictionary", "ista.weight"): v
          for k, v in model.state_dict().items()}
    torch.save({"model": sd, "model_args": {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 16,
                                            "vocab_size": 50}}, tmp_path / "ckpt.pt")
    loaded = load_published_crate(tmp_path / "ckpt.pt", ista_kernel="eager")
    loaded = loaded[0] if isinstance(loaded, tuple) else loaded
    assert nondefault_options(loaded.config) == []
    assert torch.equal(loaded.eval()(tokens())[0], model(tokens())[0])


# ---------------------------------------------------------------------------- white box, interpret


@pytest.mark.parametrize("name", ["all", "square_all", "steps1"])
def test_white_box_records_the_last_code_and_metrics_run(name):
    model = perturbed(make(**OPTIONS[name]))
    idx = tokens()
    out = model.white_box_forward(idx)
    c = model.config
    m = c.ista_expansion * c.n_embd if c.ista_variant == "overcomplete" else c.n_embd
    assert [z.shape for z in out["sparse_code"]] == [(2, 12, m)] * c.n_layer
    # the recorded code is the block's z_K, and the logits are unchanged by recording
    block, x = model.transformer.h[0], model.transformer.wte(idx) + model.transformer.wpe(torch.arange(12))
    h = x + block.attn(block.ln_1(x))[0]
    _, z = block.ista(block.ln_2(h), return_code=True)
    torch.testing.assert_close(out["sparse_code"][0], z)
    metrics = whitebox_metrics(model, idx)
    assert 0 <= metrics["whitebox/mean/sparsity"] <= 1 and "whitebox/layer1/coding_rate" in metrics
    if c.ista_learn_lambda:
        lam = model.transformer.h[1].ista.atom_lambda
        assert metrics["whitebox/layer1/lambda_mean"] == pytest.approx(lam.mean().item(), rel=1e-6)
        assert metrics["whitebox/layer1/lambda_min"] == pytest.approx(lam.min().item(), rel=1e-6)
    if c.ista_learn_eta:
        eta = model.transformer.h[0].ista.log_eta.exp().item()
        assert metrics["whitebox/layer0/eta"] == pytest.approx(eta, rel=1e-6)


def test_readout_uses_the_decoder_when_separate():
    tied, sep = perturbed(make()), perturbed(make(ista_decoder="separate"))
    with torch.no_grad():
        sep.transformer.h[1].ista.decoder.mul_(-3.0)
    assert torch.equal(unit_directions(tied, 1, "ista"), tied.transformer.h[1].ista.dictionary)
    assert torch.equal(unit_directions(sep, 1, "ista"), sep.transformer.h[1].ista.decoder)
    sq = make(ista_variant="square", ista_learn_lambda=True)
    assert torch.equal(unit_directions(sq, 0, "ista"), torch.eye(16))


# ---------------------------------------------------------------------------- BIMT


def test_layer_roles_describe_the_options():
    roles = make(**ALL_ON).layer_roles()[0]
    assert roles.hidden_in.weight == "transformer.h.0.ista.dictionary"
    assert roles.hidden_out.weight == "transformer.h.0.ista.decoder" and roles.hidden_out_rows_are_units
    assert roles.hidden_vectors == ("transformer.h.0.ista.atom_lambda",)
    default = make().layer_roles()[0]
    assert default.hidden_out is None and default.hidden_vectors == () and not default.hidden_out_rows_are_units


@pytest.mark.parametrize("name", ["all", "square_all", "separate"])
def test_bimt_swaps_leave_the_options_model_unchanged(name):
    model = perturbed(make(**OPTIONS[name])).double()
    geom = lm_geometry(model, maps=["hidden", "attention", "embeddings"])
    if model.config.ista_decoder == "separate":
        assert "transformer.h.0.ista.decoder" in {c.name for c in geom.connections}
    idx = tokens()
    before = model(idx)[0]
    for i, group in enumerate(geom.swappable()):
        perm = torch.randperm(group.units, generator=torch.Generator().manual_seed(i))
        apply_permutation(model, geom, group.name, perm)
    err = (model(idx)[0] - before).abs().max().item()
    assert err < 1e-12, f"logits moved by {err:.2e} after swaps"


def test_bimt_moments_follow_the_learned_lambda():
    model = perturbed(make(**ALL_ON)).double()
    geom = lm_geometry(model)
    opt = torch.optim.AdamW(model.configure_param_groups(0.1), lr=1e-2, foreach=False)
    model.train()
    for s in range(2):
        opt.zero_grad()
        model(tokens(seed=s), tokens(seed=s + 5))[1].backward()
        opt.step()
    lam = model.transformer.h[0].ista.atom_lambda
    avg = opt.state[lam]["exp_avg"].clone()
    perm = torch.randperm(lam.numel(), generator=torch.Generator().manual_seed(0))
    apply_permutation(model, geom, "hidden.0", perm, opt)
    assert torch.equal(opt.state[lam]["exp_avg"], avg[perm])


# ---------------------------------------------------------------------------- config


def test_recipe_keys_parse_and_validate():
    r = recipe_from_dict({}, ["model.ista_steps=3", "model.ista_init_scale=0.02", "model.ista_decoder=separate",
                              "model.ista_residual=true", "model.ista_learn_lambda=true", "model.ista_learn_eta=true"])
    m = r.model
    assert (m.ista_steps, m.ista_init_scale, m.ista_decoder, m.ista_residual) == (3, 0.02, "separate", True)
    assert m.ista_learn_lambda and m.ista_learn_eta
    assert recipe_from_dict({}, ["model.ista_steps=null"]).model.ista_steps is None
    for bad, match in (("model.ista_steps=0", "ista_steps must be >= 1"),
                       ("model.ista_init_scale=0", "ista_init_scale must be > 0"),
                       ("model.ista_decoder=untied", "not one of"),
                       ("model.ista_init_scale=-1", "ista_init_scale must be > 0")):
        with pytest.raises(UserError, match=match):
            recipe_from_dict({}, [bad])
    with pytest.raises(UserError, match="separate needs model.ista_variant: overcomplete"):
        recipe_from_dict({}, ["model.ista_decoder=separate", "model.ista_variant=square"])


def test_rope_recipe_key_validates():
    assert recipe_from_dict({}, ["model.rope=true"]).model.rope
    assert recipe_from_dict({}, ["model.rope=true", "model.arch=gpt2"]).model.rope  # the GPT-2 control
    with pytest.raises(UserError, match="must be even"):
        recipe_from_dict({}, ["model.rope=true", "model.n_embd=12", "model.n_head=4"])


def test_model_build_refuses_what_the_block_cannot_do():
    with pytest.raises(UserError, match="no decoder"):
        CRATE(cfg(ista_variant="square", ista_decoder="separate"))
    with pytest.raises(UserError, match="ista_steps"):
        CRATE(cfg(ista_steps=0))


def test_nondefault_options_lists_what_is_on():
    assert nondefault_options(cfg(**ALL_ON)) == [
        "ista_residual", "ista_decoder", "ista_learn_lambda", "ista_learn_eta", "ista_steps", "ista_init_scale"]
    assert nondefault_options(cfg(rope=True)) == ["rope"]
    assert nondefault_options(cfg(ista_steps=2)) == []  # the published count, spelled out


# ---------------------------------------------------------------------------- training


def test_tiny_fit_with_every_option_on(tmp_path):
    from wbscale.ckpt.load import load_for_inference
    from wbscale.train.fit import fit

    on = {f"model.{k}": ("null" if v is None else str(v).lower() if isinstance(v, bool) else v) for k, v in ALL_ON.items()}
    recipe = load_recipe("demo", tiny_overrides(tmp_path, "options", **{
        **on, "model.ista_kernel": "eager", "train.max_steps": 5, "train.ckpt_every": 5, "train.val_every": 5,
        "tracking.metrics_every": 5}))
    assert recipe.model.ista_steps == 3 and recipe.model.ista_init_scale == 0.02
    result = fit(recipe, progress=False)
    assert result.step == 5
    rows = losses(result.run_dir)
    assert math.isfinite(rows[5]["train/loss"]) and math.isfinite(rows[5]["val/loss"])
    assert "whitebox/mean/lambda_mean" in rows[5] and "whitebox/layer0/eta" in rows[5]
    model, loaded, _ = load_for_inference(result.run_dir)
    assert loaded.model.ista_steps == 3 and loaded.model.ista_decoder == "separate"
    assert model.transformer.h[0].ista.decoder is not None
    assert model.transformer.h[0].ista.log_eta.exp().item() != 0.1  # it learned


@pytest.mark.parametrize("name", ["all", "square_all", "rope"])
def test_options_model_is_causal_and_decodes_the_same_with_and_without_cache(name):
    model = perturbed(make(**OPTIONS[name]))
    idx = tokens(t=12)
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 50
    torch.testing.assert_close(model(idx)[0][:, :7], model(changed)[0][:, :7], atol=1e-6, rtol=0)
    prompt = tokens(b=2, t=4)
    a = model.generate(prompt, 6, temperature=0.0)
    b = model.generate(prompt, 6, temperature=0.0, use_cache=False)
    assert torch.equal(a, b)


def test_save_mode_other_than_all_warns_with_the_options_on():
    with pytest.warns(UserWarning, match="applies to the published ISTA block only"):
        make(ista_steps=3, ista_save_activations=False)


@pytest.mark.parametrize("option", [dict(rope=True), dict(ista_residual=True)])
def test_hf_export_refuses_options_it_does_not_implement(option):
    from wbscale.ckpt.export_hf import hf_config

    with pytest.raises(UserError, match=f"model.{next(iter(option))}.*published CRATE block only"):
        hf_config(make(**option), None, torch.float32)


def test_hf_export_refuses_gpt2_with_rope():
    from wbscale.ckpt.export_hf import hf_config
    from wbscale.models import GPT2

    with pytest.raises(UserError, match="model.rope: Hugging Face's GPT2LMHeadModel has no rotary"):
        hf_config(GPT2(ModelConfig(**{**TINY, "arch": "gpt2", "rope": True})), None, torch.float32)
