"""Type stub of the CacheGen C coder (kvstore/native/rangecoder.c; docs/codecs_cachegen.md).

Buffers are bytes-like objects (bytes, memoryview, numpy arrays); every error is a ValueError.
``dtype`` codes: 0 bfloat16, 1 float16, 2 float32.
"""

from typing_extensions import Buffer

def quant_params(
    src: Buffer, dtype: int, slabs: int, tokens: int, channels: int, exact: int, bins: Buffer
) -> bytes: ...
def quantize(
    src: Buffer,
    dtype: int,
    slabs: int,
    tokens: int,
    channels: int,
    exact: int,
    qparams: Buffer,
    plo: Buffer | None,
    pn: Buffer | None,
) -> tuple[bytes, bytes, bytes, bytes]: ...
def histogram(symbols: Buffer, slabs: int, tokens_q: int, channels: int) -> bytes: ...
def encode_streams(
    symbols: Buffer,
    slabs: int,
    tokens_q: int,
    channels: int,
    group: int,
    lo: Buffer,
    n: Buffer,
    freq: Buffer,
    plo: Buffer | None,
    pn: Buffer | None,
    pfreq: Buffer | None,
) -> tuple[bytes, bytes]: ...
def decode_symbols(
    data: Buffer,
    offsets: Buffer,
    slabs: int,
    tokens_q: int,
    channels: int,
    group: int,
    lo: Buffer,
    n: Buffer,
    freq: Buffer,
    plo: Buffer | None,
    pn: Buffer | None,
    pfreq: Buffer | None,
) -> bytes: ...
def decode_chunk(
    data: Buffer,
    offsets: Buffer,
    slabs: int,
    tokens: int,
    channels: int,
    exact: int,
    group: int,
    lo: Buffer,
    n: Buffer,
    freq: Buffer,
    plo: Buffer | None,
    pn: Buffer | None,
    pfreq: Buffer | None,
    qparams: Buffer,
    dtype: int,
    out: Buffer,
) -> None: ...
