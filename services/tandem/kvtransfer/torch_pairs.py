"""torch.distributed plumbing of the torch KV transport: pairs and the store (the message plan
is torch_plan.py).

A worker talks to many peers, so there is no global `init_process_group`: every (source,
receiver) pair is its own 2-rank process group (gloo on CPU, NCCL on CUDA), built directly on
a `PrefixStore(pair_id, TCPStore)`. The receiver hosts the TCPStore; the source is rank 0,
the receiver rank 1. Pairs form on first use and are torn down (aborted) on any failure; the
next pull forms a new pair under a new id.

Everything blocking here (formation, waits) runs in its owner's thread pool and is bounded by
a timeout. Pair objects are owned by one transport (receiver side) or servicer (source side).

Who may join a pair (the cluster token, `tandem.common.plane_auth`): before either side builds
its process group, the receiver writes a fresh random nonce under the pair's prefix, and the
source answers with `token.proof(PROOF_CONTEXT, pair_id, nonce)` (an HMAC-SHA256 keyed by the
cluster token). The receiver compares it in constant time, within `connect_timeout_s`; a peer
without the token (no proof, or a wrong one) gets no pair, and the receiver's pull fails with
REFUSED "did not prove the cluster token". The source itself only joins stores named by a
SendKV call, which carried the token and came from the store's own host.
Residual risk: TCPStore has no authentication of its own. Anyone who can reach the receiver's
store port (bound to `bind_host` only) can read its keys (the nonce and the proof, useless for
any other pair) and write keys: it can spoil a pair's formation (a denial of service: the pull
fails and the decode worker recomputes) or race the gloo/NCCL rendezvous keys that follow the
proof. Bytes it injected would not pass the checksum, which the real source reports over the
authenticated gRPC call. Keep `bind_host` on a network only the cluster reaches (the Helm
chart's NetworkPolicy); mTLS does not cover the store.
"""

from __future__ import annotations

import asyncio
import datetime
import hmac
import secrets
import socket
import time
from typing import Protocol, cast

import torch
import torch.distributed as dist

from tandem.common.plane_auth import ClusterToken
from tandem.kvtransfer.base import FailureReason, KVTransferError

MAX_TAG = 1 << 30  # gloo/NCCL message tags are 32-bit signed
PROOF_CONTEXT = "tandem-kv-pair-v1"  # what a source's proof is about (never reused elsewhere)
NONCE_KEY, PROOF_KEY = "auth/nonce", "auth/proof"  # under the pair's prefix


def host_bytes(tensor: torch.Tensor) -> memoryview:
    """Bytes of a uint8 tensor for hashing (device tensors are copied to the host first)."""
    return (tensor if tensor.device.type == "cpu" else tensor.cpu()).numpy().data


class _Group(Protocol):
    """What a pair uses of its gloo or NCCL backend, a `dist.Backend` used directly as a 2-rank
    group (no global process group). torch's stubs do not declare these methods."""

    def send(self, tensors: list[torch.Tensor], dst_rank: int, tag: int) -> dist.Work: ...

    def recv(self, tensors: list[torch.Tensor], src_rank: int, tag: int) -> dist.Work: ...

    def abort(self) -> None: ...


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(address: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" -> (host, port); ValueError if malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"malformed address {address!r}, expected host:port")
    return host.strip("[]"), int(port)


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(seconds, 0.001))


