"""Model zoo: CRATE against its published formulas, GPT-2 against Hugging Face, shared API."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import wbscale.models.crate as crate_module
from wbscale import kernels
from wbscale.config import ModelConfig
from wbscale.errors import UserError
from wbscale.models import CRATE, GPT2, MODEL_CLASSES, build_model, load_published
from wbscale.models.published import load_published_crate

ista = kernels.ista

TINY = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=50, ista_kernel="eager")


def tiny(arch: str = "crate", **kw) -> ModelConfig:
    return ModelConfig(arch=arch, **{**TINY, **kw})


def make(arch: str = "crate", seed: int = 0, **kw):
    torch.manual_seed(seed)
    return MODEL_CLASSES[arch](tiny(arch, **kw)).eval()


def tokens(b: int = 2, t: int = 12, vocab: int = 50, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def assert_close(actual, expected, atol, what):
    err = (actual - expected).abs().max().item()
    assert err <= atol, f"{what}: max |diff| = {err:.3e} > atol {atol:.0e}"


# ---------------------------------------------------------------------------- published formulas
# Written from the papers / published code in column form (x a d-vector, D the d x m
# dictionary), independently of wbscale.kernels.


def published_ista_overcomplete(x, D, eta, lam):
    """CRATE-LM: two ISTA steps from z = 0 on D (d x m); returns D z2 and z2."""
    z1 = F.relu(eta * torch.einsum("dm,...d->...m", D, x) - eta * lam)
    residual = torch.einsum("dm,...m->...d", D, z1) - x  # D z1 - x
    z2 = F.relu(z1 - eta * torch.einsum("dm,...d->...m", D, residual) - eta * lam)
    return torch.einsum("dm,...m->...d", D, z2), z2


def published_ista_square(x, D, eta, lam):
    """Original CRATE: relu(x + eta (D^T x - D^T D x) - eta lam), D square."""
    Dx = torch.einsum("ij,...j->...i", D, x)
    DtDx = torch.einsum("ji,...j->...i", D, Dx)
    Dtx = torch.einsum("ji,...j->...i", D, x)
    return F.relu(x + eta * (Dtx - DtDx) - eta * lam)


def reference_crate_logits(sd: dict, cfg: ModelConfig, idx: torch.Tensor) -> torch.Tensor:
    """The CRATE LM line by line from its state dict."""
    d, K = cfg.n_embd, cfg.n_head
    p = d // K
    T = idx.size(1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    for i in range(cfg.n_layer):
        g = lambda name: sd[f"transformer.h.{i}.{name}"]  # noqa: E731, B023
        h = F.layer_norm(x, (d,), g("ln_1.weight"), g("ln_1.bias"))
        heads = []
        for k in range(K):
            U_k = g("attn.c_attn.weight")[k * p : (k + 1) * p].T  # (d, p)
            W_k = h @ U_k
            scores = (W_k @ W_k.transpose(-1, -2) / math.sqrt(p)).masked_fill(~causal, -math.inf)
            heads.append(scores.softmax(-1) @ W_k)
        x = x + torch.cat(heads, -1) @ g("attn.c_proj.weight").T + g("attn.c_proj.bias")
        h = F.layer_norm(x, (d,), g("ln_2.weight"), g("ln_2.bias"))
        if cfg.ista_variant == "overcomplete":
            x, _ = published_ista_overcomplete(h, g("ista.dictionary").T, cfg.ista_eta, cfg.ista_lambda)
        else:
            x = published_ista_square(h, g("ista.dictionary"), cfg.ista_eta, cfg.ista_lambda)
    x = F.layer_norm(x, (d,), sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"])
    return x @ sd["transformer.wte.weight"].T


# ---------------------------------------------------------------------------- CRATE numerics


@pytest.mark.parametrize("variant", ["overcomplete", "square"])
def test_crate_forward_matches_published_formulas(variant):
    model = make(ista_variant=variant, ista_eta=0.3, ista_lambda=0.05)
    idx = tokens()
    logits, _ = model(idx)
    expected = reference_crate_logits(model.state_dict(), model.config, idx)
    assert_close(logits, expected, 1e-5, f"CRATE {variant} logits vs line-by-line reference")


@pytest.mark.parametrize("variant", ["overcomplete", "square"])
def test_minimal_gemm_ista_equals_published_spelling(variant):
    g = torch.Generator().manual_seed(0)
    d, m = 24, (96 if variant == "overcomplete" else 24)
    x = torch.randn(3, 7, d, generator=g, dtype=torch.float64)
    W = torch.randn(m, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    eta, lam = 0.1, 0.1
    y, z = ista(x, W, variant=variant, eta=eta, lam=lam, kernel="eager", return_code=True)
    if variant == "overcomplete":
        want_y, want_z = published_ista_overcomplete(x, W.T, eta, lam)
        kernels_published = kernels.ista_overcomplete_published(x, W, eta, lam)
    else:
        want_y = want_z = published_ista_square(x, W, eta, lam)
        kernels_published = kernels.ista_square_published(x, W, eta, lam)
    assert_close(y, want_y, 1e-12, "minimal-GEMM output vs published spelling")
    assert_close(z, want_z, 1e-12, "sparse code vs published z2")
    assert_close(kernels_published, want_y, 1e-12, "kernels' published spelling vs the paper's")
    assert (z == 0).any() and (z > 0).any(), "the test input should exercise both ReLU branches"


def test_crate_calls_the_ista_kernel_once_per_layer(monkeypatch):
    calls = []

    def counting_ista(*args, **kwargs):
        calls.append(kwargs)
        return ista(*args, **kwargs)

    monkeypatch.setattr(crate_module, "ista", counting_ista)
    model = make(ista_kernel="eager")
    model(tokens())
    assert len(calls) == model.config.n_layer
    assert all(c["kernel"] == "eager" and c["variant"] == "overcomplete" for c in calls)


# ---------------------------------------------------------------------------- shared behaviour


@pytest.mark.parametrize("arch", ["crate", "gpt2"])
def test_changing_future_tokens_leaves_past_logits_unchanged(arch):
    model = make(arch)
    idx = tokens(t=12)
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 50
    a, _ = model(idx)
    b, _ = model(changed)
    assert_close(a[:, :7], b[:, :7], 1e-6, f"{arch} past logits after changing the future")
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4, "changed tokens should change their own logits"


@pytest.mark.parametrize("arch", ["crate", "gpt2"])
def test_lm_head_is_tied_to_token_embedding(arch):
    model = make(arch)
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("arch", ["crate", "gpt2"])
def test_loss_is_mean_cross_entropy_over_all_positions(arch):
    model = make(arch)
    idx, targets = tokens(), tokens(seed=2)
    targets[0, :3] = -1  # ignored positions
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 12, 50)
    want = F.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1), ignore_index=-1)
    assert_close(loss, want, 1e-6, "loss")


def crate_param_count(c: ModelConfig, m: int) -> int:
    d, V, T, L = c.n_embd, c.vocab_size, c.block_size, c.n_layer
    # LN1 + U + c_proj (weight, bias) + LN2 + dictionary, per layer; ln_f; tied head.
    return V * d + T * d + L * (2 * d + d * d + d * d + d + 2 * d + m * d) + 2 * d


@pytest.mark.parametrize(
    "variant, expansion, m_of_d", [("overcomplete", 4, 4), ("overcomplete", 2, 2), ("square", 4, 1)]
)
def test_crate_param_count_matches_closed_form(variant, expansion, m_of_d):
    model = make(ista_variant=variant, ista_expansion=expansion)
    c = model.config
    want = crate_param_count(c, m_of_d * c.n_embd)
    assert model.num_params(non_embedding=False) == want
    assert model.num_params() == want - c.block_size * c.n_embd


def test_gpt2_param_count_matches_closed_form():
    model = make("gpt2")
    c = model.config
    d, V, T, L = c.n_embd, c.vocab_size, c.block_size, c.n_layer
    want = V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d
    assert model.num_params(non_embedding=False) == want


def test_crate_12_layer_size_is_about_82m_parameters():
    cfg = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)
    with torch.device("meta"):
        model = CRATE(cfg)
    assert model.num_params(non_embedding=False) == crate_param_count(cfg, 4 * 768)
    assert 81e6 < model.num_params(non_embedding=False) < 83e6


@pytest.mark.parametrize("arch", ["crate", "gpt2"])
def test_param_groups_cover_every_parameter_exactly_once(arch):
    model = make(arch)
    decay, no_decay = model.configure_param_groups(weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in two groups (or twice in one)"
    assert set(ids) == {id(p) for p in model.parameters()}
    decayed = {id(p) for p in decay["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    assert all(n.endswith(("weight", "dictionary")) and "ln" not in n and "prenorm" not in n for n in names), names
    assert id(model.transformer.wte.weight) not in decayed and id(model.transformer.wpe.weight) not in decayed
    if arch == "crate":
        assert "transformer.h.0.ista.dictionary" in names and "transformer.h.0.attn.c_attn.weight" in names
    torch.optim.AdamW([decay, no_decay], lr=1e-3)  # accepted as is


def test_flops_per_token_counts_real_gemms():
    L, d, V, T = 12, 768, 50257, 1024
    with torch.device("meta"):
        gpt2 = GPT2(ModelConfig(arch="gpt2", n_layer=L, n_head=12, n_embd=d, block_size=T, vocab_size=V))
        over = CRATE(ModelConfig(n_layer=L, n_head=12, n_embd=d, block_size=T, vocab_size=V))
        square = CRATE(ModelConfig(n_layer=L, n_head=12, n_embd=d, block_size=T, vocab_size=V, ista_variant="square"))
    attention = 12 * L * d * T
    # GPT-2: nanoGPT's 6N + 12LdT, up to biases and norms (no GEMM).
    nanogpt = 6 * gpt2.num_params() + attention
    assert abs(gpt2.flops_per_token(T) - nanogpt) / nanogpt < 2e-3
    # CRATE: the ISTA dictionary is used by 4 (overcomplete) or 2 (square) GEMMs.
    assert over.flops_per_token(T) == 6 * (L * (2 * d * d + 4 * d * 4 * d) + d * V) + attention
    assert square.flops_per_token(T) == 6 * (L * (2 * d * d + 2 * d * d) + d * V) + attention
    assert over.flops_per_token(T) > 6 * over.num_params() + attention
    assert gpt2.flops_per_token(2 * T) - gpt2.flops_per_token(T) == attention


# ---------------------------------------------------------------------------- generation


@pytest.mark.parametrize("arch", ["crate", "gpt2"])
def test_generate_appends_max_new_tokens_and_is_seeded(arch):
    model = make(arch)
    prompt = tokens(b=3, t=5)
    torch.manual_seed(123)
    a = model.generate(prompt, max_new_tokens=20, temperature=0.8, top_k=10)  # crosses block_size
    torch.manual_seed(123)
    b = model.generate(prompt, max_new_tokens=20, temperature=0.8, top_k=10)
    assert a.shape == (3, 25)
    assert torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b), "same seed, different samples"
    assert model.generate(prompt, max_new_tokens=0).shape == (3, 5)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(model.generate(prompt, 6, generator=g1), model.generate(prompt, 6, generator=g2))


def test_generate_stops_at_eos():
    model = make("crate")
    prompt = tokens(b=1, t=4)
    greedy = model.generate(prompt, max_new_tokens=3, temperature=0)
    eos = int(greedy[0, 4])
    out = model.generate(prompt, max_new_tokens=10, temperature=0, eos_id=eos)
    assert out.shape == (1, 5) and int(out[0, -1]) == eos


# ---------------------------------------------------------------------------- white-box hooks


def test_crate_white_box_forward_shapes_and_sparse_codes():
    model = make(ista_variant="overcomplete")
    c = model.config
    B, T, d, K = 2, 12, c.n_embd, c.n_head
    idx = tokens(b=B, t=T)
    wb = model.white_box_forward(idx)
    assert set(wb) == {"sparse_code", "head_projections", "mssa_input", "mssa_output", "mssa_projection"}
    assert all(len(v) == c.n_layer for v in wb.values())
    for i, block in enumerate(model.transformer.h):
        z = wb["sparse_code"][i]
        assert z.shape == (B, T, 4 * d)
        assert (z >= 0).all() and (z == 0).any(), "ISTA code must be non-negative with exact zeros"
        assert wb["head_projections"][i].shape == (B, K, T, d // K)
        assert wb["mssa_input"][i].shape == wb["mssa_output"][i].shape == (B, T, d)
        # W_k = X U_k with X the LN1 output; z is the kernel's code on LN2 of the stream.
        W = (wb["mssa_input"][i] @ wb["mssa_projection"][i]).view(B, T, K, d // K).transpose(1, 2)
        assert_close(wb["head_projections"][i], W, 1e-6, "head projections")
        assert torch.equal(wb["mssa_projection"][i], block.attn.c_attn.weight.T)
        _, want_z = ista(block.ln_2(wb["mssa_output"][i]), block.ista.dictionary, kernel="eager", return_code=True)
        assert_close(z, want_z, 1e-6, "sparse code")
        assert not any(t[i].requires_grad for t in wb.values()), "white-box tensors must be detached"
    square = make(ista_variant="square").white_box_forward(idx)
    assert square["sparse_code"][0].shape == (B, T, d)


def test_gpt2_rope_rotates_queries_and_keys_and_adds_no_parameter():
    from wbscale.models.base import rotary

    rope, plain = make("gpt2", rope=True), make("gpt2")
    plain.load_state_dict(rope.state_dict())  # same parameter names and shapes
    attn = rope.transformer.h[0].attn
    x = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(4))
    out, k = attn(x)
    q, k_raw, v = (z.view(2, 10, 2, 8).transpose(1, 2) for z in attn.c_attn(x).split(16, dim=2))
    expected = F.scaled_dot_product_attention(rotary(q), rotary(k_raw), v, is_causal=True)
    torch.testing.assert_close(out, attn.c_proj(expected.transpose(1, 2).reshape(2, 10, 16)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, rotary(k_raw))  # the cached keys are the rotated ones
    assert not torch.allclose(out, plain.transformer.h[0].attn(x)[0])
    assert rope.flops_per_token(64) == plain.flops_per_token(64)  # rotations are not GEMMs


def test_gpt2_white_box_forward_shapes():
    model = make("gpt2")
    c = model.config
    wb = model.white_box_forward(tokens(b=2, t=12))
    assert set(wb) == {"mlp_activation", "head_projections", "mssa_input", "mssa_output"}
    assert wb["mlp_activation"][1].shape == (2, 12, 4 * c.n_embd)
    assert wb["head_projections"][1].shape == (2, c.n_head, 12, c.n_embd // c.n_head)
    assert wb["mssa_output"][1].shape == (2, 12, c.n_embd)


# ---------------------------------------------------------------------------- published CRATE import


PUBLISHED_NAMES = {".ln_1.": ".prenorm_1.", ".ln_2.": ".prenorm_2.", ".ista.dictionary": ".ista.weight"}


def published_name(key: str) -> str:
    for ours, published in PUBLISHED_NAMES.items():
        key = key.replace(ours, published)
    return key


def published_checkpoint(model: CRATE, path, bias: bool = True, **extra_args):
    sd = {f"_orig_mod.{published_name(k)}": v.clone() for k, v in model.state_dict().items()}
    if not bias:
        sd = {k: v for k, v in sd.items() if not (k.endswith(".bias") and ("norm" in k or "ln_f" in k or "c_proj" in k))}
    c = model.config
    args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size,
                vocab_size=c.vocab_size, bias=bias, dropout=0.0, **extra_args)
    torch.save({"model": sd, "model_args": args, "iter_num": 5, "config": {"lr": 1e-3}}, path)
    return path


@pytest.mark.parametrize("variant", ["overcomplete", "square"])
def test_published_checkpoint_import_gives_identical_logits(tmp_path, variant):
    model = make(ista_variant=variant)
    path = published_checkpoint(model, tmp_path / "ckpt.pt", unknown_arg=3)
    loaded = load_published_crate(path, ista_kernel="eager").eval()
    assert loaded.config.ista_variant == variant
    idx = tokens()
    assert torch.equal(loaded(idx)[0], model(idx)[0])
    cfg, sd = load_published(path)
    assert dataclasses.replace(cfg, ista_kernel="eager") == model.config
    assert not any(k.startswith("_orig_mod.") for k in sd)


def test_published_checkpoint_without_biases_loads_with_zero_biases(tmp_path):
    model = make()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
    path = published_checkpoint(model, tmp_path / "ckpt.pt", bias=False, eta=0.1, lambd=0.1)
    loaded = load_published_crate(path).eval()
    idx = tokens()
    assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_state_dict_under_old_crate_names_still_loads(tmp_path):
    model = make(ista_variant="overcomplete")
    old = {published_name(k): v.clone() for k, v in model.state_dict().items()}
    assert "transformer.h.0.prenorm_1.weight" in old and "transformer.h.1.ista.weight" in old
    fresh = make(seed=1)
    fresh.load_state_dict(old)  # strict
    idx = tokens()
    assert torch.equal(fresh(idx)[0], model(idx)[0])
    torch.save({f"model.{k}": v for k, v in old.items()}, tmp_path / "old.pt")
    wrapped = torch.nn.ModuleDict({"model": make(seed=2)})  # as the Lightning module holds it
    wrapped.load_state_dict(torch.load(tmp_path / "old.pt", weights_only=True))
    assert torch.equal(wrapped["model"](idx)[0], model(idx)[0])


def test_broken_published_checkpoint_raises_user_error_naming_keys(tmp_path):
    model = make()
    sd = {k: v for k, v in model.state_dict().items() if k != "transformer.h.1.attn.c_proj.weight"}
    sd["transformer.h.1.attn.not_a_weight"] = torch.zeros(3)
    args = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=50)
    torch.save({"model": sd, "model_args": args}, tmp_path / "broken.pt")
    with pytest.raises(UserError) as err:
        load_published_crate(tmp_path / "broken.pt")
    assert "transformer.h.1.attn.c_proj.weight" in str(err.value)
    assert "transformer.h.1.attn.not_a_weight" in str(err.value)

    with pytest.raises(UserError, match="no such checkpoint"):
        load_published_crate(tmp_path / "missing.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UserError, match="'model' and 'model_args'"):
        load_published_crate(tmp_path / "list.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="torch.load"):
        load_published(tmp_path / "text.pt")


# ---------------------------------------------------------------------------- GPT-2 import


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64)
    ).eval()
    folder = tmp_path_factory.mktemp("hf-gpt2")
    hf.save_pretrained(folder, safe_serialization=True)
    return hf, folder


def test_gpt2_from_pretrained_matches_hugging_face(hf_gpt2):
    hf, folder = hf_gpt2
    model, cfg = GPT2.from_pretrained(str(folder))
    model.eval()
    assert (cfg.arch, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == ("gpt2", 2, 2, 32, 64, 100)
    idx = tokens(t=40, vocab=100)
    with torch.no_grad():
        want = hf(idx).logits
    assert_close(model(idx)[0], want, 1e-5, "GPT-2 logits vs Hugging Face")
    assert model.lm_head.weight is model.transformer.wte.weight


def test_build_model_loads_pretrained_gpt2_and_crops_positions(hf_gpt2):
    hf, folder = hf_gpt2
    model = build_model(ModelConfig(arch="gpt2", block_size=32, vocab_size=100, pretrained=str(folder))).eval()
    assert model.config.block_size == 32 and model.transformer.wpe.weight.shape == (32, 32)
    idx = tokens(t=32, vocab=100)
    with torch.no_grad():
        assert_close(model(idx)[0], hf(idx).logits, 1e-5, "cropped GPT-2 logits")
    with pytest.raises(UserError, match="vocab_size is 99 but the checkpoint has 100"):
        build_model(ModelConfig(arch="gpt2", block_size=64, vocab_size=99, pretrained=str(folder)))
    with pytest.raises(UserError, match="block_size"):
        build_model(ModelConfig(arch="gpt2", block_size=65, vocab_size=100, pretrained=str(folder)))


def test_gpt2_from_pretrained_errors_are_user_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not a model folder"):
        GPT2.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="config.json"):
        GPT2.from_pretrained(str(tmp_path))
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(**kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError, match="download config.json and model.safetensors"):
        GPT2.from_pretrained("openai-community/gpt2")


def test_build_model_rejects_bad_configs():
    with pytest.raises(UserError, match="vocab_size"):
        build_model(ModelConfig(vocab_size=0))
    with pytest.raises(UserError, match="only supported"):
        build_model(ModelConfig(vocab_size=50, pretrained="gpt2"))
    assert isinstance(build_model(tiny("gpt2")), GPT2) and isinstance(build_model(tiny()), CRATE)
