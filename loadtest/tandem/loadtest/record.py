"""`RequestRecord`: what one benchmark request looked like from the client side.

All times are seconds on one monotonic clock (the runner uses seconds since the run started).
A record is built once, when the request has finished or failed, and never changes. Latencies
are derived properties, never stored twice:

- TTFT = first token arrival - start.
- E2E  = end - start.
- TPOT = (E2E - TTFT) / (output_tokens - 1): mean time per output token after the first. It is
  undefined (None) for requests with fewer than 2 output tokens, as in `vllm bench serve`.
- ITL gaps = differences between consecutive token arrivals. The client records one arrival per
  streamed chunk that carries output, as `vllm bench serve` does. A chunk may carry several
  tokens (Tandem's decode worker coalesces the tokens a slow reader has not yet taken), so
  gaps are per chunk and `output_tokens` comes from the server's usage.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class ErrorKind(str, enum.Enum):
    """Why a request failed. The value is the name used in results.json and reports."""

    HTTP_4XX = "http_4xx"
    HTTP_5XX = "http_5xx"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    STREAM_ERROR = "stream_error"


@dataclass(frozen=True)
class RequestRecord:
    """Timings and sizes of one request (immutable).

    `token_times_s` holds the arrival time of every streamed chunk that carried output, in
    order; it is empty if no token arrived. `http_status` is None when no response arrived
    (connection error, timeout before the headers). `cached_tokens` is the server's
    `usage.prompt_tokens_details.cached_tokens` (prompt tokens served from a prefix cache), None
    when the server did not report it. A failed request (`error` set) keeps
    whatever timings it had, but summaries only use latencies of successful requests.
    """

    request_id: str
    start_s: float
    end_s: float
    token_times_s: tuple[float, ...]
    prompt_tokens: int
    output_tokens: int
    error: ErrorKind | None = None
    http_status: int | None = None
    error_message: str = ""
    cached_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("RequestRecord.request_id must be a non-empty string.")
        for name in ("start_s", "end_s"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"RequestRecord.{name} must be finite, got {getattr(self, name)!r}.")
        if self.end_s < self.start_s:
            raise ValueError(
                f"RequestRecord {self.request_id}: end_s ({self.end_s}) is before start_s ({self.start_s})."
            )
        previous_s = self.start_s
        for time_s in self.token_times_s:
            if not previous_s <= time_s <= self.end_s:
                raise ValueError(
                    f"RequestRecord {self.request_id}: token_times_s must be "
                    f"non-decreasing within [start_s, end_s], got {time_s} after "
                    f"{previous_s} (end_s={self.end_s})."
                )
            previous_s = time_s
        if self.prompt_tokens < 0 or self.output_tokens < 0:
            raise ValueError(
                f"RequestRecord {self.request_id}: token counts must be >= 0, got "
                f"prompt_tokens={self.prompt_tokens}, output_tokens={self.output_tokens}."
            )
        if self.cached_tokens is not None and not 0 <= self.cached_tokens <= self.prompt_tokens:
            raise ValueError(
                f"RequestRecord {self.request_id}: cached_tokens must be within [0, prompt_tokens="
                f"{self.prompt_tokens}], got {self.cached_tokens}."
            )

    @property
    def ok(self) -> bool:
        """True if the request completed without error."""
        return self.error is None

    @property
    def first_token_s(self) -> float | None:
        """Arrival time of the first output token, or None if none arrived."""
        return self.token_times_s[0] if self.token_times_s else None

    @property
    def ttft_s(self) -> float | None:
        """Time to first token, or None if no token arrived."""
        first_s = self.first_token_s
        return None if first_s is None else first_s - self.start_s

    @property
    def e2e_s(self) -> float:
        """End-to-end latency: from sending the request to the end of the response."""
        return self.end_s - self.start_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None below 2 output tokens."""
        ttft_s = self.ttft_s
        if ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - ttft_s) / (self.output_tokens - 1)

    @property
    def itl_gaps_s(self) -> tuple[float, ...]:
        """Inter-token latencies: gaps between consecutive token arrivals."""
        times_s = self.token_times_s
        return tuple(later - earlier for earlier, later in itertools.pairwise(times_s))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; `from_dict` inverts it exactly."""
        return {
            "request_id": self.request_id,
            "start_s": self.start_s,
            "end_s": self.end_s,
            "token_times_s": list(self.token_times_s),
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "error": None if self.error is None else self.error.value,
            "http_status": self.http_status,
            "error_message": self.error_message,
            "cached_tokens": self.cached_tokens,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RequestRecord:
        """Rebuild a record from `to_dict()` output (e.g. a saved results.json)."""
        error = data.get("error")
        return cls(
            request_id=str(data["request_id"]),
            start_s=float(data["start_s"]),
            end_s=float(data["end_s"]),
            token_times_s=tuple(float(t) for t in data.get("token_times_s", ())),
            prompt_tokens=int(data["prompt_tokens"]),
            output_tokens=int(data["output_tokens"]),
            error=None if error is None else ErrorKind(error),
            http_status=None if data.get("http_status") is None else int(data["http_status"]),
            error_message=str(data.get("error_message", "")),
            cached_tokens=None if data.get("cached_tokens") is None else int(data["cached_tokens"]),
        )
