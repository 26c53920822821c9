"""xgrammar's view of a model's tokenizer, built from the model directory without transformers.

It equals `xgrammar.TokenizerInfo.from_huggingface` for a fast tokenizer: the vocabulary
(added tokens included) indexed by token id, the vocabulary type and prefix-space flag that
xgrammar detects from tokenizer.json, the model's `vocab_size` (the width of the logits,
which may exceed the tokenizer's: ids without a token are never allowed), and the model's
EOS ids as the stop tokens (a grammar allows them only once it is complete).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import xgrammar as xgr

from tandem.engine.tokenizer import Tokenizer


def tokenizer_info(model_dir: Path, vocab_size: int, eos_token_ids: Iterable[int]) -> xgr.TokenizerInfo:
    """Called once per engine, on the compiler's thread (it reads tokenizer.json)."""
    backend = Tokenizer.from_pretrained(model_dir).backend
    encoded_vocab = [""] * vocab_size
    for token, token_id in backend.get_vocab(with_added_tokens=True).items():
        if token_id < vocab_size:
            encoded_vocab[token_id] = token
    metadata = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
    stop_ids = sorted(eos_token_ids)
    return xgr.TokenizerInfo(
        encoded_vocab,
        metadata["vocab_type"],
        vocab_size=vocab_size,
        stop_token_ids=stop_ids or None,
        add_prefix_space=metadata["add_prefix_space"],
    )
