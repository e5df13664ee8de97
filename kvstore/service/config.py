"""The daemon's one validated configuration object and its nested sections.

``DaemonConfig`` is frozen and checked as a whole when built: every section
validates its own fields (raising ``ValueError``), and the daemon-wide rules
(no non-loopback bind without auth tokens, distinct ports, one write mode)
are checked in ``DaemonConfig.__post_init__``. The loader that turns a
config file, ``KVSTORE_*`` variables and flags into this object lives in
``config_load.py``; only the CLI calls it. Field reference: docs/daemon.md.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import asdict, dataclass, field
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from kvstore.builder import TiersConfig
from kvstore.errors import InvalidInput
from kvstore.service.migration.peers_config import PeerConfig
from kvstore.service.net import is_loopback
from kvstore.tiers.store_types import StoreConfig

DEFAULT_DATA_DIR = "./kvstore-data"
ALL_TENANTS = "*"
"""Tenant of an admin token: it sees every tenant's namespaces (admin API only)."""

LogLevel = Literal["debug", "info", "warning", "error"]
_TOKEN = re.compile(r"^[A-Za-z0-9._~+/=-]{16,256}$")
_TENANT = re.compile(r"^(\*|[A-Za-z0-9][A-Za-z0-9._@-]{0,127})$")


class InsecureBind(InvalidInput):
    """A listener would bind a non-loopback address while no auth token is configured."""


