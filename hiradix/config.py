"""The hiradix config: schema, YAML loader and the resolved, typed config tree.

Every key is declared once, in ``_FIELDS``: dotted key, default (as it would be written
in YAML), parser (which also says what is allowed), unit and help. Validation, defaults,
:func:`config_to_dict` and the markdown reference (:func:`config_reference_markdown`)
all derive from that table, so a key cannot be added without its documentation.

Loading collects every problem of a file and raises one :class:`ConfigError` whose
message has one line per problem, each naming the dotted key, the value given and what
is allowed. Relative paths resolve against the config file's directory, except for the
embedded default (``hiradix/default.yaml``, or a link to it), which uses the working
directory. YAML is read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import yaml

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


class StoreKind(enum.Enum):
    NONE = "none"
    NVME = "nvme"
    REDIS = "redis"
    MEMORY = "memory"


class TtlMode(enum.Enum):
    SLIDING = "sliding"  # the clock restarts on every hit
    ABSOLUTE = "absolute"  # counted from the write


class WritePolicy(enum.Enum):
    WRITE_THROUGH = "write_through"
    WRITE_THROUGH_SELECTIVE = "write_through_selective"
    WRITE_BACK = "write_back"


class EvictionPolicy(enum.Enum):
    LRU = "lru"
    LFU = "lfu"
    FIFO = "fifo"
    PRIORITY = "priority"


class WaitMode(enum.Enum):
    BEST_EFFORT = "best_effort"
    WAIT_COMPLETE = "wait_complete"
    TIMEOUT = "timeout"


class Codec(enum.Enum):
    NONE = "none"
    ZSTD = "zstd"


# --------------------------------------------------------------------------- resolved tree


@dataclass(frozen=True, slots=True)
class HostConfig:
    """L2 size: exactly one of absolute bytes or a ratio of the L1 (GPU KV pool) bytes."""

    size_bytes: int | None
    size_ratio: float | None

    def __post_init__(self) -> None:
        if (self.size_bytes is None) == (self.size_ratio is None):
            raise ValueError("HostConfig: set exactly one of size_bytes and size_ratio")

    def resolve_bytes(self, l1_bytes: int) -> int:
        """Host-tier bytes for an L1 pool of ``l1_bytes``; 0 means the tier is off."""
        if self.size_bytes is not None:
            return self.size_bytes
        return int(l1_bytes * (self.size_ratio or 0.0))


@dataclass(frozen=True, slots=True)
class NvmeConfig:
    path: str  # absolute
    size_bytes: int
    fsync: bool


@dataclass(frozen=True, slots=True)
class TlsConfig:
    ca_file: str | None  # absolute paths
    cert_file: str | None
    key_file: str | None
    verify: bool


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str
    password_env: str | None
    username: str | None
    cluster: bool
    key_prefix: str
    timeout: float
    batch_pages: int
    tls: TlsConfig

    @property
    def use_tls(self) -> bool:
        return self.url.startswith("rediss://")

    def password(self) -> str | None:
        """The password from the environment variable ``password_env``, read now.

        ``None`` when no variable is configured or it is unset or empty.
        """
        if self.password_env is None:
            return None
        return os.environ.get(self.password_env) or None


@dataclass(frozen=True, slots=True)
class MemoryStoreConfig:
    size_bytes: int


@dataclass(frozen=True, slots=True)
class StoreConfig:
    kind: StoreKind
    presence_ttl: float
    write_queue_pages: int
    block_tokens: int
    nvme: NvmeConfig
    redis: RedisConfig
    memory: MemoryStoreConfig


@dataclass(frozen=True, slots=True)
class TierTtl:
    """Time-to-live of one tier; ``seconds=None`` means entries never expire."""

    seconds: float | None
    mode: TtlMode


@dataclass(frozen=True, slots=True)
class TtlConfig:
    device: TierTtl
    host: TierTtl
    store: TierTtl
    max_age: float | None
    mode: TtlMode = TtlMode.SLIDING  # the default mode the tiers were resolved with


@dataclass(frozen=True, slots=True)
class PrefetchConfig:
    policy: str  # a registered name or "package.module:Class"
    options: Mapping[str, Any]  # read-only
    wait: WaitMode
    timeout: float
    timeout_per_1k_tokens: float
    queued_timeout: float = 5.0

    def wait_budget(self, prompt_tokens: int, others_queued: bool = False) -> float:
        """Seconds a request of ``prompt_tokens`` may wait for its L3 prefetch.

        0 for ``best_effort``, infinity for ``wait_complete``, and
        ``timeout + timeout_per_1k_tokens * prompt_tokens / 1000`` for ``timeout``, or at
        least ``queued_timeout`` while other requests are queued (they use the server
        while this one waits, so waiting saves recomputing at no cost to them).
        """
        if prompt_tokens < 0:
            raise ValueError(f"wait_budget: prompt_tokens must be >= 0, got {prompt_tokens}")
        if self.wait is WaitMode.BEST_EFFORT:
            return 0.0
        if self.wait is WaitMode.WAIT_COMPLETE:
            return math.inf
        budget = self.timeout + self.timeout_per_1k_tokens * prompt_tokens / 1000
        return max(budget, self.queued_timeout) if others_queued else budget


@dataclass(frozen=True, slots=True)
class CompressionConfig:
    codec: Codec
    level: int


@dataclass(frozen=True, slots=True)
class HiradixConfig:
    version: int
    namespace: str
    host: HostConfig
    store: StoreConfig
    ttl: TtlConfig
    write_policy: WritePolicy
    write_through_hits: int
    eviction_policy: EvictionPolicy
    prefetch: PrefetchConfig
    compression: CompressionConfig
    source: str  # the file it was loaded from, or "<dict>"


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


def _parse_redis_url(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise bad_value(key, value, _URL_ALLOWED)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise bad_value(key, value, _URL_ALLOWED) from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise bad_value(key, value, _URL_ALLOWED)
    if parts.password:
        raise bad_value(
            key,
            value,
            "a URL without a password; name an environment variable "
            "holding it in store.redis.password_env",
        )
    if parts.scheme == "unix":
        if not parts.path:
            raise bad_value(key, value, _URL_ALLOWED)
    elif not parts.hostname or not re.fullmatch(r"/?|/\d+", parts.path):
        raise bad_value(key, value, _URL_ALLOWED)
    return value


_ENV_NAME_RE = r"[A-Za-z_][A-Za-z0-9_]*"
_POLICY_RE = r"[A-Za-z_]\w*|[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*"


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({name: _freeze(item) for name, item in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(item) for item in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {name: _thaw(item) for name, item in value.items()}
    if isinstance(value, tuple):
        return [_thaw(item) for item in value]
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
class _Field:
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
_F = _Field
_FIELDS: tuple[_Field, ...] = (
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
    _F("store.nvme.path", "./.hiradix/pages", _P_PATH,
       "Directory of the NVMe page files. Relative to the config file's directory, except "
       "for the embedded default, which uses the working directory.",
       lambda c: c.store.nvme.path),
    _F("store.nvme.size", "16GiB", bytes_parser(positive=True),
       "Capacity; the oldest pages are evicted beyond it.",
       lambda c: format_bytes(c.store.nvme.size_bytes)),
    _F("store.nvme.fsync", False, BOOL_PARSER,
       "fsync each page before renaming it into place.", lambda c: c.store.nvme.fsync),
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
       "Prefix of every key hiradix writes.", lambda c: c.store.redis.key_prefix),
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
       "Prefetch policy.", lambda c: c.prefetch.policy),
    _F("prefetch.options", {},
       ValueParser(_parse_options, "mapping", "a mapping with string keys"),
       "Keyword arguments for the policy's constructor.",
       lambda c: _thaw(c.prefetch.options)),
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

_BY_KEY: dict[str, _Field] = {field.key: field for field in _FIELDS}
CONFIG_KEYS: tuple[str, ...] = tuple(_BY_KEY)
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


_CHILDREN = _children()

# --------------------------------------------------------------------------- loading


def _walk(data: Mapping[Any, Any], section: str) -> Iterator[tuple[str, Any, str | None]]:
    """Walk ``data`` against the schema in document order.

    Yields ``(key, value, None)`` for each leaf and ``(key, None, message)`` for each key
    that is unknown or a section that is not a mapping.
    """
    for name, value in data.items():
        key = f"{section}.{name}" if section else str(name)
        if key in _BY_KEY:
            yield key, value, None
        elif isinstance(name, str) and key in _CHILDREN:
            if isinstance(value, Mapping):
                yield from _walk(value, key)
            elif value is not None:  # "store:" with nothing under it takes the defaults
                yield key, None, str(bad_value(key, value, "a mapping"))
        else:
            allowed = ", ".join(_CHILDREN[section])
            yield key, None, f"config key {key!r}: unknown key; allowed: {allowed}"


def _resolve_path(path: str | None, base_dir: str) -> str | None:
    if path is None:
        return None
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


def _cross_check(v: Mapping[str, Any]) -> list[str]:
    """Checks that involve more than one key; ``v`` holds every parsed value."""
    errors: list[ConfigError] = []
    url = v["store.redis.url"]
    scheme = urlsplit(url).scheme
    if scheme != "rediss":
        for name in ("ca_file", "cert_file", "key_file", "verify"):
            key = f"store.redis.tls.{name}"
            if v[key] != _BY_KEY[key].parse(_BY_KEY[key].default, key):
                allowed = f"only with a rediss:// URL (store.redis.url is {url!r})"
                errors.append(bad_value(key, v[key], allowed))
    key_file = v["store.redis.tls.key_file"]
    if key_file is not None and v["store.redis.tls.cert_file"] is None:
        allowed = "only together with store.redis.tls.cert_file"
        errors.append(bad_value("store.redis.tls.key_file", key_file, allowed))
    if v["store.redis.cluster"] and scheme == "unix":
        allowed = f"false with a unix:// URL ({url!r})"
        errors.append(bad_value("store.redis.cluster", True, allowed))
    elif v["store.redis.cluster"] and urlsplit(url).path.strip("/") not in ("", "0"):
        errors.append(bad_value("store.redis.url", url, "database 0 only in cluster mode"))
    return [error.errors[0] for error in errors]


def _build(v: Mapping[str, Any], source: str, base_dir: str) -> HiradixConfig:
    """The typed tree from parsed values (``v``: dotted key -> parsed value)."""
    mode: TtlMode = v["ttl.mode"]

    def tier(key: str) -> TierTtl:
        seconds, tier_mode = v[key]
        return TierTtl(seconds=seconds, mode=tier_mode or mode)

    def tls_path(name: str) -> str | None:
        return _resolve_path(v[f"store.redis.tls.{name}"], base_dir)

    nvme_path = _resolve_path(v["store.nvme.path"], base_dir) or ""  # never null; for mypy
    redis = RedisConfig(
        url=v["store.redis.url"],
        password_env=v["store.redis.password_env"],
        username=v["store.redis.username"],
        cluster=v["store.redis.cluster"],
        key_prefix=v["store.redis.key_prefix"],
        timeout=v["store.redis.timeout"],
        batch_pages=v["store.redis.batch_pages"],
        tls=TlsConfig(
            ca_file=tls_path("ca_file"),
            cert_file=tls_path("cert_file"),
            key_file=tls_path("key_file"),
            verify=v["store.redis.tls.verify"],
        ),
    )
    return HiradixConfig(
        version=v["version"],
        namespace=v["namespace"],
        host=v["host.size"],
        store=StoreConfig(
            kind=v["store.kind"],
            presence_ttl=v["store.presence_ttl"],
            write_queue_pages=v["store.write_queue_pages"],
            block_tokens=v["store.block_tokens"],
            nvme=NvmeConfig(nvme_path, v["store.nvme.size"], v["store.nvme.fsync"]),
            redis=redis,
            memory=MemoryStoreConfig(size_bytes=v["store.memory.size"]),
        ),
        ttl=TtlConfig(
            tier("ttl.device"), tier("ttl.host"), tier("ttl.store"), v["ttl.max_age"], mode
        ),
        write_policy=v["write_policy"],
        write_through_hits=v["write_through_hits"],
        eviction_policy=v["eviction_policy"],
        prefetch=PrefetchConfig(
            policy=v["prefetch.policy"],
            options=v["prefetch.options"],
            wait=v["prefetch.wait"],
            timeout=v["prefetch.timeout"],
            timeout_per_1k_tokens=v["prefetch.timeout_per_1k_tokens"],
            queued_timeout=v["prefetch.queued_timeout"],
        ),
        compression=CompressionConfig(codec=v["compression.codec"], level=v["compression.level"]),
        source=source,
    )


def parse_config(
    data: Mapping[str, Any],
    *,
    source: str = "<dict>",
    base_dir: str = ".",
) -> HiradixConfig:
    """Validate a mapping (as read from YAML) into a :class:`HiradixConfig`.

    Missing keys take their defaults; every problem is collected and raised together as
    one :class:`ConfigError`. Relative paths resolve against ``base_dir``.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"expected a mapping at the top level, got {type(data).__name__}",
            source=None if source == "<dict>" else source,
        )
    errors: list[str] = []  # in document order
    parsed: dict[str, Any] = {}
    for key, value, problem in _walk(data, ""):
        if problem is not None:
            errors.append(problem)
            continue
        try:
            parsed[key] = _BY_KEY[key].parse(value, key)
        except ConfigError as error:
            errors.extend(error.errors)
            parsed[key] = None  # given, though bad: it takes no default
    for field in _FIELDS:
        if field.key not in parsed:  # a default that fails here is a bug in _FIELDS
            parsed[field.key] = field.parse(field.default, field.key)
    if not errors:
        errors.extend(_cross_check(parsed))
    if errors:
        raise ConfigError(errors, source=None if source == "<dict>" else source)
    config = _build(parsed, source, os.path.abspath(base_dir))
    logger.debug("loaded hiradix config from %s", source)
    return config


