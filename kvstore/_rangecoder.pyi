"""Type stub of the CacheGen C coder (kvstore/native/rangecoder.c; docs/codecs.md, cachegen).

Buffers are bytes-like objects (bytes, memoryview, numpy arrays); every error is a ValueError.
``dtype`` codes: 0 bfloat16, 1 float16, 2 float32. ``targets``: ``2 * slabs * channels`` float64,
``a`` then ``b`` (a channel's step target is ``sigma_slab * a + b``); ``rnd256``: the rounding
offset in 1/256 (0..128; 128 rounds to nearest). ``rope``: rotates (``rotate``) or un-rotates the
pairs ``(d, d + head_dim/2)`` of every K slab (even slabs when ``kv_factor`` is 2) of tokens
``exact..`` by a ``[tokens][head_dim/2][2]`` float32 (cos, sin) table; other slabs are copied.
``tscale``: None, or format 4's per-(slab, token) step codes (int8 in [-8, 8], ``[slabs][tokens -
exact]``, from ``token_codes``): a value's step is its channel's step times ``bfloat16(2^(code/4))``.
"""

from typing_extensions import Buffer

def token_codes(src: Buffer, dtype: int, slabs: int, tokens: int, channels: int, exact: int, heads: int) -> bytes: ...
def quant_params(
    src: Buffer,
    dtype: int,
    slabs: int,
    tokens: int,
    channels: int,
    exact: int,
    targets: Buffer,
    tscale: Buffer | None,
) -> bytes: ...
def quantize(
    src: Buffer,
    dtype: int,
    slabs: int,
    tokens: int,
    channels: int,
    exact: int,
    qparams: Buffer,
    rnd256: int,
    plo: Buffer | None,
    pn: Buffer | None,
    tscale: Buffer | None,
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
    tscale: Buffer | None,
) -> None: ...
def rope(
    src: Buffer,
    src_dtype: int,
    dst: Buffer,
    dst_dtype: int,
    slabs: int,
    tokens: int,
    exact: int,
    heads: int,
    head_dim: int,
    kv_factor: int,
    table: Buffer,
    rotate: bool,
) -> None: ...
def transform(
    src: Buffer,
    dst: Buffer,
    slabs: int,
    tokens: int,
    exact: int,
    heads: int,
    head_dim: int,
    matrices: Buffer,
    live: Buffer | None,
) -> None: ...