class StoreHost:
    """The receiver's TCPStore. TCPStore's own listener binds every interface, so it is
    handed a socket bound to the configured host only (DESIGN.md section 8)."""

    def __init__(self, host: str, timeout_s: float) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.bind((host, 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        self.store = dist.TCPStore(
            host,
            port,
            is_master=True,
            wait_for_workers=False,
            timeout=_timedelta(timeout_s),
            master_listen_fd=sock.detach(),
            use_libuv=True,  # the store owns (and closes) the fd
        )
        self.address = format_address(host, port)


class Pair:
    """One side of a 2-rank process group. `lock` serializes formation; `form` and the
    waits block and run in the owner's executor."""

    def __init__(self, pair_id: str, rank: int, host: str, device: torch.device, peer_store: str = "") -> None:
        self.pair_id = pair_id
        self.peer_store = peer_store  # source side: the receiver's TCPStore address
        self.rank = rank
        self.peer_rank = 1 - rank
        self.host = host  # our interface for gloo
        self.device = device
        self.lock = asyncio.Lock()
        self.group: _Group | None = None
        self.broken = False
        self.num_users = 0
        self.last_used_s = time.monotonic()
        self._next_tag = 0

    def reserve_tags(self, count: int) -> int:
        """Receiver side: the first of `count` fresh message tags for one transfer."""
        if self._next_tag + count >= MAX_TAG:
            self._next_tag = 0  # older transfers on this pair finished or failed long ago
        first = self._next_tag
        self._next_tag += count
        return first

    def form(self, store: dist.Store, timeout_s: float, token: ClusterToken | None) -> None:
        """Blocking: prove (source) or check (receiver) the cluster token `token` (None: an
        insecure plane, nothing checked), then join the group; returns once the peer joined too
        (or raises). Operations are bounded by their own waits, formation by `timeout_s`."""
        if self.broken:  # a torn-down pair never forms again: its store keys are spent
            raise KVTransferError(FailureReason.PEER_UNAVAILABLE, f"pair {self.pair_id} was torn down")
        prefixed = dist.PrefixStore(self.pair_id, store)
        if token is not None:
            self._authenticate(prefixed, timeout_s, token)
        try:
            if self.device.type == "cuda":
                nccl_options = dist.ProcessGroupNCCL.Options()
                nccl_options._timeout = _timedelta(timeout_s)
                self.group = cast(_Group, dist.ProcessGroupNCCL(prefixed, self.rank, 2, nccl_options))
            else:
                # `_Options` is private and absent from torch's stubs; it is how a gloo group gets
                # its device (interface) and timeout without a global process group.
                gloo_options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
                gloo_options._devices = [dist.ProcessGroupGloo.create_device(hostname=self.host)]
                gloo_options._timeout = _timedelta(timeout_s)
                self.group = cast(_Group, dist.ProcessGroupGloo(prefixed, self.rank, 2, gloo_options))
        except Exception as exc:
            self.broken = True
            raise KVTransferError(_reason(exc), f"pair {self.pair_id} did not form: {_first_line(exc)}") from None
        if self.broken:  # torn down while it formed: release it now
            self.abort()
            raise KVTransferError(FailureReason.PEER_UNAVAILABLE, f"pair {self.pair_id} was torn down")

    def _authenticate(self, store: dist.Store, timeout_s: float, token: ClusterToken) -> None:
        """Blocking: the receiver (rank 1) posts a nonce and checks the source's proof of the
        token; the source (rank 0) answers it. Raises (and breaks the pair) on any failure."""
        try:
            if self.rank == 1:
                nonce = secrets.token_hex(16)
                store.set(NONCE_KEY, nonce)
                store.wait([PROOF_KEY], _timedelta(timeout_s))
                proof = store.get(PROOF_KEY)
                if not hmac.compare_digest(proof, token.proof(PROOF_CONTEXT, self.pair_id, nonce).encode()):
                    raise KVTransferError(
                        FailureReason.REFUSED,
                        f"pair {self.pair_id}: the source did not prove the cluster token (wrong proof)",
                    )
            else:
                nonce = store.get(NONCE_KEY).decode()
                store.set(PROOF_KEY, token.proof(PROOF_CONTEXT, self.pair_id, nonce))
        except KVTransferError:
            self.broken = True
            raise
        except Exception as exc:
            self.broken = True
            reason = _reason(exc)
            what = "the source did not prove the cluster token" if self.rank == 1 else "no nonce from the receiver"
            raise KVTransferError(
                FailureReason.REFUSED if reason is FailureReason.TIMEOUT else reason,
                f"pair {self.pair_id}: {what} within {timeout_s:.1f} s: {_first_line(exc)}",
            ) from None

    def join_store(self, address: str, timeout_s: float) -> dist.Store:
        """Source side, blocking: connect to the receiver's TCPStore at `address`."""
        host, port = parse_address(address)
        try:
            return dist.TCPStore(host, port, is_master=False, timeout=_timedelta(timeout_s), use_libuv=True)
        except Exception as exc:
            self.broken = True
            raise KVTransferError(FailureReason.PEER_UNAVAILABLE, f"TCPStore {address}: {_first_line(exc)}") from None

    def post(self, tensor: torch.Tensor, tag: int, send: bool) -> dist.Work:
        """Blocking only briefly: start one send to (or receive from) the peer."""
        if self.group is None:
            raise KVTransferError(FailureReason.PEER_UNAVAILABLE, f"pair {self.pair_id} was torn down")
        try:
            if send:
                return self.group.send([tensor], self.peer_rank, tag)
            return self.group.recv([tensor], self.peer_rank, tag)
        except Exception as exc:
            self.broken = True
            raise KVTransferError(_reason(exc), f"pair {self.pair_id}: {_first_line(exc)}") from None

    def wait(self, work: dist.Work, deadline_s: float, what: str) -> None:
        """Blocking: wait for one send/recv until `deadline_s` (time.monotonic())."""
        try:
            work.wait(_timedelta(deadline_s - time.monotonic()))
        except Exception as exc:
            self.broken = True
            raise KVTransferError(_reason(exc), f"{what} on pair {self.pair_id}: {_first_line(exc)}") from None

    def abort(self) -> None:
        """Tear the group down; pending and future operations on it fail."""
        self.broken = True
        group, self.group = self.group, None
        if group is not None:
            try:
                group.abort()
            except Exception:  # already broken; nothing more to release
                pass


def _reason(exc: BaseException) -> FailureReason:
    text = str(exc).lower()
    return FailureReason.TIMEOUT if "timed out" in text or "timeout" in text else FailureReason.PEER_UNAVAILABLE


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
