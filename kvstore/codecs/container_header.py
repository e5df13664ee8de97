"""What a container header may say: its schema, limits and validation.

Every value read from a header is checked here before anything trusts it:
exact key sets (no missing, no unknown fields), types (``bool`` is not an
int), ranges, and agreement between the spec, ``dtype``, ``shape`` and
``num_tokens``. The byte layout around the header is ``container.py``'s.
Every failure raises :class:`CodecError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, get_args

from kvstore.codecs.base import MAX_DECODED_BYTES, ChunkLayout
from kvstore.errors import CodecError, KVStoreError
from kvstore.spec import DType, KVSpec, Layout, ModelFingerprint, Shard

#: sections (and the end of the header) start at multiples of this many bytes
ALIGN: Final = 64
MAX_SECTIONS: Final = 32
MAX_NAME_LEN: Final = 64
MAX_STR_LEN: Final = 1024
MAX_PARAMS: Final = 32
#: bound on each dimension the header claims (heads, head_dim, tokens, tp/pp size)
MAX_DIM: Final = 1 << 24
#: bound on layers: codecs loop over layers, so this bounds their work on hostile headers
MAX_LAYERS: Final = 4096

HEADER_KEYS = frozenset({"codec", "params", "spec", "num_tokens", "dtype", "shape", "sections"})
_SECTION_KEYS = frozenset({"name", "offset", "length", "xxh3"})
_SPEC_INT_KEYS = ("num_layers", "num_kv_heads", "head_dim", "tp_rank", "tp_size", "pp_rank", "pp_size")
_SPEC_KEYS = frozenset({"model", "revision", "dtype", "layout", *_SPEC_INT_KEYS})

ParamValue = int | float | str | bool


@dataclass(frozen=True, slots=True)
class Section:
    """One entry of the section table; ``offset`` counts from the container's first byte."""

    name: str
    offset: int
    length: int
    xxh3: int


