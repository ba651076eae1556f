"""The agreed step: the one point per scheduler iteration where finished IO changes the tree.

The rule (see ``hiradix/README.md``): IO threads and copy events only *report* that they
finished. Once per scheduler iteration, at a call every TP rank reaches in the same order,
every rank calls one collective of fixed shape, unconditionally: a MIN all-reduce of an
int64 vector holding how many orders have finished at the head of each queue (device
copies, store reads, store writes), the clock, and for the first ``AGREED_IO`` finished
orders of each store lane their results (``count``/``nbytes`` MIN, seconds MAX). Every rank
then applies exactly that many completions, in submission order, with the agreed results,
and takes its decisions on the agreed clock. At TP=1 nothing is reduced.

The consensus checker (``HIRADIX_CONSENSUS_CHECK=1``) adds, for each field of a digest of
the tree (node count, tokens per tier, locks, a hash of the structure), the value and its
negation to the same vector: after the MIN, ``min(x) == -min(-x)`` holds only if every rank
had the same ``x``. A disagreement raises :class:`ConsensusError` naming the first field
that differs, at the first step after it arose.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from hiradix.transfer import LANES, NOT_DONE, IoResult, TransferEngine

logger = logging.getLogger(__name__)

AGREED_IO = 16  # store completions per IO lane agreed per step (the rest wait a step)
NEUTRAL = 2**62  # a value that never lowers a MIN
CHECK_ENV = "HIRADIX_CONSENSUS_CHECK"


class ConsensusError(RuntimeError):
    """TP ranks' trees disagree: a decision was taken outside the agreed step."""


def check_enabled() -> bool:
    return os.environ.get(CHECK_ENV, "").strip().lower() in ("1", "on", "true", "yes")


class AgreedStep:
    """Collect, agree, apply. ``reduce_min`` is ``None`` on a single rank."""

    def __init__(
        self,
        engine: TransferEngine,
        clock: Callable[[], float],
        reduce_min: Callable[[list[int]], list[int]] | None,
        *,
        digest: Callable[[], Sequence[tuple[str, int]]] | None = None,
    ):
        self.engine = engine
        self.clock = clock
        self.reduce_min = reduce_min
        self.digest = digest  # the consensus checker's fields, or None (off)
        self.steps = 0

    def run(self) -> float:
        """Apply the completions every rank has; returns the agreed clock."""
        self.steps += 1
        counts = self.engine.ready()
        now = self.clock()
        if self.reduce_min is not None:
            counts, now = self._agree(counts, now)
        self.engine.apply(counts)
        return now

    def _agree(self, counts: list[int], now: float) -> tuple[list[int], float]:
        counts = [counts[0], *(min(c, AGREED_IO) for c in counts[1:])]
        vector = [*counts, int(now * 1e6)]
        for lane, count in zip(LANES, counts[1:], strict=True):
            results = self.engine.peek_results(lane, count)
            for i in range(AGREED_IO):
                if i < len(results):
                    res = results[i][0] or NOT_DONE
                    vector += [res.count, res.nbytes, -int(res.seconds * 1e6)]
                else:
                    vector += [NEUTRAL, NEUTRAL, NEUTRAL]
        fields = list(self.digest()) if self.digest is not None else []
        for _, value in fields:
            vector += [value, -value]
        assert self.reduce_min is not None
        agreed = self.reduce_min(vector)
        offset = 4 + 2 * 3 * AGREED_IO
        for i, (name, value) in enumerate(fields):
            low, neg_high = agreed[offset + 2 * i], agreed[offset + 2 * i + 1]
            if low != -neg_high:
                raise ConsensusError(
                    f"hiradix: TP ranks disagree at step {self.steps} on {name}: this rank "
                    f"has {value}, the ranks range over [{low}, {-neg_high}]"
                )
        counts = agreed[:3]
        offset = 4
        for lane, count in zip(LANES, counts[1:], strict=True):
            mine = self.engine.peek_results(lane, count)
            values: list[Any] = []
            for i in range(count):
                n, nbytes, neg_us = agreed[offset + 3 * i : offset + 3 * i + 3]
                own = mine[i][0] or NOT_DONE
                values.append(IoResult(n, nbytes, -neg_us / 1e6, own.bad))
            self.engine.agree(lane, values)
            offset += 3 * AGREED_IO
        return counts, agreed[3] / 1e6
