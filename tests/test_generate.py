"""Generation: sampling options, end-of-text stop, the attention cache, the CLI and the bench."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from wbscale.cli import main
from wbscale.config import ModelConfig, Recipe
from wbscale.errors import UserError
from wbscale.inference import end_of_text_id, generate_text
from wbscale.models import MODEL_CLASSES
from wbscale.models.base import sample_next

V, BLOCK = 50, 16
TINY = dict(n_layer=2, n_head=2, n_embd=16, block_size=BLOCK, vocab_size=V, ista_kernel="eager")
# (arch, variant): variant "rope" is the overcomplete CRATE or GPT-2 with model.rope (the
# cache then holds rotated keys, and a new token's position comes from the cache length)
VARIANTS = [("crate", "overcomplete"), ("crate", "square"), ("gpt2", "overcomplete"), ("crate", "rope"),
            ("gpt2", "rope")]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is fastest, and does not fight other jobs for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(arch: str = "crate", variant: str = "overcomplete", seed: int = 0):
    rope = variant == "rope"
    torch.manual_seed(seed)
    config = ModelConfig(arch=arch, ista_variant="overcomplete" if rope else variant, rope=rope, **TINY)
    return MODEL_CLASSES[arch](config).eval()


def tokens(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 5) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def word_tokenizer(eot_at: int | None = None) -> Tokenizer:
    """Words w0 .. w49 with ids 0 .. 49; id ``eot_at`` is ``<|endoftext|>`` instead."""
    vocab = {("<|endoftext|>" if i == eot_at else f"w{i}"): i for i in range(V)}
    tok = Tokenizer(WordLevel(vocab, unk_token="w0" if eot_at != 0 else "w1"))
    tok.pre_tokenizer = WhitespaceSplit()
    if eot_at is not None:
        tok.add_special_tokens(["<|endoftext|>"])
    return tok


# ---------------------------------------------------------------------------- the cache


@pytest.mark.parametrize("arch,variant", VARIANTS, ids=[f"{a}-{v}" for a, v in VARIANTS])
@pytest.mark.parametrize("prompt_len", [3, BLOCK, BLOCK + 5], ids=["short", "block", "longer"])
@pytest.mark.parametrize(
    "sampling", [dict(temperature=0), dict(temperature=1.0, top_k=10), dict(temperature=0.9, top_p=0.8)],
    ids=["greedy", "top-k", "top-p"],
)
def test_cache_gives_the_same_tokens_as_recomputing(arch, variant, prompt_len, sampling):
    model = make(arch, variant)
    prompt = tokens(3, prompt_len)
    n = 2 * BLOCK  # crosses block_size: the window then slides
    cached = model.generate(prompt, n, generator=gen(), use_cache=True, **sampling)
    plain = model.generate(prompt, n, generator=gen(), use_cache=False, **sampling)
    assert cached.shape == (3, prompt_len + n)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("arch,variant", VARIANTS, ids=[f"{a}-{v}" for a, v in VARIANTS])
def test_incremental_hidden_states_match_the_full_forward(arch, variant):
    model = make(arch, variant)
    idx = tokens(2, BLOCK)
    full = model.hidden_states(idx)
    cache = model.new_cache()
    with torch.no_grad():
        steps = [model.hidden_states(idx[:, :5], cache=cache)]
        steps += [model.hidden_states(idx[:, t : t + 1], cache=cache) for t in range(5, 12)]
        steps.append(model.hidden_states(idx[:, 12:], cache=cache))  # several new tokens at once
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    # CRATE's MSSA caches W_k alone (q = k = v); GPT-2 caches keys and values.
    per_layer = 1 if arch == "crate" else 2
    d, h = model.config.n_embd, model.config.n_head
    for layer in cache:
        assert len(layer) == BLOCK and len(layer.tensors) == per_layer
        assert all(t.shape == (2, h, BLOCK, d // h) for t in layer.tensors)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model.hidden_states(idx[:, :1], cache=cache)


def test_cache_feeds_one_token_per_step_until_the_window_is_full(monkeypatch):
    model = make()
    fed = []
    original = model.hidden_states

    def spy(idx, records=None, cache=None):
        fed.append((idx.size(1), cache is not None))
        return original(idx, records, cache)

    monkeypatch.setattr(model, "hidden_states", spy)
    model.generate(tokens(1, 3), 30, temperature=0)
    # prompt once, one token at a time up to block_size, then the cropped window per step
    assert fed == [(3, True)] + [(1, True)] * (BLOCK - 3) + [(BLOCK, False)] * (30 - 1 - (BLOCK - 3))
    fed.clear()
    model.generate(tokens(1, 3), 4, temperature=0, use_cache=False)
    assert fed == [(3, False), (4, False), (5, False), (6, False)]


# ---------------------------------------------------------------------------- sampling options


def test_top_k_zero_and_none_mean_no_filtering():
    model = make()
    prompt = tokens(2, 4)
    none = model.generate(prompt, 8, top_k=None, generator=gen())
    zero = model.generate(prompt, 8, top_k=0, generator=gen())  # crashed with IndexError before
    huge = model.generate(prompt, 8, top_k=10 * V, generator=gen())
    assert torch.equal(none, zero) and torch.equal(none, huge)


def test_temperature_zero_is_greedy():
    model = make("gpt2")
    prompt = tokens(2, 4)
    out = model.generate(prompt, 1, temperature=0)
    expected = model(prompt)[0][:, -1].argmax(-1)
    assert torch.equal(out[:, -1], expected)


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    seen = {p: set() for p in (0.01, 0.7, 0.85, 1.0)}
    g = gen(0)
    for _ in range(300):
        for p in seen:
            seen[p].add(int(sample_next(logits, 1.0, None, p, g)))
    assert seen[0.01] == {1}  # the most likely token is always kept
    assert seen[0.7] == {1, 3}  # 0.5 + 0.3 reaches 0.7
    assert seen[0.85] == {1, 3, 2}
    assert seen[1.0] == {0, 1, 2, 3}
    # top-k first, then the nucleus of what is left
    assert {int(sample_next(logits, 1.0, 1, 0.9, g)) for _ in range(50)} == {1}


def test_top_p_filters_by_probability_after_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    g = gen(0)
    p = 0.9
    for temperature in (0.5, 2.0):
        probs = F.softmax(logits / temperature, -1)[0]
        before = probs.cumsum(0) - probs
        allowed = {i for i in range(4) if before[i] < p}
        seen = {int(sample_next(logits, temperature, None, p, g)) for _ in range(400)}
        assert seen == allowed


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        (dict(temperature=-0.1), "--temperature"),
        (dict(temperature=float("nan")), "--temperature"),
        (dict(top_k=-1), "--top-k"),
        (dict(top_p=0.0), "--top-p"),
        (dict(top_p=1.5), "--top-p"),
    ],
)
def test_bad_sampling_options_are_user_errors(kwargs, flag):
    with pytest.raises(UserError, match=flag):
        make().generate(tokens(1, 3), 2, **kwargs)


def test_generate_zero_new_tokens_is_allowed_negative_is_not():
    model = make()
    assert model.generate(tokens(1, 3), 0).shape == (1, 3)
    with pytest.raises(UserError, match="--max-new-tokens"):
        model.generate(tokens(1, 3), -1)


# ---------------------------------------------------------------------------- end of text


@pytest.mark.parametrize("use_cache", [True, False])
def test_batch_rows_stop_at_eos_and_are_padded(use_cache):
    model = make()
    prompt = tokens(2, 4, seed=3)
    free = model.generate(prompt, 12, temperature=0, use_cache=use_cache)
    eos = int(free[0, 5])  # row 0 emits it as its 2nd new token
    row1 = free[1, 4:].tolist()
    assert eos not in row1[:3], "pick another seed: row 1 must run on past row 0's stop"
    out = model.generate(prompt, 12, temperature=0, eos_id=eos, use_cache=use_cache)
    stop1 = row1.index(eos) + 1 if eos in row1 else 12
    assert out.shape[1] == 4 + stop1
    assert out[0, 5:].eq(eos).all(), "a finished row is padded with eos"
    assert out[1, 4:].tolist() == row1[:stop1], "the other rows keep generating"
    assert torch.equal(out, model.generate(prompt, 12, temperature=0, eos_id=eos, use_cache=not use_cache))


def test_generate_text_stops_at_end_of_text_and_cuts_there():
    model = make()
    prompt_ids = [1, 2, 3]
    free = model.generate(torch.tensor([prompt_ids]), 6, temperature=0)[0, 3:].tolist()
    # make the first greedy token not seen before (after the first) the end-of-text token
    k = next(k for k in range(1, 6) if free[k] not in free[:k] + prompt_ids)
    eot = free[k]
    tok = word_tokenizer(eot_at=eot)
    assert end_of_text_id(tok) == eot
    prompt = " ".join(f"w{i}" for i in prompt_ids)
    text = generate_text(model, tok, prompt, 6, temperature=0)
    assert text == " ".join(f"w{i}" for i in prompt_ids + free[:k])
    longer = generate_text(model, tok, prompt, 6, temperature=0, stop=False)
    assert longer == " ".join(["<|endoftext|>" if i == eot else f"w{i}" for i in prompt_ids + free])
    # without an end-of-text token there is nothing to stop at
    assert end_of_text_id(word_tokenizer()) is None
    assert len(generate_text(model, word_tokenizer(), prompt, 6, temperature=0).split()) == 9


def test_generate_text_is_seeded_and_the_cache_does_not_change_it():
    model = make("gpt2")
    tok = word_tokenizer(eot_at=0)
    a = generate_text(model, tok, "w1 w2", 20, temperature=1.0, top_k=0, top_p=0.9, seed=3)
    b = generate_text(model, tok, "w1 w2", 20, temperature=1.0, top_k=0, top_p=0.9, seed=3, use_cache=False)
    assert a == b
    # an empty prompt starts a document (after <|endoftext|>, which is not part of the text)
    empty = generate_text(model, tok, "", 5, temperature=0, stop=False)
    first = int(model.generate(torch.tensor([[0]]), 1, temperature=0)[0, 1])
    assert len(empty.split()) == 5 and empty.split()[0] == ("<|endoftext|>" if first == 0 else f"w{first}")


# ---------------------------------------------------------------------------- CLI


@pytest.fixture
def export(tmp_path):
    from wbscale.ckpt.load import export_folder

    model = make()
    tok_path = tmp_path / "tokenizer.json"
    word_tokenizer(eot_at=0).save(str(tok_path))
    return export_folder(model, Recipe(model=model.config), tmp_path / "export", tokenizer_path=tok_path)


BAD_FLAGS = [
    (["--top-k", "-1"], "--top-k"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "-5"], "--max-new-tokens"),
    (["--num-samples", "0"], "--num-samples"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.01"], "--top-p"),
]


@pytest.mark.parametrize("flags,name", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_cli_rejects_bad_options_with_one_line(tmp_path, capsys, flags, name):
    # checked before the checkpoint is read: a missing one is not what is reported
    assert main(["generate", "--ckpt", str(tmp_path / "missing"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err


def test_cli_generate_top_k_zero_top_p_no_stop_no_cache(export, capsys):
    base = ["generate", "--ckpt", str(export), "--prompt", "w1 w2", "--max-new-tokens", "6", "--device", "cpu"]
    assert main([*base, "--top-k", "0", "--top-p", "0.9", "--num-samples", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("---") == 1 and out.startswith("w1 w2")
    assert main([*base, "--temperature", "0", "--no-stop"]) == 0
    greedy = capsys.readouterr().out
    assert main([*base, "--temperature", "0", "--no-stop", "--no-cache"]) == 0
    assert capsys.readouterr().out == greedy
    assert len(greedy.split()) == 2 + 6


# ---------------------------------------------------------------------------- bench


def test_bench_generate_reports_both_paths():
    from wbscale.bench.generate import bench_generate

    result = bench_generate(
        n_layer=1, n_embd=16, n_head=2, block_size=16, vocab_size=V, prompt_tokens=4, max_new_tokens=24,
        repeats=1,
    )
    for arch, per_layer in (("crate", 1), ("gpt2", 2)):
        row = result["models"][arch]
        assert row["identical"] and row["in_window"]["identical"]
        assert row["cache_tokens_per_second"] > 0 and row["no_cache_tokens_per_second"] > 0
        assert row["cache_tensors_per_layer"] == per_layer
    assert result["models"]["gpt2"]["cache_mib"] == pytest.approx(2 * result["models"]["crate"]["cache_mib"])
