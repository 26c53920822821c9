"""APIKeys: disabled mode, header parsing, key ids, constant-time matching over all keys."""

from __future__ import annotations

import hashlib

import pytest

from tandem.gateway.auth import ANONYMOUS_KEY_ID, APIKeys, AuthError, AuthFailure, key_id_of

KEYS = ("sk-alpha-0123456789", "sk-beta-9876543210", "sk-gamma-5555")


def expect(keys: APIKeys, header: str | None, reason: AuthFailure) -> None:
    with pytest.raises(AuthError) as info:
        keys.check(header)
    assert info.value.reason is reason


def test_disabled_accepts_everything_as_anonymous():
    keys = APIKeys([])
    assert not keys.enabled
    assert len(keys) == 0
    for header in (None, "", "Bearer whatever", "Basic abc"):
        assert keys.check(header) == ANONYMOUS_KEY_ID == "anonymous"


def test_missing_header_is_missing():
    keys = APIKeys(KEYS)
    assert keys.enabled
    for header in (None, "", "   ", "Bearer", "Bearer   "):
        expect(keys, header, AuthFailure.MISSING)


def test_wrong_scheme_is_missing_like_openai():
    keys = APIKeys(KEYS)
    for header in (f"Basic {KEYS[0]}", KEYS[0], f"Token {KEYS[0]}", f"Bearer-{KEYS[0]}"):
        expect(keys, header, AuthFailure.MISSING)


def test_wrong_key_is_invalid():
    keys = APIKeys(KEYS)
    for header in ("Bearer sk-nope", f"Bearer {KEYS[0]}x", f"Bearer {KEYS[0][:-1]}", f"Bearer {KEYS[0]} {KEYS[1]}"):
        expect(keys, header, AuthFailure.INVALID)


def test_right_key_among_several_gives_same_stable_id():
    keys = APIKeys(KEYS)
    ids = []
    for key in KEYS:
        first = keys.check(f"Bearer {key}")
        # Scheme case-insensitive, whitespace trimmed, same id every time.
        assert keys.check(f"bearer {key}") == first
        assert keys.check(f"  BEARER \t {key}  ") == first
        assert first == "key-" + hashlib.sha256(key.encode()).hexdigest()[:16] == key_id_of(key)
        assert key not in first
        ids.append(first)
    assert len(set(ids)) == 3
    # Another instance (another replica), with the keys in another order, agrees.
    assert APIKeys(reversed(KEYS)).check(f"Bearer {KEYS[1]}") == ids[1]


def test_error_message_does_not_contain_the_key():
    keys = APIKeys(KEYS)
    with pytest.raises(AuthError) as info:
        keys.check("Bearer sk-secret-guess")
    assert "sk-secret-guess" not in str(info.value)
    assert str(info.value) == "authentication failed: invalid API key"


def test_duplicate_keys_are_collapsed_and_bad_keys_rejected():
    assert len(APIKeys([KEYS[0], KEYS[0], KEYS[1]])) == 2
    for bad in ([""], ["has space"], ["tab\tkey"], [None]):
        with pytest.raises(ValueError, match="non-empty string without whitespace"):
            APIKeys(bad)  # type: ignore[arg-type]
