"""An L3 store in Redis (standalone or Redis Cluster), shared by every instance that
serves the same model.

* URLs: ``redis://``, ``rediss://`` (TLS; CA / client cert / key / verification from
  ``RedisConfig.tls``) and ``unix://``; the password comes from ``cfg.password()`` (an
  environment variable), never from the config file.
* ``cluster=True`` uses ``redis.cluster.RedisCluster``: its non-transactional pipeline
  groups commands by node, so a batch whose keys hash to different slots is fine (keys
  carry no hash tag on purpose: pages of one namespace spread over every shard).
* Every batch is sent as pipelines of ``cfg.batch_pages`` commands: SET with PX (TTL),
  GET (+ PEXPIRE in the same pipeline for a sliding TTL), EXISTS, DEL.
* Expiry is native (``gc`` returns 0). See README.md for the ``maxmemory-policy``.
* Outage: every redis-py connection / timeout / cluster error (and OSError) is raised
  as ``StoreUnavailable``. Clients retry at most once so a dead server costs about
  one ``cfg.timeout``, not minutes. A per-key refusal (OOM under ``noeviction``) makes
  that put return ``False``.
"""

from __future__ import annotations

import logging
import re
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.cluster
import redis.exceptions
from hiradix.backends.base import (
    PageStore,
    StoreKey,
    StoreStats,
    check_ttl,
    key_head,
    split_key,
)
from redis.backoff import NoBackoff
from redis.retry import Retry

from hiradix.errors import StoreUnavailable

logger = logging.getLogger(__name__)

__all__ = ["RedisStore"]

# Everything redis-py raises for "the medium did not answer properly".
_OUTAGE: tuple[type[BaseException], ...] = (
    redis.exceptions.RedisError,
    redis.exceptions.RedisClusterException,
    OSError,
)


class _TlsLike(Protocol):
    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    verify: bool


class _RedisConfigLike(Protocol):
    """The fields of ``hiradix.config.RedisConfig`` this store reads."""

    url: str
    username: str | None
    cluster: bool
    key_prefix: str
    timeout: float
    batch_pages: int
    tls: _TlsLike

    def password(self) -> str | None: ...