def _port(name: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ValueError(f"{name} must be in [0, 65535] (0 picks a free port), got {port}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


@dataclass(frozen=True, slots=True)
class DataPlaneSettings:
    """The binary data plane's listener (kvstore/service/dataplane.py).

    Attributes:
        enabled: run the data plane; off leaves only the admin API (tests, inspection).
        host: TCP bind address; anything but loopback needs auth tokens.
        port: TCP port (0: a free port, logged at start).
        unix_path: also listen on this unix socket (same-host clients), or None.
        max_payload_bytes: largest payload one request may carry.
        max_inflight_bytes: payload bytes all connections may hold at once;
            beyond it requests wait (backpressure).
        shm: offer same-host clients zero-copy access to the CPU tier through /dev/shm.
        drain_timeout_s: on SIGTERM, how long in-flight requests may take to finish.
        tls_cert, tls_key: PEM certificate chain and key; both set, the TCP listener speaks
            TLS only (the unix socket stays plain). See docs/migration.md.
        transfer_tls_ca: the CA file this daemon trusts when it connects to a peer with TLS
            for a transfer (None: the system's trust store).
        peer_*: peer sharing through a Redis index (off unless ``peer_index_url`` is set);
            see ``kvstore.service.migration.peers_config.PeerConfig`` and docs/peers.md.
        handoff_max_keys, handoff_max_ttl_s, handoff_max_wait_s: bounds of the chunks
            announced as in flight (ANNOUNCE): keys held at once, an announcement's
            life, a LOOKUP's wait for them (docs/migration.md, section 9).
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 7481
    unix_path: str | None = None
    max_payload_bytes: int = 1 << 30
    max_inflight_bytes: int = 2 << 30
    shm: bool = True
    drain_timeout_s: float = 10.0
    tls_cert: str | None = None
    tls_key: str | None = None
    transfer_tls_ca: str | None = None
    peer_index_url: str | None = None
    peer_cluster: bool = False
    peer_index_prefix: str = "kvstore:peers"
    peer_advertise: str | None = None
    peer_token: str | None = field(default=None, repr=False)
    peer_id: str | None = None
    peer_timeout_s: float = 2.0
    peer_ttl_s: float = 15.0
    peer_max_chunks: int = 512
    handoff_max_keys: int = 1 << 20
    handoff_max_ttl_s: float = 600.0
    handoff_max_wait_s: float = 60.0

    @property
    def peers(self) -> PeerConfig | None:
        """Peer sharing's settings, or None when it is off."""
        return PeerConfig.from_settings(self)

    def __post_init__(self) -> None:
        PeerConfig.from_settings(self)  # validates the peer_* fields
        _port("data_plane.port", self.port)
        _positive("data_plane.max_payload_bytes", self.max_payload_bytes)
        if self.max_inflight_bytes < self.max_payload_bytes:
            raise ValueError("data_plane.max_inflight_bytes must be >= data_plane.max_payload_bytes")
        if self.drain_timeout_s < 0:
            raise ValueError("data_plane.drain_timeout_s must be >= 0")
        _positive("data_plane.handoff_max_keys", self.handoff_max_keys)
        _positive("data_plane.handoff_max_ttl_s", self.handoff_max_ttl_s)
        _positive("data_plane.handoff_max_wait_s", self.handoff_max_wait_s)
        if not self.host:
            raise ValueError("data_plane.host must not be empty")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("data_plane.tls_cert and data_plane.tls_key go together: set both or neither")


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin HTTP API and status page (same process, its own port).

    Attributes:
        host: bind address; anything but loopback needs auth tokens.
        port: TCP port (0: a free port, logged at start).
        max_body_bytes: largest JSON request body (413 beyond).
        max_chunk_bytes: largest chunk body of ``PUT /v1/chunks`` (413 beyond).
        history_interval_s: seconds between two samples of the throughput history.
        history_samples: samples kept (interval x samples = the window the status page shows).
        shutdown_timeout_s: on SIGTERM, how long in-flight admin requests may take to finish.
    """

    host: str = "127.0.0.1"
    port: int = 7482
    max_body_bytes: int = 1 << 20
    max_chunk_bytes: int = 256 << 20
    history_interval_s: float = 10.0
    history_samples: int = 60
    shutdown_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        _port("admin.port", self.port)
        _positive("admin.max_body_bytes", self.max_body_bytes)
        _positive("admin.max_chunk_bytes", self.max_chunk_bytes)
        _positive("admin.history_interval_s", self.history_interval_s)
        if not 2 <= self.history_samples <= 100_000:
            raise ValueError("admin.history_samples must be in [2, 100000]")
        if self.shutdown_timeout_s < 0:
            raise ValueError("admin.shutdown_timeout_s must be >= 0")
        if not self.host:
            raise ValueError("admin.host must not be empty")


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Bearer tokens, each mapped to exactly one tenant.

    Invariant: a token names one tenant; the tenant ``*`` (an admin token)
    sees every tenant through the admin API and is not given to the data
    plane. Tokens never appear in ``repr`` or in :meth:`redacted`.

    Attributes:
        tokens: ``(token, tenant)`` pairs; empty means no authentication
            (then every listener must be on loopback).
        tokens_file: the file the tokens were read from (for the record), or None.
    """

    tokens: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    tokens_file: str | None = None

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for token, tenant in self.tokens:
            if not _TOKEN.match(token):
                raise ValueError("auth tokens must be 16-256 characters of [A-Za-z0-9._~+/=-]")
            if not _TENANT.match(tenant):
                raise ValueError(f"bad tenant name {tenant!r}: use [A-Za-z0-9._@-] (or * for an admin token)")
            if token in seen:
                raise ValueError("an auth token is listed twice; each token maps to one tenant")
            seen.add(token)

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    def tenant_of(self, token: str) -> str | None:
        """The tenant of a presented token, or None; compares every token in constant time."""
        found = None
        for known, tenant in self.tokens:
            if hmac.compare_digest(known.encode(), token.encode()):
                found = tenant
        return found

    def data_plane_tokens(self) -> dict[str, str]:
        """token -> tenant for the data plane (admin tokens excluded)."""
        return {t: tenant for t, tenant in self.tokens if tenant != ALL_TENANTS}


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """Structured logs: one JSON object per line on stderr.

    Attributes:
        level: the lowest level logged.
        access_log: log one line per admin HTTP request.
    """

    level: LogLevel = "info"
    access_log: bool = True

    def __post_init__(self) -> None:
        if self.level not in ("debug", "info", "warning", "error"):
            raise ValueError(f"logging.level must be debug, info, warning or error, got {self.level!r}")


def default_tiers() -> TiersConfig:
    return TiersConfig(data_dir=DEFAULT_DATA_DIR)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Everything ``kvstore serve`` runs with; built once, validated as a whole.

    Invariants: a listener on a non-loopback address implies auth tokens;
    the admin and data-plane listeners never share a port; the store's
    write mode is the tiers' write mode.

    Attributes:
        tiers: which tiers and their budgets (embedded default: CPU + LMDB under ./kvstore-data).
        store: leases, background queue and chunk-size limits of the tiered store.
        data_plane: the binary data plane's listener and limits.
        admin: the admin HTTP API's listener and limits.
        auth: bearer tokens and their tenants.
        logging: log level and access log.
    """

    tiers: TiersConfig = field(default_factory=default_tiers)
    store: StoreConfig = field(default_factory=StoreConfig)
    data_plane: DataPlaneSettings = field(default_factory=DataPlaneSettings)
    admin: AdminConfig = field(default_factory=AdminConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if self.store.write_mode != self.tiers.write_mode:
            raise ValueError("store.write_mode must equal tiers.write_mode (set tiers.write_mode)")
        self._check_binds()
        dp = self.data_plane
        if dp.enabled and dp.port != 0 and dp.port == self.admin.port:
            raise ValueError(f"admin.port and data_plane.port are both {dp.port}; give each its own port")

    def _check_binds(self) -> None:
        """Refuse a non-loopback listener without tokens that can authenticate on it."""
        checks = [("admin", self.admin.host, self.auth.enabled)]
        if self.data_plane.enabled:
            checks.append(("data plane", self.data_plane.host, bool(self.auth.data_plane_tokens())))
        for what, host, authenticated in checks:
            if not is_loopback(host) and not authenticated:
                raise InsecureBind(
                    f"refusing to bind the {what} to {host!r}: without auth tokens kvstore serves loopback only "
                    "(configure --tokens-file or KVSTORE_TOKENS with tenant tokens, or bind 127.0.0.1)"
                )

    def redacted(self, tenant: str = ALL_TENANTS) -> dict[str, object]:
        """A JSON-ready view with secrets removed: tokens, passwords in URLs.

        A tenant other than ``*`` sees neither the other tenants' names nor the token count.
        """
        out = asdict(self)
        tiers = out["tiers"]
        if tiers.get("redis_url"):
            tiers["redis_url"] = redact_url(str(tiers["redis_url"]))
        dp = out["data_plane"]
        dp["peer_token"] = "***" if dp.get("peer_token") else None
        if dp.get("peer_index_url"):
            dp["peer_index_url"] = redact_url(str(dp["peer_index_url"]))
        tenants = sorted({t for _, t in self.auth.tokens})
        auth: dict[str, object] = {"enabled": self.auth.enabled, "tokens_file": self.auth.tokens_file}
        if tenant == ALL_TENANTS:
            auth.update(tokens=len(self.auth.tokens), tenants=tenants)
        out["auth"] = auth
        return out


def redact_url(url: str) -> str:
    """``redis://user:secret@host/0`` -> ``redis://user:***@host/0``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
