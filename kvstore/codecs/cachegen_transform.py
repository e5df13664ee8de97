"""Per-head transform coding for cachegen: quantize KV in the model's own error metric, decorrelated.

The error ``e`` a quantizer adds to one head's ``D`` values of one token changes the
model's next-token distributions by, to second order, ``KL ~ 1/2 e^T G e``, with
``G`` the head's ``D x D`` Fisher information (the mean of ``g g^T`` over sampled
targets' gradients, :func:`cachegen_calibrate.calibrate_heads`). With ``W =
G^(1/2)`` the weighted values ``y = W x`` make that metric plain squared
error, and with ``U`` the eigenvectors of ``W C W`` (``C``: the values'
covariance, keys un-rotated first) the components ``z = U^T W x`` are
decorrelated, sorted by variance. One uniform step for every component of
every head then gives the smallest KL for the bits (reverse water-filling):
components whose spread is below the step quantize to one value and cost
nothing. Keys are strongly low-rank; values less so. A profile holds the
forward ``T = U^T W`` and inverse ``T^-1 = W^-1 U`` matrices of every (slab,
head) as float32; the coder applies them with ``kvstore._rangecoder.transform``
(and the CUDA kernel ``cg_transform``): a fixed order of float32 operations,
every product and sum rounded on its own, so both give the same bits.

Decoding applies the inverse with the chunk's tables: a component whose
inline table holds one symbol (``n == 1``) has one value over the chunk's
tokens, so its terms are summed once per head (first, in component order)
and only the other components are multiplied per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from kvstore.buffers import U8
from kvstore.codecs import cachegen_rope as rope
from kvstore.codecs.cachegen_params import F64, Geometry
from kvstore.errors import CodecError, InvalidInput

F32 = npt.NDArray[np.float32]
#: largest magnitude of a transform coefficient a profile may hold
MAX_COEFF: Final = 1e12
#: default ridge: ``G + ridge * trace(G) / D * I`` (0.2 measured better than 0.05 at top-1 >= 97%)
DEFAULT_RIDGE: Final = 0.2


@dataclass(frozen=True, slots=True)
class HeadStatistics:
    """What a transform is built from, per (slab, head): Fisher ``fisher`` and covariance ``covariance``.

    Invariants: both are float64 ``[slabs, heads, D, D]``, symmetric positive semi-definite, keys
    (even slabs of ``kv_separate`` KV) measured un-rotated when ``rope_theta`` is set.
    """

    fisher: F64
    covariance: F64
    rope_theta: float = 0.0

    def diagonal_sensitivity(self) -> F64:
        """Each channel's own Fisher sensitivity (``slabs * heads * D``, chunk order)."""
        out: F64 = np.maximum(np.einsum("shdd->shd", self.fisher).reshape(-1), 1e-30)
        return out


@dataclass(frozen=True, slots=True)
class HeadTransform:
    """Forward and inverse matrices of every (slab, head): ``[slabs][heads][D][D]`` float32 each.

    Invariants: finite coefficients of magnitude <= :data:`MAX_COEFF`; ``forward`` and ``inverse``
    each hold ``4 * slabs * heads * head_dim**2`` bytes.
    """

    slabs: int
    heads: int
    head_dim: int
    forward: bytes
    inverse: bytes

    def __post_init__(self) -> None:
        check_transform(self, InvalidInput)

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim


def check_transform(t: HeadTransform, error: type[Exception]) -> None:
    """Raise ``error`` unless ``t`` satisfies the class invariants."""
    dims = (t.slabs, t.heads, t.head_dim)
    if any(type(v) is not int or not 1 <= v <= 1 << 20 for v in dims) or t.head_dim > 4096:
        raise error(f"cachegen transform geometry {dims} is out of range")
    size = 4 * t.slabs * t.heads * t.head_dim * t.head_dim
    if len(t.forward) != size or len(t.inverse) != size:
        raise error(f"cachegen transform matrices must hold {size} bytes each")
    for blob in (t.forward, t.inverse):
        m = np.frombuffer(blob, "<f4")
        if not (np.isfinite(m).all() and (np.abs(m) <= MAX_COEFF).all()):
            raise error(f"cachegen transform coefficients must be finite and at most {MAX_COEFF:g}")


