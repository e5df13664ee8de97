"""Build a DaemonConfig from layers: flags > environment > config file > defaults.

One table (``OPTIONS``) names every setting once: its section and field in
``DaemonConfig``, its ``KVSTORE_*`` variable, its flag and its parser. The
CLI adds the flags from it and passes ``os.environ`` and the parsed flags in;
this module never reads the process environment itself. A config file is
TOML (or YAML when PyYAML is installed) whose tables are the sections; an
unknown key is an error that names it.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import kvstore.codecs  # noqa: F401  (registers every codec)
from kvstore.builder import TiersConfig
from kvstore.codecs.base import make_codec
from kvstore.errors import KVStoreError
from kvstore.service.config import (
    AdminConfig,
    AuthConfig,
    DaemonConfig,
    DataPlaneSettings,
    LoggingConfig,
    default_tiers,
)
from kvstore.sizes import parse_size
from kvstore.tiers.policies import policy_names
from kvstore.tiers.store_types import StoreConfig
from kvstore.tiers.tier_codecs import CodecChoice

Parser = Callable[[object], object]
Layer = dict[str, dict[str, object]]
SECTIONS: dict[str, type] = {
    "tiers": TiersConfig,
    "store": StoreConfig,
    "data_plane": DataPlaneSettings,
    "admin": AdminConfig,
    "auth": AuthConfig,
    "logging": LoggingConfig,
}
TOKENS_ENV = "KVSTORE_TOKENS"
CONFIG_ENV = "KVSTORE_CONFIG"


def _size(v: object) -> object:
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise ValueError(f"not a byte size: {v!r}")
    return parse_size(v)


def _int(v: object) -> object:
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise ValueError(f"not an integer: {v!r}")
    return int(v)


def _float(v: object) -> object:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise ValueError(f"not a number: {v!r}")
    return float(v)


def _bool(v: object) -> object:
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {v!r} (use true or false)")


def _str(v: object) -> object:
    if not isinstance(v, str):
        raise ValueError(f"not a string: {v!r}")
    return v


def _choice(*allowed: str) -> Parser:
    def parse(v: object) -> object:
        if v not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {v!r}")
        return v

    return parse


def _policy(v: object) -> object:
    if v not in policy_names():
        raise ValueError(f"unknown eviction policy {v!r}; known: {', '.join(policy_names())}")
    return v


def _param(text: str) -> int | float | bool | str:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _codecs(v: object) -> object:
    """Tier codecs: a table ``{disk = {codec = "lossless"}, redis = {codec = "quant", bits = 8}}``
    in a file, or ``disk=lossless,redis=quant:bits=8`` in a flag or the environment."""
    table: dict[str, dict[str, object]] = {}
    if isinstance(v, str):
        for item in filter(None, (i.strip() for i in v.split(","))):
            tier, sep, spec = item.partition("=")
            codec, *settings = spec.split(":")
            if not sep or not tier or not codec:
                raise ValueError(f"expected tier=codec[:key=value...], got {item!r}")
            table[tier] = {"codec": codec, **{k: _param(x) for k, _, x in (p.partition("=") for p in settings)}}
    elif isinstance(v, dict):
        table = {str(k): dict(x) if isinstance(x, dict) else {"codec": x} for k, x in v.items()}
    else:
        raise ValueError(f"not a codec table: {v!r}")
    out: dict[str, CodecChoice] = {}
    for tier, entry in table.items():
        params = {k: x for k, x in entry.items() if k != "codec"}
        name = entry.get("codec")
        if not isinstance(name, str) or not all(isinstance(x, (int, float, bool, str)) for x in params.values()):
            raise ValueError(f"tier {tier!r}: a codec name and scalar parameters are needed")
        try:
            make_codec(name, params)  # type: ignore[arg-type]  # an unknown codec or bad params fail here
        except KVStoreError as exc:
            raise ValueError(f"tier {tier!r}: {exc}") from None
        out[tier] = CodecChoice(name, params)  # type: ignore[arg-type]
    return out


def _opt_str(v: object) -> object:
    """A string, where the empty string means "none" (TOML has no null)."""
    return _str(v) or None


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: where it lives in DaemonConfig and how each layer spells it.

    Attributes:
        section: the DaemonConfig field holding the section (``tiers``, ``admin``...).
        name: the field in that section (also the key in the config file).
        env: the environment variable.
        flag: the command-line flag, or None for file/environment only.
        parse: turns a string (flag, environment) or a file value into the field's type.
        help: one line for ``--help`` and docs/daemon.md.
    """

    section: str
    name: str
    env: str
    flag: str | None
    parse: Parser
    help: str

    @property
    def boolean(self) -> bool:
        """A switch: its flag comes as ``--x`` / ``--no-x``."""
        return self.parse is _bool


