"""Cost model of the simulator: links between tiers, prefill and decode time.

A :class:`Link` is one direction of one physical path (device->host, host->device,
store->host, host->store). Transfers on a link queue FIFO: a transfer submitted at ``t``
starts when the link is free, occupies it for ``bytes / bandwidth`` and completes
``latency`` after that (latency is pipelined: it does not hold the link).

Prefill time follows the standard FLOP count of a decoder-only transformer: every new
token costs ``2 * params`` FLOPs in the matmuls plus ``4 * layers * attn_dim * context``
in attention (QK^T and AV, causal: ``context = cached + new / 2`` on average), run at
``peak_flops * mfu`` over ``gpus`` GPUs, plus a fixed launch overhead per prefill.

A :class:`LinkPool` is the same path on each of ``instances`` servers (every prefill
instance has its own PCIe links, drives and NICs): a transfer runs on one member, never
faster than one path, and the pool picks the member that can start it first.

Loads overlap the prefill layer by layer (SGLang's ``LayerDoneCounter``: layer ``i``'s
forward waits only for layer ``i``'s copy), so a prefill of ``compute`` seconds behind a
load of ``load`` seconds ends after :func:`overlapped`, a two-stage pipeline of
``layers`` equal steps, not after their sum.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

LINK_NAMES = ("d2h", "h2d", "l3_write", "l3_read")


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """Bandwidth (bytes/s) and latency (s) of one direction of one path."""

    bandwidth: float
    latency: float

    def __post_init__(self) -> None:
        if not self.bandwidth > 0 or not self.latency >= 0:
            raise ValueError(f"LinkSpec: bandwidth must be > 0 and latency >= 0, got {self}")

    def seconds(self, num_bytes: float) -> float:
        return num_bytes / self.bandwidth + self.latency


class Link:
    """A FIFO-queued link with a virtual clock; counts bytes moved."""

    __slots__ = ("busy_until", "bytes_moved", "name", "spec", "transfers")

    def __init__(self, name: str, spec: LinkSpec):
        self.name = name
        self.spec = spec
        self.busy_until = 0.0
        self.bytes_moved = 0
        self.transfers = 0

    def backlog(self, now: float) -> float:
        """Seconds of queued work ahead of a transfer submitted now."""
        return max(0.0, self.busy_until - now)

    def submit(self, now: float, num_bytes: int, not_before: float = 0.0) -> float:
        """Queue a transfer (starting no earlier than ``not_before``); its completion time."""
        start = max(now, not_before, self.busy_until)
        self.busy_until = start + num_bytes / self.spec.bandwidth
        self.bytes_moved += num_bytes
        self.transfers += 1
        return self.busy_until + self.spec.latency

    def estimate(self, now: float, num_bytes: int) -> float:
        """Completion time a transfer submitted now would have (changes nothing)."""
        return max(now, self.busy_until) + self.spec.seconds(num_bytes)


class LinkPool:
    """One :class:`Link` per instance; a transfer goes to the member free first."""

    __slots__ = ("members", "name", "spec")

    def __init__(self, name: str, spec: LinkSpec, instances: int = 1):
        if instances < 1:
            raise ValueError(f"LinkPool: instances must be >= 1, got {instances}")
        self.name = name
        self.spec = spec
        self.members = [Link(name, spec) for _ in range(instances)]

    @property
    def bytes_moved(self) -> int:
        return sum(link.bytes_moved for link in self.members)

    @property
    def transfers(self) -> int:
        return sum(link.transfers for link in self.members)

    def pick(self, now: float) -> Link:
        """The member whose queue frees first (the first such, for determinism)."""
        return min(self.members, key=lambda link: max(now, link.busy_until))

    def backlog(self, now: float) -> float:
        return self.pick(now).backlog(now)

    def submit(self, now: float, num_bytes: int, not_before: float = 0.0) -> float:
        return self.pick(max(now, not_before)).submit(now, num_bytes, not_before)

    def estimate(self, now: float, num_bytes: int) -> float:
        return self.pick(now).estimate(now, num_bytes)


def overlapped(compute: float, load: float, layers: int) -> float:
    """Seconds until a prefill of ``compute`` s that needs a load of ``load`` s ends, when
    both proceed layer by layer (``layers`` equal steps) and layer ``i`` computes once its
    copy landed: the slower stage plus one step of the faster one."""
    if load <= 0:
        return compute
    steps = max(1, layers)
    return max(compute + load / steps, load + compute / steps)


@dataclass(frozen=True, slots=True)
class ModelCost:
    """What a model costs to run on the profile's GPUs."""

    params: float  # parameters (FLOPs per token = 2 * params in the matmuls)
    layers: int
    attn_dim: int  # query heads * head_dim
    kv_bytes_per_token: int  # all layers, K and V, all KV heads, the whole TP group
    gpus: int
    peak_flops: float  # per GPU, dense, in the GEMM dtype
    mfu: float  # share of peak reached by prefill
    prefill_overhead_s: float  # fixed per prefill (scheduling, launches)
    decode_s_per_token: float  # inter-token latency under load

    def prefill_flops(self, new: int, cached: int) -> float:
        context = cached + new / 2
        return new * (2 * self.params + 4 * self.layers * self.attn_dim * context)

    def prefill_time(self, new: int, cached: int) -> float:
        """Seconds to prefill ``new`` tokens after ``cached`` tokens already in KV."""
        if new <= 0:
            return self.prefill_overhead_s
        rate = self.gpus * self.peak_flops * self.mfu
        return self.prefill_overhead_s + self.prefill_flops(new, cached) / rate

    def decode_time(self, tokens: int) -> float:
        return max(0, tokens) * self.decode_s_per_token


@dataclass(frozen=True, slots=True)
class Profile:
    """A named hardware + model setup: the model's cost and every link's spec."""

    name: str
    description: str
    model: ModelCost
    links: dict[str, LinkSpec] = field(default_factory=dict)  # d2h, h2d
    stores: dict[str, LinkSpec] = field(default_factory=dict)  # "<kind>_read"/"<kind>_write"

    def link_spec(self, link: str, store_kind: str) -> LinkSpec:
        if link in ("d2h", "h2d"):
            return self.links[link]
        direction = "read" if link == "l3_read" else "write"
        key = f"{store_kind}_{direction}"
        if key not in self.stores:
            allowed = sorted({k.rsplit("_", 1)[0] for k in self.stores})
            raise ValueError(f"profile {self.name!r} has no store {store_kind!r}; has {allowed}")
        return self.stores[key]

    def bytes_for(self, tokens: int) -> int:
        return tokens * self.model.kv_bytes_per_token

    def load_beats_recompute(self, tokens: int, cached: int, seconds: float) -> bool:
        """Whether waiting ``seconds`` for ``tokens`` of KV beats recomputing them."""
        return seconds < self.model.prefill_time(tokens, cached) - self.model.prefill_overhead_s


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