def build_transform(stats: HeadStatistics, ridge: float = DEFAULT_RIDGE) -> HeadTransform:
    """The per-head transforms ``T = U^T G_r^(1/2)`` and ``T^-1`` (``G_r = G + ridge * tr(G)/D * I``).

    Raises:
        InvalidInput: shapes that differ or are not ``[slabs, heads, D, D]``, non-finite values, or
            ``ridge`` outside (0, 100].
    """
    g, c = np.asarray(stats.fisher, np.float64), np.asarray(stats.covariance, np.float64)
    if g.ndim != 4 or g.shape != c.shape or g.shape[2] != g.shape[3] or not 0.0 < ridge <= 100.0:
        raise InvalidInput("cachegen transform needs [slabs, heads, D, D] statistics and ridge in (0, 100]")
    if not (np.isfinite(g).all() and np.isfinite(c).all()):
        raise InvalidInput("cachegen transform statistics must be finite")
    slabs, heads, dim, _ = g.shape
    fwd = np.empty(g.shape, np.float64)
    inv = np.empty(g.shape, np.float64)
    eye = np.eye(dim)
    for s in range(slabs):
        for h in range(heads):
            gs = (g[s, h] + g[s, h].T) / 2
            scale = max(float(np.trace(gs)) / dim, 1e-30)
            ev, v = np.linalg.eigh(gs + ridge * scale * eye)
            ev = np.maximum(ev, ridge * scale)
            w, wi = (v * np.sqrt(ev)) @ v.T, (v / np.sqrt(ev)) @ v.T
            cw = w @ ((c[s, h] + c[s, h].T) / 2) @ w
            _, u = np.linalg.eigh(cw)
            u = u[:, ::-1]
            fwd[s, h], inv[s, h] = u.T @ w, wi @ u
    return HeadTransform(slabs, heads, dim, fwd.astype("<f4").tobytes(), inv.astype("<f4").tobytes())


def fits(t: HeadTransform, g: Geometry) -> bool:
    """Whether ``t`` was built for chunks of geometry ``g`` (same slabs, heads and head dim)."""
    return (t.slabs, t.heads, t.head_dim) == (
        g.slabs,
        g.heads,
        g.head_dim,
    ) and g.heads * g.head_dim == g.channels


def apply(values: U8, out: U8, g: Geometry, matrices: bytes, live: bytes | None) -> None:
    """``out = M @ values`` per (slab, head, token >= g.exact), float32 chunks (see the module doc)."""
    from kvstore.codecs.cachegen_coder import rangecoder

    try:
        rangecoder().transform(values, out, g.slabs, g.tokens, g.exact, g.heads, g.head_dim, matrices, live)
    except ValueError as exc:
        raise CodecError(f"cachegen transform: {exc}") from None


def forward_chunk(raw: U8 | bytes, g: Geometry, theta: float, t: HeadTransform) -> U8:
    """The chunk's components as float32 bytes (keys un-rotated first where ``theta`` applies)."""
    if rope.applies(g, theta):
        x = rope.unrotated(raw, g, theta)
    else:
        x = as_float32(raw, g)
    z = np.empty_like(x)
    apply(x, z, g, t.forward, None)
    return z


def inverse_into(values: U8, target: U8, g: Geometry, theta: float, t: HeadTransform, live: bytes) -> None:
    """Write the decoded components ``values`` (float32) back as the chunk's values into ``target``
    (``live``: one byte per component, 0 where it holds one value over the chunk's tokens)."""
    x = np.empty_like(values)
    apply(values, x, g, t.inverse, live)
    if rope.applies(g, theta):
        rope.rotate_into(x, target, g, theta)
    else:
        convert_into(x, target, g)


def as_float32(raw: U8 | bytes, g: Geometry) -> U8:
    """The chunk's tokens ``g.exact..`` as float32 bytes (earlier tokens left unset)."""
    out = np.empty(g.slabs * g.tokens * g.channels * 4, np.uint8)
    _convert(raw, g.dtype_code, out, 2, g)
    return out


def convert_into(values: U8, target: U8, g: Geometry) -> None:
    """Float32 ``values`` of tokens ``g.exact..`` into ``target`` in the chunk's dtype (round to nearest)."""
    _convert(values, 2, target, g.dtype_code, g)


def _convert(src: U8 | bytes, sdt: int, dst: U8, ddt: int, g: Geometry) -> None:
    from kvstore.codecs.cachegen_coder import rangecoder

    if g.channels % 2:
        raise CodecError("cachegen transforms need an even number of channels")
    table = bytes(8 * g.tokens)  # rope with kv_factor 1 rotates nothing: it only converts
    rangecoder().rope(src, sdt, dst, ddt, g.slabs, g.tokens, g.exact, g.channels // 2, 2, 1, table, True)
