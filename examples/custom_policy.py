"""An out-of-tree prefetch policy, loaded by the config as ``custom_policy:EveryOther``.

Run the simulator with it (from the repository root):

    PYTHONPATH=examples hiradix sim --trace ../shared/traces/mooncake_synthetic_trace.jsonl \
        --config examples/custom_policy.yaml --json /tmp/custom.json

A policy subclasses ``PrefetchPolicy``, takes its options as keyword arguments (the
config's ``prefetch.options``) and returns plans from its hooks. It must stay pure: no
IO, no threads, no wall clock (``event.now`` is the time).
"""

from __future__ import annotations

from collections.abc import Sequence

from hiradix.policies.base import ArrivalEvent, Plan, PrefetchPolicy, Stage
from hiradix.types import Tier


class EveryOther(PrefetchPolicy):
    """Stages the L3 run of every ``every``-th arriving request whose run is at least
    ``min_tokens`` long, into L2 (a toy: real policies predict)."""

    name = "every_other"

    def __init__(self, *, every: int = 2, min_tokens: int = 512) -> None:
        if every < 1:
            raise ValueError(f"prefetch.options.every: {every!r}; allowed: an int >= 1")
        self.every = every
        self.min_tokens = min_tokens
        self.seen = 0

    def on_arrival(self, event: ArrivalEvent) -> Sequence[Plan]:
        self.seen += 1
        run = event.matched
        if self.seen % self.every or run.l3_tokens < self.min_tokens:
            return ()
        end = run.l1_tokens + run.l2_tokens + run.l3_tokens
        return [Stage(event.namespace, event.key.prefix(end), Tier.L2, event.now, 0)]
