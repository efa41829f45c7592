"""Tokenizers: load the one a data folder was prepared with, or any ``tokenizer.json``.

Training the byte-level BPE is :mod:`wbscale.data.bpe`.

The tokenizer used to prepare a data folder is saved in it as ``tokenizer.json``; its
sha256 identifies it in the manifest and in checkpoints. The end-of-document token
(``<|endoftext|>`` for the BPE of :mod:`wbscale.data.bpe` and for GPT-2) separates documents in the
token shards.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer

from wbscale.config import DataConfig
from wbscale.data.hub import resolve_tokenizer
from wbscale.errors import UserError
from wbscale.io import sha256_file

__all__ = [
    "BPE",
    "CHAR",
    "EOT",
    "TOKENIZER_FILE",
    "TRAINED",
    "UNK",
    "decode",
    "encode",
    "eot_id",
    "expected_vocab_size",
    "load_tokenizer",
    "load_tokenizer_file",
    "tokenizer_path",
    "tokenizer_sha256",
    "vocab_size",
]

EOT = "<|endoftext|>"
UNK = "<|unk|>"  # what the character tokenizer gives a character its training text never had
TOKENIZER_FILE = "tokenizer.json"
# data.tokenizer values that name a tokenizer to train (wbscale.data.bpe); anything else is a file
BPE = "bpe"
CHAR = "char"
TRAINED = (BPE, CHAR)
# End-of-document tokens of common tokenizers, tried in order when EOT is absent.
_EOT_CANDIDATES = (EOT, "<|end_of_text|>", "</s>", "<eos>")


def tokenizer_path(path: str | Path) -> Path:
    """``path`` if it is a file (a hub id such as ``openai-community/gpt2`` is downloaded
    first, :func:`wbscale.data.hub.resolve_tokenizer`); a UserError saying what to give instead otherwise."""
    path = resolve_tokenizer(path)
    if not path.is_file():
        hint = (
            f" ({path} is a folder: point at the tokenizer.json inside it)"
            if path.is_dir()
            else ""
        )
        raise UserError(
            f"data.tokenizer: no tokenizer file at '{path}'{hint}. Give the path to a "
            "tokenizer.json (e.g. GPT-2's), or set data.tokenizer: bpe (or char) to train one."
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
            "`wbscale data prepare <recipe>` first."
        )
    return load_tokenizer_file(path)


def expected_vocab_size(cfg: DataConfig) -> int | None:
    """Token ids the tokenizer of ``cfg`` will have, before padding; None if not known yet.

    ``bpe``: ``data.vocab_size``. ``char``: the prepared folder's ``tokenizer.json`` if
    ``data.out_dir`` holds one (the character set is only known once the text is read).
    A file: its vocabulary, when it is readable here.
    """
    if cfg.tokenizer == BPE:
        return cfg.vocab_size
    path = Path(cfg.out_dir).expanduser() / TOKENIZER_FILE if cfg.tokenizer == CHAR else Path(cfg.tokenizer).expanduser()
    try:
        return vocab_size(Tokenizer.from_file(str(path)))
    except Exception:  # missing or unreadable: not known yet
        return None


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


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text``, without any template tokens (BOS/EOS) the tokenizer adds."""
    return tok.encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids: Iterable[int]) -> str:
    """Text of ``ids``; special tokens (the EOT) are kept, so documents stay visible."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)
