"""`WorkloadRequest`: one request a workload asks the load generator to send (immutable).

Prompts are token-id lists so that prompt lengths are exact: the gateway accepts `prompt` as a
list of ints on /v1/completions. Multi-turn workloads also carry the conversation as chat
messages (`messages`), each a list of token ids; the client renders them as text for
/v1/chat/completions, where lengths are then only approximate (the chat template and the
tokenizer decide).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(str, enum.Enum):
    """The author of a chat message."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


@dataclass(frozen=True)
class ChatMessage:
    """One message of a synthetic conversation: its role and token ids."""

    role: Role
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class WorkloadRequest:
    """A prompt and its output length, tagged with where it comes from.

    `class_name` names the request class in mixed workloads (e.g. `long_prefill`).
    `conversation_id` and `turn` (0-based) are set for multi-turn workloads only; then
    `prompt_token_ids` is the concatenation of `messages`' token ids.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    class_name: str = "default"
    conversation_id: int | None = None
    turn: int | None = None
    messages: tuple[ChatMessage, ...] = ()

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("WorkloadRequest.request_id must be a non-empty string.")
        if not self.prompt_token_ids:
            raise ValueError(f"WorkloadRequest {self.request_id}: the prompt must have at least one token.")
        if self.max_tokens < 1:
            raise ValueError(f"WorkloadRequest {self.request_id}: max_tokens must be >= 1, got {self.max_tokens}.")
        if (self.conversation_id is None) != (self.turn is None):
            raise ValueError(f"WorkloadRequest {self.request_id}: set both conversation_id and turn, or neither.")

    @property
    def prompt_len(self) -> int:
        """Number of prompt tokens."""
        return len(self.prompt_token_ids)
