"""How `tandem up --ray` authenticates to Ray (Ray's token authentication).

Ray reads its side of the handshake from the environment of every Ray process, the driver
(`tandem up`) included, and nowhere else:

- `RAY_AUTH_MODE`: `token` (every Ray RPC carries `Authorization: Bearer <token>`, a server
  rejects any other) or `disabled`. Unset, `ray start --head` and a local `ray.init()` turn
  token mode on by themselves when a token exists (`ray.init()` even writes one), but
  `ray.init(address=...)` with an explicit address does not: a client that should present a
  token must say `RAY_AUTH_MODE=token`, or the server answers "Authentication token is missing
  or incorrect" until the connection times out.
- The token, first found of: `RAY_AUTH_TOKEN` (the token itself), `RAY_AUTH_TOKEN_PATH` (a file
  holding it), `~/.ray/auth_token` (what `ray get-auth-token --generate` writes).

`RayAuth` is the user's choice, built once by the CLI from `--ray-auth-token-file` and those
variables. `environ(...)` turns it into the variables to set: mode `token` when the user said
so, when a token file was given, or when Ray would find a token on its own (what
`ray start --head` does with it); `disabled` otherwise. A head that `tandem up --ray` starts
itself always uses token mode, like `ray.init()`: with a token the user has, or else with a
fresh one in a private file (`write_token_file`).
"""

from __future__ import annotations

import enum
import os
import secrets
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path(".ray") / "auth_token"  # under the home directory, as Ray has it
TOKEN_BYTES = 32  # what `ray get-auth-token --generate` uses (secrets.token_hex(32))


class AuthMode(enum.Enum):
    TOKEN = "token"
    DISABLED = "disabled"


@dataclass(frozen=True)
class RayAuth:
    """`mode`: `RAY_AUTH_MODE` as the user set it (None: unset). `token_file`: the token to
    present (`--ray-auth-token-file`), overriding Ray's own sources. `token_available`: Ray
    would find a token without us (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or
    `~/.ray/auth_token`)."""

    mode: AuthMode | None = None
    token_file: Path | None = None
    token_available: bool = False

    def __post_init__(self) -> None:
        if self.mode is not None and not isinstance(self.mode, AuthMode):
            raise ValueError(f"mode must be an AuthMode, got {self.mode!r}")
        if self.token_file is not None:
            if self.mode is AuthMode.DISABLED:
                raise ValueError(f"--ray-auth-token-file contradicts {AUTH_MODE_ENV}=disabled")
            try:
                token = Path(self.token_file).read_text().strip()
            except OSError as exc:
                raise ValueError(f"cannot read the Ray auth token file {self.token_file}: {exc}") from None
            if not token:
                raise ValueError(f"the Ray auth token file {self.token_file} is empty")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], token_file: Path | None, home: Path) -> RayAuth:
        """The user's choice from the environment and `--ray-auth-token-file`."""
        raw_mode = environ.get(AUTH_MODE_ENV)
        try:
            mode = AuthMode(raw_mode.strip().lower()) if raw_mode else None
        except ValueError:
            raise ValueError(
                f"{AUTH_MODE_ENV} must be one of {[m.value for m in AuthMode]}, got {raw_mode!r}"
            ) from None
        available = bool(environ.get(TOKEN_ENV) or environ.get(TOKEN_PATH_ENV) or (home / DEFAULT_TOKEN_FILE).is_file())
        return cls(mode=mode, token_file=token_file, token_available=available)

    def uses_token(self, own_head: bool) -> bool:
        """Whether Ray runs in token mode, for a head we start (`own_head`) or one we join."""
        if self.mode is not None:
            return self.mode is AuthMode.TOKEN
        return own_head or self.token_file is not None or self.token_available

    def needs_new_token(self, own_head: bool) -> bool:
        """A head we start needs a fresh token: token mode, and no token anywhere."""
        return own_head and self.uses_token(own_head) and self.token_file is None and not self.token_available

    def environ(self, own_head: bool, new_token_file: Path | None = None) -> dict[str, str | None]:
        """The variables to set (None: to remove) in our environment and a head's."""
        if not self.uses_token(own_head):
            return {AUTH_MODE_ENV: AuthMode.DISABLED.value}
        updates: dict[str, str | None] = {AUTH_MODE_ENV: AuthMode.TOKEN.value}
        token_file = self.token_file if self.token_file is not None else new_token_file
        if token_file is not None:
            # RAY_AUTH_TOKEN would win over the file: drop it so the file is what Ray presents.
            updates.update({TOKEN_PATH_ENV: str(Path(token_file).resolve()), TOKEN_ENV: None})
        return updates

    def describe(self, own_head: bool) -> str:
        """One line for the log: the mode and where the token comes from."""
        if not self.uses_token(own_head):
            return "token authentication off"
        source = (
            f"token file {self.token_file}"
            if self.token_file is not None
            else f"Ray's token ({TOKEN_ENV}, {TOKEN_PATH_ENV} or ~/{DEFAULT_TOKEN_FILE})"
            if self.token_available
            else "a new token for this head"
        )
        return f"token authentication on ({source})"


def write_token_file(directory: Path) -> Path:
    """A fresh token in `directory/auth_token`, readable by its owner only."""
    path = directory / "auth_token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(TOKEN_BYTES))
    return path


def patch_environ(environ: MutableMapping[str, str], updates: Mapping[str, str | None]) -> dict[str, str | None]:
    """Apply `updates` to `environ` (None removes a variable); returns the previous values,
    which `patch_environ(environ, previous)` puts back."""
    previous = {name: environ.get(name) for name in updates}
    for name, value in updates.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    return previous