def _o(section: str, name: str, env: str, flag: str | None, parse: Parser, help: str) -> Option:
    return Option(section, name, "KVSTORE_" + env, flag, parse, help)


# fmt: off
OPTIONS: tuple[Option, ...] = (
    _o("tiers", "cpu_bytes", "CPU_BYTES", "--cpu-bytes", _size, "CPU tier budget"),
    _o("tiers", "policy", "POLICY", "--policy", _policy, "eviction policy: lru, lfu, cost, ttl"),
    _o("tiers", "data_dir", "DATA_DIR", "--data-dir", _opt_str, "LMDB disk tier directory ('' = no disk tier)"),
    _o("tiers", "disk_bytes", "DISK_BYTES", "--disk-bytes", _size, "disk tier budget"),
    _o("tiers", "disk_sync", "DISK_SYNC", "--disk-sync", _choice("none", "commit"),
       "none or commit (fsync per commit)"),
    _o("tiers", "redis_url", "REDIS_URL", "--redis-url", _opt_str, "remote tier URL ('' = no remote tier)"),
    _o("tiers", "redis_cluster", "REDIS_CLUSTER", "--redis-cluster", _bool, "the Redis URL names a cluster node"),
    _o("tiers", "redis_bytes", "REDIS_BYTES", "--redis-bytes", _size, "budget this daemon may write to Redis"),
    _o("tiers", "write_mode", "WRITE_MODE", "--write-mode", _choice("write_through", "write_back"),
       "write_through or write_back"),
    _o("tiers", "codecs", "TIER_CODECS", "--tier-codecs", _codecs,
       "codec per lower tier, e.g. disk=lossless,redis=quant:bits=8"),
    _o("store", "lease_ttl_s", "LEASE_TTL_S", "--lease-ttl-s", _float, "default lease lifetime"),
    _o("store", "max_leases", "MAX_LEASES", None, _int, "bound on live leases"),
    _o("store", "queue_depth", "QUEUE_DEPTH", None, _int, "bound on queued background writes"),
    _o("store", "queue_timeout_s", "QUEUE_TIMEOUT_S", None, _float, "wait on a full write queue before dropping"),
    _o("store", "max_chunk_bytes", "MAX_CHUNK_BYTES", "--max-chunk-bytes", _size, "largest chunk accepted"),
    _o("store", "promote_on_hit", "PROMOTE_ON_HIT", None, _bool, "copy lower-tier hits into the CPU tier"),
    _o("data_plane", "enabled", "DATA_PLANE", "--data-plane", _bool, "run the binary data plane"),
    _o("data_plane", "host", "HOST", "--host", _str, "data plane bind address"),
    _o("data_plane", "port", "PORT", "--port", _int, "data plane TCP port"),
    _o("data_plane", "unix_path", "UNIX_PATH", "--unix-path", _opt_str, "data plane unix socket ('' = none)"),
    _o("data_plane", "max_payload_bytes", "MAX_PAYLOAD_BYTES", None, _size, "largest request payload"),
    _o("data_plane", "max_inflight_bytes", "MAX_INFLIGHT_BYTES", None, _size, "payload bytes in flight"),
    _o("data_plane", "shm", "SHM", "--shm", _bool, "zero-copy /dev/shm access for same-host clients"),
    _o("data_plane", "drain_timeout_s", "DRAIN_TIMEOUT_S", "--drain-timeout-s", _float, "SIGTERM drain limit"),
    _o("data_plane", "tls_cert", "TLS_CERT", "--tls-cert", _opt_str, "PEM certificate: the TCP data plane speaks TLS"),
    _o("data_plane", "tls_key", "TLS_KEY", "--tls-key", _opt_str, "PEM private key of --tls-cert"),
    _o("data_plane", "transfer_tls_ca", "TRANSFER_TLS_CA", "--transfer-tls-ca", _opt_str,
       "CA file trusted when connecting to TLS peers for transfers"),
    _o("data_plane", "peer_index_url", "PEER_INDEX_URL", "--peer-index-url", _opt_str,
       "Redis/Valkey URL of the shared peer index ('' = no peer sharing)"),
    _o("data_plane", "peer_cluster", "PEER_CLUSTER", "--peer-cluster", _bool, "the peer index URL names a cluster node"),
    _o("data_plane", "peer_index_prefix", "PEER_INDEX_PREFIX", "--peer-index-prefix", _str,
       "first part of the peer index's keys"),
    _o("data_plane", "peer_advertise", "PEER_ADVERTISE", "--peer-advertise", _opt_str,
       "host:port peers reach this data plane at ('' = its bind address)"),
    _o("data_plane", "peer_token", "PEER_TOKEN", None, _opt_str, "bearer token presented to peers"),
    _o("data_plane", "peer_id", "PEER_ID", "--peer-id", _opt_str, "this daemon's name in the peer index"),
    _o("data_plane", "peer_timeout_s", "PEER_TIMEOUT_S", "--peer-timeout-s", _float,
       "bound on a lookup's work with peers"),
    _o("data_plane", "peer_ttl_s", "PEER_TTL_S", "--peer-ttl-s", _float,
       "peer index entries expire this long after the last heartbeat"),
    _o("data_plane", "peer_max_chunks", "PEER_MAX_CHUNKS", None, _int, "chunks asked of peers per lookup"),
    _o("data_plane", "handoff_max_keys", "HANDOFF_MAX_KEYS", None, _int, "chunks announced as in flight at once"),
    _o("data_plane", "handoff_max_ttl_s", "HANDOFF_MAX_TTL_S", None, _float, "longest life of an announcement"),
    _o("data_plane", "handoff_max_wait_s", "HANDOFF_MAX_WAIT_S", "--handoff-max-wait-s", _float,
       "longest wait of a lookup for announced chunks"),
    _o("admin", "host", "ADMIN_HOST", "--admin-host", _str, "admin API bind address"),
    _o("admin", "port", "ADMIN_PORT", "--admin-port", _int, "admin API TCP port"),
    _o("admin", "max_body_bytes", "ADMIN_MAX_BODY_BYTES", None, _size, "largest admin JSON body"),
    _o("admin", "max_chunk_bytes", "ADMIN_MAX_CHUNK_BYTES", None, _size, "largest PUT /v1/chunks body"),
    _o("admin", "history_interval_s", "HISTORY_INTERVAL_S", "--history-interval-s", _float,
       "seconds between throughput samples"),
    _o("admin", "history_samples", "HISTORY_SAMPLES", None, _int, "throughput samples kept"),
    _o("admin", "shutdown_timeout_s", "ADMIN_SHUTDOWN_TIMEOUT_S", None, _float, "SIGTERM limit for admin requests"),
    _o("auth", "tokens_file", "TOKENS_FILE", "--tokens-file", _opt_str, "file of 'token tenant' lines"),
    _o("logging", "level", "LOG_LEVEL", "--log-level", _choice("debug", "info", "warning", "error"),
       "debug, info, warning or error"),
    _o("logging", "access_log", "ACCESS_LOG", "--access-log", _bool, "log every admin request"),
)
# fmt: on
BY_KEY = {(o.section, o.name): o for o in OPTIONS}


