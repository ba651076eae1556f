"""The L3 store interface: a synchronous, batched key -> blob store with per-key TTL.

Stores own no threads. Every method may block on IO and is called only from the
transfer engine's worker threads (several at once: implementations must be safe for
concurrent calls), never from the scheduler thread that owns the radix tree. The CLI
(``hiradix store ...``) also calls them, from its main thread.

Outcomes (house rule "three outcomes, three mechanisms"):

* a miss (absent, expired) returns ``None`` / ``False``;
* a write the store declines (full, disk full, dropped) returns ``False`` for that item;
* the medium being unreachable (connection, timeout, OS error) raises
  :class:`hiradix.errors.StoreUnavailable`, and nothing else.

Blobs are opaque here; they are normally pages framed by :mod:`hiradix.codec`.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, MutableSequence, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NewType

logger = logging.getLogger(__name__)

__all__ = [
    "PageStore",
    "StoreKey",
    "StoreStats",
    "check_ttl",
    "key_head",
    "make_key",
    "split_key",
]

#: ``f"{key_head(prefix)}{namespace}:{page_key_hex}"``; see :func:`make_key`.
StoreKey = NewType("StoreKey", str)

_HEX = re.compile(r"[0-9a-f]+")
_KEY_TAIL = re.compile(r"([0-9a-f]+):([0-9a-f]+)$")
_HEX_DIGITS = frozenset("0123456789abcdef")


def key_head(prefix: str) -> str:
    """What every key of ``prefix`` starts with: ``prefix`` itself, followed by ``":"``
    when it ends in a lowercase hex digit (``"team-a"`` -> ``"team-a:"``), so that the
    namespace after it can always be told apart (:func:`split_key`). Scans match on it.
    """
    return prefix + ":" if prefix and prefix[-1] in _HEX_DIGITS else prefix


def make_key(prefix: str, namespace: str, page_key_hex: str) -> StoreKey:
    """Build the store key of one page: ``f"{key_head(prefix)}{namespace}:{page_key_hex}"``.

    ``namespace`` is ``PageMeta.namespace.hex()`` and ``page_key_hex`` is
    ``PageMeta.page_key.hex()`` (``hiradix store verify`` checks a page's header
    against its key under that convention); both must be lowercase hex (``ValueError``
    otherwise, a programming error). Every string is a valid ``prefix``: one ending in a
    hex digit gets a ``":"`` (``"team-a"`` and ``"team-a:"`` name the same keys).
    """
    if not _HEX.fullmatch(namespace):
        raise ValueError(f"namespace must be lowercase hex, got {namespace!r}")
    if not _HEX.fullmatch(page_key_hex):
        raise ValueError(f"page key must be lowercase hex, got {page_key_hex!r}")
    return StoreKey(f"{key_head(prefix)}{namespace}:{page_key_hex}")


def split_key(key: str) -> tuple[str, str]:
    """``(namespace, page_key_hex)`` of a key built by :func:`make_key`."""
    match = _KEY_TAIL.search(key)
    if match is None:
        raise ValueError(f"not a hiradix store key: {key!r}")
    return match.group(1), match.group(2)


def check_ttl(ttl: float | None) -> None:
    """Stores call this on every ``ttl`` / ``refresh_ttl`` argument (misuse -> ValueError)."""
    if ttl is not None and not ttl > 0:
        raise ValueError(f"ttl must be > 0 seconds or None, got {ttl!r}")


@dataclass(frozen=True, slots=True)
class StoreStats:
    """What a store holds now. ``by_namespace`` maps namespace hex -> (pages, bytes)."""

    pages: int
    bytes: int
    by_namespace: Mapping[str, tuple[int, int]] = field(default_factory=dict)


class PageStore(ABC):
    """A batched blob store. See the module docstring for threading and outcomes."""

    name: ClassVar[str]

    @abstractmethod
    def put_many(self, items: Sequence[tuple[StoreKey, bytes]], ttl: float | None) -> list[bool]:
        """Store every blob under its key, replacing what is there, expiring after ``ttl``
        seconds (``None``: no expiry; otherwise ``ttl > 0``).

        Returns one flag per item: ``False`` means not stored (too big, store full, disk
        full, dropped). May block on IO; called from transfer worker threads. Raises
        ``StoreUnavailable`` when the medium cannot be reached.
        """

    @abstractmethod
    def get_many(
        self, keys: Sequence[StoreKey], refresh_ttl: float | None = None
    ) -> list[bytes | None]:
        """Read blobs; ``None`` for a miss (absent or expired).

        With ``refresh_ttl`` set (sliding TTL), every hit's expiry is reset to now +
        ``refresh_ttl``; with ``None`` (absolute TTL) expiries are untouched. May block on
        IO; called from transfer worker threads. Raises ``StoreUnavailable``.
        """

    def get_many_into(
        self,
        keys: Sequence[StoreKey],
        buffers: MutableSequence[bytearray],
        refresh_ttl: float | None = None,
    ) -> list[memoryview | None]:
        """:meth:`get_many`, reading into caller-owned buffers where the store can.

        ``buffers`` belongs to the caller and is kept across calls (one per worker
        thread): a store that reads into memory it is given (files) uses
        ``buffers[i]`` for the i-th key, growing the list or replacing an entry that is
        too small, so a steady stream of loads touches the same warm memory instead of
        faulting in a fresh buffer per page. A returned view may alias ``buffers`` and
        is valid until the next call with the same list. The default copies nothing and
        returns views of :meth:`get_many`'s blobs.
        """
        return [None if b is None else memoryview(b) for b in self.get_many(keys, refresh_ttl)]

    @abstractmethod
    def exists_many(self, keys: Sequence[StoreKey]) -> list[bool]:
        """Whether each key holds an unexpired blob (does not refresh TTLs).

        May block on IO; called from transfer worker threads. Raises ``StoreUnavailable``.
        """

    @abstractmethod
    def delete_many(self, keys: Sequence[StoreKey]) -> int:
        """Delete keys; returns how many existed. Absent keys are not an error.

        May block on IO; called from transfer worker threads and the CLI. Raises
        ``StoreUnavailable``.
        """

    @abstractmethod
    def scan(self, namespace: str | None = None) -> Iterator[StoreKey]:
        """Iterate over stored keys (of one namespace hex, or all). Weakly consistent:
        keys written or deleted during the scan may or may not appear.

        May block on IO for a long time; meant for the CLI and maintenance, not the hot
        path. Raises ``StoreUnavailable``.
        """

    @abstractmethod
    def stats(self) -> StoreStats:
        """Pages and bytes held, in total and per namespace. May scan the whole store
        (slow); meant for the CLI and metrics threads. Raises ``StoreUnavailable``.
        """

    @abstractmethod
    def gc(self, max_items: int | None = None) -> int:
        """Delete entries whose TTL is due (at most ``max_items``; ``None``: all) and
        return how many. Stores with native expiry (Redis) return 0.

        May block on IO; called from a transfer worker thread periodically and the CLI.
        """

    @abstractmethod
    def close(self) -> None:
        """Release connections / handles. Idempotent. Called once at shutdown."""

    def describe(self) -> str:
        """Where the store lives, for messages (no credentials)."""
        return self.name
