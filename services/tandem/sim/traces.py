"""Trace readers: request arrival times and lengths from public LLM-serving traces, as `TraceRequest`s.

Formats (`read_trace` picks one from the file, or by name):

- `mooncake`: the Mooncake traces (kvcache-ai/Mooncake, FAST'25 release), JSON Lines:
  `{"timestamp": 0, "input_length": 6755, "output_length": 500, "hash_ids": [0, 1, ...]}`.
  `timestamp` is the arrival in milliseconds since the trace's start; `hash_ids` names the
  prompt's blocks of 512 tokens (the last one may be partial), and two prompts that start with
  the same ids share those blocks.
- `azure`: the Azure LLM inference traces (Azure/AzurePublicDataset, 2023 and 2024), CSV with
  the header `TIMESTAMP,ContextTokens,GeneratedTokens`; `TIMESTAMP` is a wall-clock time such as
  `2023-11-16 18:15:46.6805900`. No prefix information.
- `csv`: the project's plain trace, CSV with the header
  `arrival_s,prompt_tokens,output_tokens,prefix_group[,prefix_tokens]`; an empty
  `prefix_group` is no shared prefix, and a group needs `prefix_tokens`.

Every reader returns requests sorted by arrival (stable), with the first arrival at 0 s. A row
with 0 output tokens becomes 1 (the prefill samples the first token whatever the trace says).
A bad row raises ValueError naming the file, the line (1-based, the header is line 1 of a CSV)
and the problem; nothing is skipped silently.

Mooncake prefixes. A request's prefix is the longest leading run of blocks it shares with any
other request of the trace; requests whose runs are the same blocks form one prefix group
(numbered from 0 in order of first arrival), and the prefix is that many blocks x 512 tokens,
at most the prompt. Nested sharing is flattened: a prompt that shares one block with some
requests and four with others counts only its four-block group. A request that shares no
leading block has no group.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

from tandem.sim.types import TraceRequest

MOONCAKE_BLOCK_TOKENS = 512
AZURE_HEADER = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
CSV_HEADER = ("arrival_s", "prompt_tokens", "output_tokens", "prefix_group", "prefix_tokens")


class _Row:
    """Checks of one row's fields; every message names the file and the line."""

    def __init__(self, path: Path, line: int) -> None:
        self.where = f"{path}: line {line}"

    def fail(self, problem: str) -> ValueError:
        return ValueError(f"{self.where}: {problem}")

    def count(self, name: str, value: object, minimum: int) -> int:
        """A token count >= minimum, from a JSON int or a CSV string of digits."""
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise self.fail(f"{name} must be an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(f"{name} must be an integer >= {minimum}, got {value!r}")
        return value

    def seconds(self, name: str, value: object, scale: float) -> float:
        """A finite, non-negative time; `scale` converts the trace's unit to seconds."""
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise self.fail(f"{name} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise self.fail(f"{name} must be a finite number >= 0, got {value!r}")
        return float(value) * scale


def _from_zero(requests: list[TraceRequest]) -> tuple[TraceRequest, ...]:
    """Sorted by arrival (stable), shifted so that the first arrives at 0 s."""
    if not requests:
        return ()
    start = min(r.arrival_s for r in requests)
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    return tuple(
        TraceRequest(r.arrival_s - start, r.prompt_tokens, r.output_tokens, r.prefix_group, r.prefix_tokens)
        for r in ordered
    )


def _csv_rows(path: Path, header: Sequence[str], required: int) -> Iterator[tuple[_Row, dict[str, str]]]:
    """The data rows of a CSV whose first `required` columns are `header[:required]` (in any
    order; the rest of `header` optional), each with its line number's checker."""
    with path.open(newline="", encoding="utf-8-sig") as stream:
        reader = csv.reader(stream)
        names = [name.strip() for name in next(reader, [])]
        missing = [name for name in header[:required] if name not in names]
        if missing:
            raise ValueError(f"{path}: line 1: the header lacks {', '.join(missing)}; expected {','.join(header)}")
        for values in reader:
            row = _Row(path, reader.line_num)
            if not values or all(not v.strip() for v in values):
                continue  # a blank line
            if len(values) != len(names):
                raise row.fail(f"expected {len(names)} fields, got {len(values)}")
            yield row, dict(zip(names, values))


def read_mooncake(path: Path) -> tuple[TraceRequest, ...]:
    """A Mooncake JSONL trace (module docstring)."""
    rows: list[tuple[float, int, int, tuple[int, ...]]] = []
    with Path(path).open(encoding="utf-8-sig") as stream:
        for line, text in enumerate(stream, start=1):
            if not text.strip():
                continue
            row = _Row(path, line)
            try:
                record = json.loads(text)
            except ValueError as err:
                raise row.fail(f"not a JSON object: {err}") from None
            if not isinstance(record, dict):
                raise row.fail(f"not a JSON object: {text.strip()[:60]!r}")
            missing = [k for k in ("timestamp", "input_length", "output_length", "hash_ids") if k not in record]
            if missing:
                raise row.fail(f"missing {', '.join(missing)}")
            prompt = row.count("input_length", record["input_length"], 1)
            hash_ids = record["hash_ids"]
            if not isinstance(hash_ids, list) or not all(
                isinstance(h, int) and not isinstance(h, bool) for h in hash_ids
            ):
                raise row.fail(f"hash_ids must be a list of integers, got {hash_ids!r}")
            blocks = math.ceil(prompt / MOONCAKE_BLOCK_TOKENS)
            if len(hash_ids) > blocks:
                raise row.fail(
                    f"{len(hash_ids)} hash_ids for {prompt} input tokens (at most {blocks} blocks of "
                    f"{MOONCAKE_BLOCK_TOKENS})"
                )
            arrival_s = row.seconds("timestamp", record["timestamp"], 1e-3)
            output = max(1, row.count("output_length", record["output_length"], 0))
            rows.append((arrival_s, prompt, output, tuple(hash_ids)))
    runs = _shared_runs([ids for *_, ids in rows])
    groups: dict[tuple[int, ...], int] = {}
    requests = []
    for (arrival_s, prompt, output, ids), run in zip(rows, runs):
        if run == 0:
            requests.append(TraceRequest(arrival_s, prompt, output))
            continue
        group = groups.setdefault(ids[:run], len(groups))
        requests.append(TraceRequest(arrival_s, prompt, output, group, min(prompt, run * MOONCAKE_BLOCK_TOKENS)))
    return _from_zero(requests)


class _TrieNode:
    """A node of the prompts' block trie: how many prompts start with the path to it."""

    __slots__ = ("children", "count")

    def __init__(self) -> None:
        self.count = 0
        self.children: dict[int, _TrieNode] = {}


def _shared_runs(prompts: Sequence[tuple[int, ...]]) -> list[int]:
    """For each prompt, the longest leading run of blocks it shares with another prompt (a run
    is shared when two or more prompts start with it). Linear in the total number of blocks."""
    root = _TrieNode()
    for ids in prompts:
        node = root
        for block in ids:
            node = node.children.setdefault(block, _TrieNode())
            node.count += 1
    runs = []
    for ids in prompts:
        node, run = root, 0
        for block in ids:
            node = node.children[block]
            if node.count < 2:
                break
            run += 1
        runs.append(run)
    return runs


def _azure_time_s(row: _Row, value: str) -> float:
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise row.fail(
            f"TIMESTAMP must be a date and time such as 2023-11-16 18:15:46.6805900, got {value!r}"
        ) from None
    # a time without a zone is taken as UTC: the local zone's DST shifts would bend the gaps
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def read_azure(path: Path) -> tuple[TraceRequest, ...]:
    """An Azure LLM inference trace, CSV (module docstring)."""
    requests = []
    for row, fields in _csv_rows(Path(path), AZURE_HEADER, 3):
        requests.append(
            TraceRequest(
                _azure_time_s(row, fields["TIMESTAMP"]),
                row.count("ContextTokens", fields["ContextTokens"], 1),
                max(1, row.count("GeneratedTokens", fields["GeneratedTokens"], 0)),
            )
        )
    return _from_zero(requests)


def read_csv(path: Path) -> tuple[TraceRequest, ...]:
    """The project's plain CSV trace (module docstring)."""
    requests = []
    for row, fields in _csv_rows(Path(path), CSV_HEADER, 4):
        prompt = row.count("prompt_tokens", fields["prompt_tokens"], 1)
        group_text = fields["prefix_group"].strip()
        group = row.count("prefix_group", group_text, 0) if group_text else None
        prefix_text = fields.get("prefix_tokens", "").strip()
        if group is not None and not prefix_text:
            raise row.fail("prefix_group needs prefix_tokens")
        prefix = row.count("prefix_tokens", prefix_text, 0) if prefix_text else 0
        if prefix > prompt:
            raise row.fail(f"prefix_tokens ({prefix}) exceeds prompt_tokens ({prompt})")
        if prefix and group is None:
            raise row.fail("prefix_tokens needs a prefix_group")
        requests.append(
            TraceRequest(
                row.seconds("arrival_s", fields["arrival_s"], 1.0),
                prompt,
                max(1, row.count("output_tokens", fields["output_tokens"], 0)),
                group,
                prefix,
            )
        )
    return _from_zero(requests)


def write_csv(path: Path, requests: Sequence[TraceRequest]) -> None:
    """Write `requests` as the project's plain CSV trace (`read_csv` reads it back equal)."""
    with Path(path).open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(CSV_HEADER)
        for r in requests:
            group = "" if r.prefix_group is None else r.prefix_group
            writer.writerow((repr(r.arrival_s), r.prompt_tokens, r.output_tokens, group, r.prefix_tokens))


TRACE_FORMATS: Mapping[str, Callable[[Path], tuple[TraceRequest, ...]]] = {
    "mooncake": read_mooncake,
    "azure": read_azure,
    "csv": read_csv,
}


def detect_format(path: Path) -> str:
    """`mooncake` for a file whose first non-blank line is a JSON object, `azure` for a CSV
    starting with TIMESTAMP, `csv` for one starting with arrival_s; ValueError otherwise."""
    with Path(path).open(encoding="utf-8-sig") as stream:
        first = next((text.strip() for text in stream if text.strip()), "")
    if first.startswith("{"):
        return "mooncake"
    column = first.split(",")[0].strip()
    if column == AZURE_HEADER[0]:
        return "azure"
    if column == CSV_HEADER[0]:
        return "csv"
    raise ValueError(
        f"{path}: not a known trace format (a Mooncake JSONL line, or a CSV header starting with "
        f"{AZURE_HEADER[0]} or {CSV_HEADER[0]}); got {first[:60]!r}"
    )


def read_trace(path: Path, trace_format: str | None = None) -> tuple[TraceRequest, ...]:
    """The requests of a trace file; `trace_format` (a key of TRACE_FORMATS) or detected."""
    name = trace_format or detect_format(path)
    if name not in TRACE_FORMATS:
        raise ValueError(f"Unknown trace format {name!r}; known: {', '.join(TRACE_FORMATS)}")
    return TRACE_FORMATS[name](Path(path))
