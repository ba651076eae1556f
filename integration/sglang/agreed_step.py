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

import torch

from hiradix.transfer import LANES, NOT_DONE, IoResult, TransferEngine

logger = logging.getLogger(__name__)

AGREED_IO = 16  # store completions per IO lane agreed per step (the rest wait a step)
NEUTRAL = 2**62  # a value that never lowers a MIN
CHECK_ENV = "HIRADIX_CONSENSUS_CHECK"
#: the tag of the relay between pipeline stages (SGLang's own P2PTag values are 4-byte
#: names too; this one is hiradix's)
PP_TAG = int.from_bytes(b"PpHr", byteorder="big")


class ConsensusError(RuntimeError):
    """TP ranks' trees disagree: a decision was taken outside the agreed step."""


def check_enabled() -> bool:
    return os.environ.get(CHECK_ENV, "").strip().lower() in ("1", "on", "true", "yes")


def relay_down(vector: list[int], group: Any, rank: int, size: int, sends: list[Any]) -> list[int]:
    """The first stage's verdict down the pipeline, as SGLang's unified cache relays its
    own (``_pp_sync``): a later stage receives it from the stage before and passes it on
    without waiting for the next; ``sends`` holds the pending send, finished at the next
    call (SGLang's ``_drain_async_work``)."""
    tensor = torch.tensor(vector, dtype=torch.int64)
    for work in sends:
        work.wait()
    sends.clear()
    if rank > 0:
        torch.distributed.recv(tensor, group=group, group_src=rank - 1, tag=PP_TAG)
    if rank + 1 < size:
        sends.append(
            torch.distributed.isend(tensor.clone(), group=group, group_dst=rank + 1, tag=PP_TAG)
        )
    return [int(v) for v in tensor.tolist()]


class AgreedStep:
    """Collect, agree, apply. ``reduce_min`` is ``None`` on a single rank; ``forward`` is
    ``None`` without pipeline parallelism (see :meth:`run` for what it does with it)."""

    def __init__(
        self,
        engine: TransferEngine,
        clock: Callable[[], float],
        reduce_min: Callable[[list[int]], list[int]] | None,
        *,
        digest: Callable[[], Sequence[tuple[str, int]]] | None = None,
        forward: Callable[[list[int]], list[int]] | None = None,
        first_stage: bool = True,
    ):
        self.engine = engine
        self.clock = clock
        self.reduce_min = reduce_min
        self.digest = digest  # the consensus checker's fields, or None (off)
        self.forward = forward
        self.first_stage = first_stage
        self.steps = 0

    def run(self) -> float:
        """Apply the completions every rank has; returns the agreed clock.

        With pipeline parallelism the ranks of the first stage agree among themselves and
        ``forward`` passes their verdict down the pipeline, as SGLang's unified cache does
        (``_all_reduce``: PP0 reduces, each later stage receives from the one before and
        relays): a later stage adopts it, waiting for its own copies to catch up, and never
        makes the first wait for it (a collective spanning the stages would deadlock
        SGLang's PP loop, where a stage relays requests and activations only after its own
        scheduling work)."""
        self.steps += 1
        counts = self.engine.ready()
        now = self.clock()
        if self.reduce_min is None and self.forward is None:
            self.engine.apply(counts)
            return now
        counts = [counts[0], *(min(c, AGREED_IO) for c in counts[1:])]
        vector = self._vector(counts, now)
        fields = list(self.digest()) if self.digest is not None else []
        for _, value in fields:
            vector += [value, -value]
        if self.first_stage and self.reduce_min is not None:
            vector = self.reduce_min(vector)
        if self.forward is not None:
            vector = self.forward(vector)
        self._check(fields, vector)
        counts = vector[:3]
        if not self.first_stage:
            self.engine.wait_ready(counts)
        offset = 4
        for lane, count in zip(LANES, counts[1:], strict=True):
            mine = self.engine.peek_results(lane, count)
            values: list[Any] = []
            for i in range(count):
                n, nbytes, neg_us = vector[offset + 3 * i : offset + 3 * i + 3]
                own = mine[i][0] or NOT_DONE
                values.append(IoResult(n, nbytes, -neg_us / 1e6, own.bad))
            self.engine.agree(lane, values)
            offset += 3 * AGREED_IO
        self.engine.apply(counts)
        return vector[3] / 1e6

    def _vector(self, counts: list[int], now: float) -> list[int]:
        vector = [*counts, int(now * 1e6)]
        for lane, count in zip(LANES, counts[1:], strict=True):
            results = self.engine.peek_results(lane, count)
            for i in range(AGREED_IO):
                if i < len(results):
                    res = results[i][0] or NOT_DONE
                    vector += [res.count, res.nbytes, -int(res.seconds * 1e6)]
                else:
                    vector += [NEUTRAL, NEUTRAL, NEUTRAL]
        return vector

    def _check(self, fields: list[tuple[str, int]], agreed: list[int]) -> None:
        """Each digest field: every first-stage rank had the same value (its MIN equals its
        MAX), and so does this rank (a later stage checks itself against the first)."""
        offset = 4 + 2 * 3 * AGREED_IO
        for i, (name, value) in enumerate(fields):
            low, neg_high = agreed[offset + 2 * i], agreed[offset + 2 * i + 1]
            if low != -neg_high or value != low:
                who = "TP ranks" if self.first_stage else "pipeline stages"
                raise ConsensusError(
                    f"hiradix: {who} disagree at step {self.steps} on {name}: this rank "
                    f"has {value}, the first stage's ranks range over [{low}, {-neg_high}]"
                )
