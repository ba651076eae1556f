"""The hiradix config: YAML loader, cross-key checks and printing.

Every key is declared once, in :data:`hiradix.config_schema.FIELDS` (dotted key, default,
parser, help); the resolved, typed tree it builds is in :mod:`hiradix.config_types`.
This module re-exports both, so ``from hiradix.config import ...`` is the one import.

Loading collects every problem of a file and raises one :class:`ConfigError` whose
message has one line per problem, each naming the dotted key, the value given and what
is allowed (a Redis URL's userinfo is never shown). The prefetch policy is imported and
constructed with its options at load, as the scheduler will. Relative paths resolve
against the config file's directory, except for the embedded default
(``hiradix/default.yaml``, or a link to it), which uses the working directory. YAML is
read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import yaml

from hiradix.config_schema import BY_KEY, CHILDREN, CONFIG_KEYS, FIELDS, redact_url, thaw
from hiradix.config_types import (
    Codec,
    CompressionConfig,
    EvictionPolicy,
    HiradixConfig,
    HostConfig,
    MemoryStoreConfig,
    NvmeConfig,
    PrefetchConfig,
    RedisConfig,
    StoreConfig,
    StoreKind,
    TierTtl,
    TlsConfig,
    TtlConfig,
    TtlMode,
    WaitMode,
    WritePolicy,
)
from hiradix.units import ConfigError, bad_value

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_KEYS",
    "Codec",
    "CompressionConfig",
    "ConfigError",
    "EvictionPolicy",
    "HiradixConfig",
    "HostConfig",
    "MemoryStoreConfig",
    "NvmeConfig",
    "PrefetchConfig",
    "RedisConfig",
    "StoreConfig",
    "StoreKind",
    "TierTtl",
    "TlsConfig",
    "TtlConfig",
    "TtlMode",
    "WaitMode",
    "WritePolicy",
    "config_reference_markdown",
    "config_to_dict",
    "default_config_path",
    "load_config",
    "load_default_config",
    "parse_config",
    "redact_url",
]


# --------------------------------------------------------------------------- loading


def _walk(data: Mapping[Any, Any], section: str) -> Iterator[tuple[str, Any, str | None]]:
    """Walk ``data`` against the schema in document order.

    Yields ``(key, value, None)`` for each leaf and ``(key, None, message)`` for each key
    that is unknown or a section that is not a mapping.
    """
    for name, value in data.items():
        key = f"{section}.{name}" if section else str(name)
        if key in BY_KEY:
            yield key, value, None
        elif isinstance(name, str) and key in CHILDREN:
            if isinstance(value, Mapping):
                yield from _walk(value, key)
            elif value is not None:  # "store:" with nothing under it takes the defaults
                yield key, None, str(bad_value(key, value, "a mapping"))
        else:
            allowed = ", ".join(CHILDREN[section])
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
    url = redact_url(url)  # for messages: a user name is all it can hold here
    if scheme != "rediss":
        for name in ("ca_file", "cert_file", "key_file", "verify"):
            key = f"store.redis.tls.{name}"
            if v[key] != BY_KEY[key].parse(BY_KEY[key].default, key):
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


_POLICY_ALLOWED = (
    "a registered name (none, arrival, session, hot, pattern), an importable "
    "'package.module:Class' or an entry point of hiradix.prefetch_policies"
)
_OPTION_ERROR_RE = re.compile(r"prefetch\.options\.(\w+): (.*)")


def _check_policy(v: Mapping[str, Any]) -> list[str]:
    """Import and construct the prefetch policy now, as the scheduler will, so that a
    policy that cannot load, refuses its options or raises fails the config check
    instead of every scheduler after the model has loaded."""
    from hiradix.policies.registry import create_policy, resolve_policy_class  # imports us

    spec, options = v["prefetch.policy"], v["prefetch.options"]
    try:
        resolve_policy_class(spec)
    except Exception as exc:  # noqa: BLE001 - any failure to import is a config error
        detail = _one_line(exc).removeprefix("prefetch.policy: ")
        return [_policy_error("prefetch.policy", spec, f"{_POLICY_ALLOWED} ({detail})")]
    prefetch = PrefetchConfig(
        spec, options, v["prefetch.wait"], v["prefetch.timeout"],
        v["prefetch.timeout_per_1k_tokens"], v["prefetch.queued_timeout"],
    )  # fmt: skip
    try:
        create_policy(prefetch)
    except Exception as exc:  # noqa: BLE001 - a user's constructor may raise anything
        # Policies name a bad option as "prefetch.options.NAME: why" (see PrefetchPolicy).
        named = _OPTION_ERROR_RE.fullmatch(_one_line(exc))
        accepts = f"what policy {spec!r} accepts"
        if named is not None and named[1] in options:
            key, value, allowed = f"prefetch.options.{named[1]}", options[named[1]], accepts
            detail = named[2]
        elif options:
            key, value, allowed, detail = "prefetch.options", options, accepts, _raised(exc)
        else:
            key, value, detail = "prefetch.policy", spec, _raised(exc)
            allowed = "a policy whose constructor succeeds"
        return [_policy_error(key, value, f"{allowed} ({detail})")]
    return []


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _raised(exc: BaseException) -> str:
    return f"constructing it raised {type(exc).__name__}: {_one_line(exc)}"


def _policy_error(key: str, value: Any, allowed: str) -> str:
    return bad_value(key, thaw(value), allowed).errors[0]


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
            nvme=NvmeConfig(
                nvme_path, v["store.nvme.size"], v["store.nvme.fsync"], v["store.nvme.group_access"]
            ),
            redis=redis,
            memory=MemoryStoreConfig(size_bytes=v["store.memory.size"]),
            mac_key_env=v["store.mac_key_env"],
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
            parsed[key] = BY_KEY[key].parse(value, key)
        except ConfigError as error:
            errors.extend(error.errors)
            parsed[key] = None  # given, though bad: it takes no default
    for field in FIELDS:
        if field.key not in parsed:  # a default that fails here is a bug in FIELDS
            parsed[field.key] = field.parse(field.default, field.key)
    if not errors:
        errors.extend(_cross_check(parsed))
    if parsed["prefetch.policy"] is not None and parsed["prefetch.options"] is not None:
        errors.extend(_check_policy(parsed))
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
    for field in FIELDS:
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
    for field in FIELDS:
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
