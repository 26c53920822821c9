"""loadtest workloads: every generator is deterministic for a seed and differs for another; the
shared-prefix workload shares exactly the configured number of tokens; multi-turn turn k starts
with turn k-1's whole conversation; YAML files load and bad ones fail with clear messages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tandem.loadtest.request import Role, WorkloadRequest
from tandem.loadtest.workloads import (
    InterferenceWorkload,
    LengthRange,
    MultiTurnWorkload,
    RandomWorkload,
    RequestClass,
    SharedPrefixWorkload,
    Workload,
    load_workload,
    shared_prefix_len,
    workload_from_mapping,
)

WORKLOAD_DIR = Path(__file__).resolve().parents[2] / "loadtest" / "tandem" / "loadtest" / "workloads"
YAML_FILES = sorted(WORKLOAD_DIR.glob("*.yaml"))


def common_prefix_len(prompts: list[tuple[int, ...]]) -> int:
    return len(os.path.commonprefix(prompts))  # noqa: RUF071 (token tuples, compared element-wise)


def test_workload_files_ship() -> None:
    # The four kinds, and smoke.yaml: a tiny random workload for tests/e2e/test_loadtest_smoke.py.
    assert [p.name for p in YAML_FILES] == [
        "interference.yaml",
        "multi_turn.yaml",
        "random.yaml",
        "shared_prefix.yaml",
        "smoke.yaml",
    ]


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.stem)
def test_deterministic_for_a_seed_and_different_for_another(path: Path) -> None:
    workload = load_workload(path)
    first = workload.generate(12, seed=7)
    assert len(first) == 12
    assert workload.generate(12, seed=7) == first
    assert load_workload(path).generate(12, seed=7) == first
    assert workload.generate(12, seed=8) != first
    assert len({r.request_id for r in first}) == 12
    assert all(0 <= t < 512 for r in first for t in r.prompt_token_ids)


def test_random_lengths_within_ranges_and_fixed() -> None:
    workload = RandomWorkload(LengthRange(3, 5), LengthRange(7, 7), vocab_size=10)
    requests = workload.generate(200, seed=0)
    assert {r.prompt_len for r in requests} == {3, 4, 5}
    assert {r.max_tokens for r in requests} == {7}
    assert {t for r in requests for t in r.prompt_token_ids} == set(range(10))
    assert [r.request_id for r in requests[:3]] == ["req-0", "req-1", "req-2"]


@pytest.mark.parametrize(
    ("fraction", "prompt_len", "shared"),
    [
        (0.75, 256, 192),
        (0.5, 5, 3),
        (0.5, 3, 2),
        (0.0, 64, 0),
        (1.0, 64, 64),
        (0.3, 10, 3),
    ],
)
def test_shared_prefix_len_rounds_half_up(fraction: float, prompt_len: int, shared: int) -> None:
    assert shared_prefix_len(fraction, prompt_len) == shared


@pytest.mark.parametrize(("fraction", "shared"), [(0.75, 48), (0.5, 32), (0.0, 0), (1.0, 64)])
def test_shared_prefix_shares_exactly_the_configured_tokens(fraction: float, shared: int) -> None:
    workload = SharedPrefixWorkload(LengthRange(64, 64), LengthRange(8, 8), fraction, num_prefixes=3)
    requests = workload.generate(30, seed=3)
    systems = workload.system_prompts(seed=3)
    assert [r.class_name for r in requests[:4]] == ["prefix-0", "prefix-1", "prefix-2", "prefix-0"]
    for group in range(3):
        prompts = [r.prompt_token_ids for r in requests[group::3]]
        assert all(len(p) == 64 for p in prompts)
        # Every prompt diverges from its group's system prompt right after the shared part ...
        assert all(common_prefix_len([p, systems[group]]) == shared for p in prompts)
        # ... and the group as a whole shares exactly that many tokens.
        assert common_prefix_len(prompts) == shared
    # Different groups have different system prompts.
    assert len({s for s in systems}) == 3


def test_shared_prefix_with_variable_lengths() -> None:
    workload = SharedPrefixWorkload(LengthRange(10, 40), LengthRange(1, 1), 0.5)
    systems = workload.system_prompts(seed=0)
    assert len(systems[0]) == shared_prefix_len(0.5, 40) + 1
    for request in workload.generate(50, seed=0):
        shared = shared_prefix_len(0.5, request.prompt_len)
        assert common_prefix_len([request.prompt_token_ids, systems[0]]) == shared


def test_multi_turn_each_turn_extends_the_previous_conversation() -> None:
    workload = MultiTurnWorkload(LengthRange(8, 8), LengthRange(4, 6), LengthRange(2, 3), num_turns=3)
    requests = workload.generate(9, seed=5)
    # Turn by turn: turn 0 of every conversation, then turn 1, ...
    assert [(r.conversation_id, r.turn) for r in requests] == [(c, t) for t in range(3) for c in range(3)]
    by_key = {(r.conversation_id, r.turn): r for r in requests}
    for conversation in range(3):
        for turn in (1, 2):
            previous, current = by_key[conversation, turn - 1], by_key[conversation, turn]
            reply = current.messages[-2]
            assert reply.role is Role.ASSISTANT and len(reply.token_ids) == previous.max_tokens
            full_previous = previous.prompt_token_ids + reply.token_ids
            assert current.prompt_token_ids[: len(full_previous)] == full_previous
            assert current.messages[:-2] == previous.messages
            assert 4 <= current.prompt_len - len(full_previous) <= 6
        assert [m.role for m in by_key[conversation, 2].messages] == [
            Role.USER,
            Role.ASSISTANT,
            Role.USER,
            Role.ASSISTANT,
            Role.USER,
        ]
        assert by_key[conversation, 0].prompt_len == 8
    for request in requests:
        assert request.prompt_token_ids == tuple(t for m in request.messages for t in m.token_ids)


def test_multi_turn_truncation_drops_late_turns_first() -> None:
    workload = MultiTurnWorkload(LengthRange(4, 4), LengthRange(4, 4), LengthRange(2, 2), num_turns=4)
    requests = workload.generate(5, seed=0)
    assert [(r.conversation_id, r.turn) for r in requests] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2)]
    assert requests[0].request_id == "conv-0-turn-0"


def test_interference_mixes_classes_by_weight() -> None:
    workload = InterferenceWorkload(
        (
            RequestClass("long_prefill", 3.0, LengthRange(100, 100), LengthRange(2, 2)),
            RequestClass("long_decode", 1.0, LengthRange(4, 4), LengthRange(50, 50)),
        )
    )
    requests = workload.generate(400, seed=11)
    shapes = {r.class_name: (r.prompt_len, r.max_tokens) for r in requests}
    assert shapes == {"long_prefill": (100, 2), "long_decode": (4, 50)}
    num_prefill = sum(r.class_name == "long_prefill" for r in requests)
    assert 270 <= num_prefill <= 330  # expected 300; the seed fixes the exact count
    assert num_prefill == sum(r.class_name == "long_prefill" for r in workload.generate(400, seed=11))


def test_length_range_parse() -> None:
    assert LengthRange.parse(16, "input_len") == LengthRange(16, 16)
    assert LengthRange.parse({"min": 2, "max": 9}, "input_len") == LengthRange(2, 9)
    with pytest.raises(ValueError, match=r"input_len must be a token count or \{min: a, max: b\}"):
        LengthRange.parse("16", "input_len")
    with pytest.raises(ValueError, match="1 <= min <= max"):
        LengthRange(5, 4)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"kind": "zipf"}, "kind must be one of"),
        ({"kind": "random", "input_len": 4}, "Bad the random workload.*output_len"),
        ({"kind": "random", "input_len": 4, "output_len": 4, "promt": 1}, r"Unknown key\(s\) \['promt'\]"),
        ({"kind": "random", "input_len": 4, "output_len": 4, "vocab_size": 1}, "vocab_size must be >= 2"),
        ({"kind": "shared_prefix", "input_len": 4, "output_len": 4, "shared_fraction": 1.5}, r"within \[0, 1\]"),
        (
            {"kind": "multi_turn", "first_input_len": 4, "turn_input_len": 4, "output_len": 4, "num_turns": 0},
            "num_turns must be >= 1",
        ),
        ({"kind": "interference", "classes": []}, "one or more classes"),
        (
            {"kind": "interference", "classes": [{"name": "a", "weight": 0, "input_len": 1, "output_len": 1}]},
            "weight must be positive",
        ),
    ],
)
def test_bad_workload_specs_fail_clearly(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        workload_from_mapping(data)


def test_bad_workload_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text("kind: random\ninput_len: [1, 2]\noutput_len: 1\n")
    with pytest.raises(ValueError, match="w.yaml: input_len must be a token count"):
        load_workload(path)
    with pytest.raises(ValueError, match="Cannot read workload file"):
        load_workload(tmp_path / "missing.yaml")


def test_workload_request_validation() -> None:
    with pytest.raises(ValueError, match="at least one token"):
        WorkloadRequest("r", (), 1)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        WorkloadRequest("r", (1,), 0)
    with pytest.raises(ValueError, match="conversation_id and turn"):
        WorkloadRequest("r", (1,), 1, conversation_id=0)


def test_workloads_satisfy_the_protocol() -> None:
    workload: Workload = load_workload(WORKLOAD_DIR / "random.yaml")
    assert isinstance(workload, RandomWorkload)
