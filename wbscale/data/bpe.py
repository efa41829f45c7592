"""Training the byte-level BPE tokenizer of ``data.tokenizer: bpe``, on the train split.

Loading a tokenizer (trained here, or any ``tokenizer.json``) is
:mod:`wbscale.data.tokenizer`'s job.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from wbscale.config import DataConfig
from wbscale.data.sources import iter_chunks, iter_documents, val_mask, val_phase
from wbscale.data.tokenizer import EOT

__all__ = ["BPE_TRAIN_MAX_CHARS", "bpe_training_text", "train_bpe"]

# BPE merges stop improving long before this; it bounds training time on web-scale sources.
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
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def bpe_training_text(cfg: DataConfig) -> Iterator[str]:
    """The training split's documents (val is never seen by the tokenizer), capped."""
    phase, chars, first = val_phase(cfg.seed), 0, 0
    for texts in iter_chunks(iter_documents(cfg)):
        index = np.arange(first, first + len(texts))
        first += len(texts)
        for text, is_val in zip(texts, val_mask(index, cfg.val_fraction, phase).tolist(), strict=True):
            if is_val:
                continue
            yield text
            chars += len(text)
            if chars >= BPE_TRAIN_MAX_CHARS:
                return
