"""The state file of a running `tandem up` (`<cache dir>/up.json`).

Written once the cluster is up, removed when `tandem up` exits. `tandem status` reads it to
find Redis and the cluster name; tests read it for the pids of the children. JSON object:
`{"redis_url", "cluster", "endpoint", "pid", "children": [{"name", "pid", "address",
"metrics_port"}, ...], "cluster_token"}` (each child a `ChildSummary`); `pid` is the `tandem up`
process itself. The file holds secrets (the Redis URL with its password, the cluster token, which
`tandem drain` presents), so it is readable by its owner only (mode 0600, as `mkstemp` creates
it); `tandem status` never prints either.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tandem.common.plane_auth import ClusterToken

STATE_FILE_NAME = "up.json"


@dataclass(frozen=True)
class ChildSummary:
    """One running child as `tandem up` reports it (and writes it to its state file)."""

    name: str
    pid: int
    address: str | None
    metrics_port: int | None


@dataclass(frozen=True)
class UpState:
    redis_url: str
    cluster: str
    endpoint: str
    pid: int
    children: tuple[ChildSummary, ...] = ()
    cluster_token: ClusterToken | None = None  # None: an insecure plane

    def owner_running(self) -> bool:
        """Whether the `tandem up` that wrote this file still runs (False: a stale file)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # someone else's process
        return True

    def to_json(self) -> dict[str, Any]:
        return {
            "redis_url": self.redis_url,
            "cluster": self.cluster,
            "endpoint": self.endpoint,
            "pid": self.pid,
            "children": [asdict(child) for child in self.children],
            "cluster_token": self.cluster_token.secret if self.cluster_token is not None else None,
        }

    @classmethod
    def from_json(cls, data: Any) -> UpState:
        """Parse and check a state file's content; ValueError if it is not one."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        try:
            children = tuple(
                ChildSummary(
                    name=str(c["name"]), pid=int(c["pid"]), address=c.get("address"), metrics_port=c.get("metrics_port")
                )
                for c in data.get("children", [])
            )
            token = data.get("cluster_token")
            state = cls(
                cluster_token=ClusterToken(str(token)) if token is not None else None,
                redis_url=str(data["redis_url"]),
                cluster=str(data["cluster"]),
                endpoint=str(data["endpoint"]),
                pid=int(data["pid"]),
                children=children,
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"missing or malformed field: {exc}") from exc
        return state


def write_state(path: Path, state: UpState) -> None:
    """Write `path` atomically (a reader sees the old file or the new one, never half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".up-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(state.to_json(), fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_state(path: Path) -> UpState | None:
    """The state in `path`; None if there is no file; ValueError if it is malformed."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return UpState.from_json(json.loads(text))
    except ValueError as exc:
        raise ValueError(f"state file {path} is malformed ({exc}); delete it") from exc


def remove_state(path: Path, pid: int) -> None:
    """Delete `path` if it still belongs to process `pid` (another `tandem up` may own it now)."""
    try:
        current = read_state(path)
    except ValueError:
        return
    if current is not None and current.pid == pid:
        path.unlink(missing_ok=True)
