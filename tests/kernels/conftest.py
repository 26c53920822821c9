"""Kernel test setup: the Triton interpreter on CPU, compiled kernels on CUDA.

`triton.jit` picks interpreted or compiled kernels when a kernel module is imported (it reads
TRITON_INTERPRET at decoration time, not at launch), so the variable is set here, before any
test module imports `kernels`. Without CUDA every test runs in the interpreter on CPU tensors
(tiny shapes: it is ~1000x slower than torch); with CUDA the same tests run compiled, and
the `gpu`-marked tests add large shapes.
"""

from __future__ import annotations

import os

import torch

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from collections.abc import Callable  # noqa: E402
from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402

from tandem.kernels.cache_write import _store_kv_kernel  # noqa: E402
from tandem.kernels.launch_checks import is_interpreted  # noqa: E402

if is_interpreted(_store_kv_kernel) == ON_CUDA:
    raise pytest.UsageError(
        f"kernels are {'interpreted' if ON_CUDA else 'compiled'} but this machine "
        f"{'has' if ON_CUDA else 'has no'} CUDA: TRITON_INTERPRET must be "
        f"{'unset' if ON_CUDA else '1'} before anything imports kernels (set it in "
        "tests/conftest.py, or run `pytest tests/kernels` on its own)"
    )

DEVICE = torch.device("cuda" if ON_CUDA else "cpu")

# Absolute/relative tolerances against the float32 reference rounded to the input dtype.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
}


class PagedKV(NamedTuple):
    """Random paged caches plus block tables that place each sequence in shuffled blocks."""

    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    seq_lens: torch.Tensor  # int32 [num_seqs]


def make_paged_kv(
    seq_lens: list[int],
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int = 0,
    spare_blocks: int = 3,
) -> PagedKV:
    """Caches filled with noise; sequence blocks drawn from a random permutation of the pool.

    Table rows are padded with block 0 and one spare column, as the engine pads them; the pool
    has `spare_blocks` unused blocks so that reading a wrong block shows up as a mismatch.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(blocks_per_seq, default=0) + 1
    num_blocks = sum(blocks_per_seq) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.zeros((len(seq_lens), max_blocks), dtype=torch.int32)
    for i, n in enumerate(blocks_per_seq):
        block_tables[i, :n] = torch.tensor(pool[:n], dtype=torch.int32)
        pool = pool[n:]
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return PagedKV(k_cache.to(DEVICE), v_cache.to(DEVICE), block_tables.to(DEVICE), lens.to(DEVICE))


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype).to(DEVICE)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCES[expected.dtype])


# Pairwise covering array over (head_dim, block_size, queries per KV head, dtype): every pair
# of values of any two factors appears in at least one case (12 cases instead of 72).
PAIRWISE_CASES: list[tuple[int, int, int, torch.dtype]] = [
    (64, 16, 1, torch.float32),
    (64, 16, 4, torch.float16),
    (64, 32, 8, torch.bfloat16),
    (80, 16, 4, torch.float32),
    (80, 16, 8, torch.float16),
    (80, 32, 1, torch.bfloat16),
    (128, 16, 8, torch.float32),
    (128, 16, 1, torch.float16),
    (128, 32, 4, torch.bfloat16),
    (256, 32, 1, torch.float32),
    (256, 32, 4, torch.float16),
    (256, 16, 8, torch.bfloat16),
]


class AttentionCase(NamedTuple):
    head_dim: int
    block_size: int
    num_heads: int
    num_kv_heads: int
    dtype: torch.dtype


def _case_id(case: tuple[int, int, int, torch.dtype]) -> str:
    head_dim, block_size, ratio, dtype = case
    return f"d{head_dim}-bs{block_size}-gqa{ratio}-{str(dtype).removeprefix('torch.')}"


@pytest.fixture(params=PAIRWISE_CASES, ids=[_case_id(c) for c in PAIRWISE_CASES])
def attention_case(request: pytest.FixtureRequest) -> AttentionCase:
    """One pairwise case; 2 KV heads (1 when 8 query heads share one, to keep it small)."""
    head_dim, block_size, ratio, dtype = request.param
    num_kv_heads = 1 if ratio == 8 else 2
    return AttentionCase(head_dim, block_size, ratio * num_kv_heads, num_kv_heads, dtype)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def paged_kv() -> Callable[..., PagedKV]:
    """Factory: `paged_kv(seq_lens, block_size, num_kv_heads, head_dim, dtype)`."""
    return make_paged_kv


@pytest.fixture
def rand() -> Callable[..., torch.Tensor]:
    """Factory: `rand(shape, dtype, seed=1)`, standard normal on the test device."""
    return random_tensor


@pytest.fixture
def check_close() -> Callable[[torch.Tensor, torch.Tensor], None]:
    """Compare a kernel's output with the reference using per-dtype tolerances."""
    return assert_close
