"""`SLO`: per-request latency objectives, parsed from `--slo ttft=200,tpot=50` (milliseconds).

A request meets the SLO when it succeeded and every objective that is set holds. TPOT is
undefined for requests with fewer than 2 output tokens (no decode after the first token), so
the TPOT objective holds for them vacuously. Goodput counts the requests that meet the SLO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tandem.loadtest.record import RequestRecord

SLO_KEYS = ("ttft", "tpot", "e2e")


@dataclass(frozen=True)
class SLO:
    """Latency objectives in milliseconds; None means "no objective on this metric"."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def __post_init__(self) -> None:
        values = {key: getattr(self, f"{key}_ms") for key in SLO_KEYS}
        if all(value is None for value in values.values()):
            raise ValueError(
                f"An SLO needs at least one objective among {', '.join(SLO_KEYS)} "
                f"(e.g. 'ttft=200,tpot=50', in milliseconds)."
            )
        for key, value in values.items():
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"SLO {key} must be a positive number of milliseconds, got {value!r}.")

    @classmethod
    def parse(cls, text: str) -> SLO:
        """Parse `key=ms[,key=ms...]` with keys ttft, tpot, e2e, e.g. `ttft=200,tpot=50`."""
        values: dict[str, float] = {}
        for item in text.split(","):
            key, sep, raw = (part.strip() for part in item.partition("="))
            if not sep or not key or not raw:
                raise ValueError(
                    f"Bad SLO item {item.strip()!r} in {text!r}: expected key=milliseconds, e.g. 'ttft=200,tpot=50'."
                )
            if key not in SLO_KEYS:
                raise ValueError(f"Unknown SLO key {key!r} in {text!r}; known keys: {', '.join(SLO_KEYS)}.")
            if key in values:
                raise ValueError(f"SLO key {key!r} is given twice in {text!r}.")
            try:
                values[key] = float(raw)
            except ValueError:
                raise ValueError(f"SLO {key} must be a number of milliseconds, got {raw!r}.") from None
        return cls(**{f"{key}_ms": value for key, value in values.items()})

    def __str__(self) -> str:
        return ",".join(
            f"{key}={getattr(self, f'{key}_ms'):g}" for key in SLO_KEYS if getattr(self, f"{key}_ms") is not None
        )

    def met_by(self, record: RequestRecord) -> bool:
        """True if `record` succeeded and meets every objective that is set (bounds inclusive)."""
        if not record.ok:
            return False
        if self.ttft_ms is not None:
            ttft_s = record.ttft_s
            if ttft_s is None or ttft_s * 1000.0 > self.ttft_ms:
                return False
        tpot_s = record.tpot_s
        if self.tpot_ms is not None and tpot_s is not None and tpot_s * 1000.0 > self.tpot_ms:
            return False
        return self.e2e_ms is None or record.e2e_s * 1000.0 <= self.e2e_ms
