"""Build the optional C helpers; everything else is in pyproject.toml.

The extension links OpenSSL's libcrypto (Debian: libssl-dev). It is
optional: where it cannot be built, kvstore falls back to the same keys
computed in Python, only slower.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kvstore._chainhash",
            ["kvstore/native/chainhash.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
        Extension(
            "kvstore._rangecoder",
            ["kvstore/native/rangecoder.c"],
            optional=True,
            extra_compile_args=["-O3"],
        ),
    ]
)
