"""A store's registered namespaces, kept in a file beside its disk tier.

Chunks on disk outlive the process; the namespaces that make them readable
must too, or every client would have to register again after a restart
before its chunks could be found. The catalog is one msgpack file, rewritten
whole (write to a temporary file, fsync, rename) each time a new namespace is
registered, so a crash leaves either the old or the new catalog, never a torn
one. Each record carries the namespace id it was registered under; a record
that no longer rebuilds to that id (a changed spec encoding, a flipped bit)
is skipped with a warning, never trusted.

The file is bounded: at most ``max_entries`` namespaces; registering more
raises ``CapacityError`` (namespaces already known are always accepted).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import msgpack

from kvstore.errors import CapacityError, InvalidInput
from kvstore.keys import Namespace
from kvstore.spec import KVSpec, ModelFingerprint, Shard

FORMAT = "kvstore-namespaces"
VERSION = 1
DEFAULT_MAX_ENTRIES = 4096
MAX_FILE_BYTES = 16 << 20
FILE_NAME = "namespaces.msgpack"

log = logging.getLogger(__name__)


def namespace_record(ns: Namespace) -> dict[str, Any]:
    """The catalog record of one namespace (every field of its id, plus the id)."""
    s = ns.spec
    return {
        "id": bytes(ns.id), "tenant": ns.tenant, "scheme": ns.scheme, "chunk_tokens": ns.chunk_tokens,
        "model": s.model.name, "revision": s.model.revision, "num_layers": s.num_layers,
        "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim, "dtype": s.dtype, "layout": s.layout,
        "shard": [s.shard.tp_rank, s.shard.tp_size, s.shard.pp_rank, s.shard.pp_size],
    }  # fmt: skip


def namespace_from_record(record: object) -> Namespace:
    """The namespace a catalog record names.

    Raises:
        InvalidInput: a malformed record, or one that no longer rebuilds to its id.
    """
    if not isinstance(record, dict):
        raise InvalidInput("namespace record is not a map")
    try:
        spec = KVSpec(
            ModelFingerprint(record["model"], record["revision"]),
            record["num_layers"],
            record["num_kv_heads"],
            record["head_dim"],
            record["dtype"],
            record["layout"],
            Shard(*record["shard"]),
        )
        ns = Namespace(record["tenant"], spec, record["scheme"], record["chunk_tokens"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInput(f"malformed namespace record: {exc}") from exc
    if bytes(ns.id) != record.get("id"):
        raise InvalidInput(f"namespace record of tenant {ns.tenant!r} does not rebuild to its id")
    return ns


class NamespaceCatalog:
    """The namespaces of one data directory; thread-safe; the only writer of its file."""

    def __init__(self, directory: str | os.PathLike[str], max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise InvalidInput("max_entries must be >= 1")
        self.path = Path(directory) / FILE_NAME
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._records: dict[bytes, dict[str, Any]] = {}

    def load(self) -> list[Namespace]:
        """The namespaces in the file (none if it is absent); unreadable records are skipped.

        A file that cannot be decoded at all is moved aside to ``<name>.corrupt`` (kept for
        inspection) and the catalog starts empty: chunks stay on disk and become readable
        again as soon as their namespace is registered.
        """
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        try:
            if size > MAX_FILE_BYTES:
                raise ValueError(f"{size} bytes, more than {MAX_FILE_BYTES}")
            doc = msgpack.unpackb(self.path.read_bytes(), raw=False, strict_map_key=True)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
                raise ValueError("not a version-1 namespace catalog")
            entries = doc.get("namespaces")
            if not isinstance(entries, list):
                raise ValueError("no namespace list")
        except (ValueError, msgpack.UnpackException) as exc:
            aside = self.path.with_name(self.path.name + ".corrupt")
            os.replace(self.path, aside)
            log.warning("namespace catalog unreadable (%s); moved to %s, starting empty", exc, aside)
            return []
        found: list[Namespace] = []
        with self._lock:
            for record in entries[: self.max_entries]:
                try:
                    ns = namespace_from_record(record)
                except InvalidInput as exc:
                    log.warning("namespace catalog: skipping a record: %s", exc)
                    continue
                self._records[bytes(ns.id)] = namespace_record(ns)
                found.append(ns)
        return found

    def record(self, ns: Namespace) -> None:
        """Add ``ns`` to the file if it is new (durable when this returns).

        Raises:
            CapacityError: the catalog already holds ``max_entries`` namespaces.
            OSError: the file could not be written (the namespace is not recorded).
        """
        key = bytes(ns.id)
        with self._lock:
            if key in self._records:
                return
            if len(self._records) >= self.max_entries:
                raise CapacityError(f"at most {self.max_entries} namespaces may be registered")
            records = {**self._records, key: namespace_record(ns)}
            self._write(list(records.values()))
            self._records = records

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def _write(self, records: list[dict[str, Any]]) -> None:
        body = msgpack.packb({"format": FORMAT, "version": VERSION, "namespaces": records}, use_bin_type=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