def redact_url(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


class RedisStore(PageStore):
    """Pages as Redis strings under ``make_key(key_prefix, namespace, page_key_hex)``."""

    name = "redis"

    def __init__(self, cfg: _RedisConfigLike, clock: Callable[[], float] = time.time) -> None:
        if cfg.batch_pages < 1:
            raise ValueError(f"redis.batch_pages must be >= 1, got {cfg.batch_pages}")
        self.cfg = cfg
        self.url = cfg.url
        self.key_prefix = cfg.key_prefix
        self.batch_pages = cfg.batch_pages
        self._clock = clock  # unused: Redis keeps time; kept for a uniform factory
        self.refused_writes = 0
        kwargs = self._client_kwargs(cfg)
        try:
            if cfg.cluster:
                self._client: Any = redis.cluster.RedisCluster.from_url(
                    cfg.url, retry=Retry(NoBackoff(), 1), **kwargs
                )
            else:
                self._client = redis.Redis.from_url(cfg.url, retry=Retry(NoBackoff(), 0), **kwargs)
        except _OUTAGE as exc:
            raise StoreUnavailable(self._why(exc)) from exc

    @staticmethod
    def _client_kwargs(cfg: _RedisConfigLike) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "socket_timeout": cfg.timeout,
            "socket_connect_timeout": cfg.timeout,
            "decode_responses": False,
        }
        password = cfg.password()
        if password is not None:
            kwargs["password"] = password
        if cfg.username:
            kwargs["username"] = cfg.username
        if cfg.url.startswith("rediss://"):
            tls = cfg.tls
            kwargs.update(
                ssl_ca_certs=tls.ca_file,
                ssl_certfile=tls.cert_file,
                ssl_keyfile=tls.key_file,
                ssl_cert_reqs="required" if tls.verify else "none",
                ssl_check_hostname=bool(tls.verify),
            )
        return kwargs

    # -- PageStore ---------------------------------------------------------------------

    def put_many(self, items: Sequence[tuple[StoreKey, bytes]], ttl: float | None) -> list[bool]:
        check_ttl(ttl)
        ttl_ms = None if ttl is None else max(1, round(ttl * 1000))
        out: list[bool] = []
        for start in range(0, len(items), self.batch_pages):
            chunk = items[start : start + self.batch_pages]
            pipe = self._pipeline()
            for key, blob in chunk:
                pipe.set(key, blob, px=ttl_ms)
            for reply in self._execute(pipe):
                if isinstance(reply, Exception):
                    # A per-key refusal (OOM under noeviction, READONLY replica, ...).
                    self.refused_writes += 1
                    if self.refused_writes == 1 or self.refused_writes % 1000 == 0:
                        logger.warning(
                            "redis at %s refused a page (%d so far): %s",
                            redact_url(self.url), self.refused_writes, reply,
                        )  # fmt: skip
                    out.append(False)
                else:
                    out.append(bool(reply))
        return out

    def get_many(
        self, keys: Sequence[StoreKey], refresh_ttl: float | None = None
    ) -> list[bytes | None]:
        check_ttl(refresh_ttl)
        refresh_ms = None if refresh_ttl is None else max(1, round(refresh_ttl * 1000))
        per_key = 1 if refresh_ms is None else 2
        step = max(1, self.batch_pages // per_key)
        out: list[bytes | None] = []
        for start in range(0, len(keys), step):
            chunk = keys[start : start + step]
            pipe = self._pipeline()
            for key in chunk:
                pipe.get(key)
                if refresh_ms is not None:
                    pipe.pexpire(key, refresh_ms)
            replies = self._execute(pipe)
            for reply in replies[::per_key]:
                out.append(reply if isinstance(reply, bytes) else None)
        return out

    def exists_many(self, keys: Sequence[StoreKey]) -> list[bool]:
        out: list[bool] = []
        for start in range(0, len(keys), self.batch_pages):
            pipe = self._pipeline()
            for key in keys[start : start + self.batch_pages]:
                pipe.exists(key)
            out.extend(reply == 1 for reply in self._execute(pipe))
        return out

    def delete_many(self, keys: Sequence[StoreKey]) -> int:
        deleted = 0
        for start in range(0, len(keys), self.batch_pages):
            pipe = self._pipeline()
            for key in keys[start : start + self.batch_pages]:
                pipe.delete(key)
            deleted += sum(r for r in self._execute(pipe) if isinstance(r, int))
        return deleted

    def scan(self, namespace: str | None = None) -> Iterator[StoreKey]:
        head = _glob_escape(key_head(self.key_prefix))
        pattern = head + (f"{namespace}:*" if namespace else "*")
        try:
            for raw in self._client.scan_iter(match=pattern, count=1000):
                key = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
                try:
                    ns, _ = split_key(key)
                except ValueError:
                    continue
                if namespace is None or ns == namespace:
                    yield StoreKey(key)
        except _OUTAGE as exc:
            raise StoreUnavailable(self._why(exc)) from exc

    def stats(self) -> StoreStats:
        by_ns: dict[str, tuple[int, int]] = {}
        keys = list(self.scan())
        for start in range(0, len(keys), self.batch_pages):
            chunk = keys[start : start + self.batch_pages]
            pipe = self._pipeline()
            for key in chunk:
                pipe.strlen(key)
            for key, size in zip(chunk, self._execute(pipe), strict=True):
                if not isinstance(size, int) or size == 0:
                    continue  # expired between SCAN and STRLEN
                ns = split_key(key)[0]
                pages, nbytes = by_ns.get(ns, (0, 0))
                by_ns[ns] = (pages + 1, nbytes + size)
        return StoreStats(
            pages=sum(p for p, _ in by_ns.values()),
            bytes=sum(b for _, b in by_ns.values()),
            by_namespace=by_ns,
        )

    def gc(self, max_items: int | None = None) -> int:
        return 0  # Redis expires keys natively

    def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the server answers."""
        try:
            self._client.ping()
        except _OUTAGE as exc:
            raise StoreUnavailable(self._why(exc)) from exc

    def close(self) -> None:
        try:
            self._client.close()
        except _OUTAGE:  # closing a dead connection is not worth an error
            logger.debug("ignoring error while closing redis client", exc_info=True)

    def describe(self) -> str:
        kind = "redis cluster" if self.cfg.cluster else "redis"
        return f"{kind} at {redact_url(self.url)}"

    # -- internals ---------------------------------------------------------------------

    def _pipeline(self) -> Any:
        return self._client.pipeline(transaction=False)

    def _execute(self, pipe: Any) -> list[Any]:
        try:
            replies: list[Any] = pipe.execute(raise_on_error=False)
        except _OUTAGE as exc:
            raise StoreUnavailable(self._why(exc)) from exc
        finally:
            pipe.reset()
        for reply in replies:
            if isinstance(reply, _OUTAGE) and not _is_per_key_refusal(reply):
                raise StoreUnavailable(self._why(reply))
        return replies

    def _why(self, exc: BaseException) -> str:
        return f"cannot reach {self.describe()}: {exc}{self._tls_hint(exc)}"

    def _tls_hint(self, exc: BaseException) -> str:
        """What to check when a TLS handshake fails for a reason the TLS error hides: a
        server that requires client certificates just closes the connection ("EOF
        occurred in violation of protocol")."""
        if not self.cfg.url.startswith("rediss://") or self.cfg.tls.cert_file is not None:
            return ""
        chain: list[BaseException] = []
        cause: BaseException | None = exc
        while cause is not None and len(chain) < 8:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        tls_errors = [e for e in chain if isinstance(e, ssl.SSLError)]
        if not tls_errors or isinstance(tls_errors[0], ssl.SSLCertVerificationError):
            return ""
        return (
            " (TLS handshake failed and no client certificate is configured: the server "
            "may require one, see store.redis.tls.cert_file and key_file)"
        )


def _is_per_key_refusal(exc: BaseException) -> bool:
    """Errors that concern one command, not the connection: the write is just refused."""
    return isinstance(exc, redis.exceptions.ResponseError) and not isinstance(
        exc, redis.exceptions.ClusterDownError | redis.exceptions.TryAgainError
    )
