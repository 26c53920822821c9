"""IncrementalDetokenizer and StopStringMatcher: exact text over every split of a stream."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from tandem.engine.tokenizer import Tokenizer
from tandem.gateway.detokenize import IncrementalDetokenizer, StopStringMatcher, token_bytes, token_text

MULTIBYTE = "héllo 世界 🙂"
REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_model_dir)


def compositions(n: int) -> list[list[int]]:
    """Every way to cut n tokens into consecutive non-empty pushes (2**(n-1) of them)."""
    out = []
    for cuts in itertools.product((False, True), repeat=max(n - 1, 0)):
        sizes, size = [], 1
        for cut in cuts:
            if cut:
                sizes.append(size)
                size = 0
            size += 1
        out.append([*sizes, size])
    return out


def stream(
    tokenizer: Tokenizer,
    prompt: Sequence[int],
    ids: Sequence[int],
    sizes: Sequence[int],
    skip_special_tokens: bool = True,
) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens)
    pieces, start = [], 0
    for size in sizes:
        pieces.append(detok.push(ids[start : start + size]))
        start += size
    pieces.append(detok.flush())
    return pieces


def test_multibyte_text_is_split_across_byte_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    assert REPLACEMENT in "".join(tokenizer.decode([i]) for i in ids)  # single tokens are partial characters
    assert tokenizer.decode(ids) == MULTIBYTE


@pytest.mark.parametrize("text", ["世界 🙂", "é🙂a"])
def test_every_split_concatenates_to_decode(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt = tokenizer.encode("Hello")
    for sizes in compositions(len(ids)):
        pieces = stream(tokenizer, prompt, ids, sizes)
        assert "".join(pieces) == text
        assert all(REPLACEMENT not in piece for piece in pieces)


def test_every_single_cut_of_long_multibyte_text(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(MULTIBYTE * 3, add_special_tokens=False)
    for a, b in itertools.combinations(range(1, len(ids)), 2):
        pieces = stream(tokenizer, [], ids, [a, b - a, len(ids) - b])
        assert "".join(pieces) == MULTIBYTE * 3
        assert all(REPLACEMENT not in piece for piece in pieces)


def test_one_token_at_a_time_emits_whole_characters(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("世🙂", add_special_tokens=False)
    assert len(ids) == 7  # 3 + 4 byte tokens
    assert stream(tokenizer, [], ids, [1] * 7) == ["", "", "世", "", "", "", "🙂", ""]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_streams_concatenate_to_decode(tokenizer: Tokenizer, skip_special_tokens: bool) -> None:
    rng = random.Random(1234)
    texts = [MULTIBYTE, "naïve café 🚀👍🏽", "日本語のテキスト", "The quick brown fox."]
    for _ in range(400):
        if rng.random() < 0.5:
            ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(0, 40))]
        else:  # real text, with special tokens sprinkled in
            ids = tokenizer.encode(rng.choice(texts), add_special_tokens=False)
            for _ in range(rng.randint(0, 3)):
                ids.insert(rng.randint(0, len(ids)), rng.randrange(4))
        prompt = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(0, 8))]
        sizes, left = [], len(ids)
        while left:
            sizes.append(min(left, rng.randint(1, 5)))
            left -= sizes[-1]
        pieces = stream(tokenizer, prompt, ids, sizes, skip_special_tokens)
        full = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(pieces) == full, (prompt, ids)
        if REPLACEMENT not in full:
            assert all(REPLACEMENT not in piece for piece in pieces)


def test_special_tokens(tokenizer: Tokenizer) -> None:
    ids = [*tokenizer.encode("hi", add_special_tokens=False), 1, *tokenizer.encode(" there", add_special_tokens=False)]
    assert "".join(stream(tokenizer, [0], ids, [1] * len(ids), skip_special_tokens=True)) == "hi there"
    assert "".join(stream(tokenizer, [0], ids, [1] * len(ids), skip_special_tokens=False)) == "hi<|eos|> there"


def test_prompt_context_does_not_leak_into_output(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("The quick brown")
    ids = tokenizer.encode(" fox jumps", add_special_tokens=False)
    assert "".join(stream(tokenizer, prompt, ids, [1] * len(ids))) == " fox jumps"


def test_prompt_ending_mid_character(tokenizer: Tokenizer) -> None:
    world = tokenizer.encode("世", add_special_tokens=False)  # 3 byte tokens
    # The prompt holds the first byte; the output's two bytes alone are two invalid sequences.
    assert stream(tokenizer, world[:1], world[1:], [1, 1]) == ["", "", REPLACEMENT * 2]
    assert tokenizer.decode(world[1:]) == REPLACEMENT * 2


def test_flush_emits_an_incomplete_tail(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a世", add_special_tokens=False)  # a, then 3 byte tokens
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.push(ids[:1]) == "a"
    assert detok.push(ids[1:3]) == ""
    assert detok.flush() == REPLACEMENT
    assert detok.flush() == ""


def test_window_stays_small(tokenizer: Tokenizer) -> None:
    """Each push decodes a few tokens, never the whole text (O(window) per token)."""

    class Spy:
        def __init__(self) -> None:
            self.lengths: list[int] = []

        def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
            self.lengths.append(len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    spy = Spy()
    ids = tokenizer.encode(MULTIBYTE * 50, add_special_tokens=False)
    detok = IncrementalDetokenizer(spy, tokenizer.encode("prompt " * 20))  # type: ignore[arg-type]
    text = "".join(detok.push([i]) for i in ids) + detok.flush()
    assert text == MULTIBYTE * 50
    assert len(ids) > 500 and max(spy.lengths) <= 8


def test_token_text_and_bytes(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("é世", add_special_tokens=False)
    assert b"".join(token_bytes(tokenizer, i) for i in ids) == "é世".encode()
    assert [token_text(tokenizer, i) for i in ids[1:]] == [REPLACEMENT] * 3
    assert token_bytes(tokenizer, 1) == b"<|eos|>" and token_text(tokenizer, 1) == "<|eos|>"
    space = tokenizer.encode(" ", add_special_tokens=False)
    assert [token_bytes(tokenizer, i) for i in space] == [b" "]


# ---- StopStringMatcher -------------------------------------------------------------------------


def run(matcher: StopStringMatcher, pushes: Sequence[str]) -> tuple[list[tuple[str, bool]], str]:
    return [matcher.push(p) for p in pushes], matcher.flush()


def test_stop_split_across_pushes() -> None:
    steps, tail = run(StopStringMatcher(["</s>"]), ["Hello <", "/s", "> more", "ignored"])
    assert steps == [("Hello ", False), ("", False), ("", True), ("", True)]
    assert tail == ""


def test_only_possible_stop_prefixes_are_held_back() -> None:
    matcher = StopStringMatcher(["xyz"])
    assert matcher.push("abc") == ("abc", False)
    assert matcher.push("dx") == ("d", False)
    assert matcher.push("y!") == ("xy!", False)
    assert matcher.push("xy") == ("", False)
    assert matcher.flush() == "xy"
    assert matcher.stopped is False


def test_include_stop_str() -> None:
    steps, tail = run(StopStringMatcher(["</s>"], include_stop_str=True), ["Hello </", "s> more"])
    assert steps == [("Hello ", False), ("</s>", True)]
    assert tail == ""


def test_earliest_ending_stop_wins() -> None:
    assert StopStringMatcher(["world", "lo w"]).push("hello world") == ("hel", True)
    assert StopStringMatcher(["bc", "abc"]).push("xabcd") == ("x", True)  # same end: the longer
    assert StopStringMatcher(["bc", "abc"], include_stop_str=True).push("xabcd") == ("xabc", True)
    assert StopStringMatcher(["cd", "abcdef"]).push("abcdef") == ("ab", True)


def test_no_stop_strings_pass_everything() -> None:
    matcher = StopStringMatcher([])
    assert matcher.push("abc") == ("abc", False)
    assert matcher.flush() == ""


def test_empty_stop_string_is_refused() -> None:
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        StopStringMatcher(["a", ""])


@pytest.mark.parametrize(
    ("stop", "include", "expected"),
    [
        (["STOP"], False, "abc "),
        (["STOP"], True, "abc STOP"),
        (["ST", "OP d"], False, "abc "),
        (["OP", "C STO"], False, "abc ST"),
        (["never"], False, "abc STOP def"),
    ],
)
def test_every_split_of_text_gives_the_same_result(stop: list[str], include: bool, expected: str) -> None:
    text = "abc STOP def"
    for sizes in compositions(len(text)):
        matcher, pieces, start, stopped = StopStringMatcher(stop, include), [], 0, False
        for size in sizes:
            piece, stopped = matcher.push(text[start : start + size])
            pieces.append(piece)
            start += size
        pieces.append(matcher.flush())
        assert "".join(pieces) == expected
        assert stopped is (expected != text)


def test_detokenizer_and_matcher_together(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("héllo 世界 🙂 more", add_special_tokens=False)
    for sizes in ([1] * len(ids), [2, 5, len(ids) - 7]):
        detok, matcher, pieces, start = IncrementalDetokenizer(tokenizer, []), StopStringMatcher(["界 "]), [], 0
        for size in sizes:
            piece, stopped = matcher.push(detok.push(ids[start : start + size]))
            pieces.append(piece)
            start += size
            if stopped:
                break
        assert "".join(pieces) == "héllo 世" and stopped
