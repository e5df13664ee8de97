"""The engine adapters' one validated configuration object.

vLLM passes it as ``kv_transfer_config.kv_connector_extra_config``; SGLang as
``--hicache-storage-backend-extra-config`` (minus SGLang's own keys). Both go
through :meth:`AdapterSettings.from_mapping`, which rejects unknown keys so a
typo is an error, not a silently ignored option. Field reference:
docs/engines.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from kvstore.errors import InvalidInput
from kvstore.keys import DEFAULT_CHUNK_TOKENS, MAX_CHUNK_TOKENS

BackendKind = Literal["local", "daemon"]
PagedLayout = Literal["auto", "kv_blocks", "blocks_kv", "heads_tokens"]


@dataclass(frozen=True, slots=True)
class AdapterSettings:
    """How an engine adapter reaches its store and names its chunks.

    Attributes:
        backend: ``local``: an in-process tiered store, shared by every adapter
            object of this process that names the same ``store_id``;
            ``daemon``: the kvstore daemon at ``url``.
        url: daemon URL (``unix:///path`` or ``tcp://host:port``); daemon only.
        token: daemon auth token, or None.
        store_id: local only: adapters in one process with the same id share one store.
        cpu_bytes: local only: budget of the CPU tier.
        data_dir: local only: directory of an LMDB disk tier, or None.
        disk_bytes: local only: budget of the disk tier.
        redis_url: local only: Redis/Valkey URL of a remote tier, or None.
        chunk_tokens: tokens per stored chunk (vLLM: a multiple of its block size).
        default_tenant: tenant of requests that carry no ``cache_salt``.
        lease_ttl_s: how long a lookup pins its hits for the following load.
        paged_layout: vLLM only: how a layer's paged cache is laid out; ``auto``
            tells by shape (docs/engines.md).
        model_revision: revision recorded in the KV spec (the engine's own when None).
        save_decode: vLLM only: also store the KV of generated tokens, a chunk at a time
            as decoding fills chunks (prompt chunks are always stored).
        async_load: vLLM only: load in a background thread; the scheduler is told
            ``load_async`` and the worker reports finished loads through ``get_finished``.
    """

    backend: BackendKind = "local"
    url: str | None = None
    token: str | None = None
    store_id: str = "default"
    cpu_bytes: int = 1 << 30
    data_dir: str | None = None
    disk_bytes: int = 8 << 30
    redis_url: str | None = None
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    default_tenant: str = "default"
    lease_ttl_s: float = 30.0
    paged_layout: PagedLayout = "auto"
    model_revision: str | None = None
    save_decode: bool = True
    async_load: bool = False

    def __post_init__(self) -> None:
        if self.backend not in get_args(BackendKind):
            raise InvalidInput(f"backend must be one of {get_args(BackendKind)}, got {self.backend!r}")
        if self.backend == "daemon" and not self.url:
            raise InvalidInput("backend 'daemon' needs a url")
        if self.paged_layout not in get_args(PagedLayout):
            raise InvalidInput(f"paged_layout must be one of {get_args(PagedLayout)}, got {self.paged_layout!r}")
        if not 1 <= self.chunk_tokens <= MAX_CHUNK_TOKENS:
            raise InvalidInput(f"chunk_tokens must be in [1, {MAX_CHUNK_TOKENS}], got {self.chunk_tokens}")
        if self.cpu_bytes <= 0 or self.disk_bytes <= 0:
            raise InvalidInput("cpu_bytes and disk_bytes must be > 0")
        if not self.lease_ttl_s > 0:
            raise InvalidInput("lease_ttl_s must be > 0")
        if not self.default_tenant or not self.store_id:
            raise InvalidInput("default_tenant and store_id must not be empty")

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> AdapterSettings:
        """Settings from an engine's extra-config dict.

        Raises:
            InvalidInput: an unknown key, a value of the wrong type, or a bad value.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise InvalidInput(f"unknown kvstore adapter settings {unknown}; known: {sorted(fields)}")
        kwargs: dict[str, object] = {}
        for name, value in values.items():
            kwargs[name] = _coerce(name, fields[name].type, value)
        return cls(**kwargs)  # type: ignore[arg-type]


def _coerce(name: str, type_name: object, value: object) -> object:
    """Check one value against its field's declared type (the annotation string)."""
    declared = str(type_name)
    if value is None and "None" in declared:
        return None
    if declared.startswith("bool"):
        if isinstance(value, bool):
            return value
        raise InvalidInput(f"setting {name!r} must be a bool, got {type(value).__name__} {value!r}")
    if declared.startswith("int") and isinstance(value, int) and not isinstance(value, bool):
        return value
    if declared.startswith("float") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if declared.startswith(("str", "BackendKind", "PagedLayout")) and isinstance(value, str):
        return value
    raise InvalidInput(f"setting {name!r} must be {declared}, got {type(value).__name__} {value!r}")
