"""The transfer engine: the one place that owns worker threads, CUDA streams and events.

Everything that moves KV between tiers goes through here as an order. The tree never
blocks: it submits an order with a completion callback and the engine runs that callback
later, *on the scheduler thread, at the step that applies it* (``apply``/``poll``), so the
tree stays single-threaded and changes only at that step, never inside a lookup or an
eviction.

Orders:

- ``demote``: device -> host copy (through the ``KvCopier``: synchronous on CPU, a side
  stream and an event on CUDA);
- ``load``: host -> device copy for a load-back; returns the handle the forward must wait on;
- ``submit_io``: a blocking job (an L3 store batch) run on the engine's IO threads.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from hiradix.kv_copy import CopyHandle, KvCopier
from hiradix.linux import name_thread

logger = logging.getLogger(__name__)

CopyDone = Callable[[bool], None]
IoDone = Callable[[Any, BaseException | None], None]


@dataclass(frozen=True, slots=True)
class IoResult:
    """What a store job reports. With tensor parallelism each rank's job sees its own
    shard of the store, so the ranks agree on one result before anyone acts on it:
    ``count`` (pages present / read / stored, from the start; -1: no IO happened) and
    ``nbytes`` take the MIN over ranks, ``seconds`` the MAX. ``bad`` stays this rank's own
    (for its stats)."""

    count: int = 0
    nbytes: int = 0
    seconds: float = 0.0
    bad: tuple[str, ...] = ()


#: what a store job reports when it did no IO (store down, known absent) or failed: -1
#: pages, so that the MIN over ranks says "not looked" if any rank did not look
NOT_DONE = IoResult(count=-1)


class _IoOrder:
    """One store job: filled in by its worker thread, applied on the scheduler thread."""

    __slots__ = ("done", "error", "on_done", "result")

    def __init__(self, on_done: IoDone):
        self.on_done = on_done
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


LANES = ("read", "write")


class TransferEngine:
    """Submit/poll front for every copy and store IO. ``demote``/``load``/``submit_io``/
    ``ready``/``apply``/``poll`` are called on the scheduler thread only; IO jobs run on
    worker threads, which only *report* that they finished.

    Completions change the tree only when the scheduler applies them, in submission order
    per queue (device copies, store reads, store writes): ``ready()`` says how many orders
    at the head of each queue have finished, ``apply(counts)`` runs the callbacks of that
    many. With tensor parallelism every rank applies the MIN of the ranks' counts at the
    same step, so all trees see the same completions (see ``HiRadixCache.step``)."""

    def __init__(self, copier: KvCopier | None = None, *, io_workers: int = 2):
        self.copier = copier
        self.io_workers = io_workers
        self._copies: list[tuple[CopyHandle, CopyDone]] = []
        # Two lanes: lookups a request may be waiting on never queue behind bulk writes.
        self._io_pools: dict[str, ThreadPoolExecutor] = {}
        self._io_orders: dict[str, collections.deque[_IoOrder]] = {
            lane: collections.deque() for lane in LANES
        }
        self._lock = threading.Lock()  # guards nothing but the pool's lazy creation
        self._wakeup = threading.Event()  # set by workers, for drain()
        self.copy_failures = 0

    # ------------------------------------------------------------------ copies
    def demote(self, device_idx: torch.Tensor, host_idx: torch.Tensor, on_done: CopyDone) -> None:
        """Copy device pages to host slots; ``on_done(ok)`` runs from a later ``poll``."""
        if self.copier is None:
            raise RuntimeError("transfer engine has no KV copier (host tier disabled)")
        try:
            handle = self.copier.device_to_host(device_idx, host_idx)
        except Exception:  # a failed copy rolls back, it never fails a request
            logger.exception("hiradix: device->host copy failed; dropping the host copy")
            self.copy_failures += 1
            self._copies.append((_FAILED, on_done))
            return
        self._copies.append((handle, on_done))

    def load(self, host_idx: torch.Tensor, device_idx: torch.Tensor) -> CopyHandle:
        """Copy host slots back to device slots; the caller makes the forward wait on the
        returned handle (CPU: already done)."""
        if self.copier is None:
            raise RuntimeError("transfer engine has no KV copier (host tier disabled)")
        return self.copier.host_to_device(host_idx, device_idx)

    def track(self, handle: CopyHandle, on_done: CopyDone) -> None:
        """Run ``on_done(True)`` once ``handle`` is done and applied (a load whose source
        host slots must stay reserved until the copy has read them)."""
        self._copies.append((handle, on_done))

    # ------------------------------------------------------------------ store IO
    def submit_io(self, job: Callable[[], Any], on_done: IoDone, *, lane: str = "read") -> None:
        """Run ``job`` on an IO thread of ``lane`` (``read``: lookups and fetches a request
        may wait on; ``write``: write-through); ``on_done(result, error)`` runs when the
        scheduler applies the completion (``apply``/``poll``)."""
        pool = self._io_pools.get(lane)
        if pool is None:
            with self._lock:
                pool = self._io_pools.get(lane)
                if pool is None:
                    pool = ThreadPoolExecutor(
                        max_workers=self.io_workers,
                        thread_name_prefix=f"hiradix-{lane}",
                        initializer=name_thread,
                        initargs=(f"hiradix-{lane}",),
                    )
                    self._io_pools[lane] = pool
        order = _IoOrder(on_done)
        self._io_orders[lane].append(order)
        wakeup = self._wakeup

        def run() -> None:
            try:
                order.result = job()
            except BaseException as exc:  # noqa: BLE001 - handed to the scheduler thread's callback
                order.error = exc
            order.done = True  # last: the scheduler thread reads result/error after it
            wakeup.set()

        pool.submit(run)

    # ------------------------------------------------------------------ completion
    @property
    def in_flight(self) -> int:
        return len(self._copies) + sum(len(q) for q in self._io_orders.values())

    def ready(self) -> list[int]:
        """How many orders at the head of each queue (copies, reads, writes) are done."""
        copies = 0
        for handle, _ in self._copies:
            if not handle.done():
                break
            copies += 1
        counts = [copies]
        for lane in LANES:
            n = 0
            for order in self._io_orders[lane]:
                if not order.done:
                    break
                n += 1
            counts.append(n)
        return counts

    def wait_ready(self, counts: Sequence[int], timeout: float = 300.0) -> None:
        """Block until at least ``counts`` orders at the head of each queue are done (a
        later pipeline stage catching up with the verdict of the first, which saw its own
        copies finish). Raises ``TimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            have = self.ready()
            if all(h >= c for h, c in zip(have, counts, strict=True)):
                return
            if have[0] < counts[0] and have[0] < len(self._copies):
                self._copies[have[0]][0].wait()
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"hiradix: transfers {have} never reached {list(counts)}")
            self._wakeup.clear()
            if self.ready() == have:
                self._wakeup.wait(0.05)

    def peek_results(self, lane: str, count: int) -> list[tuple[Any, BaseException | None]]:
        """Results of the first ``count`` finished orders of ``lane`` (not yet applied)."""
        orders = self._io_orders[lane]
        return [(orders[i].result, orders[i].error) for i in range(min(count, len(orders)))]

    def agree(self, lane: str, results: list[Any]) -> None:
        """Replace the results of the first ``len(results)`` finished orders of ``lane``
        with the values the ranks agreed on (errors stay this rank's own)."""
        orders = self._io_orders[lane]
        for i, result in enumerate(results):
            orders[i].result = result

    def apply(self, counts: list[int]) -> int:
        """Run the callbacks of the first ``counts[i]`` finished orders of each queue, in
        submission order; returns how many ran. Never blocks."""
        ran = 0
        if counts[0]:
            head, self._copies = self._copies[: counts[0]], self._copies[counts[0] :]
            for handle, on_done in head:
                on_done(handle is not _FAILED)
                ran += 1
        for lane, count in zip(LANES, counts[1:], strict=True):
            orders = self._io_orders[lane]
            for _ in range(min(count, len(orders))):
                order = orders.popleft()
                order.on_done(order.result, order.error)
                ran += 1
        return ran

    def poll(self) -> int:
        """Apply every finished order (a single rank: nobody to agree with)."""
        return self.apply(self.ready())

    def drain(self, timeout: float = 60.0) -> None:
        """Wait for every order and run its callback (flush / shutdown)."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            for handle, _ in self._copies:
                handle.wait()
            self._wakeup.clear()
            if not self.poll() and self.in_flight:
                self._wakeup.wait(0.05)
        if self.in_flight:
            logger.warning("hiradix: %d transfers still running after drain", self.in_flight)

    def shutdown(self) -> None:
        self.drain()
        for pool in self._io_pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self._io_pools = {}


class _Failed:
    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None


_FAILED = _Failed()
