"""Tokenizers: train a byte-level BPE, or load any ``tokenizer.json``.

The tokenizer used to prepare a data folder is saved in it as ``tokenizer.json``; its
sha256 identifies it in the manifest and in checkpoints. The end-of-document token
(``<|endoftext|>`` for the BPE trained here and for GPT-2) separates documents in the
token shards.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from wbscale.errors import UserError
from wbscale.io import sha256_file

__all__ = [
    "EOT",
    "TOKENIZER_FILE",
    "decode",
    "dtype_for_vocab",
    "encode",
    "eot_id",
    "load_tokenizer",
    "load_tokenizer_file",
    "tokenizer_path",
    "tokenizer_sha256",
    "train_bpe",
    "vocab_size",
]

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
# End-of-document tokens of common tokenizers, tried in order when EOT is absent.
_EOT_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>")


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
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tokenizer_path(path: str | Path) -> Path:
    """``path`` if it is a file; a UserError saying what to give instead otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        hint = (
            f" ({path} is a folder: point at the tokenizer.json inside it)"
            if path.is_dir()
            else ""
        )
        raise UserError(
            f"data.tokenizer: no tokenizer file at '{path}'{hint}. Give the path to a "
            "tokenizer.json (e.g. GPT-2's), or set data.tokenizer: bpe to train one."
        )
    return path


def load_tokenizer_file(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` file given by the user (``data.tokenizer``)."""
    path = tokenizer_path(path)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises plain Exception for bad JSON
        raise UserError(
            f"data.tokenizer: '{path}' is not a valid tokenizer.json ({err}). "
            "Give a file saved by the `tokenizers` library (Tokenizer.save)."
        ) from None


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer a data folder was prepared with."""
    path = Path(data_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(
            f"no {TOKENIZER_FILE} in data folder '{data_dir}': run "
            "`wbscale data prepare --config <recipe>` first."
        )
    return load_tokenizer_file(path)


def tokenizer_sha256(path: str | Path) -> str:
    """sha256 of a tokenizer file (or of ``tokenizer.json`` inside a data folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    return sha256_file(path)


def eot_id(tok: Tokenizer) -> int:
    """Id of the end-of-document token."""
    for name in _EOT_CANDIDATES:
        idx = tok.token_to_id(name)
        if idx is not None:
            return idx
    raise UserError(
        "the tokenizer has no end-of-document token (looked for "
        + ", ".join(_EOT_CANDIDATES)
        + "). Add one as a special token to the tokenizer.json, or use data.tokenizer: bpe."
    )


def vocab_size(tok: Tokenizer) -> int:
    """Number of token ids, added/special tokens included."""
    return tok.get_vocab_size(with_added_tokens=True)


def dtype_for_vocab(n_vocab: int) -> np.dtype:
    """uint16 when every id fits in it, uint32 otherwise (little-endian on disk)."""
    return np.dtype("<u2") if n_vocab < 65536 else np.dtype("<u4")


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text``, without any template tokens (BOS/EOS) the tokenizer adds."""
    return tok.encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids: Iterable[int]) -> str:
    """Text of ``ids``; special tokens (the EOT) are kept, so documents stay visible."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)
