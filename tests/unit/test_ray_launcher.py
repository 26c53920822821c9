"""`tandem up --ray` without a Ray cluster: the auth decision table (which RAY_AUTH_* variables
`tandem up` sets for Ray, for a head it starts and for one it joins), the environment patch and
its undo, the fresh token file, `RayConfig` validation and the `--ray` flags."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tandem.cli import build_parser
from tandem.cli.cluster import RAY_OWN_HEAD
from tandem.launcher.ray_auth import AuthMode, RayAuth, patch_environ, write_token_file


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("f" * 64 + "\n")
    return path


@pytest.mark.parametrize(
    "environ, home_token, own_head, expected",
    [
        # Nothing anywhere: a joined cluster is spoken to without a token; a head we start gets a
        # fresh one (like ray.init()), so no path is set here (it comes with new_token_file).
        ({}, False, False, {"RAY_AUTH_MODE": "disabled"}),
        ({}, False, True, {"RAY_AUTH_MODE": "token"}),
        # A token Ray finds by itself turns token mode on (what `ray start --head` does with it).
        ({}, True, False, {"RAY_AUTH_MODE": "token"}),
        ({"RAY_AUTH_TOKEN": "abc"}, False, False, {"RAY_AUTH_MODE": "token"}),
        ({"RAY_AUTH_TOKEN_PATH": "/x"}, False, False, {"RAY_AUTH_MODE": "token"}),
        # An explicit RAY_AUTH_MODE always wins, either way.
        ({"RAY_AUTH_MODE": "disabled"}, True, True, {"RAY_AUTH_MODE": "disabled"}),
        ({"RAY_AUTH_MODE": "TOKEN"}, False, False, {"RAY_AUTH_MODE": "token"}),
    ],
)
def test_auth_mode_table(
    tmp_path: Path, environ: dict[str, str], home_token: bool, own_head: bool, expected: dict[str, str]
) -> None:
    if home_token:
        (tmp_path / ".ray").mkdir()
        (tmp_path / ".ray" / "auth_token").write_text("t" * 64)
    auth = RayAuth.from_environ(environ, None, tmp_path)
    assert auth.environ(own_head) == expected


def test_token_file_flag_sets_mode_and_path_and_drops_the_token_variable(token_file: Path, tmp_path: Path) -> None:
    auth = RayAuth.from_environ({"RAY_AUTH_TOKEN": "other"}, token_file, tmp_path)
    assert auth.uses_token(own_head=False) and not auth.needs_new_token(own_head=True)
    assert auth.environ(own_head=False) == {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "RAY_AUTH_TOKEN": None,
    }
    assert "token file" in auth.describe(own_head=False)


def test_own_head_without_any_token_gets_a_private_new_one(tmp_path: Path) -> None:
    auth = RayAuth.from_environ({}, None, tmp_path)
    assert auth.needs_new_token(own_head=True) and not auth.needs_new_token(own_head=False)
    path = write_token_file(tmp_path)
    assert len(path.read_text()) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert auth.environ(own_head=True, new_token_file=path)["RAY_AUTH_TOKEN_PATH"] == str(path)
    with pytest.raises(FileExistsError):
        write_token_file(tmp_path)  # never overwrites


@pytest.mark.parametrize(
    "environ, token, message",
    [
        ({"RAY_AUTH_MODE": "maybe"}, False, "RAY_AUTH_MODE must be one of"),
        ({"RAY_AUTH_MODE": "disabled"}, True, "contradicts RAY_AUTH_MODE=disabled"),
    ],
)
def test_auth_rejects(environ: dict[str, str], token: bool, message: str, token_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        RayAuth.from_environ(environ, token_file if token else None, tmp_path)


def test_auth_rejects_missing_and_empty_token_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read the Ray auth token file"):
        RayAuth(token_file=tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        RayAuth(token_file=tmp_path / "empty")
    assert RayAuth(mode=AuthMode.TOKEN).uses_token(own_head=False)


def test_patch_environ_applies_and_undoes() -> None:
    environ = {"RAY_AUTH_TOKEN": "old", "KEEP": "1"}
    previous = patch_environ(environ, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": None})
    assert environ == {"RAY_AUTH_MODE": "token", "KEEP": "1"}
    patch_environ(environ, previous)
    assert environ == {"RAY_AUTH_TOKEN": "old", "KEEP": "1"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(address="not an address"), "host:port or ray://host:port"),
        (dict(address="http://1.2.3.4:80"), "host:port or ray://host:port"),
        (dict(cpus_per_worker=0), "cpus_per_worker must be > 0"),
        (dict(head_start_timeout_s=-1.0), "head_start_timeout_s must be > 0"),
    ],
)
def test_ray_config_rejects(kwargs: dict, message: str) -> None:
    from tandem.launcher.ray_config import RayConfig

    with pytest.raises(ValueError, match=message):
        RayConfig(**kwargs)


def test_ray_config_addresses() -> None:
    from tandem.launcher.ray_config import RayConfig

    assert RayConfig().own_head
    assert not RayConfig(address="10.0.0.1:6379").own_head
    assert RayConfig(address="ray://head.example:10001").address == "ray://head.example:10001"


def test_up_ray_flags() -> None:
    parser = build_parser()
    assert parser.parse_args(["up"]).ray is None
    assert parser.parse_args(["up", "--ray", "--prefill", "0"]).ray == RAY_OWN_HEAD
    args = parser.parse_args(
        ["up", "--ray", "ray://10.0.0.1:10001", "--ray-auth-token-file", "/t", "--ray-cpus-per-worker", "0.5"]
    )
    assert (args.ray, args.ray_auth_token_file, args.ray_cpus_per_worker) == ("ray://10.0.0.1:10001", Path("/t"), 0.5)
