"""This host's id: what tells a decode worker that a KV source shares its memory.

Two workers with the same host id may hand KV over through shared memory
(`tandem.kvtransfer.shm_transport`); a worker publishes its id in its registration
(`WorkerInfo.host_id`) and in every KV handle it grants. The id is `$TANDEM_HOST_ID` when set
(tests, or containers that share a `/dev/shm` volume across pods), else a hash of the kernel's
boot id and the hostname: processes of one container (or one machine) agree, pods with their
own hostname and their own `/dev/shm` differ. A wrong "same host" costs one failed segment open
and a network fallback, never a request. Leaf module.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Mapping
from pathlib import Path

HOST_ID_ENV = "TANDEM_HOST_ID"
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
MACHINE_ID_PATH = Path("/etc/machine-id")


def local_host_id(environ: Mapping[str, str]) -> str:
    """`environ[TANDEM_HOST_ID]` if set, else 16 hex digits of sha256(boot id or machine id, hostname)."""
    configured = environ.get(HOST_ID_ENV, "").strip()
    if configured:
        return configured
    machine = ""
    for path in (BOOT_ID_PATH, MACHINE_ID_PATH):
        try:
            machine = path.read_text().strip()
        except OSError:
            continue
        if machine:
            break
    return hashlib.sha256(f"{machine}\n{socket.gethostname()}".encode()).hexdigest()[:16]