def load_config(
    env: Mapping[str, str], flags: Mapping[str, object], config_file: str | None = None
) -> DaemonConfig:
    """The daemon's config from its layers; later layers win: file < environment < flags.

    Args:
        env: the process environment (only ``KVSTORE_*`` names are read).
        flags: option ``dest`` names (``section__name``) to values the user gave;
            absent or None means not given.
        config_file: TOML or YAML file; None falls back to ``KVSTORE_CONFIG``.

    Raises:
        ValueError: an unknown key, a bad value, an unreadable or world-readable
            tokens file, or a config that fails validation (InsecureBind...).
    """
    path = config_file or env.get(CONFIG_ENV) or None
    values: Layer = read_file(path) if path else {}
    _merge(values, _env_layer(env))
    _merge(values, _flag_layer(flags))
    tokens_file = values.get("auth", {}).pop("tokens_file", None)
    tokens = read_tokens_file(str(tokens_file)) if tokens_file else []
    tokens += parse_tokens(env.get(TOKENS_ENV, ""), TOKENS_ENV)
    values["auth"] = {"tokens": tuple(tokens), "tokens_file": tokens_file}
    return build(values)


def dest(option: Option) -> str:
    """The argparse ``dest`` of an option's flag."""
    return f"{option.section}__{option.name}"


