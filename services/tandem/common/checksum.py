"""crc32c, the checksum of the tcp and same-host KV paths (DESIGN.md: crc32c or xxh64), as fast
as this CPU allows.

`crc32c(data, value=0)` is the Castagnoli crc of `data` continuing from `value`, the `crc32c`
package's function. Where the compiled module `_crc32c` (setup.py) was built and the CPU has
AVX-512 VPCLMULQDQ, it is that module's (about 70 GB/s on buffers in cache against the
package's 26 GB/s, measured here); elsewhere it is the package's. Both give the same values
(tests/unit/test_checksum.py compares them) and both release the GIL on large buffers.
"""

from __future__ import annotations

from typing import Protocol

import crc32c as _package

try:
    from tandem.common import _crc32c
except ImportError:  # not compiled: no C compiler where the package was installed
    _crc32c = None  # type: ignore[assignment]


class _Crc32c(Protocol):
    def __call__(self, data: bytes | bytearray | memoryview, value: int = 0, /) -> int: ...


crc32c: _Crc32c
if _crc32c is not None and _crc32c.supported():
    crc32c = _crc32c.crc32c
    IMPLEMENTATION = "avx512 vpclmulqdq"
else:
    crc32c = _package.crc32c
    IMPLEMENTATION = "crc32c package"
