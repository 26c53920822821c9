"""The records of the cluster state in Redis (cluster_state.py): their fields, written and read.

`worker_fields`, `load_fields` and `kv_event_fields` give the fields a writer stores for a
`WorkerInfo`, a `WorkerLoad` and a KV event (the layout is in cluster_state.py's docstring).
`parse_worker`, `parse_load` and `parse_kv_event` validate what a reader got back, as input from
anyone who can write to Redis: a malformed entry (a missing or non-numeric field, a negative
count, an address that is not host:port) gives None, with a warning through the caller's
`LogThrottle` under the key kind ("worker", "load", "kv_events"), never a traceback.

Values are bytes: the client is built with `decode_responses=False` (`ClusterState` checks it).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from typing import cast

from redis.typing import EncodableT, FieldT

from tandem.common.log_throttle import LogThrottle
from tandem.common.workers import KVEventKind, KVEventRecord, WorkerInfo, WorkerLoad, WorkerRole

# A worker's gRPC address: host:port, the host a DNS name, an IPv4 address or a bracketed IPv6
# one. Anything else (a gRPC scheme such as unix: or dns:, a path, a port out of range) is not
# an address a worker registers, and is never dialed.
_ADDRESS_RE = re.compile(r"(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?):([0-9]{1,5})")


def worker_fields(info: WorkerInfo) -> dict[str, str]:
    """The `worker:{id}` hash of `info` (reference_hash only when the worker has one)."""
    fields = {
        "role": info.role.value,
        "address": info.address,
        "fingerprint": info.fingerprint,
        "capacity_blocks": str(info.capacity_blocks),
        "version": info.version,
        "block_size": str(info.block_size),
        "model_id": info.model_id,
        "block_hash_version": str(info.block_hash_version),
        "kv_epoch": str(info.kv_epoch),
        "kv_cache_dtype": info.kv_cache_dtype,
        "host_id": info.host_id,
    }
    if info.reference_hash is not None:
        fields["reference_hash"] = f"{info.reference_hash:016x}"
    return fields


def load_fields(load: WorkerLoad) -> dict[str, str]:
    """The `load:{id}` hash of `load`."""
    return {
        "waiting": str(load.waiting),
        "running": str(load.running),
        "queued_prefill_tokens": str(load.queued_prefill_tokens),
        "kv_blocks_used": str(load.kv_blocks_used),
        "kv_blocks_total": str(load.kv_blocks_total),
        "timestamp_s": repr(float(load.timestamp_s)),
        "spec_draft_tokens": str(load.spec_draft_tokens),
        "spec_accepted_tokens": str(load.spec_accepted_tokens),
    }


def kv_event_fields(record: KVEventRecord) -> dict[FieldT, EncodableT]:
    """The `kv_events` stream entry of `record`: the hashes packed as little-endian uint64."""
    hashes = record.block_hashes
    return {
        "worker": record.worker_id,
        "epoch": str(record.epoch),
        "seq": str(record.seq),
        "kind": record.kind.value,
        "hashes": struct.pack(f"<{len(hashes)}Q", *hashes),
    }


def parse_worker(worker_id: str, fields: Mapping[bytes, bytes], malformed: LogThrottle) -> WorkerInfo | None:
    """The worker of a `worker:{id}` hash; None if empty (expired, absent) or malformed."""
    if not fields:
        return None  # expired between SCAN and HGETALL, or never there
    try:
        return WorkerInfo(
            worker_id=worker_id,
            role=WorkerRole(_text(fields, "role")),
            address=_address(fields),
            fingerprint=_text(fields, "fingerprint"),
            capacity_blocks=_int(fields, "capacity_blocks"),
            version=_text(fields, "version"),
            block_size=_int(fields, "block_size"),
            model_id=_text(fields, "model_id"),
            block_hash_version=_int(fields, "block_hash_version"),
            # optional (absent from older workers): the gateway refuses such a worker
            reference_hash=int(_text(fields, "reference_hash"), 16) if b"reference_hash" in fields else None,
            kv_epoch=_int(fields, "kv_epoch") if b"kv_epoch" in fields else 0,
            kv_cache_dtype=_text(fields, "kv_cache_dtype") if b"kv_cache_dtype" in fields else "",
            host_id=_text(fields, "host_id") if b"host_id" in fields else "",
        )
    except (ValueError, UnicodeDecodeError) as exc:
        malformed.warning("worker", "skipping malformed worker entry %r: %s", worker_id[:160], str(exc)[:160])
        return None


def parse_load(worker_id: str, fields: Mapping[bytes, bytes], malformed: LogThrottle) -> WorkerLoad | None:
    """The load of a `load:{id}` hash; None if empty (expired, absent) or malformed."""
    if not fields:
        return None
    try:
        return WorkerLoad(
            waiting=_int(fields, "waiting"),
            running=_int(fields, "running"),
            queued_prefill_tokens=_int(fields, "queued_prefill_tokens"),
            kv_blocks_used=_int(fields, "kv_blocks_used"),
            kv_blocks_total=_int(fields, "kv_blocks_total"),
            timestamp_s=float(_text(fields, "timestamp_s")),
            # optional (absent from older workers): no speculative decoding
            spec_draft_tokens=_int(fields, "spec_draft_tokens") if b"spec_draft_tokens" in fields else 0,
            spec_accepted_tokens=_int(fields, "spec_accepted_tokens") if b"spec_accepted_tokens" in fields else 0,
        )
    except (ValueError, UnicodeDecodeError) as exc:
        malformed.warning("load", "skipping malformed load entry %r: %s", worker_id[:160], str(exc)[:160])
        return None


def parse_kv_event(entry_id: str, fields: Mapping[bytes, bytes], malformed: LogThrottle) -> KVEventRecord | None:
    """The event of a `kv_events` stream entry; None if malformed."""
    try:
        packed = fields.get(b"hashes")
        if packed is None or len(packed) % 8:
            raise ValueError("hashes must be packed uint64 (a multiple of 8 bytes)")
        return KVEventRecord(
            worker_id=_text(fields, "worker"),
            epoch=_int(fields, "epoch"),
            seq=_int(fields, "seq"),
            kind=KVEventKind(_text(fields, "kind")),
            block_hashes=struct.unpack(f"<{len(packed) // 8}Q", packed),
        )
    except (ValueError, UnicodeDecodeError, struct.error) as exc:
        malformed.warning("kv_events", "skipping malformed kv event %s: %s", entry_id, str(exc)[:160])
        return None


def as_fields(reply: object) -> Mapping[bytes, bytes]:
    """A hash or stream entry as read with decode_responses=False (`ClusterState` checks it):
    redis-py types replies for both client modes."""
    return cast(Mapping[bytes, bytes], reply)


def _text(fields: Mapping[bytes, bytes], name: str) -> str:
    value = fields.get(name.encode())
    if value is None:
        raise ValueError(f"missing field {name!r}")
    return value.decode("utf-8")


def _int(fields: Mapping[bytes, bytes], name: str) -> int:
    return int(_text(fields, name), 10)


def _address(fields: Mapping[bytes, bytes]) -> str:
    address = _text(fields, "address")
    match = _ADDRESS_RE.fullmatch(address)
    if match is None or not 0 < int(match.group(1)) < 65536:
        raise ValueError(f"address must be host:port, got {address[:80]!r}")
    return address