def _merge(into: Layer, layer: Layer) -> None:
    for section, items in layer.items():
        into.setdefault(section, {}).update(items)


def _env_layer(env: Mapping[str, str]) -> Layer:
    layer: Layer = {}
    for o in OPTIONS:
        if o.env in env:
            layer.setdefault(o.section, {})[o.name] = _parse(o, env[o.env], o.env)
    return layer


def _flag_layer(flags: Mapping[str, object]) -> Layer:
    layer: Layer = {}
    for o in OPTIONS:
        value = flags.get(dest(o))
        if value is not None:
            layer.setdefault(o.section, {})[o.name] = _parse(o, value, o.flag or o.name)
    return layer


def _parse(o: Option, value: object, where: str) -> object:
    try:
        return o.parse(value)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def read_file(path: str) -> Layer:
    """The sections of a TOML (or, with PyYAML, YAML) config file, parsed and checked key by key."""
    raw = _load_raw(path)
    layer: Layer = {}
    for section, items in raw.items():
        if section not in SECTIONS:
            raise ValueError(f"{path}: unknown key {section!r} (sections: {', '.join(SECTIONS)})")
        if not isinstance(items, dict):
            raise ValueError(f"{path}: {section!r} must be a table of settings")
        for name, value in items.items():
            o = BY_KEY.get((section, name))
            if o is None:
                known = ", ".join(n for s, n in BY_KEY if s == section)
                raise ValueError(f"{path}: unknown key '{section}.{name}' (known in [{section}]: {known})")
            layer.setdefault(section, {})[name] = _parse(o, value, f"{path}: {section}.{name}")
    return layer


def _load_raw(path: str) -> dict[str, object]:
    try:
        text = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read config file {path}: {e.strerror}") from None
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ValueError(
                f"{path}: YAML config files need PyYAML (pip install pyyaml); or use TOML"
            ) from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: bad YAML: {e}") from None
    else:
        try:
            data = tomllib.loads(text.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: bad TOML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections")
    return data


def read_tokens_file(path: str) -> list[tuple[str, str]]:
    """``token tenant`` lines (``#`` comments, blank lines skipped) of a file others cannot read.

    Raises:
        ValueError: unreadable, world-readable or world-writable, or a malformed line.
    """
    try:
        mode = os.stat(path).st_mode
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"cannot read tokens file {path}: {e.strerror}") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ValueError(f"tokens file {path} is readable or writable by others; chmod 600 it")
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2:
            raise ValueError(f"{path}:{n}: expected 'token tenant'")
        pairs.append((words[0], words[1]))
    return pairs


def parse_tokens(text: str, where: str) -> list[tuple[str, str]]:
    """``token:tenant,token:tenant`` (the ``KVSTORE_TOKENS`` format)."""
    pairs = []
    for item in filter(None, (i.strip() for i in text.split(","))):
        token, sep, tenant = item.rpartition(":")
        if not sep or not token or not tenant:
            raise ValueError(f"{where}: expected token:tenant[,token:tenant...]")
        pairs.append((token, tenant))
    return pairs


def build(values: Layer) -> DaemonConfig:
    """DaemonConfig from per-section field values (unnamed fields keep their defaults)."""
    tiers = values.get("tiers", {})
    base = default_tiers()
    tiers_config = TiersConfig(**{**{f.name: getattr(base, f.name) for f in fields(TiersConfig)}, **tiers})
    store = {"write_mode": tiers_config.write_mode, **values.get("store", {})}
    return DaemonConfig(
        tiers=tiers_config,
        store=StoreConfig(**store),  # type: ignore[arg-type]
        data_plane=DataPlaneSettings(**values.get("data_plane", {})),  # type: ignore[arg-type]
        admin=AdminConfig(**values.get("admin", {})),  # type: ignore[arg-type]
        auth=AuthConfig(**values.get("auth", {})),  # type: ignore[arg-type]
        logging=LoggingConfig(**values.get("logging", {})),  # type: ignore[arg-type]
    )
