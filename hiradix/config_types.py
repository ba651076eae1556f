"""The resolved config: enums and the frozen, typed tree that :mod:`hiradix.config`
builds from a YAML file (every value parsed, every path absolute).

Secrets are never part of it: the Redis password and the page MAC key are read from
the environment variables the config names, when a store is set up
(:meth:`RedisConfig.password`, :meth:`StoreConfig.mac_key`), and a named variable
that is unset is an error there, never a silent fallback.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hiradix.units import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "Codec",
    "CompressionConfig",
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
]

#: The shortest MAC key accepted from the environment, in characters.
MIN_MAC_KEY_CHARS = 16


def _secret_from_env(key: str, variable: str) -> str:
    """The value of ``variable``, named by config key ``key``; unset or empty is an error
    (a configured secret must never silently become no secret)."""
    value = os.environ.get(variable)
    if value is None or value == "":
        state = "is not set" if value is None else "is empty"
        raise ConfigError(
            f"config key {key!r}: environment variable {variable!r} {state}; allowed: "
            f"set {variable} in the server's environment, or remove {key} from the config"
        )
    return value


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
    group_access: bool = False  # files 0660 / dirs 2770 instead of 0600 / 0700


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

        ``None`` when no variable is configured; :class:`ConfigError` naming the
        variable when one is configured but unset or empty (connecting without the
        password would hide the mistake until every page misses).
        """
        if self.password_env is None:
            return None
        return _secret_from_env("store.redis.password_env", self.password_env)


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
    mac_key_env: str | None = None

    def mac_key(self) -> bytes | None:
        """The page MAC key (32 bytes) derived from the environment variable
        ``mac_key_env``, read now; ``None`` when no variable is configured.

        :class:`ConfigError` when the variable is unset, empty or shorter than
        :data:`MIN_MAC_KEY_CHARS` characters. The value is hashed into the key, so any
        text works; use a random one (``openssl rand -hex 32``).
        """
        if self.mac_key_env is None:
            return None
        secret = _secret_from_env("store.mac_key_env", self.mac_key_env)
        if len(secret) < MIN_MAC_KEY_CHARS:
            raise ConfigError(
                f"config key 'store.mac_key_env': environment variable {self.mac_key_env!r} "
                f"holds {len(secret)} characters; allowed: at least {MIN_MAC_KEY_CHARS} "
                "(e.g. the output of `openssl rand -hex 32`)"
            )
        digest = hashlib.blake2b(secret.encode(), digest_size=32, person=b"hiradix-mac-key")
        return digest.digest()


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
