"""Prefetch policies: the events they see, the plans they return, and the guard around them.

A prefetch policy is a small Python class. The engine (the SGLang adapter or the
simulator) calls it on the scheduler thread with an event and executes the plans it
returns, within its own budgets (link bandwidth, free capacity; locked nodes are never
evicted for a prefetch). Policies are pure: no IO, no locks, no threads, no metrics, no
wall clock (``event.now`` is the only time they see, so a simulated run replays exactly).

Events carry read-only views: :class:`PathView` (a request's token path) and
:class:`TreeView` (what the tree holds, for periodic decisions). Plans are frozen values:
:class:`Stage` ("bring this path up to that tier by then") and :class:`Cold` ("this path
may go cold").

:class:`GuardedPolicy` wraps a policy for the engine: a policy that raises or returns
anything but a sequence of valid plans is disabled with one ``logger.error`` line and
serving goes on without it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
from abc import ABC
from array import array
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from hiradix.config_types import WaitMode
from hiradix.types import Tier

logger = logging.getLogger(__name__)

__all__ = [
    "ArrivalEvent",
    "Cold",
    "FinishEvent",
    "GuardedPolicy",
    "PathInfo",
    "PathView",
    "Plan",
    "PrefetchPolicy",
    "Stage",
    "TickEvent",
    "TierRun",
    "TreeView",
    "validate_plans",
]

#: What a plan's ``tokens`` may be: any read-only or owned sequence of token ids.
TokenSeq = tuple | array | memoryview | Sequence[int]


# --------------------------------------------------------------------------- views


class PathView:
    """A read-only token path (a request's prompt, or prompt + output at finish).

    ``tokens`` is a read-only ``memoryview`` of int64 ids: index it, slice it (a slice is
    again read-only and copies nothing) and pass a slice straight into a :class:`Stage`.
    ``prefix_keys(block)`` gives one hashable key per ``block``-token prefix, chained so
    that two paths share a key exactly when they share that whole prefix; policies use
    them to count and index prefixes without hashing tokens themselves. Keys are computed
    once per block size and cached on the view.
    """

    __slots__ = ("_keys", "namespace", "tokens")

    def __init__(self, tokens: Sequence[int] | array | memoryview, namespace: Hashable = None):
        if isinstance(tokens, memoryview):
            view = tokens if tokens.readonly else tokens.toreadonly()
            if view.format != "q":
                view = memoryview(array("q", view.tolist())).toreadonly()
        elif isinstance(tokens, array) and tokens.typecode == "q":
            view = memoryview(tokens).toreadonly()
        else:
            view = memoryview(array("q", tokens)).toreadonly()
        self.tokens: memoryview = view
        self.namespace = namespace
        self._keys: dict[int, tuple[bytes, ...]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def length(self) -> int:
        return len(self.tokens)

    def prefix(self, length: int) -> memoryview:
        """The first ``length`` tokens (read-only, no copy)."""
        return self.tokens[: max(0, length)]

    def prefix_keys(self, block: int) -> tuple[bytes, ...]:
        """Key ``i`` identifies the prefix of ``(i + 1) * block`` tokens (whole blocks only)."""
        if block < 1:
            raise ValueError(f"prefix_keys: block must be >= 1, got {block}")
        keys = self._keys.get(block)
        if keys is None:
            raw = self.tokens.tobytes()
            step = block * 8
            prev = repr(self.namespace).encode()
            out = []
            for off in range(0, len(raw) - step + 1, step):
                prev = hashlib.blake2b(prev + raw[off : off + step], digest_size=12).digest()
                out.append(prev)
            keys = tuple(out)
            self._keys[block] = keys
        return keys

    def __repr__(self) -> str:
        return f"PathView(len={len(self.tokens)}, namespace={self.namespace!r})"


@dataclass(frozen=True, slots=True)
class TierRun:
    """How much of a prompt is resident in each tier, in order: the first ``l1_tokens`` are
    on device, the next ``l2_tokens`` in host memory, the next ``l3_tokens`` in the store
    (including any already on their way up)."""

    l1_tokens: int = 0
    l2_tokens: int = 0
    l3_tokens: int = 0

    @property
    def total(self) -> int:
        return self.l1_tokens + self.l2_tokens + self.l3_tokens


@dataclass(frozen=True, slots=True)
class PathInfo:
    """One cached path (root to a leaf of the tree) as a :class:`TreeView` reports it.

    ``path_id`` is stable while the leaf lives; ``last_access`` is the tree's logical tick
    (comparable between paths, not seconds)."""

    path_id: int
    namespace: Hashable
    tokens: int
    l1_tokens: int
    l2_tokens: int
    hits: int
    last_access: int


class TreeView(Protocol):
    """Read-only view of the tree for :meth:`PrefetchPolicy.on_tick`.

    Every method is cheap (``resident``/``capacity``: O(1); ``paths``/``hot_paths``: one
    pass over the tree's leaves) and none changes the tree, its recency or its locks."""

    def resident(self, tier: Tier) -> int:
        """Tokens the tree holds in ``tier`` now."""

    def capacity(self, tier: Tier) -> float:
        """Capacity of ``tier`` in tokens (``math.inf`` when unbounded, 0 when off)."""

    def paths(self) -> Iterator[PathInfo]:
        """Every cached path (one per leaf), in no particular order."""

    def hot_paths(self, limit: int) -> list[PathInfo]:
        """The ``limit`` paths with the most hits, most hits first."""

    def path_tokens(self, path_id: int) -> PathView | None:
        """The tokens of a path from :meth:`paths`, or ``None`` if it is gone."""

    def resident_run(self, namespace: Hashable, tokens: TokenSeq) -> TierRun:
        """How much of the prefix ``tokens`` is on device, then in host memory (ready
        copies only; ``l3_tokens`` is always 0: the store is not asked). Cost: one walk
        down the tree along ``tokens``; no recency, split or expiry."""


class EmptyTreeView:
    """A :class:`TreeView` of an empty tree with no capacity (tests, edge cases)."""

    def resident(self, tier: Tier) -> int:
        return 0

    def capacity(self, tier: Tier) -> float:
        return 0.0

    def paths(self) -> Iterator[PathInfo]:
        return iter(())

    def hot_paths(self, limit: int) -> list[PathInfo]:
        return []

    def path_tokens(self, path_id: int) -> PathView | None:
        return None

    def resident_run(self, namespace: Hashable, tokens: TokenSeq) -> TierRun:
        return TierRun()


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class ArrivalEvent:
    """A request arrived (before it is scheduled). ``matched`` is what its prompt found."""

    now: float
    request_id: str
    namespace: Hashable
    key: PathView
    matched: TierRun
    session_id: str | None = None


@dataclass(frozen=True, slots=True)
class AbortEvent:
    """A request left before it finished (aborted while queued or running): forget it."""

    now: float
    request_id: str


@dataclass(frozen=True, slots=True)
class FinishEvent:
    """A request finished; ``path`` is its full path (prompt, then output when known)."""

    now: float
    request_id: str
    namespace: Hashable
    path: PathView
    session_id: str | None = None


@dataclass(frozen=True, slots=True)
class TickEvent:
    """Periodic call (the engine's tick interval) with a read-only view of the tree."""

    now: float
    tree: TreeView


# --------------------------------------------------------------------------- plans


#: The engines' rule for staging an arriving request's own prefix to L1 (``Stage(tier=L1)``
#: from ``on_arrival``): skipped while what was staged for requests still waiting holds
#: this share of L1 (a staging whose request has not started within ``STAGED_FOR_S``
#: seconds no longer counts), and when the prompts queued ahead of it hold more tokens
#: than L1 (their prefills would evict what is staged now before it is used). The SGLang
#: adapter and the simulator both apply it.
STAGED_FOR_SHARE = 0.25
STAGED_FOR_S = 30.0


class StagedForRequests:
    """What an engine staged to L1 for arriving requests that have not started yet, and
    the rule above for whether one more staging fits."""

    def __init__(self) -> None:
        self._by_rid: dict[str, tuple[int, float]] = {}  # request id -> (tokens, when)

    def fits(self, tokens: int, *, now: float, l1_tokens: float, queued_new: int) -> bool:
        """Whether ``tokens`` more may be staged for a request behind prompts that will
        insert ``queued_new`` new tokens into an L1 of ``l1_tokens``."""
        if queued_new > l1_tokens:  # the prefills queued ahead would evict it before use
            return False
        for rid in [r for r, (_, t) in self._by_rid.items() if now - t > STAGED_FOR_S]:
            del self._by_rid[rid]  # its request never started: it no longer counts
        pending = sum(n for n, _ in self._by_rid.values())
        return pending + tokens <= l1_tokens * STAGED_FOR_SHARE

    def add(self, request_id: str, tokens: int, now: float) -> None:
        self._by_rid[request_id] = (tokens, now)

    def pop(self, request_id: str | None) -> int:
        """Tokens staged for a request that starts or goes away (0 if none)."""
        entry = self._by_rid.pop(request_id, None) if request_id is not None else None
        return entry[0] if entry is not None else 0


@dataclass(frozen=True, slots=True)
class Stage:
    """Bring the prefix ``tokens`` of ``namespace`` up to ``tier`` (L2 or L1) by
    ``deadline`` (engine-clock seconds). Higher ``priority`` goes first; the engine drops
    what its budgets cannot fit and what the lower tiers do not hold."""

    namespace: Hashable
    tokens: TokenSeq
    tier: Tier = Tier.L2
    deadline: float = 0.0
    priority: int = 0


@dataclass(frozen=True, slots=True)
class Cold:
    """The path ``tokens`` of ``namespace`` may go cold: the part of it no other cached
    path shares is evicted before everything else (its lower-tier copies stay)."""

    namespace: Hashable
    tokens: TokenSeq


Plan = Stage | Cold
_PLAN_TYPES = (Stage, Cold)
_TOKEN_TYPES = (tuple, list, array, memoryview, range)


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _check_tokens(plan: Plan) -> str | None:
    tokens = plan.tokens
    if not isinstance(tokens, _TOKEN_TYPES):
        return f"{type(plan).__name__}.tokens must be a tuple/array of ints, got {type(tokens).__name__}"
    if isinstance(tokens, (tuple, list)) and not all(
        isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in tokens
    ):
        return f"{type(plan).__name__}.tokens holds a non-integer"
    if isinstance(tokens, (tuple, list)) and not all(_INT64_MIN <= t <= _INT64_MAX for t in tokens):
        return f"{type(plan).__name__}.tokens holds a value outside int64"
    if isinstance(tokens, memoryview) and tokens.format not in ("q", "l", "i"):
        return f"{type(plan).__name__}.tokens memoryview has format {tokens.format!r}"
    try:
        hash(plan.namespace)
    except TypeError:
        return f"{type(plan).__name__}.namespace is not hashable"
    return None


def validate_plans(result: Any) -> tuple[Plan, ...]:
    """``result`` as a tuple of plans; raises ``TypeError`` saying what is wrong with it."""
    if result is None:
        raise TypeError("returned None; return () for no plans")
    if isinstance(result, (str, bytes)) or not isinstance(result, (list, tuple)):
        raise TypeError(f"returned {type(result).__name__}; expected a list or tuple of plans")
    for plan in result:
        if not isinstance(plan, _PLAN_TYPES):
            raise TypeError(f"returned a {type(plan).__name__} among its plans")
        problem = _check_tokens(plan)
        if problem is not None:
            raise TypeError(problem)
        if isinstance(plan, Stage):
            if plan.tier not in (Tier.L1, Tier.L2):
                raise TypeError(f"Stage.tier must be Tier.L1 or Tier.L2, got {plan.tier!r}")
            if not isinstance(plan.deadline, numbers.Real) or math.isnan(plan.deadline):
                raise TypeError(f"Stage.deadline must be a number, got {plan.deadline!r}")
            if not isinstance(plan.priority, numbers.Integral) or isinstance(plan.priority, bool):
                raise TypeError(f"Stage.priority must be an int, got {plan.priority!r}")
    return tuple(result)


# --------------------------------------------------------------------------- policy


class PrefetchPolicy(ABC):
    """Base class of prefetch policies.

    Subclasses set ``name`` and take their options as keyword arguments (the config's
    ``prefetch.options``); a bad option value raises ``ValueError`` in the constructor.
    Every hook runs on the engine's scheduler thread, must be fast (microseconds per
    event: no IO, no blocking, no locks) and returns a sequence of plans; the defaults
    return ``()``. Given the same events a policy must return the same plans (TP ranks and
    simulator replays depend on it).
    """

    name: ClassVar[str] = "base"
    #: The wait mode this policy was designed for, or ``None`` for the config's. A hint:
    #: the engine may log a mismatch but follows the config.
    wait_mode: ClassVar[WaitMode | None] = None

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"{type(self).__name__} takes no options, got {sorted(options)}")

    def on_arrival(self, event: ArrivalEvent) -> Sequence[Plan]:
        """A request arrived; ``event.matched`` says where its prompt's KV is now."""
        return ()

    def on_finish(self, event: FinishEvent) -> Sequence[Plan]:
        """A request finished; its full path is in ``event.path``."""
        return ()

    def on_tick(self, event: TickEvent) -> Sequence[Plan]:
        """Periodic call with a read-only view of the tree."""
        return ()

    def on_abort(self, event: AbortEvent) -> Sequence[Plan]:
        """A request that arrived will never finish: drop what is kept for it."""
        return ()


class GuardedPolicy:
    """Runs a policy for an engine: validates its plans and disables it on the first fault.

    A hook that raises, or returns anything but a list/tuple of valid :class:`Stage` /
    :class:`Cold` plans, disables the policy for good with one ``logger.error`` line;
    from then on every hook returns ``()`` and serving goes on without prefetch.
    """

    __slots__ = ("disabled", "policy", "reason")

    def __init__(self, policy: PrefetchPolicy):
        self.policy = policy
        self.disabled = False
        self.reason: str | None = None

    @property
    def name(self) -> str:
        return str(getattr(self.policy, "name", type(self.policy).__name__))

    @property
    def wait_mode(self) -> WaitMode | None:
        return getattr(self.policy, "wait_mode", None)

    def _call(self, hook: str, event: Any) -> tuple[Plan, ...]:
        if self.disabled:
            return ()
        try:
            return validate_plans(getattr(self.policy, hook)(event))
        except Exception as error:  # noqa: BLE001 - any fault of user code disables it, never the server
            self.disabled = True
            self.reason = f"{hook}: {type(error).__name__}: {error}"
            logger.error("hiradix: prefetch policy %r disabled: %s", self.name, self.reason)
            return ()

    def on_arrival(self, event: ArrivalEvent) -> tuple[Plan, ...]:
        return self._call("on_arrival", event)

    def on_finish(self, event: FinishEvent) -> tuple[Plan, ...]:
        return self._call("on_finish", event)

    def on_tick(self, event: TickEvent) -> tuple[Plan, ...]:
        return self._call("on_tick", event)

    def on_abort(self, event: AbortEvent) -> tuple[Plan, ...]:
        if not hasattr(self.policy, "on_abort"):  # a policy written before the hook
            return ()
        return self._call("on_abort", event)
