"""Training the tokenizers a recipe can ask for, on the train split only.

- ``data.tokenizer: bpe``: a GPT-2 style byte-level BPE of ``data.vocab_size`` tokens
  (:func:`train_bpe`);
- ``data.tokenizer: char``: one token per character of the training text
  (:func:`char_tokenizer`): the characters sorted by code point get ids ``0 .. n-1`` (the
  ids nanoGPT's ``shakespeare_char`` gives them), then ``<|endoftext|>`` (the document
  separator every prepared folder needs) and ``<|unk|>`` (what a character the training
  text never had encodes to). ``data.vocab_size`` is not used. It is a real
  ``tokenizer.json`` (WordLevel model, one-character pre-tokenizer, Fuse decoder), so
  ``tokenizers.Tokenizer.from_file`` loads it and eval, generate and interpret use it like
  any other; ``decode(encode(text)) == text`` for any text of those characters.

Loading a tokenizer (trained here, or any ``tokenizer.json``) is
:mod:`wbscale.data.tokenizer`'s job.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from wbscale.config import DataConfig
from wbscale.data.sources import iter_chunks, split_documents
from wbscale.data.tokenizer import BPE, CHAR, EOT, UNK

__all__ = [
    "BPE_TRAIN_MAX_CHARS",
    "bpe_training_text",
    "char_tokenizer",
    "train_bpe",
    "train_char",
    "train_tokenizer",
    "training_text",
]

# BPE merges stop improving long before this; it bounds training time on web-scale sources
# (and the text the character set of data.tokenizer: char is read from).
BPE_TRAIN_MAX_CHARS = 1 << 30


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE with ``<|endoftext|>`` as its only special token.

    No normalizer and no prefix space, so ``decode(encode(text)) == text`` for any text.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        # All 256 byte symbols up front: any input is encodable even if unseen in training.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),  # a bar on a terminal; the lines around it otherwise
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def char_tokenizer(chars: Iterable[str]) -> Tokenizer:
    """The character-level tokenizer of a character set (see the module doc)."""
    alphabet = sorted(set(chars) - {EOT, UNK})
    if any(len(c) != 1 for c in alphabet):
        raise ValueError("char_tokenizer takes single characters")
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab[EOT] = len(vocab)
    vocab[UNK] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    tok.decoder = decoders.Fuse()  # concatenate, no spaces between tokens
    tok.add_special_tokens([EOT, UNK])
    return tok


def train_char(texts: Iterable[str]) -> Tokenizer:
    """The character-level tokenizer of the characters in ``texts``."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    return char_tokenizer(chars)


def train_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The tokenizer ``data.tokenizer: bpe | char`` asks for, trained on the train split."""
    if cfg.tokenizer == CHAR:
        tok = train_char(training_text(cfg))
        ignored = (
            f"; data.vocab_size ({cfg.vocab_size}) is not used"
            if cfg.vocab_size != DataConfig.vocab_size
            else ""
        )
        print(
            f"prepare: character tokenizer: {tok.get_vocab_size() - 2} characters + "
            f"{EOT} + {UNK} = {tok.get_vocab_size()} tokens{ignored}",
            file=sys.stderr,
        )
        return tok
    if cfg.tokenizer == BPE:
        print(f"prepare: training a {cfg.vocab_size:,}-token byte-level BPE on the training split …",
              file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        tok = train_bpe(training_text(cfg), cfg.vocab_size)
        got = tok.get_vocab_size()
        why = " (no more pairs frequent enough to merge: the text's vocabulary is small)" if got < cfg.vocab_size else ""
        print(f"prepare: BPE trained in {time.perf_counter() - t0:.1f}s: {got:,} tokens{why}", file=sys.stderr)
        return tok
    raise ValueError(f"data.tokenizer {cfg.tokenizer!r} is a file, not a tokenizer to train")


def training_text(cfg: DataConfig) -> Iterator[str]:
    """The training split's documents (val is never seen by the tokenizer), capped at
    ``BPE_TRAIN_MAX_CHARS`` characters."""
    docs, plan = split_documents(cfg)
    chars, first = 0, 0
    for texts in iter_chunks(docs):
        index = np.arange(first, first + len(texts))
        first += len(texts)
        for text, is_val in zip(texts, plan.is_val(index).tolist(), strict=True):
            if is_val:
                continue
            yield text
            chars += len(text)
            if chars >= BPE_TRAIN_MAX_CHARS:
                return


bpe_training_text = training_text  # the older name
