"""What the commands read besides their flags: the model directory's fallback (the generated
tiny model), the API keys and the cluster token in the environment."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tandem.common.plane_auth import PlaneAuth


def model_dir(path: Path | None) -> Path:
    """`path`, or the generated tiny model (made on first use) when no `--model` was given."""
    if path is not None:
        return path
    from tandem.engine.tiny_model import ensure_tiny_model

    return ensure_tiny_model()


def api_keys(flags: Iterable[str], environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The `--api-key` flags, then the keys of TANDEM_API_KEYS, in order, each once."""
    from tandem.gateway.config import API_KEYS_ENV

    from_environ = [key.strip() for key in environ.get(API_KEYS_ENV, "").split(",") if key.strip()]
    return tuple(dict.fromkeys([*flags, *from_environ]))


def plane_auth(
    cluster_token_file: Path | None, insecure_no_auth: bool, environ: Mapping[str, str] = os.environ
) -> PlaneAuth:
    """The internal plane's authentication: the token of `--cluster-token-file`, else of
    TANDEM_CLUSTER_TOKEN, read once here; or none with `--insecure-no-auth`."""
    from tandem.common.plane_auth import PlaneAuth

    return PlaneAuth(cluster_token_file, bool(insecure_no_auth)).resolve(environ)


def redis_url(flag: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """`--redis`, else TANDEM_REDIS_URL (how `tandem up` hands a URL with a password to its
    children, off their command lines), else None."""
    from tandem.common.redis_url import REDIS_URL_ENV

    return flag or environ.get(REDIS_URL_ENV) or None
