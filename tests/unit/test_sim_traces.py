"""The trace readers: Mooncake JSONL, Azure CSV and the plain CSV, on small generated samples;
bad rows fail with a message naming the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tandem.sim.traces import detect_format, read_azure, read_csv, read_mooncake, read_trace, write_csv
from tandem.sim.types import TraceRequest


def _jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_mooncake_lengths_times_and_prefix_groups(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "trace.jsonl",
        [
            {"timestamp": 0, "input_length": 6755, "output_length": 500, "hash_ids": list(range(14))},
            {"timestamp": 0, "input_length": 7319, "output_length": 490, "hash_ids": [0, *range(14, 28)]},
            {"timestamp": 3052, "input_length": 2287, "output_length": 316, "hash_ids": [0, 1, 2, 3, 99]},
            {"timestamp": 3100, "input_length": 700, "output_length": 0, "hash_ids": [50, 51]},
            {"timestamp": 4000, "input_length": 2000, "output_length": 7, "hash_ids": [0, 1, 2, 3]},
        ],
    )
    assert read_mooncake(path) == (
        # shares blocks 0-3 with the third and fifth prompts: group 0 of 4 blocks
        TraceRequest(0.0, 6755, 500, 0, 2048),
        # shares only block 0: group 1 of one block
        TraceRequest(0.0, 7319, 490, 1, 512),
        TraceRequest(3.052, 2287, 316, 0, 2048),
        TraceRequest(3.1, 700, 1),  # no shared block; 0 output tokens become 1
        TraceRequest(4.0, 2000, 7, 0, 2000),  # its whole (last block partial) prompt is the shared prefix
    )


def test_mooncake_starts_at_zero_and_sorts(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "t.jsonl",
        [
            {"timestamp": 2500, "input_length": 10, "output_length": 2, "hash_ids": [1]},
            {"timestamp": 1000, "input_length": 20, "output_length": 3, "hash_ids": [2]},
        ],
    )
    assert read_mooncake(path) == (TraceRequest(0.0, 20, 3), TraceRequest(1.5, 10, 2))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '{"timestamp": 5, "input_length": 0, "output_length": 1, "hash_ids": []}',
            "input_length must be an integer >= 1, got 0",
        ),
        (
            '{"timestamp": -1, "input_length": 4, "output_length": 1, "hash_ids": [1]}',
            "timestamp must be a finite number >= 0, got -1",
        ),
        ('{"timestamp": 5, "input_length": 4, "hash_ids": [1]}', "missing output_length"),
        (
            '{"timestamp": 5, "input_length": 4, "output_length": 1, "hash_ids": "ab"}',
            "hash_ids must be a list of integers, got 'ab'",
        ),
        (
            '{"timestamp": 5, "input_length": 600, "output_length": 1, "hash_ids": [1, 2, 3]}',
            "3 hash_ids for 600 input tokens (at most 2 blocks of 512)",
        ),
        ("[1, 2]", "not a JSON object: '[1, 2]'"),
    ],
)
def test_mooncake_bad_rows_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    good = '{"timestamp": 0, "input_length": 4, "output_length": 1, "hash_ids": [7]}'
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(ValueError) as err:
        read_mooncake(path)
    assert str(err.value) == f"{path}: line 3: {message}"


def test_azure_reads_the_public_layout(tmp_path: Path) -> None:
    path = tmp_path / "AzureLLMInferenceTrace_conv.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:15:51.4561850,879,0\n"
    )
    trace = read_azure(path)
    assert [(r.prompt_tokens, r.output_tokens, r.prefix_group) for r in trace] == [
        (374, 44, None),
        (396, 109, None),
        (879, 1, None),
    ]
    assert [r.arrival_s for r in trace] == pytest.approx([0.0, 4.314579, 4.775595], abs=1e-6)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("2023-11-16 18:15:47,12", "expected 3 fields, got 2"),
        ("yesterday,12,3", "TIMESTAMP must be a date and time such as 2023-11-16 18:15:46.6805900, got 'yesterday'"),
        ("2023-11-16 18:15:47,12.5,3", "ContextTokens must be an integer, got '12.5'"),
        ("2023-11-16 18:15:47,12,-3", "GeneratedTokens must be an integer >= 0, got -3"),
    ],
)
def test_azure_bad_rows_name_the_line(tmp_path: Path, row: str, message: str) -> None:
    path = tmp_path / "azure.csv"
    path.write_text(f"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,10,2\n{row}\n")
    with pytest.raises(ValueError) as err:
        read_azure(path)
    assert str(err.value) == f"{path}: line 3: {message}"


def test_azure_header_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    path.write_text("TIMESTAMP,Context,GeneratedTokens\n")
    with pytest.raises(ValueError) as err:
        read_azure(path)
    assert str(err.value) == (
        f"{path}: line 1: the header lacks ContextTokens; expected TIMESTAMP,ContextTokens,GeneratedTokens"
    )


def test_plain_csv_round_trips(tmp_path: Path) -> None:
    requests = (TraceRequest(0.0, 100, 10, 3, 64), TraceRequest(0.125, 50, 5), TraceRequest(1 / 3, 70, 1, 0, 70))
    path = tmp_path / "trace.csv"
    write_csv(path, requests)
    assert path.read_text().splitlines()[:3] == [
        "arrival_s,prompt_tokens,output_tokens,prefix_group,prefix_tokens",
        "0.0,100,10,3,64",
        "0.125,50,5,,0",
    ]
    assert read_csv(path) == requests


def test_plain_csv_without_prefix_tokens_column(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens,prefix_group\n1.5,8,2,\n2.0,9,3,\n")
    assert read_csv(path) == (TraceRequest(0.0, 8, 2), TraceRequest(0.5, 9, 3))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("0.5,8,2,1,", "prefix_group needs prefix_tokens"),
        ("0.5,8,2,,4", "prefix_tokens needs a prefix_group"),
        ("0.5,8,2,1,9", "prefix_tokens (9) exceeds prompt_tokens (8)"),
        ("nan,8,2,,", "arrival_s must be a finite number >= 0, got nan"),
        ("0.5,x,2,,", "prompt_tokens must be an integer, got 'x'"),
    ],
)
def test_plain_csv_bad_rows_name_the_line(tmp_path: Path, row: str, message: str) -> None:
    path = tmp_path / "trace.csv"
    path.write_text(f"arrival_s,prompt_tokens,output_tokens,prefix_group,prefix_tokens\n0,8,2,,\n{row}\n")
    with pytest.raises(ValueError) as err:
        read_csv(path)
    assert str(err.value) == f"{path}: line 3: {message}"


def test_read_trace_detects_the_format(tmp_path: Path) -> None:
    mooncake = _jsonl(tmp_path / "m.jsonl", [{"timestamp": 0, "input_length": 4, "output_length": 1, "hash_ids": [1]}])
    azure = tmp_path / "a.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,10,2\n")
    plain = tmp_path / "p.csv"
    plain.write_text("arrival_s,prompt_tokens,output_tokens,prefix_group\n0,3,4,\n")
    assert [detect_format(p) for p in (mooncake, azure, plain)] == ["mooncake", "azure", "csv"]
    assert read_trace(azure) == (TraceRequest(0.0, 10, 2),)
    assert read_trace(plain, "csv") == (TraceRequest(0.0, 3, 4),)
    other = tmp_path / "o.csv"
    other.write_text("time,in,out\n")
    with pytest.raises(ValueError, match=r"not a known trace format .*got 'time,in,out'$"):
        read_trace(other)
    with pytest.raises(ValueError, match=r"^Unknown trace format 'sharegpt'; known: mooncake, azure, csv$"):
        read_trace(plain, "sharegpt")


def test_a_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    path.write_bytes("\ufeffTIMESTAMP,ContextTokens,GeneratedTokens\r\n2023-11-16 18:15:46,10,2\r\n".encode())
    assert detect_format(path) == "azure"
    assert read_trace(path) == (TraceRequest(0.0, 10, 2),)
