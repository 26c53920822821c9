"""KV hand-off throughput of each transport against raw loopback TCP (`tandem bench kv`)."""

from __future__ import annotations

from tandem.common.checksum import IMPLEMENTATION
from tandem.loadtest.bench.kv import (
    BEST_GOAL,
    GRANT_DIGESTS,
    GRPC_GOAL,
    MEMCPY,
    RAW,
    SHARED,
    SHM,
    SHM_MEMCPY_GOAL,
    SHM_TCP_GOAL,
    STAGED,
    baseline,
    measure_kv,
)
from tandem.loadtest.suite.context import BenchContext
from tandem.loadtest.suite.figures import Figure, Section


def run(ctx: BenchContext) -> Section:
    report = measure_kv(rounds=ctx.size(15, 2), prompt_tokens=ctx.size(4096, 512))
    if not report.exact:
        raise RuntimeError("a transport's destination blocks differ from the source's")
    rows = [("path", "cores", "MB/s (median)", "range", "of raw TCP in the same placement")]
    for name, result in report.results.items():
        rows.append(
            (
                name,
                "shared" if name in SHARED else "one each",
                f"{result.median:.0f}",
                f"{min(result.mb_per_s):.0f}..{max(result.mb_per_s):.0f}",
                f"{report.ratio(name):.2f}" + ("" if baseline(name) == RAW else " (of the shared-cores round)"),
            )
        )
    best_name, best = report.best
    figures = (
        Figure(f"best transport ({best_name}) / raw TCP", best, goal=BEST_GOAL),
        Figure("grpc / raw TCP", report.ratio("grpc"), goal=GRPC_GOAL),
        Figure("torch, received in place / raw TCP", report.ratio("torch")),
        Figure("tcp, cache blocks to cache blocks / raw TCP", report.ratio("tcp")),
        Figure("torch, staged as before issue 20 / raw TCP", report.ratio(STAGED)),
        Figure(
            "same-host shm / in-process memcpy of the same bytes",
            report.results[SHM].median / report.results[MEMCPY].median,
            goal=SHM_MEMCPY_GOAL,
        ),
        Figure("same-host shm / raw TCP, both on shared cores", report.ratio(SHM), goal=SHM_TCP_GOAL),
        Figure(f"{GRANT_DIGESTS} (prefill side, once per lease)", report.grant_digests_ms * 1e3, unit=" us"),
    )
    lay = report.layout
    setup = (
        f"{report.size_bytes / 2**20:.0f} MiB per pull ({report.num_blocks} blocks of "
        f"{report.bytes_per_block // 1024} KiB: {lay.num_layers} layers, {lay.num_kv_heads} KV heads x "
        f"{lay.head_dim}, {lay.dtype}); source process and receiver on loopback, one torch thread each; "
        f"median of {len(report.results[RAW].mb_per_s)} interleaved rounds. Raw TCP and the network "
        "transports run with the source's threads pinned to one core and the receiver's to another (two "
        "workers never share a core; left to the scheduler, a 2-core host's rounds split by chance into "
        "modes 2x apart); the same-host path and the memcpy run on shared cores, as a same-host pair does, "
        "each round beside a raw TCP pull on shared cores, its baseline. Every pull includes the "
        "source's pack, checksums and the receiver's unpack into a shuffled block table (torch: received "
        "in place, runs of 64 blocks; tcp: sent from and received into the blocks, hashed by the receiver per "
        f"512 KiB batch (crc32c: {IMPLEMENTATION}), the source's trailer combined from the per-block crc32c "
        "it took at lease grant; "
        "torch staged: into a staging buffer, then unpacked); raw TCP is "
        "sendall into recv_into of a ready buffer. Same-host shm: the one-copy path of a CPU worker pair (the "
        "source's cache is a shared pool file, as a prefill worker's with --kv-shm): the receiver copies the "
        "leased blocks straight out of the source's pool into its shuffled blocks, hashing them (crc32c) as it "
        "copies, and compares with the source's crc32c of the same chunks (combined from the per-block crc32c "
        "the source took once when it granted the lease, as a prefill worker does when a prompt finishes; that "
        "hashing is timed apart, in the last figure); the receiver maps the pool once per "
        "source process, as a decode worker does (the warm-up round maps it); "
        "memcpy: one in-process copy_ of the same bytes."
    )
    return Section("kv", "KV hand-off vs raw loopback TCP", setup, figures, tuple(rows))
