"""`tandem.common.checksum.crc32c` against the `crc32c` package: the compiled AVX-512 module
(`tandem.common._crc32c`) is built and used where the CPU can run it, and gives the package's
values for every length around the folding code's block boundaries, every alignment and every
starting value; its argument errors name the problem."""

from __future__ import annotations

import random

import crc32c as package
import numpy as np
import pytest

from tandem.common import checksum

try:
    from tandem.common import _crc32c
except ImportError:
    _crc32c = None  # type: ignore[assignment]

# the folding loop takes 376 bytes per step once 384 remain; the head aligns to 8 then 64 bytes
LENGTHS = [*range(0, 130), *range(370, 400), 751, 752, 760, 1127, 4096, 65_535, 65_536, 65_537, (1 << 20) + 5]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


FAST_CPU = {"avx512f", "avx512vl", "vpclmulqdq", "sse4_2", "pclmulqdq"} <= _cpu_flags()


def test_the_compiled_module_is_built_and_chosen_where_the_cpu_has_vpclmulqdq() -> None:
    # `pip install -e .` (make install, CI) compiles it; its CPU check agrees with /proc/cpuinfo
    assert _crc32c is not None
    assert _crc32c.supported() is FAST_CPU
    if FAST_CPU:
        assert checksum.crc32c is _crc32c.crc32c
        assert checksum.IMPLEMENTATION == "avx512 vpclmulqdq"
    else:
        assert checksum.crc32c is package.crc32c
        assert checksum.IMPLEMENTATION == "crc32c package"


@pytest.mark.skipif(not FAST_CPU, reason="the compiled crc32c runs only on CPUs with AVX-512 VPCLMULQDQ")
def test_the_compiled_crc32c_equals_the_package_on_every_length_alignment_and_start() -> None:
    assert _crc32c is not None
    rng = random.Random(20)
    data = rng.randbytes(max(LENGTHS) + 64)
    for length in LENGTHS:
        for offset in (0, 1, 3, 8, 63):
            view = memoryview(data)[offset : offset + length]
            start = rng.getrandbits(32)
            assert _crc32c.crc32c(view) == package.crc32c(view), (length, offset)
            assert _crc32c.crc32c(view, start) == package.crc32c(view, start), (length, offset, start)
    assert _crc32c.crc32c(b"123456789") == 0xE3069283  # the Castagnoli check value
    assert _crc32c.crc32c(b"") == 0 and _crc32c.crc32c(b"", 0xDEADBEEF) == 0xDEADBEEF


@pytest.mark.skipif(not FAST_CPU, reason="the compiled crc32c runs only on CPUs with AVX-512 VPCLMULQDQ")
def test_the_compiled_crc32c_chains_across_pieces_as_one_buffer() -> None:
    assert _crc32c is not None
    plane = np.random.default_rng(3).integers(0, 256, size=(32, 8192), dtype=np.uint8)  # KV-sized pieces
    value = 0
    for row in plane:
        value = _crc32c.crc32c(row.data, value)
    assert value == package.crc32c(plane.tobytes())


@pytest.mark.skipif(not FAST_CPU, reason="the compiled crc32c runs only on CPUs with AVX-512 VPCLMULQDQ")
def test_the_compiled_crc32c_refuses_bad_arguments_by_name() -> None:
    assert _crc32c is not None
    with pytest.raises(TypeError, match=r"crc32c\(\) takes 1 or 2 positional arguments \(0 given\)"):
        _crc32c.crc32c()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"crc32c\(\) takes 1 or 2 positional arguments \(3 given\)"):
        _crc32c.crc32c(b"x", 0, 0)  # type: ignore[call-arg]
    with pytest.raises(OverflowError, match="value must be a 32-bit crc"):
        _crc32c.crc32c(b"x", 1 << 32)
    with pytest.raises(OverflowError):
        _crc32c.crc32c(b"x", -1)
    with pytest.raises(TypeError, match="bytes-like object"):
        _crc32c.crc32c("text")  # type: ignore[arg-type]
    with pytest.raises(BufferError):
        _crc32c.crc32c(np.zeros((4, 4), dtype=np.uint8)[:, ::2].data)  # not contiguous
