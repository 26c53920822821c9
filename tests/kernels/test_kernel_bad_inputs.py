"""Every launcher rejects malformed arguments with a ValueError naming the argument."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tandem.kernels import (
    pack_blocks,
    paged_decode_attention,
    paged_prefill_attention,
    store_kv,
    unpack_blocks,
)
from tandem.kernels.launch_checks import check_device

NB, BS, KVH, H, D = 4, 16, 2, 4, 64


def _args(device: torch.device) -> dict[str, torch.Tensor]:
    """Well-formed arguments for every launcher: 2 sequences, 3 new tokens."""
    cache = torch.zeros((NB, BS, KVH, D), dtype=torch.float16, device=device)
    return dict(
        key=torch.zeros((3, KVH, D), dtype=torch.float16, device=device),
        k_cache=cache,
        v_cache=cache.clone(),
        slots=torch.tensor([0, 1, 2], dtype=torch.int64, device=device),
        query=torch.zeros((2, H, D), dtype=torch.float16, device=device),
        tokens=torch.zeros((3, H, D), dtype=torch.float16, device=device),
        block_tables=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([5, 20], dtype=torch.int32, device=device),
        loc=torch.tensor([0, 1, 3], dtype=torch.int32, device=device),
    )


def _store(a: dict, **over: torch.Tensor) -> None:
    a = {**a, **over}
    store_kv(a["key"], a.get("value", a["key"]), a["k_cache"], a["v_cache"], a["slots"])


def _decode(a: dict, **over: torch.Tensor) -> None:
    a = {**a, **over}
    paged_decode_attention(a["query"], a["k_cache"], a["v_cache"], a["block_tables"], a["seq_lens"], 0.125)


def _prefill(a: dict, **over: torch.Tensor) -> None:
    a = {**a, **over}
    paged_prefill_attention(a["tokens"], a["k_cache"], a["v_cache"], a["block_tables"], a["loc"], a["seq_lens"], 0.125)


def _noncontiguous_cache(a: dict) -> torch.Tensor:
    # [NB, BS, KVH, D] with the two middle axes swapped in memory
    return a["k_cache"].transpose(1, 2).contiguous().transpose(1, 2)


CASES: list[tuple[str, Callable[[dict], None], str]] = [
    ("store-value-dtype", lambda a: _store(a, value=a["key"].float()), "value"),
    ("store-cache-dtype", lambda a: _store(a, k_cache=a["k_cache"].float()), "k_cache"),
    ("store-slot-dtype", lambda a: _store(a, slots=a["slots"].float()), "slot_mapping"),
    (
        "store-head-dim",
        lambda a: _store(a, key=a["key"][..., :32].contiguous(), value=a["key"][..., :32].contiguous()),
        "k_cache",
    ),
    ("store-slots-len", lambda a: _store(a, slots=a["slots"][:2]), "slot_mapping"),
    ("store-noncontig-cache", lambda a: _store(a, v_cache=_noncontiguous_cache(a)), "v_cache"),
    (
        "store-key-stride",
        lambda a: _store(a, key=a["key"].transpose(1, 2).contiguous().transpose(1, 2)),
        "key must have stride 1",
    ),
    ("decode-query-dtype", lambda a: _decode(a, query=a["query"].bfloat16()), "k_cache"),
    ("decode-table-dtype", lambda a: _decode(a, block_tables=a["block_tables"].long()), "block_tables"),
    ("decode-seq-lens-dtype", lambda a: _decode(a, seq_lens=a["seq_lens"].long()), "seq_lens"),
    ("decode-int-query", lambda a: _decode(a, query=a["query"].int()), "query"),
    ("decode-gqa-ratio", lambda a: _decode(a, query=a["query"][:, :3]), "heads"),
    ("decode-head-dim", lambda a: _decode(a, query=a["query"][..., :32]), "k_cache"),
    ("decode-query-rank", lambda a: _decode(a, query=a["query"][0]), "query"),
    ("decode-table-rows", lambda a: _decode(a, block_tables=a["block_tables"][:1]), "block_tables"),
    ("decode-noncontig-cache", lambda a: _decode(a, k_cache=_noncontiguous_cache(a)), "k_cache"),
    ("decode-noncontig-table", lambda a: _decode(a, block_tables=a["block_tables"].t()), "block_tables"),
    ("prefill-loc-len", lambda a: _prefill(a, loc=a["loc"][:2]), "query_start_loc"),
    ("prefill-loc-dtype", lambda a: _prefill(a, loc=a["loc"].long()), "query_start_loc"),
    ("prefill-cache-dtype", lambda a: _prefill(a, v_cache=a["v_cache"].float()), "v_cache"),
    ("prefill-noncontig-cache", lambda a: _prefill(a, v_cache=_noncontiguous_cache(a)), "v_cache"),
    ("prefill-cache-shape", lambda a: _prefill(a, v_cache=a["v_cache"][:2]), "v_cache"),
]


@pytest.mark.parametrize(("call", "name"), [(c, n) for _, c, n in CASES], ids=[i for i, _, _ in CASES])
def test_launcher_rejects_bad_argument(call: Callable[[dict], None], name: str, device) -> None:
    with pytest.raises(ValueError, match=name):
        call(_args(device))


def test_decode_rejects_zero_splits(device) -> None:
    with pytest.raises(ValueError, match="num_splits"):
        a = _args(device)
        paged_decode_attention(
            a["query"], a["k_cache"], a["v_cache"], a["block_tables"], a["seq_lens"], 0.125, num_splits=0
        )


def test_pack_rejects_bad_caches_and_ids(device) -> None:
    a = _args(device)
    k, v = [a["k_cache"]], [a["v_cache"]]
    with pytest.raises(ValueError, match="equal length"):
        pack_blocks(k, [], [0])
    with pytest.raises(ValueError, match=r"v_caches\[0\]"):
        pack_blocks(k, [a["v_cache"].float()], [0])
    with pytest.raises(ValueError, match=r"v_caches\[0\]"):
        pack_blocks(k, [_noncontiguous_cache(a)], [0])
    with pytest.raises(ValueError, match=r"v_caches\[0\]"):
        pack_blocks(k, [a["v_cache"][:2]], [0])
    with pytest.raises(ValueError, match="block_ids"):
        pack_blocks(k, v, [0, NB])
    with pytest.raises(ValueError, match="block_ids"):
        pack_blocks(k, v, torch.tensor([0.0]))


def test_unpack_rejects_bad_buffer(device) -> None:
    a = _args(device)
    k, v = [a["k_cache"]], [a["v_cache"]]
    buffer = pack_blocks(k, v, [1, 2])
    with pytest.raises(ValueError, match="buffer has"):
        unpack_blocks(buffer[:-1], k, v, [1, 2])
    with pytest.raises(ValueError, match="buffer"):
        unpack_blocks(buffer.float(), k, v, [1, 2])
    with pytest.raises(ValueError, match="block_ids"):
        unpack_blocks(buffer, k, v, [-1, 2])


def test_compiled_kernel_rejects_cpu_tensors() -> None:
    """Without the interpreter a CPU tensor is an error, never a silent torch fallback."""
    not_a_triton_kernel = object()
    with pytest.raises(ValueError, match="query is on cpu: Triton kernels need a CUDA device"):
        check_device(not_a_triton_kernel, query=torch.zeros(1))


def test_mixed_devices_rejected() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a second device type")
    with pytest.raises(ValueError, match="seq_lens is on"):
        check_device(object(), query=torch.zeros(1, device="cuda"), seq_lens=torch.zeros(1))
