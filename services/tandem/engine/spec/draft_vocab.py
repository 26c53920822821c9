"""Can this draft model draft for this target? Checked once, before the draft's weights load.

Token ids are the only thing a draft and its target exchange, so they must mean the same
tokens: equal vocabulary size and EOS ids in config.json / generation_config.json, and, when
both directories hold a `tokenizer.json`, the same token -> id map (the BPE vocabulary and
the added tokens; merges may differ, they only change how text splits, not what an id means).
The draft must also serve every position the target does. Every refusal is a ValueError that
names the mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tandem.engine.model_config import ModelConfig
from tandem.engine.spec.proposer import ProposerContext


def check_draft_compatible(draft_dir: Path, draft: ModelConfig, context: ProposerContext) -> None:
    target = context.target_config
    if draft.vocab_size != target.vocab_size:
        raise ValueError(
            f"draft model {draft_dir}: vocab size {draft.vocab_size} differs from the target's "
            f"{target.vocab_size}; a draft must share the target's vocabulary"
        )
    if draft.eos_token_ids != target.eos_token_ids:
        raise ValueError(
            f"draft model {draft_dir}: EOS token ids {sorted(draft.eos_token_ids)} differ from the "
            f"target's {sorted(target.eos_token_ids)}"
        )
    if draft.max_model_len < context.max_model_len:
        raise ValueError(
            f"draft model {draft_dir}: max length {draft.max_model_len} is shorter than the target's "
            f"max_model_len {context.max_model_len}; lower max_model_len or use a longer draft"
        )
    if context.target_dir is None:
        return
    draft_vocab, target_vocab = _token_ids(Path(draft_dir)), _token_ids(Path(context.target_dir))
    if draft_vocab is None or target_vocab is None or draft_vocab == target_vocab:
        return
    differing = sorted(t for t in draft_vocab.keys() | target_vocab.keys() if draft_vocab.get(t) != target_vocab.get(t))
    token = differing[0]
    raise ValueError(
        f"draft model {draft_dir}: tokenizer.json differs from the target's ({len(differing)} tokens have "
        f"other ids, first: token {token!r} is id {draft_vocab.get(token)} in the draft and "
        f"{target_vocab.get(token)} in the target)"
    )


def _token_ids(model_dir: Path) -> dict[str, int] | None:
    """The token -> id map of `model_dir/tokenizer.json` (vocabulary and added tokens), or
    None when the directory has no tokenizer.json or its model has no vocabulary map."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    vocab = (raw.get("model") or {}).get("vocab")
    if not isinstance(vocab, dict):
        return None
    ids = {str(token): int(i) for token, i in vocab.items()}
    for added in raw.get("added_tokens") or []:
        ids[str(added["content"])] = int(added["id"])
    return ids
