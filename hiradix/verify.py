"""Verify mode: every page that comes back up a tier must be the KV that went down.

A cache hit must never change an answer. Verify mode checks it at run time: when a page
of KV is written down from L1 (device -> host) its content digest is recorded under the
page's content key (the tree's chained page key: namespace + every token up to the page);
when a page lands back in L1 (from L2, or from L3 through L2) the digest of what landed is
checked against the digests recorded for that key. L3 pages are checked the same way at
fetch time, against what this process wrote for that store key.

A key may have several recorded digests (the same tokens computed twice, in different
batches, can differ in the last bits); what lands must equal one of them. A key this
process never wrote down (pages from another server or an earlier run) is counted as
unchecked, not as a mismatch.

Switch: ``HIRADIX_VERIFY`` in the environment: unset or ``0``/``off``: off; ``1``/``on``/
``log``: mismatches are logged and counted (the page is not served); ``fatal``: a mismatch
also raises :class:`VerifyError` (tests). Counters: ``verify_checked_pages``,
``verify_unchecked_pages``, ``verify_mismatches`` (Prometheus ``hiradix_verify_*``).

Thread use: ``record``/``check`` may be called from the scheduler thread and from L3 IO
worker threads; each call touches one dict entry per page under the GIL (no lock needed
for set/dict updates of distinct keys, and a lost race only drops a record, which makes a
later check "unchecked", never a false mismatch).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

ENV = "HIRADIX_VERIFY"
MAX_KEYS = 1_000_000  # recorded page keys (oldest forgotten first): bounded memory
MAX_DIGESTS_PER_KEY = 8


class VerifyError(RuntimeError):
    """A page that came back up a tier is not the KV that was written down (fatal mode)."""


def mode_from_env(value: str | None = None) -> str:
    """``off``, ``log`` or ``fatal`` from the ``HIRADIX_VERIFY`` value."""
    raw = (os.environ.get(ENV, "") if value is None else value).strip().lower()
    if raw in ("", "0", "off", "false", "no"):
        return "off"
    if raw in ("1", "on", "log", "true", "yes"):
        return "log"
    if raw == "fatal":
        return "fatal"
    raise ValueError(f"{ENV}={raw!r}: expected one of off, 0, on, 1, log, fatal")


def digest(data: Any) -> bytes:
    """16-byte digest of a contiguous buffer (bytes, memoryview, a numpy array)."""
    return hashlib.blake2b(data, digest_size=16).digest()


class PageVerifier:
    """Recorded digests per page key, and the counters of the checks."""

    def __init__(self, mode: str = "log", *, max_keys: int = MAX_KEYS):
        if mode not in ("log", "fatal"):
            raise ValueError(f"verify mode {mode!r}: expected 'log' or 'fatal'")
        self.mode = mode
        self.max_keys = max_keys
        self._digests: OrderedDict[bytes, tuple[bytes, ...]] = OrderedDict()
        self.checked = 0
        self.unchecked = 0
        self.mismatches = 0

    def record(self, keys: Sequence[bytes], digests: Sequence[bytes]) -> None:
        """Remember that page ``keys[i]`` was written down with content ``digests[i]``."""
        for key, value in zip(keys, digests, strict=True):
            known = self._digests.get(key, ())
            if value not in known:
                self._digests[key] = (*known[-(MAX_DIGESTS_PER_KEY - 1) :], value)
            self._digests.move_to_end(key)
        while len(self._digests) > self.max_keys:
            self._digests.popitem(last=False)

    def check(self, keys: Sequence[bytes], digests: Sequence[bytes], where: str) -> int:
        """Check pages that landed; returns how many did not match (logged and counted;
        raises :class:`VerifyError` in fatal mode)."""
        bad = []
        for i, (key, value) in enumerate(zip(keys, digests, strict=True)):
            known = self._digests.get(key)
            if known is None:
                self.unchecked += 1
            elif value in known:
                self.checked += 1
            else:
                self.mismatches += 1
                bad.append(i)
        if bad:
            message = (
                f"hiradix verify: {len(bad)} of {len(keys)} pages landing via {where} are not "
                f"the KV written down for their key (first at page {bad[0]}, key "
                f"{keys[bad[0]].hex()[:16]})"
            )
            logger.error(message)
            if self.mode == "fatal":
                raise VerifyError(message)
        return len(bad)

    def forget(self) -> None:
        """Drop every record (weights changed: old digests describe another model)."""
        self._digests.clear()
