"""Configuration of one gateway process: frozen, validated once (flags are read in services/tandem/cli/)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from tandem.common.plane_auth import PlaneAuth
from tandem.common.tracing import TracingConfig
from tandem.common.workers import check_name
from tandem.gateway.admission import AdmissionConfig
from tandem.gateway.guardrails import load_guardrails
from tandem.gateway.limits import RateLimitConfig
from tandem.gateway.tools.parsers import PARSERS
from tandem.scheduler import SchedulerConfig

SESSION_KEY_SOURCES = ("header", "user", "none")
_HEADER_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
API_KEYS_ENV = "TANDEM_API_KEYS"  # more API keys, comma-separated: read by `tandem gateway` and `tandem up`


@dataclass(frozen=True)
class GatewayConfig:
    """`model_dir` holds the tokenizer, chat template and config.json the gateway reads (never
    the weights). `model_id` must equal the workers' (`EngineConfig.model_id`, default the
    directory name): it is part of every block hash, so the prefix index only matches when it
    agrees. `max_model_len=None` takes the model's own limit, as the workers do.

    Times are seconds. `prefill_timeout_s` bounds one Prefill call (queue + compute);
    `decode_idle_timeout_s` bounds the wait for each message of a decode stream, so a stuck
    worker is migrated away from (or, past `max_migrations`, turns into an error event) instead
    of a hang. `max_migrations` bounds how many times one choice is resumed on another decode
    worker after its stream failed mid-way (0: never). `retry_after_s` is what a 503 tells
    clients. `max_body_bytes` caps a request body (413 above it). A streaming client that stops
    reading holds at most `max_buffered_events` events; once they have been full for
    `slow_client_timeout_s`, its request is aborted. `admission` bounds what is admitted
    (admission.py: 429/503 with Retry-After, priorities). `plane` is how it authenticates to the
    workers (`tandem.common.plane_auth`): without a token it refuses to start, unless
    `--insecure-no-auth`. `tool_call_parser` names how tool calls are read from the output
    (gateway/tools/parsers.py); None: tool_choice "auto" is refused.

    `guardrails` names the guardrail hooks, in order (`name[:json-options],...`; gateway/
    guardrails/loading.py); an unknown name or bad options refuse the start. Output hooks hold
    back at most `guardrail_window_chars` characters of each choice's text. `session_key` says
    where a request's session key comes from (`header`: the `session_header` header, `user`:
    the body's `user` field, `none`: no session affinity); the scheduler prefers the decode
    worker that last served the session (scheduler/affinity.py).
    """

    model_dir: Path = field(
        metadata={"flag": "model", "required": False, "help": "local HF model directory (tokenizer, config)"}
    )
    redis_url: str = field(
        metadata={
            "flag": "redis",
            "required": False,
            "help": "Redis URL of the cluster state (default: $TANDEM_REDIS_URL); redis://:PASSWORD@host:port/db, "
            "rediss:// for TLS",
        }
    )
    served_model_name: str | None = field(
        default=None, metadata={"help": "the `model` clients send (default: directory name)"}
    )
    model_id: str | None = field(default=None, metadata={"help": "model id in block hashes; must equal the workers'"})
    max_model_len: int | None = field(default=None, metadata={"help": "cap on prompt + output tokens"})
    host: str = field(default="127.0.0.1", metadata={"help": "bind address of the HTTP server"})
    port: int = field(default=8000, metadata={"help": "HTTP port (0 picks a free one)"})
    cluster: str = field(default="default", metadata={"help": "cluster name (Redis key prefix)"})
    api_keys: tuple[str, ...] = field(
        default=(),
        metadata={"flag": "api-key", "help": "accepted API key (repeatable; also TANDEM_API_KEYS)"},
    )
    max_n: int = field(default=8, metadata={"help": "most choices one request may ask for"})
    max_body_bytes: int = field(default=8 * 1024 * 1024, metadata={"help": "larger request bodies get 413"})
    prefill_timeout_s: float = field(default=120.0, metadata={"help": "bound on one Prefill call"})
    decode_idle_timeout_s: float = field(default=60.0, metadata={"help": "bound on each wait of a decode stream"})
    max_migrations: int = field(
        default=2, metadata={"help": "most times one choice's stream is resumed on another decode worker"}
    )
    retry_after_s: int = field(default=1, metadata={"help": "the Retry-After of a 503"})
    max_buffered_events: int = field(default=256, metadata={"help": "events held per request for a slow client"})
    slow_client_timeout_s: float = field(
        default=5.0, metadata={"help": "abort a request whose client buffer stays full this long"}
    )
    tool_call_parser: str | None = field(
        default=None,
        metadata={
            "help": f"turns tool-calling output into tool_calls ({', '.join(PARSERS)}); needed by tool_choice auto"
        },
    )
    guardrails: str = field(
        default="",
        metadata={
            "help": 'guardrail hooks in order: name[:json-options],... (e.g. regex_redactor,blocklist:{"words":["x"]})'
        },
    )
    guardrail_window_chars: int = field(
        default=64, metadata={"help": "characters of each choice's text that output guardrails may hold back"}
    )
    session_key: str = field(
        default="header",
        metadata={"choices": SESSION_KEY_SOURCES, "help": "where a request's session key comes from (affinity)"},
    )
    session_header: str = field(
        default="x-session-id", metadata={"help": "the header that carries the session key (--session-key header)"}
    )
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    rate_limits: RateLimitConfig = field(default_factory=RateLimitConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    plane: PlaneAuth = field(default_factory=PlaneAuth)

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            if self.host != "localhost":
                raise ValueError(f"host must be an IP address or 'localhost', got {self.host!r}") from None
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not self.redis_url:
            raise ValueError(
                "redis_url is required (the gateway reads the cluster state from Redis): --redis or TANDEM_REDIS_URL"
            )
        check_name("cluster", self.cluster)  # it names Redis keys
        if self.max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {self.max_n}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_buffered_events < 1:
            raise ValueError(f"max_buffered_events must be >= 1, got {self.max_buffered_events}")
        for name in ("prefill_timeout_s", "decode_idle_timeout_s", "slow_client_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_migrations < 0:
            raise ValueError(f"max_migrations must be >= 0, got {self.max_migrations}")
        if self.retry_after_s < 1:
            raise ValueError(f"retry_after_s must be >= 1, got {self.retry_after_s}")
        if self.tool_call_parser is not None and self.tool_call_parser not in PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(PARSERS)}, got {self.tool_call_parser!r}")
        if any(not key for key in self.api_keys):
            raise ValueError("api_keys must not contain an empty key")
        if self.guardrail_window_chars < 1:
            raise ValueError(f"guardrail_window_chars must be >= 1, got {self.guardrail_window_chars}")
        load_guardrails(self.guardrails, self.guardrail_window_chars)  # refuse the start on a bad spec
        if self.session_key not in SESSION_KEY_SOURCES:
            raise ValueError(f"session_key must be one of {', '.join(SESSION_KEY_SOURCES)}, got {self.session_key!r}")
        if not _HEADER_RE.match(self.session_header):
            raise ValueError(f"session_header must be a header name ([A-Za-z0-9-]+), got {self.session_header!r}")

    @property
    def model_name(self) -> str:
        """The name clients pass as `model` (GET /v1/models lists it)."""
        return self.served_model_name or self.model_dir.name

    @property
    def hash_model_id(self) -> str:
        return self.model_id or self.model_dir.name