def _read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as error:
        raise ConfigError(
            f"cannot read config file: {error.strerror or error}", source=path
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"not valid YAML: {error}", source=path) from None
    if not isinstance(data, Mapping):
        got = "an empty document" if data is None else type(data).__name__
        raise ConfigError(f"expected a YAML mapping at the top level, got {got}", source=path)
    return data


def load_config(path: str | os.PathLike[str]) -> HiradixConfig:
    """Load and validate a YAML config file; relative paths resolve against its directory.

    The embedded default, also when reached through a link such as
    ``configs/default.yaml``, resolves them against the working directory instead.
    """
    path = os.fspath(path)
    data = _read_yaml(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    if _is_embedded_default(path):
        base_dir = os.getcwd()
    return parse_config(data, source=path, base_dir=base_dir)


def _is_embedded_default(path: str) -> bool:
    try:
        return os.path.samefile(path, default_config_path())
    except OSError:
        return False


def default_config_path() -> str:
    """Path of the embedded default config, ``hiradix/default.yaml``."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.yaml")


def load_default_config() -> HiradixConfig:
    """The embedded default; its relative paths resolve against the working directory.

    (Every other file resolves them against its own directory: the package directory is
    no place for a page store.)
    """
    path = default_config_path()
    return parse_config(_read_yaml(path), source=path, base_dir=os.getcwd())


# --------------------------------------------------------------------------- printing


def config_to_dict(config: HiradixConfig) -> dict[str, Any]:
    """The config as plain nested dicts with human units ("8 GiB", "24h"); loads back equal."""
    result: dict[str, Any] = {}
    for field in _FIELDS:
        *sections, leaf = field.key.split(".")
        node = result
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = field.dump(config)
    return result


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _yaml_literal(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "" or (isinstance(value, str) and value.endswith(":")):
        return f'"{value}"'
    if isinstance(value, Mapping):
        return "{}" if not value else str(dict(value))
    return str(value)


def config_reference_markdown() -> str:
    """A markdown table of every config key: default, type/unit, allowed values, meaning."""
    lines = [
        "| Key | Default | Type | Allowed | Description |",
        "|---|---|---|---|---|",
    ]
    for field in _FIELDS:
        cells = (
            f"`{field.key}`",
            f"`{_yaml_literal(field.default)}`",
            field.parse.kind,
            field.parse.doc,
            field.help,
        )
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    notes = (
        "Sizes: KiB/MiB/GiB/TiB and K/M/G/T are powers of 1024, KB/MB/GB/TB powers of 1000. "
        "Durations: us, ms, s, m, h, d, w, combinable (`1h30m`); a bare number is seconds. "
        "Relative paths resolve against the config file's directory, except for the embedded "
        "default, which uses the working directory. Unknown keys are errors; missing keys "
        "take the defaults above."
    )
    return "\n".join([*lines, "", notes]) + "\n"
