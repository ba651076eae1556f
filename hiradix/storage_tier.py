"""L3 tiering: write host pages through to a shared store, prefetch them back on arrival.

Runs on the scheduler thread and owns no threads: every store call is a job submitted to
the transfer engine, whose completion callback comes back through ``TransferEngine.poll``.
The store is any object with the ``PageStore`` methods (``put_many``, ``get_many_into``,
``exists_many``, ``delete_many``); the core never imports the backends.

Pages in the store are ``block_tokens`` long (a multiple of the tree's page size) and keyed
by a chain of BLAKE2b digests over their tokens, seeded with the namespace digest (model
identity, TP shard, tenant namespace, LoRA ``extra_key`` and ``cache_salt``), so KV is
shared only between requests, servers and restarts that would compute the same KV.

Failure model: any error of the store (``StoreUnavailable``), a page that does not verify
(``CorruptPage``) or a full write queue is a miss, logged once per state change through the
circuit breaker and counted; requests never fail because of L3.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hiradix.breaker import CircuitBreaker
from hiradix.codec import (
    PageMeta,
    codec_name,
    decode_page,
    encode_page,
    raw_frame,
    seal_raw_frame,
)
from hiradix.cost_model import CostModel
from hiradix.errors import CorruptPage, StoreUnavailable
from hiradix.metrics import Stats
from hiradix.transfer import NOT_DONE, IoResult, TransferEngine
from hiradix.tree import Node, RadixTree
from hiradix.verify import digest

logger = logging.getLogger(__name__)

#: the page layout recorded in each page's header, by the number of per-layer buffers of
#: slot rows the pool has: MHA's K and V pages are ``(2, layers, block, heads, dim)``;
#: MLA's latent pages ``(1, layers, block, 1, dim)``. A reader compares it (and the shape)
#: with what it expects, so an MLA page is never read as MHA KV or the other way round.
LAYOUT = "kv_layer_token_head_dim"
MLA_LAYOUT = "mla_latent_layer_token_dim"
LAYOUTS = {2: LAYOUT, 1: MLA_LAYOUT}
#: what a rank that does not write replicated KV reports for a write: every page stored,
#: and bytes no MIN can pick over the writer's own result
_NOT_MINE = 1 << 62
MAX_ABSENT = 65536  # "not in the store" answers remembered (presence_ttl each)
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NP_INT_OF_SIZE = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}
_TORCH_DTYPES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.uint8: "uint8",
    torch.int8: "int8",
}


@dataclass
class Prefetch:
    """One request's L3 lookup: submitted on arrival, materialized at admission."""

    namespace: Hashable
    tokens: array
    start_block: int
    submitted_at: float
    done: bool = False
    #: host slots reserved for the fetched pages (``block`` per page), written by the
    #: worker; ``ready`` leading pages of them hold verified KV once ``done``
    slots: torch.Tensor | None = None
    ready: int = 0
    abandoned: bool = False


