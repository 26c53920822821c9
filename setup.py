"""The one compiled module, `tandem.common._block_chain` (block_hash.py's chain loop in C).

Everything else is in pyproject.toml. The extension is optional: where it cannot be compiled
(no C compiler or no Python headers), the install goes on without it and
`tandem.common.block_hash` uses its pure-Python path, which gives the same hashes.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tandem.common._block_chain",
            sources=["services/tandem/common/_block_chain.c"],
            depends=["services/tandem/common/xxhash-0.8.2/xxhash.h"],
            optional=True,
        )
    ]
)
