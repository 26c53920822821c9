"""The compiled modules, both optional; everything else is in pyproject.toml.

- `tandem.common._block_chain`: block_hash.py's chain loop in C.
- `tandem.common._crc32c`: crc32c with AVX-512 VPCLMULQDQ, for checksum.py.

Where one cannot be compiled (no C compiler or no Python headers), the install goes on without
it: `tandem.common.block_hash` then uses its pure-Python path, which gives the same hashes, and
`tandem.common.checksum` the `crc32c` package, which gives the same checksums.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tandem.common._block_chain",
            sources=["services/tandem/common/_block_chain.c"],
            depends=["services/tandem/common/xxhash-0.8.2/xxhash.h"],
            optional=True,
        ),
        Extension(
            "tandem.common._crc32c",
            sources=["services/tandem/common/_crc32c.c"],
            depends=["services/tandem/common/fast-crc32/crc32c_avx512_vpclmulqdq_v4s5x3.c"],
            extra_compile_args=["-fno-strict-aliasing"],  # the folding code reads bytes as uint64_t
            optional=True,
        ),
    ]
)
