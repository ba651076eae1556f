"""What the built-in prefetch policies share: option checks, plans that stage an arriving
prompt's L3 run, a per-tick staging budget and the predictive policies' common options.

Pure functions and small value holders, like the policies that use them (no IO, no locks).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any

from hiradix.policies.base import ArrivalEvent, Plan, PrefetchPolicy, Stage, TickEvent
from hiradix.types import Tier


def positive_option(value: Any, option: str, *, zero: bool = False) -> float:
    """``value`` as a float > 0 (>= 0 with ``zero``); ``ValueError`` naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"prefetch.options.{option}: {value!r}; allowed: a number")
    if value < 0 or (value == 0 and not zero):
        raise ValueError(f"prefetch.options.{option}: {value!r}; allowed: > 0")
    return float(value)


def count_option(value: Any, option: str, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``; ``ValueError`` naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"prefetch.options.{option}: {value!r}; allowed: an int >= {minimum}")
    return value


def stage_l3_run(event: ArrivalEvent, *, chunk_tokens: int = 0, priority: int = 0) -> list[Plan]:
    """Plans that bring the L3 run of an arriving prompt into L2, in order.

    With ``chunk_tokens`` > 0 the run is split into chunks with rising deadlines and
    falling priorities, so that the engine reads a long context ahead in order and the
    front of it is usable before the end has arrived."""
    matched = event.matched
    if matched.l3_tokens <= 0:
        return []
    start = matched.l1_tokens + matched.l2_tokens
    end = min(start + matched.l3_tokens, len(event.key))
    if chunk_tokens <= 0 or end - start <= chunk_tokens:
        return [Stage(event.namespace, event.key.prefix(end), Tier.L2, event.now, priority)]
    plans: list[Plan] = []
    for index, stop in enumerate(range(start + chunk_tokens, end + chunk_tokens, chunk_tokens)):
        stop = min(stop, end)
        plans.append(
            Stage(event.namespace, event.key.prefix(stop), Tier.L2, event.now, priority - index)
        )
    return plans


class TickBudget:
    """Tokens a policy may stage per tick into each tier: ``share`` of the tier's
    capacity, so that staging never crowds out what requests are using. One path per
    tier and tick always fits when the share is not 0 (a path longer than the share
    would otherwise never be staged); it may not exceed half the tier."""

    __slots__ = ("left", "taken", "whole")

    def __init__(self, event: TickEvent, l1_share: float, l2_share: float):
        tree = event.tree
        self.whole = {Tier.L1: tree.capacity(Tier.L1), Tier.L2: tree.capacity(Tier.L2)}
        self.left = {
            Tier.L1: self.whole[Tier.L1] * l1_share,
            Tier.L2: self.whole[Tier.L2] * l2_share,
        }
        self.taken = {Tier.L1: False, Tier.L2: False}

    def take(self, tier: Tier, tokens: int) -> bool:
        first = not self.taken[tier] and self.left[tier] > 0 and tokens <= self.whole[tier] / 2
        if self.left[tier] < tokens and not first:
            return False
        self.left[tier] -= tokens
        self.taken[tier] = True
        return True


def needs_staging(event: TickEvent, namespace: Hashable, tokens: Any, tier: Tier) -> bool:
    """Whether ``tokens`` is not yet all in ``tier`` or above (a plan for a resident
    path would only cost the engine a lookup, and a budget share)."""
    run = event.tree.resident_run(namespace, tokens)
    held = run.l1_tokens if tier is Tier.L1 else run.l1_tokens + run.l2_tokens
    return held < len(tokens)


class StagingPolicy(PrefetchPolicy):
    """Base of the predictive policies (session, pattern): their shared options, validated
    once."""

    block: int
    lead: float
    l1_lead: float
    l2_budget: float
    l1_budget: float
    ema: float

    def _staging_options(
        self,
        block_tokens: int,
        lead_s: float,
        l1_lead_s: float,
        l2_budget: float,
        l1_budget: float,
        ema: float,
    ) -> None:
        self.block = count_option(block_tokens, "block_tokens")
        self.lead = positive_option(lead_s, "lead_s", zero=True)
        self.l1_lead = positive_option(l1_lead_s, "l1_lead_s", zero=True)
        self.l2_budget = positive_option(l2_budget, "l2_budget", zero=True)
        self.l1_budget = positive_option(l1_budget, "l1_budget", zero=True)
        self.ema = positive_option(ema, "ema")
        if self.ema > 1:
            raise ValueError(f"prefetch.options.ema: {ema!r}; allowed: (0, 1]")