class StorageTier:
    """The L2 <-> L3 half of the hierarchy for one cache instance."""

    def __init__(
        self,
        store: Any,
        engine: TransferEngine,
        slab: Any,
        tree: RadixTree,
        *,
        stats: Stats,
        model_id: str,
        tenant: str,
        make_key: Callable[[str, str], str],
        block_tokens: int,
        codec: str = "none",
        level: int = 3,
        mac_key: bytes | None = None,
        ttl: float | None = None,
        sliding: bool = True,
        presence_ttl: float = 10.0,
        write_queue_pages: int = 4096,
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] = time.monotonic,
        writer: bool = True,
    ):
        if block_tokens % tree.page_size:
            raise ValueError(
                f"store.block_tokens={block_tokens} is not a multiple of the page size "
                f"{tree.page_size}"
            )
        self.store = store
        self.engine = engine
        self.slab = slab
        self.tree = tree
        self.stats = stats
        self.model_id = model_id
        self.tenant = tenant
        self.make_key = make_key
        self.block = block_tokens
        self.codec = codec
        self.codec_name = codec_name(codec)
        self.level = level
        self.mac_key = mac_key  # keyed page MAC (store.mac_key_env), or None
        self.ttl = ttl
        self.sliding = sliding
        self.presence_ttl = presence_ttl
        self.write_queue_pages = write_queue_pages
        self.breaker = breaker or CircuitBreaker(clock=clock)
        self.clock = clock
        #: whether this rank writes pages. Every rank writes its own shard of sharded KV
        #: (MHA); of replicated KV (MLA, the same on every TP rank) one rank writes each
        #: page and every rank reads (a non-writer's write job reports "all stored", so
        #: the agreed count, a MIN, is the writer's: nobody counts on a refused write)
        self.writer = writer
        buffers = getattr(slab, "buffers", None) or (slab.k, slab.v)
        self.layout = LAYOUTS[len(buffers)]
        self.dtype = _TORCH_DTYPES.get(slab.k.dtype, str(slab.k.dtype).replace("torch.", ""))
        self.page_shape = (len(buffers), slab.k.shape[0], block_tokens, *slab.k.shape[2:])
        self._written: OrderedDict[bytes, None] = OrderedDict()
        self._absent: dict[bytes, float] = {}
        self._queued_pages = 0
        self._ns_digests: dict[Hashable, bytes] = {}
        self.prefetches: dict[str, Prefetch] = {}
        self.cost = CostModel()
        self.bytes_per_token = slab.bytes_per_token
        self._in_flight_keys: set[bytes] = set()
        self._scratch = threading.local()  # per worker thread: reusable read buffers
        # numpy views of the slab (same bytes; numpy takes read-only sources and copies
        # without the GIL), for the worker threads that fill reserved rows
        itemsize = slab.k.element_size()
        as_int = _INT_OF_SIZE[itemsize]
        self._np_dtype = _NP_INT_OF_SIZE[itemsize]
        self._buffers = tuple(buffers)
        self._slab_np = tuple(b.view(as_int).numpy() for b in buffers)
        #: requests waiting to be scheduled, the one asking included (the adapter counts
        #: SGLang's waiting queue). With others queued, a fetch slower than recomputing
        #: still pays: its pages land while the server prefills the others.
        self.queued: Callable[[], int] = lambda: 0
        #: verify mode (:mod:`hiradix.verify`): digests of the pages written, checked on read
        self.verifier: Any = None
        #: the tree may hold KV of other weights (an update the cache was not flushed
        #: with): nothing is read from or written to the store until ``reset``
        self.suspended = False
        #: replaced by another store (``store_admin.py``): jobs that have not started do
        #: no IO (a miss, a dropped write); running ones finish against this store
        self.retired = False
        self.pending_jobs = 0  # submitted jobs whose completion is not applied yet
        #: clears of the store submitted and not applied yet (``store_admin.py``): a write
        #: that starts meanwhile does no IO (dropped), as the clear might delete its pages
        #: after ``_written`` records them
        self.clearing = 0

    def others_queued(self) -> bool:
        return self.queued() > 1

    # ------------------------------------------------------------------ keys
    def ns_digest(self, namespace: Hashable) -> bytes:
        digest = self._ns_digests.get(namespace)
        if digest is None:
            text = f"{self.model_id}\x00{self.tenant}\x00{namespace!r}".encode()
            digest = hashlib.blake2b(text, digest_size=16).digest()
            self._ns_digests[namespace] = digest
        return digest

    def block_keys(self, namespace: Hashable, tokens: array, blocks: int) -> list[bytes]:
        prev = self.ns_digest(namespace)
        raw = tokens[: blocks * self.block].tobytes()
        step = self.block * 8
        keys = []
        for off in range(0, blocks * step, step):
            prev = hashlib.blake2b(prev + raw[off : off + step], digest_size=16).digest()
            keys.append(prev)
        return keys

    def _meta(self, namespace: Hashable, key: bytes) -> PageMeta:
        return PageMeta(self.dtype, self.layout, self.page_shape, self.ns_digest(namespace), key)

    def _store_key(self, namespace: Hashable, key: bytes) -> str:
        return self.make_key(self.ns_digest(namespace).hex(), key.hex())

    # ------------------------------------------------------------------ write-through
    def save_path(self, last: Node) -> None:
        """Write the complete blocks of the path ending at ``last`` whose tokens are all in
        host memory now (ancestors' blocks were written when they were demoted). What is
        written and pinned depends only on agreed state (the tree, ``_written``); whether
        the store is up is the worker's business (the circuit breaker is asked there)."""
        if self.suspended:
            return
        path = self.tree.path(last)
        if not path:
            return
        tokens = array("q")
        spans = []  # (start, node) for nodes whose host copy is ready
        for n in path:
            if n.l2_ready:
                spans.append((len(tokens), n))
            tokens.extend(n.tokens)
        blocks = len(tokens) // self.block
        if blocks == 0 or not spans:
            return
        namespace = last.namespace
        keys = self.block_keys(namespace, tokens, blocks)
        items = []
        item_blocks: list[int] = []  # the store page index of each item (KV events)
        covered: dict[int, Node] = {}
        for b in range(blocks):
            key = keys[b]
            if key in self._written or key in self._in_flight_keys:
                continue
            lo, hi = b * self.block, (b + 1) * self.block
            covering = [(start, n) for start, n in spans if start < hi and start + len(n) > lo]
            if sum(min(hi, s0 + len(n)) - max(lo, s0) for s0, n in covering) != self.block:
                continue  # part of this block is not in host memory
            pieces = [n.l2[max(lo, s0) - s0 : min(hi, s0 + len(n)) - s0] for s0, n in covering]
            page_slots = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            items.append(
                (self._store_key(namespace, key), self._meta(namespace, key), page_slots, key)
            )
            item_blocks.append(b)
            for _, n in covering:
                covered[id(n)] = n
        if not items:
            return
        if self._queued_pages + len(items) > self.write_queue_pages:
            self.stats.add("l3_dropped_writes", len(items))
            return
        pins = [self.tree.pin_l2(n) for n in covered.values()]
        self._queued_pages += len(items)
        written = [key for *_, key in items]
        self._in_flight_keys.update(written)

        def job() -> IoResult:
            if not self.writer:  # replicated KV: the writer rank stores it; the MIN is its
                for key in written:
                    self._absent.pop(key, None)
                return IoResult(len(items), _NOT_MINE)
            if self.retired or self.clearing or not self.breaker.allow():
                return NOT_DONE
            started = time.perf_counter()
            payload = []
            try:
                for store_key, meta, page_slots, _ in items:
                    payload.append((store_key, self._encode(page_slots, meta)))
                stored = self.store.put_many(payload, self.ttl)
            except StoreUnavailable:
                self.breaker.record_failure()
                raise
            self.breaker.record_success()
            count = 0
            while count < len(stored) and stored[count]:
                count += 1
            for key in written[:count]:
                self._absent.pop(key, None)
            nbytes = sum(len(blob) for (_, blob), ok in zip(payload, stored) if ok)
            return IoResult(count, nbytes, time.perf_counter() - started)

        def done(result: IoResult | None, error: BaseException | None) -> None:
            result = result or NOT_DONE
            self._queued_pages -= len(items)
            self._in_flight_keys.difference_update(written)
            for pin in pins:
                self.tree.unpin_l2(pin)
            if error is not None:
                self._failed(error)
            stored = written[: max(0, result.count)]  # agreed: stored by every rank
            for key in stored:
                self._remember_written(key)
            if stored and self.tree.listener is not None:
                self.tree.listener.l3_present(self, namespace, tokens, item_blocks[: len(stored)])
            if len(stored) < len(written) and error is None:
                self.stats.add("l3_dropped_writes", len(written) - len(stored))
            self.stats.add("l2_to_l3_tokens", len(stored) * self.block)
            if self.writer:
                self.stats.add("l3_put_bytes", result.nbytes)

        self._submit(job, done, lane="write")

    def _submit(self, job: Callable[[], Any], done: Any, *, lane: str = "read") -> None:
        """``engine.submit_io``, counting this store's jobs until they are applied."""
        self.pending_jobs += 1

        def applied(result: Any, error: BaseException | None) -> None:
            self.pending_jobs -= 1
            done(result, error)

        self.engine.submit_io(job, applied, lane=lane)

    def _encode(self, page_slots: torch.Tensor, meta: PageMeta) -> bytes | memoryview:
        """One page of host rows, framed (worker thread; the rows are pinned). Uncompressed
        pages are copied straight from the slab into the frame: one copy, GIL released."""
        if self.codec_name != "none":
            stacked = torch.stack(tuple(b[:, page_slots] for b in self._buffers))
            raw = stacked.view(torch.uint8).numpy()
            if self.verifier is not None:
                self.verifier.record([meta.page_key], [digest(raw)])
            return encode_page(raw, meta, self.codec, self.level, mac_key=self.mac_key)
        frame, payload = raw_frame(meta, mac_key=self.mac_key)
        parts = payload.view(self._np_dtype).reshape(self.page_shape)
        first = _run_start(page_slots)
        for part, rows in zip(parts, self._slab_np, strict=True):
            if first is not None:
                np.copyto(part, rows[:, first : first + len(page_slots)])
            else:
                np.take(rows, page_slots.numpy(), axis=1, out=part)
        if self.verifier is not None:
            self.verifier.record([meta.page_key], [digest(payload)])
        return seal_raw_frame(frame, meta, mac_key=self.mac_key)

    def _remember_written(self, key: bytes) -> None:
        self._written[key] = None
        if len(self._written) > 1_000_000:
            self._written.popitem(last=False)

    def _failed(self, error: BaseException) -> None:
        self.stats.add("l3_errors")
        if not isinstance(error, StoreUnavailable):
            logger.error("hiradix: L3 job failed unexpectedly: %r", error)

    # ------------------------------------------------------------------ prefetch
    def prefetch(
        self,
        request_id: str,
        namespace: Hashable,
        tokens: array,
        local_len: int,
        decide: Callable[[int], int] | None = None,
    ) -> bool:
        """Look up the blocks of ``tokens`` past ``local_len`` (already in L1/L2) and fetch
        them. Two store round trips: an existence check, then ``decide(present_tokens)``
        (the prefetch policy, on the scheduler thread) says how many of the present tokens
        to fetch (default: all). Returns whether a lookup was submitted: that depends only
        on the arguments, never on this rank's store health or clock (the worker asks the
        circuit breaker and the absence cache), so every TP rank submits the same lookups."""
        self.forget(request_id)
        blocks = len(tokens) // self.block
        start = local_len // self.block
        if start >= blocks or self.suspended:
            return False
        keys = self.block_keys(namespace, tokens, blocks)
        state = Prefetch(namespace, tokens[: blocks * self.block], start, self.clock())
        self.prefetches[request_id] = state
        wanted = keys[start:]
        store_keys = [self._store_key(namespace, k) for k in wanted]

        def exists_job() -> IoResult:
            started = time.monotonic()
            until = self._absent.get(wanted[0])
            if (until is not None and until > started) or self.retired or not self.breaker.allow():
                return NOT_DONE
            try:
                present = self.store.exists_many(store_keys)
            except StoreUnavailable:
                self.breaker.record_failure()
                raise
            self.breaker.record_success()
            run = 0
            while run < len(present) and present[run]:
                run += 1
            ended = time.monotonic()
            if run < len(wanted):
                self._remember_absent(wanted[run], ended + self.presence_ttl)
            return IoResult(run, 0, ended - started)

        def exists_done(result: IoResult | None, error: BaseException | None) -> None:
            result = result or NOT_DONE
            if error is not None:
                self._failed(error)  # this rank's stats and log only
            if result.seconds:  # agreed values only: the cost model is the same on every rank
                self.cost.observe_fetch(0, result.seconds)
            run = max(0, result.count)
            listener = self.tree.listener
            if run and listener is not None:
                listener.l3_present(self, namespace, tokens, range(start, start + run))
            if 0 <= result.count < len(wanted):
                # every rank looked and the store no longer has this page; if this server
                # wrote it (since evicted or expired), the next write-through writes it again
                self._written.pop(wanted[result.count], None)
                if listener is not None:
                    listener.l3_absent(self, namespace, tokens, start + result.count)
            present_tokens = max(0, run * self.block - (local_len - start * self.block))
            # the policy hears every arrival, L3 hit or not
            take = (
                present_tokens
                if decide is None
                else max(0, min(present_tokens, decide(present_tokens)))
            )
            if (
                take > 0
                and not self.others_queued()
                and not self.cost.decide(take, self.bytes_per_token).fetch
            ):
                self.stats.add("recompute_instead_of_load")
                take = 0
            pages = -(-(take + local_len - start * self.block) // self.block) if take > 0 else 0
            if pages == 0:
                self._finish(request_id, state)
                return
            self._fetch(request_id, state, namespace, wanted[:pages], store_keys[:pages])

        self._submit(exists_job, exists_done)
        return True

    def _fetch(
        self,
        request_id: str,
        state: Prefetch,
        namespace: Hashable,
        keys: list[bytes],
        store_keys: list[str],
    ) -> None:
        """Reserve host slots for the pages, then read, verify and copy them straight
        into those slots on a worker thread (store buffer -> slab rows: one copy)."""
        slots = None if self.retired else self._reserve_slots(len(keys))
        if slots is None:
            self._finish(request_id, state)
            return
        keys, store_keys = keys[: len(slots) // self.block], store_keys[: len(slots) // self.block]
        state.slots = slots
        metas = [self._meta(namespace, k) for k in keys]
        refresh = self.ttl if self.sliding else None
        rows = [slots[i * self.block : (i + 1) * self.block] for i in range(len(keys))]

        def job() -> IoResult:
            if self.retired or not self.breaker.allow():
                return NOT_DONE
            started = time.perf_counter()
            buffers = getattr(self._scratch, "buffers", None)
            if buffers is None:
                buffers = self._scratch.buffers = []
            try:
                blobs = self.store.get_many_into(store_keys, buffers, refresh_ttl=refresh)
            except StoreUnavailable:
                self.breaker.record_failure()
                raise
            self.breaker.record_success()
            ready, nbytes, bad = 0, 0, []
            for store_key, meta, blob, page_rows in zip(store_keys, metas, blobs, rows):
                if blob is None:
                    break
                try:
                    raw = decode_page(blob, meta, mac_key=self.mac_key)
                except CorruptPage as exc:
                    logger.warning("hiradix: corrupt L3 page %s: %s", store_key, exc)
                    bad.append(store_key)
                    break
                if self.verifier is not None and self.verifier.check(
                    [meta.page_key], [digest(raw)], f"L3 read of {store_key}"
                ):
                    break  # not what was written for this key: a miss from here on
                self._write_rows(raw, page_rows)
                ready += 1
                nbytes += len(blob)
            if bad:
                try:
                    self.store.delete_many(bad)
                except StoreUnavailable:
                    pass
            return IoResult(ready, nbytes, time.perf_counter() - started, tuple(bad))

        def done(result: IoResult | None, error: BaseException | None) -> None:
            result = result or NOT_DONE
            if error is not None:
                self._failed(error)  # this rank's stats and log only
            if result.count > 0:  # agreed values only (see exists_done)
                self.cost.observe_fetch(result.nbytes, result.seconds)
            self.stats.add("l3_corrupt_pages", len(result.bad))
            self.stats.add("l3_get_bytes", result.nbytes)
            state.ready = max(0, result.count)  # agreed: pages every rank holds
            listener = self.tree.listener
            if listener is not None and result.count >= 0:  # read: a sliding TTL restarts
                first = state.start_block
                if result.count:
                    listener.l3_present(
                        self, namespace, state.tokens, range(first, first + result.count)
                    )
                if result.count < len(keys) and error is None:  # missing or corrupt
                    listener.l3_absent(self, namespace, state.tokens, first + result.count)
            self._finish(request_id, state)

        self._submit(job, done)

    def _reserve_slots(self, pages: int) -> torch.Tensor | None:
        """Host slots for up to ``pages`` pages (evicting host leaves if needed; fewer
        pages when host memory is smaller than the run); ``None`` when none fit."""
        need = pages * self.block
        slots = self.slab.alloc(need)
        if slots is None:
            freed = self.tree.evict_l2(need - self.slab.free_slots)
            self.stats.add("l2_evicted_tokens", freed)
            slots = self.slab.alloc(need)
        if slots is None:
            fit = min(pages, self.slab.free_slots // self.block)
            if fit == 0:
                self.stats.add("l2_full_skips")
                return None
            slots = self.slab.alloc(fit * self.block)
        return slots

    def _write_rows(self, raw: bytes | memoryview, rows: torch.Tensor) -> None:
        """Copy one verified page into its slab rows (worker thread; rows are reserved for
        this fetch, nobody else reads or writes them until it is materialized)."""
        page = np.frombuffer(raw, dtype=self._np_dtype).reshape(self.page_shape)
        first = _run_start(rows)
        index = rows.numpy() if first is None else None
        for part, slab_rows in zip(page, self._slab_np, strict=True):
            if first is not None:  # one ascending run: plain slices
                slab_rows[:, first : first + len(rows)] = part
            else:
                slab_rows[:, index] = part

    def _finish(self, request_id: str, state: Prefetch) -> None:
        state.done = True
        if state.abandoned:  # admitted without it: keep the pages for later requests
            if self.prefetches.get(request_id) is state:
                del self.prefetches[request_id]
            self.materialize(state)  # applied at the agreed step: the same on every rank

    def materialize(self, state: Prefetch, pages: int | None = None) -> int:
        """Record the first ``pages`` fetched pages (default: all that arrived) in the
        tree, free the rest of the reserved slots; returns the number of tokens that are
        new to the tree."""
        take = state.ready if pages is None else max(0, min(pages, state.ready))
        slots, state.slots, state.ready = state.slots, None, 0
        if slots is None:
            return 0
        if take == 0:
            self.slab.free(slots)
            return 0
        used = take * self.block
        if used < len(slots):
            self.slab.free(slots[used:])
        start = state.start_block * self.block
        added, unused = self.tree.insert_host(
            state.namespace, state.tokens[: start + used], start, slots[:used]
        )
        for piece in unused:
            self.slab.free(piece)
        self.stats.add("l3_to_l2_tokens", added)
        return added

    def release(self, state: Prefetch) -> None:
        """Give back the host slots of a fetch nobody will use."""
        if state.slots is not None:
            self.slab.free(state.slots)
        state.slots, state.ready = None, 0

    def forget(self, request_id: str) -> None:
        state = self.prefetches.pop(request_id, None)
        if state is None:
            return
        if state.done:
            self.release(state)
        else:
            state.abandoned = True

    def _remember_absent(self, key: bytes, until: float) -> None:
        """Worker threads: trust "not in the store" for ``key`` until ``until`` (bounded:
        expired entries are pruned when the cache grows)."""
        self._absent[key] = until
        if len(self._absent) > MAX_ABSENT:
            now = time.monotonic()
            for stale in [k for k, t in list(self._absent.items()) if t <= now]:
                self._absent.pop(stale, None)
            while len(self._absent) > MAX_ABSENT:  # all still fresh: drop the oldest
                self._absent.pop(next(iter(self._absent)), None)

    def reset(self) -> None:
        """The tree was reset (SGLang's flush): lookups in flight are dropped; what the
        store holds for this identity stays valid (``_written`` is kept)."""
        for request_id in list(self.prefetches):
            self.forget(request_id)
        self._absent.clear()
        self.suspended = False  # the tree holds no KV of other weights any more

    def new_epoch(self, model_id: str, *, suspend: bool) -> None:
        """New weights: pages are keyed under ``model_id`` from now on, so pages of the
        old weights are never read again (the store expires and evicts them); what was
        written, found absent or looked up under the old identity is forgotten.
        ``suspend``: the tree still holds the old weights' KV, so nothing is read or
        written until ``reset``."""
        for request_id in list(self.prefetches):
            self.forget(request_id)
        self.model_id = model_id
        self._ns_digests.clear()
        self._written.clear()
        self._absent.clear()
        self.suspended = self.suspended or suspend


def _run_start(rows: torch.Tensor) -> int | None:
    """The first slot if ``rows`` is one ascending run of consecutive slots, else None."""
    first = int(rows[0])
    if int(rows[-1]) - first + 1 != len(rows):
        return None
    return first if len(rows) < 3 or bool((rows.diff() == 1).all()) else None


def wait_ready(mode: str, state: Prefetch | None, budget: float, now: float) -> bool:
    """Whether a request may be scheduled given its prefetch and the wait mode."""
    if state is None or state.done or mode == "best_effort":
        return True
    if mode == "wait_complete":
        return False
    return now - state.submitted_at >= budget
