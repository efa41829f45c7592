"""Real text in: a book split by position, character tokens, text values of --set, the Tiny
Shakespeare recipes, and a tiny fit on Tiny Shakespeare (skipped without ../shared/data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from wbscale.cli import main
from wbscale.config import DataConfig, load_recipe
from wbscale.data import prepare as prep
from wbscale.data.loader import TokenShards
from wbscale.data.sources import iter_documents, split_documents, split_mode
from wbscale.data.synthetic import generate_stories
from wbscale.data.tokenizer import EOT, UNK, decode, encode, eot_id, load_tokenizer
from wbscale.errors import UserError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"
needs_shakespeare = pytest.mark.skipif(
    not TINY_SHAKESPEARE.is_file(),
    reason=f"{TINY_SHAKESPEARE} is absent (a clone without ../shared/data, see its README): "
    "the Tiny Shakespeare tests need it",
)


@pytest.fixture(scope="module")
def book(tmp_path_factory) -> tuple[Path, str]:
    """A separator-free text of ~20K characters (one document), and its text."""
    text = "\n".join(generate_stories(40, seed=3))
    path = tmp_path_factory.mktemp("book") / "book.txt"
    path.write_text(text + "\n", encoding="utf-8")
    return path, text


def cfg_for(source: Path, tmp_path: Path, **kw) -> DataConfig:
    base = dict(source=str(source), tokenizer="char", val_fraction=0.1, shard_tokens=4096, workers=1,
                out_dir=str(tmp_path / "data"))
    base.update(kw)
    return DataConfig(**base)


def split_ids(data_dir: Path, split: str) -> np.ndarray:
    return np.concatenate([np.asarray(m) for m in TokenShards(data_dir, split).maps])


# ---------------------------------------------------------------------------- position split


def test_a_text_without_separators_is_split_by_position_exactly(book, tmp_path):
    path, text = book
    cfg = cfg_for(path, tmp_path)
    assert split_mode(cfg) == "position"  # auto: one document
    data = prep.prepare(cfg, progress=False)
    manifest = json.loads((data / "manifest.json").read_text())
    n = len(text)  # the document is stripped: the final newline is not part of it
    cut = int(n * 0.9)
    # one character = one token; each split ends with one <|endoftext|>
    assert manifest["splits"]["train"]["tokens"] == cut + 1
    assert manifest["splits"]["val"]["tokens"] == n - cut + 1
    assert (manifest["splits"]["train"]["documents"], manifest["splits"]["val"]["documents"]) == (1, 1)
    tok = load_tokenizer(data)
    assert decode(tok, split_ids(data, "train").tolist()) == text[:cut] + EOT
    assert decode(tok, split_ids(data, "val").tolist()) == text[cut:] + EOT
    assert manifest["fingerprint"]["split"] == "position"
    assert len(TokenShards(data, "train").maps) > 1, "the test should cross shard boundaries"


def test_bpe_on_a_position_split_never_sees_the_val_text(book, tmp_path):
    path, text = book
    data = prep.prepare(cfg_for(path, tmp_path, tokenizer="bpe", vocab_size=300), progress=False)
    cut = int(len(text) * 0.9)
    tok = load_tokenizer(data)
    assert decode(tok, split_ids(data, "val").tolist()) == text[cut:] + EOT
    assert decode(tok, split_ids(data, "train").tolist()) == text[:cut] + EOT


def test_multi_document_text_keeps_the_document_split_and_position_can_cut_one(tmp_path):
    docs = generate_stories(30, seed=5)
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(docs), encoding="utf-8")
    cfg = cfg_for(path, tmp_path, separator="\n\n", val_fraction=0.2)
    docs = list(iter_documents(cfg))  # stories may hold blank lines themselves
    assert split_mode(cfg) == "documents" and len(docs) >= 30
    assert "split" not in prep.config_fingerprint(cfg), "documents mode keeps the fingerprint it always had"
    assert list(split_documents(cfg)[0]) == list(iter_documents(cfg))

    position = cfg_for(path, tmp_path, separator="\n\n", val_fraction=0.2, split="position",
                       out_dir=str(tmp_path / "pos"))
    pieces, plan = split_documents(position)
    pieces = list(pieces)
    total = sum(len(d) for d in docs)
    cut = int(total * 0.8)
    train = [p for i, p in enumerate(pieces) if not plan.is_val(np.array([i]))[0]]
    val = [p for i, p in enumerate(pieces) if plan.is_val(np.array([i]))[0]]
    assert "".join(train) == "".join(docs)[:cut] and "".join(val) == "".join(docs)[cut:]
    assert len(pieces) == len(docs) + 1, "the document the cut falls in is cut in two"
    data = prep.prepare(position, progress=False)
    tok = load_tokenizer(data)
    assert decode(tok, split_ids(data, "val").tolist()) == "".join(v + EOT for v in val)


def test_document_split_of_a_single_document_says_to_split_by_position(book, tmp_path):
    path, _ = book
    with pytest.raises(UserError, match=r"split is empty.*data.split: position"):
        prep.prepare(cfg_for(path, tmp_path, split="documents"), progress=False)


# ---------------------------------------------------------------------------- char tokenizer


def test_char_tokenizer_round_trips_and_is_recorded(book, tmp_path):
    path, text = book
    cfg = cfg_for(path, tmp_path)
    data = prep.prepare(cfg, progress=False)
    tok = Tokenizer.from_file(str(data / "tokenizer.json"))  # a real tokenizer.json
    train_text = text[: int(len(text) * 0.9)]
    chars = sorted(set(train_text))
    assert [tok.token_to_id(c) for c in chars] == list(range(len(chars)))  # sorted, as nanoGPT's stoi
    assert (tok.token_to_id(EOT), tok.token_to_id(UNK)) == (len(chars), len(chars) + 1)
    assert decode(tok, encode(tok, train_text)) == train_text
    assert decode(tok, encode(tok, "ab\n\n" + EOT + "c")) == "ab\n\n" + EOT + "c"
    assert encode(tok, "\u2603") == [tok.token_to_id(UNK)]  # a character training never saw
    assert eot_id(load_tokenizer(data)) == len(chars)

    manifest = json.loads((data / "manifest.json").read_text())
    assert (manifest["vocab_size"], manifest["eot_id"]) == (len(chars) + 2, len(chars))
    assert manifest["fingerprint"]["tokenizer"] == "char" and "vocab_size" not in manifest["fingerprint"]
    assert prep.config_fingerprint(cfg_for(path, tmp_path, vocab_size=4096)) == manifest["fingerprint"]
    assert prep.prepare(cfg_for(path, tmp_path, vocab_size=4096), progress=False) == data  # up to date


def test_char_vocabulary_comes_from_the_training_text_only(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("ab" * 450 + "zzzzzzzzzzzzzzzzzzzz" + "ab" * 40, encoding="utf-8")
    data = prep.prepare(cfg_for(path, tmp_path), progress=False)
    tok = load_tokenizer(data)
    assert tok.token_to_id("z") is None  # only in the last 10%, the val split
    assert decode(tok, split_ids(data, "val").tolist()) == UNK * 20 + "ab" * 40 + EOT


def test_set_separator_escape_from_the_command_line(tmp_path, capsys):
    docs = generate_stories(40, seed=9)
    path = tmp_path / "paras.txt"
    path.write_text("\n\n".join(docs), encoding="utf-8")
    out = tmp_path / "prepared"
    args = ["data", "prepare", "demo", "--set", f"data.source={path}", "--set", r"data.separator=\n\n",
            "--set", "data.tokenizer=char", "--set", f"data.out_dir={out}", "--set", "data.workers=1",
            "--set", "data.val_fraction=0.1"]
    assert main(args) == 0
    paragraphs = list(iter_documents(DataConfig(source=str(path), separator="\n\n")))
    assert json.loads((out / "manifest.json").read_text())["documents"] == len(paragraphs) > 40
    # a real newline ($'\n' in a shell) works too; YAML would read it as null
    assert main([*args, "--set", "data.separator=\n", "--set", f"data.out_dir={tmp_path / 'lines'}"]) == 0
    lines = [line for line in path.read_text().split("\n") if line.strip()]
    assert json.loads((tmp_path / "lines" / "manifest.json").read_text())["documents"] == len(lines)


# ---------------------------------------------------------------------------- Tiny Shakespeare


def test_the_shakespeare_recipes_are_twins_of_nanogpts_cpu_run():
    gpt2, crate = load_recipe("shakespeare-char-gpt2"), load_recipe("shakespeare-char-crate")
    for r in (gpt2, crate):
        m, o, t = r.model, r.optim, r.train
        assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (4, 4, 128, 64, 0.0)
        assert (o.max_lr, o.min_lr, o.warmup_steps, o.beta2) == (1e-3, 1e-4, 100, 0.99)
        assert (t.max_steps, t.micro_batch_size, t.grad_accum) == (2000, 12, 1)
        assert (r.data.tokenizer, r.data.split, r.data.source) == ("char", "position", "../shared/data/tinyshakespeare.txt")
        assert r.tracking.wandb.mode == "offline"
    assert (gpt2.model.arch, crate.model.arch) == ("gpt2", "crate")
    assert gpt2.data == crate.data and gpt2.optim == crate.optim


@needs_shakespeare
@pytest.mark.parametrize("arch", ["gpt2", "crate"])
def test_tiny_fit_on_the_start_of_tiny_shakespeare(tmp_path, capsys, arch):
    source = tmp_path / "shakespeare-50k.txt"
    text = TINY_SHAKESPEARE.read_text(encoding="utf-8")[:50_000]
    source.write_text(text, encoding="utf-8")
    sets = {
        "data.source": source, "data.out_dir": tmp_path / "data", "train.runs_dir": tmp_path / "runs",
        "train.max_steps": 4, "train.val_every": 4, "train.val_batches": 2, "train.ckpt_every": 4,
        "train.log_every": 1, "train.sample_max_new_tokens": 8, "optim.warmup_steps": 2,
        "tracking.metrics_every": 4, "tracking.wandb.mode": "disabled", "distributed.accelerator": "cpu",
        "train.precision": "32",
    }
    args = ["fit", f"shakespeare-char-{arch}", "--no-progress"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    run = tmp_path / "runs" / f"shakespeare-char-{arch}"
    summary = json.loads((run / "summary.json").read_text())
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert summary["step"] == 4 and 0 < summary["val_loss"] < 1.1 * np.log(128)
    n = len(text.strip())
    assert manifest["splits"]["val"]["tokens"] == n - int(n * 0.9) + 1  # the last 10% of the characters + EOT
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "16", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
