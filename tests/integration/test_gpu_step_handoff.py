"""The GPU check's hand-off step on CPU: its real measurement path (a kv_source process, the torch
transport over gloo and the gRPC transport, the device copy and the checksum timings) on a small
layout, the tables it builds, the outcomes it fails on, and its skip without CUDA."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import xxhash

from tandem.common.layout import KVLayout
from tandem.kernels.reference import ref_pack_blocks
from tandem.loadtest.bench.kv import SEED, Receiver
from tandem.loadtest.bench.kv_source import random_kv_caches
from tandem.loadtest.gpu import step_handoff
from tandem.loadtest.gpu.step_handoff import (
    HandoffMeasurement,
    PathResult,
    check_handoff,
    handoff_tables,
    measure_handoff,
    nccl_warnings,
)
from tandem.loadtest.gpu.steps import Skip, StepFailed

# 4 layers x 2 K/V planes of 130 blocks x 2 KiB: 2 messages of 4 planes for the torch transport
# (at least 1 MiB each), one gRPC chunk, and a destination of 3 shuffled runs of block ids.
LAYOUT = KVLayout("llama", num_layers=4, num_kv_heads=2, head_dim=32, dtype="bfloat16", block_size=16)
PROMPT_TOKENS = 130 * 16 - 5  # 130 blocks, the last one partly filled
BYTES_PER_BLOCK = 2 * 4 * 16 * 2 * 32 * 2  # K and V x layers x block_size x heads x head_dim x bf16
ROUNDS = 2
DUPLICATE = "Duplicate GPU detected : rank 1 and rank 0 both on CUDA device 1a000"
TRANSFER_HEADERS = ("path", "MB/s (median)", "range", "of device copy", "destination")
CHECKSUM_HEADERS = ("integrity check (xxh64)", "ms per pull (median)", "GB/s", "of the transport's pull")


@pytest.fixture(scope="module")
def measured() -> HandoffMeasurement:
    return measure_handoff("cpu", LAYOUT, PROMPT_TOKENS, ROUNDS)


def test_both_transports_move_exactly_the_sources_bytes(measured: HandoffMeasurement) -> None:
    assert (measured.device, measured.device_name, measured.num_blocks) == ("cpu", "CPU", 130)
    assert measured.bytes_per_block == BYTES_PER_BLOCK
    assert measured.size_bytes == 130 * BYTES_PER_BLOCK == 2_129_920
    assert [(p.transport, p.label, p.bytes_moved, p.exact, p.error) for p in measured.paths] == [
        ("torch", "torch (gloo)", 2_129_920, True, ""),
        ("grpc", "grpc", 2_129_920, True, ""),
    ]
    for figures in (measured.copy_mb_per_s, *(p.mb_per_s for p in measured.paths)):
        assert len(figures) == ROUNDS and all(mb > 0 for mb in figures)
    assert measured.nccl_warnings == ()


def test_the_checksum_is_timed_over_the_packed_blocks_as_the_transports_plan_them(
    measured: HandoffMeasurement,
) -> None:
    caches = random_kv_caches(LAYOUT, 130, SEED)  # the source process's cache, rebuilt
    packed = ref_pack_blocks([c[0] for c in caches], [c[1] for c in caches], list(range(130)))
    cost = measured.checksum
    assert cost.torch_digest == xxhash.xxh64(packed.view(torch.uint8).numpy().tobytes()).intdigest()
    assert (cost.num_messages, cost.num_chunks, cost.chunk_bytes) == (2, 1, 4 * 2**20)
    assert cost.torch_check_s > 0 and cost.host_copy_s > 0 and cost.grpc_check_s > 0


def test_tables_of_a_cpu_measurement(measured: HandoffMeasurement) -> None:
    transfer, checksum = handoff_tables(measured)
    assert transfer.title == "KV hand-off between two processes on one CPU"
    assert transfer.headers == TRANSFER_HEADERS
    assert [(r[0], r[4]) for r in transfer.rows] == [
        ("device-to-device copy", "-"),
        ("torch (gloo)", "exact"),
        ("grpc", "exact"),
    ]
    assert transfer.rows[0][3] == "1.00"
    assert transfer.notes[0].startswith(
        "2.031 MiB per pull: 130 blocks of 16 KiB (4 layers, 2 KV heads x 32, bfloat16, block size 16); "
        "source process and receiver with their caches on cpu; median of 2 interleaved rounds"
    )
    assert len(transfer.notes) == 1  # no goal for gloo, no failure
    assert checksum.title == "Checksum cost over the same bytes"
    assert checksum.headers == CHECKSUM_HEADERS
    assert [r[0] for r in checksum.rows] == [
        "torch: host_bytes + xxh64 per message (2 messages)",
        "torch: of which host_bytes (the copy to the host)",
        "grpc: xxh64 per chunk of 4 MiB (1 chunks)",
    ]
    check_handoff(measured, [transfer, checksum])  # nothing to fail


def _on_gpu(measured: HandoffMeasurement, torch_path: PathResult, warnings: tuple[str, ...]) -> HandoffMeasurement:
    """The CPU measurement relabelled as a GPU run whose torch path is `torch_path`."""
    return dataclasses.replace(
        measured,
        device="cuda",
        device_name="NVIDIA H100 80GB HBM3",
        paths=(torch_path, measured.paths[1]),
        nccl_warnings=warnings,
    )


def test_nccls_same_gpu_refusal_is_a_refused_row_with_ncclss_words_and_the_reason(
    measured: HandoffMeasurement,
) -> None:
    error = "peer_unavailable: 127.0.0.1:4000: UNAVAILABLE: pair 1f: NCCL error in: ProcessGroupNCCL.cpp:3001"
    refused = _on_gpu(measured, PathResult("torch", "torch (NCCL)", 0, (), False, error), (DUPLICATE,))
    tables = handoff_tables(refused)
    transfer, checksum = tables
    assert transfer.title == "KV hand-off between two processes on one NVIDIA H100 80GB HBM3"
    assert transfer.rows[1] == ("torch (NCCL)", "refused", "-", "-", "-")
    assert transfer.rows[2][0] == "grpc" and transfer.rows[2][4] == "exact"
    assert transfer.notes[1:] == (
        f"torch (NCCL) refused: {error}",
        f"NCCL: {DUPLICATE}",
        f"why: {step_handoff.SAME_GPU_REASON}",
    )
    assert [r[3] for r in checksum.rows[:2]] == ["-", "-"]  # no torch pull to compare with
    assert checksum.rows[2][3] != "-"
    check_handoff(refused, tables)  # the known limit of one GPU: reported, not a failure


def test_a_torch_failure_other_than_the_refusal_fails_the_step_with_its_tables(measured: HandoffMeasurement) -> None:
    error = "timeout: receive on pair 1f: Timed out waiting 20000ms for recv operation to complete"
    failed = _on_gpu(measured, PathResult("torch", "torch (NCCL)", 0, (), False, error), ())
    tables = handoff_tables(failed)
    assert tables[0].rows[1] == ("torch (NCCL)", "failed", "-", "-", "-")
    assert tables[0].notes[1:] == (f"torch (NCCL) failed: {error}",)
    with pytest.raises(StepFailed) as failure:
        check_handoff(failed, tables)
    assert str(failure.value) == f"torch (NCCL) failed: {error}"
    assert failure.value.tables == tables


def test_a_destination_that_differs_fails_the_step(measured: HandoffMeasurement) -> None:
    grpc = dataclasses.replace(measured.paths[1], exact=False)
    wrong = dataclasses.replace(measured, paths=(measured.paths[0], grpc))
    tables = handoff_tables(wrong)
    assert tables[0].rows[2][4] == "differs from the source"
    with pytest.raises(StepFailed, match=r"^grpc: the destination blocks differ from the source's$"):
        check_handoff(wrong, tables)


def test_a_completed_nccl_pull_is_held_to_the_goal(measured: HandoffMeasurement) -> None:
    copy = dataclasses.replace(measured, copy_mb_per_s=(1000.0, 1000.0))
    nccl = _on_gpu(copy, PathResult("torch", "torch (NCCL)", copy.size_bytes, (500.0, 520.0), True), ())
    transfer = handoff_tables(nccl)[0]
    assert transfer.rows[1] == ("torch (NCCL)", "510", "500..520", "0.51", "exact")
    assert transfer.notes[1:] == ("goal: torch (NCCL) >= 0.70 of the device copy: 0.510 (missed)",)


def test_nccl_warnings_are_read_from_its_debug_files(tmp_path: Path) -> None:
    (tmp_path / "nccl.host.101.log").write_text(
        "host:101:120 [0] NCCL INFO Bootstrap : Using lo:127.0.0.1<0>\n"
        f"host:101:120 [0] init.cc:738 NCCL WARN {DUPLICATE}\n"
        "host:101:120 [0] NCCL INFO init.cc:1234 -> 5\n"
    )
    (tmp_path / "nccl.host.102.log").write_text(
        f"host:102:130 [0] init.cc:738 NCCL WARN {DUPLICATE}\nhost:102:130 [0] NCCL WARN another\n"
    )
    (tmp_path / "other.log").write_text("host:1:1 [0] NCCL WARN not a debug file\n")
    assert nccl_warnings(tmp_path) == (DUPLICATE, "another")


def test_receivers_exactness_check_sees_a_destination_it_did_not_write() -> None:
    receiver = Receiver(LAYOUT, 130, "127.0.0.1:1")
    assert not receiver.exact()  # a different seed
    index = torch.tensor(receiver.dst_ids)
    for source, dest in zip(receiver.source.kv_caches, receiver.dest.kv_caches):
        dest[:, index] = source
    assert receiver.exact()
    receiver.clear_dest()
    assert not receiver.exact()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the step runs instead")
def test_run_skips_without_cuda(tmp_path: Path) -> None:
    with pytest.raises(Skip) as skip:
        step_handoff.run(tmp_path)
    assert str(skip.value) == (
        "no CUDA device here (torch.cuda.is_available() is False): the hand-off step needs both "
        "processes' KV caches on a GPU"
    )
