"""The config schema: every key of the hiradix config, declared once.

``FIELDS`` lists each dotted key with its default (as written in YAML), its parser (which
also says what is allowed), its help text and how to print the resolved value back.
Validation, defaults, :func:`hiradix.config.config_to_dict` and the markdown reference
all derive from that table, so a key cannot be added without its documentation. The
value parsers specific to hiradix (host size, tier TTLs, Redis URLs, ...) live here too;
the generic ones (sizes, durations, enums) in :mod:`hiradix.units`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from hiradix.config_types import (
    Codec,
    EvictionPolicy,
    HiradixConfig,
    HostConfig,
    StoreKind,
    TierTtl,
    TtlConfig,
    TtlMode,
    WaitMode,
    WritePolicy,
)
from hiradix.units import (
    BOOL_PARSER,
    BYTES_ALLOWED,
    ConfigError,
    ValueParser,
    bad_value,
    bytes_parser,
    duration_parser,
    enum_parser,
    format_bytes,
    format_duration,
    int_parser,
    parse_bytes,
    string_parser,
)

logger = logging.getLogger(__name__)

__all__ = ["BY_KEY", "CHILDREN", "CONFIG_KEYS", "FIELDS", "Field", "redact_url", "thaw"]


# --------------------------------------------------------------------------- value parsers

_HOST_ALLOWED = "a ratio of the GPU KV pool as a float (2.0), or " + BYTES_ALLOWED
_SMALL_HOST_BYTES = 1 << 20


def _parse_host_size(value: Any, key: str) -> HostConfig:
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise bad_value(key, value, _HOST_ALLOWED)
        return HostConfig(size_bytes=None, size_ratio=value)
    try:
        size = parse_bytes(value, key)
    except ConfigError:
        raise bad_value(key, value, _HOST_ALLOWED) from None
    if 0 < size < _SMALL_HOST_BYTES:
        logger.warning(
            "config key %r: %r means %d bytes; write a float such as %.1f for a ratio",
            key,
            value,
            size,
            float(size),
        )
    return HostConfig(size_bytes=size, size_ratio=None)


_TIER_ALLOWED = "null (never), a duration, or {after: duration, mode: sliding|absolute}"


def _parse_tier_ttl(value: Any, key: str) -> tuple[float | None, TtlMode | None]:
    """A tier TTL as (seconds, mode or None = the section's ``ttl.mode``)."""
    if not isinstance(value, Mapping):
        try:
            return duration_parser(nullable=True, positive=True)(value, key), None
        except ConfigError:
            raise bad_value(key, value, _TIER_ALLOWED) from None
    for name in value:
        if name not in ("after", "mode"):
            raise ConfigError(f"config key '{key}.{name}': unknown key; allowed: after, mode")
    seconds = duration_parser(nullable=True, positive=True)(value.get("after"), f"{key}.after")
    mode = enum_parser(TtlMode)(value["mode"], f"{key}.mode") if "mode" in value else None
    return seconds, mode


_URL_ALLOWED = "redis://host[:port][/db], rediss://host[:port][/db] (TLS) or unix:///path.sock"
# Everything between "://" and the last "@": the userinfo, also when the password holds
# "/" or "@" or the URL does not parse.
_USERINFO_RE = re.compile(r"(?<=://)[^@]*@")


def redact_url(url: str) -> str:
    """``url`` with its userinfo (user and password) replaced by ``***``, for messages."""
    return _USERINFO_RE.sub("***@", url, count=1) if "@" in url else url


def _parse_redis_url(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise bad_value(key, value, _URL_ALLOWED)
    shown = redact_url(value)  # never print a password, even from a rejected URL
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise bad_value(key, shown, _URL_ALLOWED) from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise bad_value(key, shown, _URL_ALLOWED)
    if parts.password:
        raise bad_value(
            key,
            shown,
            "a URL without a password; name an environment variable "
            "holding it in store.redis.password_env",
        )
    if parts.scheme == "unix":
        if not parts.path:
            raise bad_value(key, shown, _URL_ALLOWED)
    elif not parts.hostname or not re.fullmatch(r"/?|/\d+", parts.path):
        raise bad_value(key, shown, _URL_ALLOWED)
    return value


_ENV_NAME_RE = r"[A-Za-z_][A-Za-z0-9_]*"
_POLICY_RE = r"[A-Za-z_]\w*|[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*"


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({name: _freeze(item) for name, item in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(item) for item in value)
    return value


def thaw(value: Any) -> Any:
    """A frozen config value (mapping proxies, tuples) as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {name: thaw(item) for name, item in value.items()}
    if isinstance(value, tuple):
        return [thaw(item) for item in value]
    return value


def _parse_options(value: Any, key: str) -> Mapping[str, Any]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping) or not all(isinstance(name, str) for name in value):
        raise bad_value(key, value, "a mapping with string keys")
    return _freeze(value)  # type: ignore[no-any-return]


def _parse_path(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise bad_value(key, value, "a non-empty path")
    return value


def _parse_opt_path(value: Any, key: str) -> str | None:
    return None if value is None else _parse_path(value, key)


def _parse_version(value: Any, key: str) -> int:
    if value != 1 or isinstance(value, bool):
        raise bad_value(key, value, "1")
    return 1


_P_PATH = ValueParser(
    _parse_path, "path", "a path; relative to the config file's directory, ~ expands"
)
_P_OPT_PATH = ValueParser(
    _parse_opt_path, "path", "null or a path (relative as for store.nvme.path)"
)
_P_HOST = ValueParser(
    _parse_host_size, "ratio or bytes", _HOST_ALLOWED, "a ratio (`2.0`) or a size"
)
_P_TIER = ValueParser(
    _parse_tier_ttl, "TTL", _TIER_ALLOWED, "null (never), a duration, or {after, mode}"
)

# --------------------------------------------------------------------------- the schema


@dataclass(frozen=True, slots=True)
class Field:
    key: str  # dotted
    default: Any  # as written in YAML
    parse: ValueParser
    help: str
    dump: Callable[[HiradixConfig], Any]  # the resolved value back in YAML form


def _opt(value: float | None) -> str | None:
    return None if value is None else format_duration(value)


def _dump_host(host: HostConfig) -> Any:
    return host.size_ratio if host.size_bytes is None else format_bytes(host.size_bytes)


def _dump_tier(ttl: TtlConfig, tier: TierTtl) -> Any:
    if tier.mode is ttl.mode:
        return _opt(tier.seconds)
    return {"after": _opt(tier.seconds), "mode": tier.mode.value}


# fmt: off
_F = Field
FIELDS: tuple[Field, ...] = (
    _F("version", 1, ValueParser(_parse_version, "integer", "1"),
       "Schema version.", lambda c: c.version),
    _F("namespace", "", string_parser(),
       "Extra tenant string mixed into every page key: configs with different namespaces "
       "never share pages.", lambda c: c.namespace),
    _F("host.size", 2.0, _P_HOST,
       "L2 host-memory tier. A float is a ratio of the L1 (GPU KV pool) bytes; an integer "
       "or a string with a unit is bytes; 0 disables the tier. All of it is committed at "
       "start (pinned on CUDA, faulted in by a background thread on CPU).",
       lambda c: _dump_host(c.host)),
    _F("store.kind", "none", enum_parser(StoreKind),
       "L3 store.", lambda c: c.store.kind.value),
    _F("store.presence_ttl", "10s", duration_parser(),
       "How long an L3 existence answer is trusted in the tree.",
       lambda c: format_duration(c.store.presence_ttl)),
    _F("store.write_queue_pages", 4096, int_parser(1),
       "Most pages waiting to be written to L3; more are dropped (and counted).",
       lambda c: c.store.write_queue_pages),
    _F("store.block_tokens", 64, int_parser(1, 65536),
       "Tokens per L3 page (a multiple of SGLang's --page-size). Larger pages mean fewer "
       "store round trips; smaller ones match shorter shared prefixes.",
       lambda c: c.store.block_tokens),
    _F("store.mac_key_env", None,
       string_parser(nullable=True, pattern=_ENV_NAME_RE, what="an environment variable name"),
       "NAME of an environment variable holding a secret (16+ characters) that keys a MAC "
       "on every L3 page: pages without a valid MAC are corrupt. For stores that others "
       "can write. Read when the store is set up; unset then is an error.",
       lambda c: c.store.mac_key_env),
    _F("store.nvme.path", "./.hiradix/pages", _P_PATH,
       "Directory of the NVMe page files. Relative to the config file's directory, except "
       "for the embedded default, which uses the working directory. With TP/PP > 1 each "
       "rank keeps its own subdirectory rank<i>of<n>, so ranks never evict each other's pages.",
       lambda c: c.store.nvme.path),
    _F("store.nvme.size", "16GiB", bytes_parser(positive=True),
       "Capacity; the oldest pages are evicted beyond it. With TP/PP > 1 each rank gets an "
       "equal share.",
       lambda c: format_bytes(c.store.nvme.size_bytes)),
    _F("store.nvme.fsync", False, BOOL_PARSER,
       "fsync each page before renaming it into place.", lambda c: c.store.nvme.fsync),
    _F("store.nvme.group_access", False, BOOL_PARSER,
       "Let the directory's group read and write the pages (directories 2770, files 0660), "
       "for servers running as different users of one group; false: owner only (0700, "
       "0600). A directory that already exists keeps its mode.",
       lambda c: c.store.nvme.group_access),
    _F("store.redis.url", "redis://127.0.0.1:6379/0",
       ValueParser(_parse_redis_url, "URL", _URL_ALLOWED),
       "Redis server (or a seed node when cluster is true). No password in the URL.",
       lambda c: c.store.redis.url),
    _F("store.redis.password_env", None,
       string_parser(nullable=True, pattern=_ENV_NAME_RE, what="an environment variable name"),
       "NAME of an environment variable holding the password, read when connecting (never "
       "the password itself).", lambda c: c.store.redis.password_env),
    _F("store.redis.username", None, string_parser(nullable=True),
       "ACL user name.", lambda c: c.store.redis.username),
    _F("store.redis.cluster", False, BOOL_PARSER,
       "Redis Cluster mode (not with unix://; database 0 only).",
       lambda c: c.store.redis.cluster),
    _F("store.redis.key_prefix", "hiradix:", string_parser(),
       "Prefix of every key hiradix writes; one ending in a hex digit is followed by ':' "
       "(`team-a` writes `team-a:...`).", lambda c: c.store.redis.key_prefix),
    _F("store.redis.timeout", "1s", duration_parser(positive=True),
       "Socket connect and read timeout.", lambda c: format_duration(c.store.redis.timeout)),
    _F("store.redis.batch_pages", 128, int_parser(1, 4096),
       "Pages per pipelined batch.", lambda c: c.store.redis.batch_pages),
    _F("store.redis.tls.ca_file", None, _P_OPT_PATH,
       "CA bundle (rediss:// only).", lambda c: c.store.redis.tls.ca_file),
    _F("store.redis.tls.cert_file", None, _P_OPT_PATH,
       "Client certificate (rediss:// only).", lambda c: c.store.redis.tls.cert_file),
    _F("store.redis.tls.key_file", None, _P_OPT_PATH,
       "Client key; needs cert_file (rediss:// only).", lambda c: c.store.redis.tls.key_file),
    _F("store.redis.tls.verify", True, BOOL_PARSER,
       "Verify the server certificate (rediss:// only).", lambda c: c.store.redis.tls.verify),
    _F("store.memory.size", "1GiB", bytes_parser(positive=True),
       "Capacity of the in-process store (tests, simulation).",
       lambda c: format_bytes(c.store.memory.size_bytes)),
    _F("ttl.mode", "sliding", enum_parser(TtlMode),
       "Default TTL mode of every tier: sliding restarts on each hit, absolute counts "
       "from the write.", lambda c: c.ttl.mode.value),
    _F("ttl.device", None, _P_TIER,
       "L1 (GPU) time-to-live.", lambda c: _dump_tier(c.ttl, c.ttl.device)),
    _F("ttl.host", None, _P_TIER,
       "L2 (host) time-to-live.", lambda c: _dump_tier(c.ttl, c.ttl.host)),
    _F("ttl.store", "24h", _P_TIER,
       "L3 (store) time-to-live.", lambda c: _dump_tier(c.ttl, c.ttl.store)),
    _F("ttl.max_age", None, duration_parser(nullable=True, positive=True),
       "Hard maximum age on every tier, counted from the first write.",
       lambda c: _opt(c.ttl.max_age)),
    _F("write_policy", "write_through", enum_parser(WritePolicy),
       "When KV is copied down the tiers.", lambda c: c.write_policy.value),
    _F("write_through_hits", 2, int_parser(1),
       "Hits before a node is written down under write_through_selective.",
       lambda c: c.write_through_hits),
    _F("eviction_policy", "lru", enum_parser(EvictionPolicy),
       "Victim order when a tier is full.", lambda c: c.eviction_policy.value),
    _F("prefetch.policy", "pattern",
       string_parser(pattern=_POLICY_RE, what="a registered name (none, arrival, session, hot, "
               "pattern) or 'package.module:Class'"),
       "Prefetch policy. Checked at load: it is imported and constructed with "
       "prefetch.options.", lambda c: c.prefetch.policy),
    _F("prefetch.options", {},
       ValueParser(_parse_options, "mapping", "a mapping with string keys"),
       "Keyword arguments for the policy's constructor (unknown ones are errors).",
       lambda c: thaw(c.prefetch.options)),
    _F("prefetch.wait", "timeout", enum_parser(WaitMode),
       "Whether a request waits for its L3 prefetch.", lambda c: c.prefetch.wait.value),
    _F("prefetch.timeout", "50ms", duration_parser(),
       "Base wait for wait: timeout.", lambda c: format_duration(c.prefetch.timeout)),
    _F("prefetch.timeout_per_1k_tokens", "20ms", duration_parser(),
       "Wait added per 1000 prompt tokens for wait: timeout.",
       lambda c: format_duration(c.prefetch.timeout_per_1k_tokens)),
    _F("prefetch.queued_timeout", "5s", duration_parser(),
       "Under wait: timeout, the least a request may wait for its L3 pages while other "
       "requests are queued (they use the server meanwhile).",
       lambda c: format_duration(c.prefetch.queued_timeout)),
    _F("compression.codec", "none", enum_parser(Codec),
       "L3 page compression.", lambda c: c.compression.codec.value),
    _F("compression.level", 3, int_parser(1, 22),
       "zstd level.", lambda c: c.compression.level),
)
del _F
# fmt: on

BY_KEY: dict[str, Field] = {field.key: field for field in FIELDS}
CONFIG_KEYS: tuple[str, ...] = tuple(BY_KEY)
"""Every leaf key of the schema, dotted, in declaration order."""


def _children() -> dict[str, list[str]]:
    """Section ("" = top) -> its child names in declaration order."""
    children: dict[str, list[str]] = {"": []}
    for key in CONFIG_KEYS:
        parts = key.split(".")
        for depth in range(len(parts)):
            section = ".".join(parts[:depth])
            children.setdefault(section, [])
            if parts[depth] not in children[section]:
                children[section].append(parts[depth])
    return children


CHILDREN = _children()
"""Section ("" = top) -> its child names in declaration order."""
