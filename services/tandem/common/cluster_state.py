"""Cluster state in Redis (DESIGN.md section 4, "Redis keys"): live workers, load, KV events.

Keys, all under `tandem:{cluster}:` (e.g. `tandem:default:`):
- `worker:{id}`  hash role, address, fingerprint, capacity_blocks, version, block_size,
  model_id, block_hash_version, and the optional reference_hash (16 hex digits) and kv_epoch.
  TTL `ttl_s`; the worker's `Heartbeat` refreshes it. An entry that lacks a required field
  (a worker of an older version) is malformed: skipped with a warning; one without
  reference_hash is read (and refused by gateways, which say why).
  A worker whose key expired is dead to the scheduler.
- `load:{id}`    hash waiting, running, queued_prefill_tokens, kv_blocks_used, kv_blocks_total,
  timestamp_s. Same TTL, rewritten on every heartbeat tick.
- `gateway:{id}` hash routing_mode, refused:{worker id} -> reason (`gateway_view`): what one
  gateway's scheduler publishes on each refresh, read by `tandem status`. TTL a few refreshes.
- `kv_events`    stream, one entry per event: worker, epoch, seq, kind, hashes. `hashes` is
  the block hashes packed as little-endian uint64 (8 bytes each). Trimmed to about `maxlen`.

Writers: each worker process (its `Heartbeat` thread, and its KV event publisher for events).
Readers: gateways / schedulers (`list_workers`, `get_load`, `read_kv_events`). Everything read
is validated, as input from anyone who can write to Redis: a malformed entry (a missing or
non-numeric field, a negative count, an address that is not host:port, a key of the wrong
Redis type) is skipped, with a warning that is throttled per key kind (never a traceback), and
never reaches a reader (the fields of each record, written and validated: cluster_records.py).
Redis errors are raised to the caller, except in `Heartbeat`, which logs them and retries on its
next tick.

The client must be built with `decode_responses=False` (values are bytes: packed hashes).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Mapping

import redis
from redis.backoff import ConstantBackoff
from redis.retry import Retry
from redis.typing import EncodableT, FieldT

from tandem.common.cluster_records import (
    as_fields,
    kv_event_fields,
    load_fields,
    parse_kv_event,
    parse_load,
    parse_worker,
    worker_fields,
)
from tandem.common.gateway_view import GatewayView
from tandem.common.log_throttle import LogThrottle
from tandem.common.workers import KVEventKind, KVEventRecord, WorkerInfo, WorkerLoad, WorkerRole, check_name

logger = logging.getLogger(__name__)

DEFAULT_TTL_S = 5.0
DEFAULT_KV_EVENTS_MAXLEN = 100_000
CLIENT_RETRY_BACKOFF_S = 0.05


def connect(url: str, socket_timeout_s: float) -> redis.Redis:
    """A client for `ClusterState` whose calls fail within about 2 * `socket_timeout_s`
    when Redis is unreachable (refused, or frozen: a SIGSTOPped server accepts connections
    and never answers): the connect timeout equals the socket timeout and a failed command is
    retried once, after 50 ms. redis-py's own default retries with backoff for seconds, which
    would hide an outage from the callers that must react to it (heartbeats, the registry)."""
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        retry=Retry(ConstantBackoff(CLIENT_RETRY_BACKOFF_S), 1),
    )


class ClusterState:
    """Typed access to one cluster's keys. Thread-safe (redis-py clients are)."""

    def __init__(self, client: redis.Redis, cluster: str = "default", malformed_log_interval_s: float = 10.0) -> None:
        """`malformed_log_interval_s`: at most one warning per key kind (worker, load,
        kv_events) in this interval about malformed entries."""
        check_name("cluster", cluster)
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("ClusterState needs a redis client with decode_responses=False")
        self._redis = client
        self._prefix = f"tandem:{cluster}:"
        # (worker_id, epoch) -> last seq handed out. Owned by this publisher; see append_kv_events.
        self._kv_seq: dict[tuple[str, int], int] = {}
        self._kv_lock = threading.Lock()
        self._malformed = LogThrottle(logger, malformed_log_interval_s)  # keys: "worker", "load", "kv_events"

    @property
    def key_prefix(self) -> str:
        return self._prefix

    @property
    def socket_timeout_s(self) -> float | None:
        """The client's socket timeout (None: no timeout). Blocking reads must stay below it."""
        timeout = self._redis.connection_pool.connection_kwargs.get("socket_timeout")
        return None if timeout is None else float(timeout)

    def ping(self) -> None:
        """One round trip; raises the client's error if Redis does not answer."""
        self._redis.ping()

    def key(self, *parts: str) -> str:
        """Full key name, e.g. `key("worker", "w1")` -> `tandem:default:worker:w1`."""
        return self._prefix + ":".join(parts)

    # --- workers -----------------------------------------------------------------------------

    def register(self, info: WorkerInfo, ttl_s: float = DEFAULT_TTL_S) -> None:
        """Write (or overwrite) the worker's hash with a TTL. Called by `Heartbeat`."""
        self._write_hash(self.key("worker", info.worker_id), worker_fields(info), ttl_s)

    def heartbeat(self, worker_id: str, ttl_s: float = DEFAULT_TTL_S) -> bool:
        """Push the worker key's expiry `ttl_s` ahead. False if the key is gone: re-register."""
        return bool(self._redis.pexpire(self.key("worker", worker_id), ttl_to_ms(ttl_s)))

    def deregister(self, worker_id: str) -> None:
        """Delete the worker and load keys (a draining worker, just before it exits)."""
        self._redis.delete(self.key("worker", worker_id), self.key("load", worker_id))

    def get_worker(self, worker_id: str) -> WorkerInfo | None:
        """The live worker's info; None if expired, absent or malformed."""
        try:
            fields = as_fields(self._redis.hgetall(self.key("worker", worker_id)))
        except redis.ResponseError as exc:  # the key holds another Redis type
            fields = self._not_a_hash("worker", worker_id, exc)
        return parse_worker(worker_id, fields, self._malformed)

    def list_workers(self, role: WorkerRole | None = None) -> list[WorkerInfo]:
        """Live workers (optionally of one role), sorted by id. Uses SCAN, never KEYS."""
        keys = sorted(set(self._redis.scan_iter(match=self.key("worker", "*"), count=200)))
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        workers = []
        for key, reply in zip(keys, pipe.execute(raise_on_error=False)):
            worker_id = key.decode("utf-8", "replace")[len(self.key("worker", "")) :]
            fields = self._not_a_hash("worker", worker_id, reply) if isinstance(reply, Exception) else reply
            info = parse_worker(worker_id, fields, self._malformed)
            if info is not None and (role is None or info.role is role):
                workers.append(info)
        return workers

    # --- load --------------------------------------------------------------------------------

    def publish_load(self, worker_id: str, load: WorkerLoad, ttl_s: float = DEFAULT_TTL_S) -> None:
        """Overwrite the worker's load hash, with a TTL. Called by `Heartbeat` every tick."""
        self._write_hash(self.key("load", worker_id), load_fields(load), ttl_s)

    def get_load(self, worker_id: str) -> WorkerLoad | None:
        """The worker's last published load; None if expired, absent or malformed."""
        return self.get_loads([worker_id])[worker_id]

    def get_loads(self, worker_ids: Iterable[str]) -> dict[str, WorkerLoad | None]:
        """`get_load` for many workers in one pipelined round trip (the scheduler's refresher).
        Every id is a key of the result; None where expired, absent or malformed."""
        ids = list(dict.fromkeys(worker_ids))
        pipe = self._redis.pipeline(transaction=False)
        for worker_id in ids:
            pipe.hgetall(self.key("load", worker_id))
        loads: dict[str, WorkerLoad | None] = {}
        for worker_id, reply in zip(ids, pipe.execute(raise_on_error=False)):
            fields = self._not_a_hash("load", worker_id, reply) if isinstance(reply, Exception) else reply
            loads[worker_id] = parse_load(worker_id, fields, self._malformed)
        return loads

    def _not_a_hash(self, kind: str, worker_id: str, error: Exception) -> Mapping[bytes, bytes]:
        """A `kind` key that could not be read as a hash: skipped like a malformed entry. Any
        other error (Redis unreachable) is the caller's, as everywhere."""
        if not isinstance(error, redis.ResponseError):
            raise error
        self._malformed.warning(kind, "skipping malformed %s entry %r: %s", kind, worker_id[:160], str(error)[:160])
        return {}

    def _write_hash(self, key: str, fields: dict[str, str], ttl_s: float) -> None:
        ttl_ms = ttl_to_ms(ttl_s)
        pipe = self._redis.pipeline(transaction=True)  # readers never see a half-written hash
        pipe.delete(key)
        mapping: dict[FieldT, EncodableT] = {name: value for name, value in fields.items()}
        pipe.hset(key, mapping=mapping)
        pipe.pexpire(key, ttl_ms)
        pipe.execute()

    # --- gateway views (tandem.common.gateway_view) ------------------------------------------

    def publish_gateway_view(self, view: GatewayView, ttl_s: float) -> None:
        """Overwrite the gateway's view, with a TTL. Called by its scheduler on each refresh."""
        self._write_hash(self.key("gateway", view.gateway_id), view.to_fields(), ttl_s)

    def list_gateway_views(self) -> list[GatewayView]:
        """The views of the live gateways, sorted by id; malformed ones skipped (warning)."""
        keys = sorted(set(self._redis.scan_iter(match=self.key("gateway", "*"), count=200)))
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        prefix = len(self.key("gateway", ""))
        views = (
            GatewayView.from_fields(k.decode("utf-8", "replace")[prefix:], as_fields(f))
            for k, f in zip(keys, pipe.execute())
        )
        return [view for view in views if view is not None]

    # --- KV events ---------------------------------------------------------------------------

    def append_kv_events(
        self,
        worker_id: str,
        epoch: int,
        kind: KVEventKind,
        block_hashes: Iterable[int],
        maxlen: int = DEFAULT_KV_EVENTS_MAXLEN,
    ) -> KVEventRecord:
        """Append one event to `kv_events` (trimmed to about `maxlen`) and return it.

        Called by the worker's single KV event publisher, after its block pool changed. `seq`
        is kept here in memory, per (worker, epoch): a worker process has one publisher and
        picks a fresh epoch when it starts (e.g. `time.time_ns()`), so `(epoch, seq)` is unique.
        A seq is used up even if XADD fails: a reader then sees a gap (and resyncs that worker)
        rather than two events with one seq.
        """
        if maxlen <= 0:
            raise ValueError("maxlen must be > 0")
        hashes = tuple(block_hashes)
        with self._kv_lock:
            seq = self._kv_seq.get((worker_id, epoch), 0) + 1
            record = KVEventRecord(worker_id, epoch, seq, kind, hashes)  # validates
            self._kv_seq[(worker_id, epoch)] = seq
            self._redis.xadd(self.key("kv_events"), kv_event_fields(record), maxlen=maxlen, approximate=True)
        return record

    def read_kv_events(
        self, last_id: str = "0-0", count: int = 1000, block_ms: int | None = None
    ) -> tuple[list[KVEventRecord], str]:
        """Up to `count` events after stream id `last_id`, oldest first, and the id to pass next.

        Called by the scheduler's prefix index: `"0-0"` to rebuild from what the stream still
        holds, then the returned id to follow it. `block_ms` waits (bounded) for new entries; the
        client's socket timeout must exceed it. Malformed entries are skipped, but the returned
        id moves past them.
        """
        if count <= 0:
            raise ValueError("count must be > 0")
        if block_ms is not None and block_ms <= 0:
            raise ValueError("block_ms must be > 0 or None (0 would block forever)")
        reply = self._redis.xread({self.key("kv_events"): last_id}, count=count, block=block_ms)
        records: list[KVEventRecord] = []
        streams = reply.items() if isinstance(reply, dict) else (reply or [])  # RESP3 | RESP2
        for _stream, entries in streams:
            for entry_id, fields in entries:
                last_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                record = parse_kv_event(last_id, as_fields(fields), self._malformed)
                if record is not None:
                    records.append(record)
        return records, last_id


def ttl_to_ms(ttl_s: float) -> int:
    if not ttl_s > 0 or not math.isfinite(ttl_s):
        raise ValueError(f"ttl_s must be a finite number > 0, got {ttl_s!r}")
    return max(1, round(ttl_s * 1000))