def align(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`ALIGN`."""
    return -(-n // ALIGN) * ALIGN


def spec_to_dict(spec: KVSpec) -> dict[str, str | int]:
    """The KV spec as the flat msgpack map a container header holds."""
    s = spec.shard
    return {
        "model": spec.model.name,
        "revision": spec.model.revision,
        "num_layers": spec.num_layers,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "dtype": spec.dtype,
        "layout": spec.layout,
        "tp_rank": s.tp_rank,
        "tp_size": s.tp_size,
        "pp_rank": s.pp_rank,
        "pp_size": s.pp_size,
    }


def check_str(value: object, what: str, *, max_len: int = MAX_STR_LEN, empty: bool = False) -> str:
    """``value`` if it is a string of at most ``max_len`` characters (empty only if ``empty``).

    Raises:
        CodecError: anything else; ``what`` names the field in the message.
    """
    if not isinstance(value, str):
        raise CodecError(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > max_len or (not value and not empty):
        raise CodecError(f"{what} must be 1..{max_len} characters, got {len(value)}")
    return value


def check_int(value: object, what: str, lo: int, hi: int) -> int:
    """``value`` if it is an int (not a bool) in ``[lo, hi]``.

    Raises:
        CodecError: anything else.
    """
    if type(value) is not int:  # bool is an int subclass: refuse it too
        raise CodecError(f"{what} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise CodecError(f"{what} = {value} outside [{lo}, {hi}]")
    return value


def check_map(value: object, what: str, keys: frozenset[str]) -> dict[str, object]:
    """``value`` if it is a map with exactly the keys ``keys``.

    Raises:
        CodecError: not a map, or a key missing or unknown.
    """
    if not isinstance(value, dict):
        raise CodecError(f"{what} must be a map, got {type(value).__name__}")
    got = set(value)
    if got != keys:
        missing, unknown = sorted(keys - got), sorted(map(str, got - keys))
        raise CodecError(f"{what}: missing fields {missing}, unknown fields {unknown}")
    return value


def spec_from_dict(value: object) -> KVSpec:
    """The KV spec of a container header, fully validated.

    Raises:
        CodecError: not a map of exactly the fields :func:`spec_to_dict` writes,
            or a field of the wrong type or out of range.
    """
    d = check_map(value, "spec", _SPEC_KEYS)
    limits = {k: MAX_LAYERS if k == "num_layers" else MAX_DIM for k in _SPEC_INT_KEYS}
    ints = {k: check_int(d[k], f"spec.{k}", 0, limits[k]) for k in _SPEC_INT_KEYS}
    dtype = check_str(d["dtype"], "spec.dtype", max_len=MAX_NAME_LEN)
    layout = check_str(d["layout"], "spec.layout", max_len=MAX_NAME_LEN)
    if dtype not in get_args(DType) or layout not in get_args(Layout):
        raise CodecError(f"spec names an unknown dtype {dtype!r} or layout {layout!r}")
    try:
        return KVSpec(
            model=ModelFingerprint(
                check_str(d["model"], "spec.model"), check_str(d["revision"], "spec.revision", empty=True)
            ),
            num_layers=ints["num_layers"],
            num_kv_heads=ints["num_kv_heads"],
            head_dim=ints["head_dim"],
            dtype=dtype,  # type: ignore[arg-type]  # checked against get_args above
            layout=layout,  # type: ignore[arg-type]
            shard=Shard(ints["tp_rank"], ints["tp_size"], ints["pp_rank"], ints["pp_size"]),
        )
    except KVStoreError as exc:
        raise CodecError(f"invalid spec in container: {exc}") from None


def check_params(value: object) -> dict[str, ParamValue]:
    """Codec params: a map of names to ints (i64), finite floats, bools or short strings.

    Raises:
        CodecError: anything else (each codec then checks its own keys and values).
    """
    if not isinstance(value, dict) or len(value) > MAX_PARAMS:
        raise CodecError(f"params must be a map of at most {MAX_PARAMS} entries")
    out: dict[str, ParamValue] = {}
    for key, v in value.items():
        name = check_str(key, "param name", max_len=MAX_NAME_LEN)
        if isinstance(v, bool):
            out[name] = v
        elif isinstance(v, int):
            out[name] = check_int(v, f"param {name}", -(1 << 63), (1 << 63) - 1)
        elif isinstance(v, float) and math.isfinite(v):
            out[name] = v
        elif isinstance(v, str):
            out[name] = check_str(v, f"param {name}", max_len=MAX_NAME_LEN * 4, empty=True)
        else:
            raise CodecError(f"param {name} must be a finite number, bool or string, not {type(v).__name__}")
    return out


def check_layout(header: dict[str, object], spec: KVSpec) -> ChunkLayout:
    """The chunk layout a header describes, bounded and consistent.

    Raises:
        CodecError: ``num_tokens`` out of range, more than ``MAX_DECODED_BYTES``
            decoded bytes, or ``dtype``/``shape`` disagreeing with the spec.
    """
    num_tokens = check_int(header["num_tokens"], "num_tokens", 1, MAX_DIM)
    layout = ChunkLayout(spec, num_tokens)
    if layout.nbytes > MAX_DECODED_BYTES:
        raise CodecError(f"container claims {layout.nbytes} decoded bytes, more than {MAX_DECODED_BYTES}")
    if header["dtype"] != spec.dtype:
        raise CodecError(f"header dtype {header['dtype']!r} disagrees with the spec's {spec.dtype!r}")
    shape = header["shape"]
    if not isinstance(shape, list) or tuple(shape) != layout.shape or any(type(d) is not int for d in shape):
        raise CodecError(f"header shape {shape!r} disagrees with the spec's {layout.shape}")
    return layout


def check_sections(value: object, start: int, end: int) -> tuple[Section, ...]:
    """The section table, checked canonical: in order from ``start``, each aligned, ending at ``end``.

    Raises:
        CodecError: not 1..MAX_SECTIONS well-formed entries with unique names,
            an offset not where the writer puts it, or a section past ``end``.
    """
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_SECTIONS:
        raise CodecError(f"sections must be a list of 1..{MAX_SECTIONS} entries")
    sections: list[Section] = []
    pos = start
    for i, entry in enumerate(value):
        d = check_map(entry, f"section {i}", _SECTION_KEYS)
        name = check_str(d["name"], f"section {i} name", max_len=MAX_NAME_LEN)
        if any(s.name == name for s in sections):
            raise CodecError(f"duplicate section {name!r}")
        offset = check_int(d["offset"], f"section {name} offset", 0, end)
        length = check_int(d["length"], f"section {name} length", 0, end)
        if offset != align(pos) or offset + length > end:
            raise CodecError(f"section {name} at [{offset}, {offset + length}) is misplaced or past {end}")
        digest = check_int(d["xxh3"], f"section {name} xxh3", 0, (1 << 64) - 1)
        sections.append(Section(name, offset, length, digest))
        pos = offset + length
    if pos != end:
        raise CodecError(f"container has {end - pos} bytes after its last section")
    return tuple(sections)
