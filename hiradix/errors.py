"""The two small exception types that cross hiradix's layer boundaries.

* ``StoreUnavailable``: the L3 medium (Redis, a directory, ...) cannot be reached or
  answered with a connection / timeout / OS error. Callers treat it as a miss and feed
  a :class:`hiradix.breaker.CircuitBreaker`; a store never raises anything else for an
  outage.
* ``CorruptPage``: a stored page whose header or checksum does not verify. It is a
  ``ValueError`` so that generic "bad data" handlers catch it too.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

__all__ = ["CorruptPage", "StoreUnavailable"]


class StoreUnavailable(Exception):
    """The L3 store cannot be reached now; the operation did not happen (or may have
    half-happened for writes). Retrying later may succeed."""


class CorruptPage(ValueError):
    """A page blob failed verification; ``str(exc)`` names the reason."""
