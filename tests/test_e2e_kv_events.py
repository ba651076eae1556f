"""End-to-end KV events (issue 17): real SGLang servers on CPU started with
``--kv-events-config`` (ZMQ PUB on a loopback port), and a plain ZMQ subscriber that decodes
the batches with SGLang's ``KVEventBatch``, as a cache-aware router does.

Three servers, started together: SGLang's own cache with a large L1 (the reference
hashes), hiradix with a small L1 over a host tier and an NVMe store, and a second hiradix
server sharing that NVMe directory (an L3 hit it did not write)."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import msgspec
import pytest
import zmq
from hiradix.integration.testbed.sglang_server import SGLangServer, free_port, wait_for
from sglang.srt.disaggregation.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
)

pytestmark = pytest.mark.e2e

NEW_TOKENS = 4
_RNG = random.Random(17)
SYSTEM = [_RNG.randrange(4, 1000) for _ in range(40)]
PROMPTS = [SYSTEM + [_RNG.randrange(4, 1000) for _ in range(160)] for _ in range(6)]
GPU, CPU, DISK = "GPU", "CPU_PINNED", "DISK"


class Subscriber:
    """A SUB socket on a server's event endpoint, decoding on a thread; it replays the
    stream like a router (the blocks each medium holds) and fails on an inconsistent one:
    a block stored twice in a medium without a removal, or removed while not held."""

    def __init__(self) -> None:
        self.port = free_port()
        self.config = (
            f'{{"publisher": "zmq", "endpoint": "tcp://127.0.0.1:{self.port}", "bind": true}}'
        )
        self.held: dict[str, set[int]] = {}
        self.stored: dict[str, set[int]] = {}
        self.removed: dict[str, set[int]] = {}
        self.errors: list[str] = []
        self.batches = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socket = zmq.Context.instance().socket(zmq.SUB)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.connect(f"tcp://127.0.0.1:{self.port}")  # before the server binds
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        decoder = msgspec.msgpack.Decoder(KVEventBatch)
        while not self._stop.is_set():
            if not self._socket.poll(100):
                continue
            _topic, _seq, payload = self._socket.recv_multipart()
            batch = decoder.decode(payload)
            with self._lock:
                self.batches += 1
                for event in batch.events:
                    self._apply(event)

    def _apply(self, event: object) -> None:
        if isinstance(event, AllBlocksCleared):
            self.held.clear()
            return
        assert isinstance(event, (BlockStored, BlockRemoved))
        medium = str(event.medium)
        held = self.held.setdefault(medium, set())
        for block in event.block_hashes:
            if isinstance(event, BlockStored):
                if block in held:
                    self.errors.append(f"{block} stored twice in {medium}")
                held.add(block)
                self.stored.setdefault(medium, set()).add(block)
            else:
                if block not in held:
                    self.errors.append(f"{block} removed from {medium} but not held")
                held.discard(block)
                self.removed.setdefault(medium, set()).add(block)

    def ever(self, medium: str) -> set[int]:
        with self._lock:
            return set(self.stored.get(medium, ()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close(linger=0)


@pytest.fixture(scope="module")
def servers(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """(name -> (server, subscriber)) for the three servers, started in parallel."""
    tmp = tmp_path_factory.mktemp("kv_events")
    config = tmp / "tiers.yaml"
    config.write_text(
        "host: {size: 1MiB}\n"
        f"store: {{kind: nvme, block_tokens: 16, nvme: {{path: '{tmp / 'pages'}'}}}}\n"
        "prefetch: {wait: wait_complete}\n"
    )
    hiradix = ["--enable-hiradix", "--hiradix-config", str(config)]
    layout = {  # name: (L1 tokens, extra args)
        "sglang": (4096, []),
        "tiered": (512, hiradix),
        "second": (512, hiradix),
    }
    running: dict[str, tuple[SGLangServer, Subscriber]] = {}
    try:
        for name, (l1, extra) in layout.items():
            subscriber = Subscriber()
            server = SGLangServer(
                tiny_model,
                extra_args=[*extra, "--kv-events-config", subscriber.config],
                log_path=tmp / f"{name}.log",
                max_total_tokens=l1,
                name=f"events-{name}",
            )
            running[name] = (server, subscriber)
            server.start()
        for server, _ in running.values():
            server.wait_ready()
        yield running
    finally:
        for server, subscriber in running.values():
            server.stop()
            subscriber.close()


def test_events_of_every_tier(servers):
    """SGLang's cache and hiradix serve the same requests: hiradix publishes the same GPU
    block hashes; its small L1 reports blocks leaving the GPU and arriving in host memory
    and on disk; a second server over the same NVMe directory reports the disk blocks it
    found (the hashes the first one published) and nothing inconsistent anywhere."""
    sglang, reference = servers["sglang"]
    tiered, events = servers["tiered"]
    second, found = servers["second"]
    outputs = {}
    for prompt in PROMPTS:
        outputs[tuple(prompt)] = sglang.generate(prompt, NEW_TOKENS).output_ids
        result = tiered.generate(prompt, NEW_TOKENS)
        assert result.output_ids == outputs[tuple(prompt)]
    # every page of every request once (page size 1): the prompt and the outputs but the
    # last (its KV is never computed)
    full = [list(p) + outputs[tuple(p)][: NEW_TOKENS - 1] for p in PROMPTS]
    pages = len({tuple(f[: i + 1]) for f in full for i in range(len(f))})
    wait_for(lambda: len(reference.ever(GPU)) >= pages, "SGLang's cache published its blocks")
    # (and each server's warm-up request)
    wait_for(lambda: events.ever(GPU) == reference.ever(GPU), "the same GPU blocks")

    gpu = events.ever(GPU)
    wait_for(lambda: events.ever(DISK), "blocks written to disk")
    assert events.removed.get(GPU), "a 512-token L1 evicted nothing"
    assert events.ever(CPU) <= gpu and events.ever(DISK) <= gpu

    # the second server finds the first prompt's store pages on disk
    result = second.generate(PROMPTS[0], NEW_TOKENS)
    assert result.output_ids == outputs[tuple(PROMPTS[0])]
    assert second.hiradix_metrics()["l3_hit_tokens"] > 0
    wait_for(lambda: found.ever(DISK), "the second server reported its L3 hit")
    assert found.ever(DISK) <= events.ever(DISK)
    assert found.ever(DISK) <= found.ever(CPU) <= reference.ever(GPU)
    for name, (_, subscriber) in servers.items():
        assert subscriber.errors == [], f"{name}: {subscriber.errors[:5]}"
    assert reference.ever(CPU) == set() and reference.ever(DISK) == set()
