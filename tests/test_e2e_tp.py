"""TP=2 on real SGLang servers at ``--tp-size 2`` (issue 14 item 5): (c, d) hiradix on a
Redis L3 with 8 clients, aborted requests, a store that is slow on rank 1 only, and the
Redis server killed mid-run and restarted; (a, b) 24 conversations x 4 turns through a
small L1, 8 clients, aborted requests, short sliding and absolute TTLs on every tier and
pauses between the turns that straddle them. Every answer must equal a TP=2 server with
SGLang's default cache (one, shared by both tests); no request may hang; the consensus
checker and verify mode are on (a disagreement or a wrong page stops the scheduler and
fails the test)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hiradix.integration.testbed.fuzz import (
    BAD_LOG_LINES,
    baseline_for,
    baselines,
    build_workload,
    draw_case,
    send_wave,
)
from hiradix.integration.testbed.redis_servers import RedisServer
from hiradix.integration.testbed.sglang_server import SGLangServer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tp2_baselines(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """TP=2 servers with SGLang's default cache, kept for every test of this module."""
    with baselines(tiny_model, tmp_path_factory.mktemp("tp2")) as servers:
        yield servers


def replay_tp2(model: Path, tmp_path: Path, case, requests, config: Path, env: dict,
               before_wave) -> tuple[int, dict[str, float]]:  # fmt: skip
    """``requests`` wave by wave on a fresh TP=2 hiradix server (``before_wave(wave)`` runs
    before each); every answer must equal the baseline's and no log line may be bad.
    Returns the number of answers compared and the server's hiradix metrics."""
    env = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1", "HIRADIX_VERIFY": "fatal",
           "HIRADIX_CONSENSUS_CHECK": "1", **env}  # fmt: skip
    server = SGLangServer(
        model, extra_args=["--tp-size", "2", "--enable-hiradix", "--hiradix-config",
                           str(config)],
        env=env, log_path=tmp_path / "hiradix.log", max_total_tokens=case.l1_tokens,
        name="hiradix-tp2",
    )  # fmt: skip
    answered = mismatched = 0
    try:
        server.start()
        server.wait_ready(timeout=300)
        for wave in range(case.turns):
            before_wave(wave)
            batch = [r for r in requests if r.wave == wave]
            for req, res in zip(batch, send_wave(server, batch, case, abort=True), strict=True):
                if res is None:
                    continue
                assert not isinstance(res, Exception), f"request {req.index} failed: {res!r}"
                answered += 1
                mismatched += res.output_ids != req.expected
        metrics = server.hiradix_metrics()
        log = server.log_text()
    finally:
        server.stop()
    assert answered >= len(requests) // 2
    assert mismatched == 0, f"{mismatched} of {answered} answers differ from SGLang's"
    assert metrics["verify_mismatches"] == 0, metrics
    for bad in BAD_LOG_LINES:
        assert bad not in log, f"{bad!r} in {server.log_path}"
    return answered, metrics


def test_tp2_slow_rank_and_redis_outage_answer_like_sglang(
    tiny_model: Path, tmp_path: Path, tp2_baselines: dict
):
    case = draw_case(
        141, tp=2, store="redis", policy="pattern", wait="timeout", conversations=8, turns=4,
        concurrency=8, abort_prob=0.1, system_tokens=256, user_tokens=(48, 160),
        host_size=0.5, l1_tokens=1536, page_size=1, block_tokens=64, ttl_device=None, ttl_host=None,
        ttl_store="24h", write_policy="write_through", branch_prob=0.2, new_tokens=8,
    )  # fmt: skip
    requests = build_workload(case, baseline_for(tp2_baselines, tiny_model, case, tmp_path))
    redis = RedisServer().start()
    config = tmp_path / "hiradix.yaml"
    config.write_text(case.config_yaml(tmp_path / "pages", redis.url))

    def outage(wave: int) -> None:
        if wave == 2:
            redis.kill()  # outage in the middle of the run: L3 becomes misses
        if wave == 3:
            redis.restart()  # back, empty, on the same port

    slow_rank = {"HIRADIX_TESTBED_STORE_LATENCY_S": "0.03",
                 "HIRADIX_TESTBED_STORE_LATENCY_RANKS": "1"}  # fmt: skip
    try:
        _, metrics = replay_tp2(tiny_model, tmp_path, case, requests, config, slow_rank, outage)
    finally:
        redis.stop()
    assert metrics["l2_to_l3_tokens"] > 0, metrics  # the store was in use before the outage


#: pauses before turns 2, 3 and 4: past the host TTL only, past the store's too, past all
PAUSES = (2.5, 4.0, 6.0)


def test_tp2_many_conversations_short_ttls_and_aborts_answer_like_sglang(
    tiny_model: Path, tmp_path: Path, tp2_baselines: dict
):
    """Items (a) and (b): most hits come from L2 and L3 (L1 holds a tenth of the working
    set); device TTL 5 s absolute, host 2 s sliding, store 3 s absolute."""
    case = draw_case(
        142, tp=2, store="nvme", policy="session", wait="wait_complete", conversations=24,
        turns=4, concurrency=8, abort_prob=0.15, system_tokens=256, user_tokens=(32, 96),
        host_size=1.0, l1_tokens=1536, page_size=1, block_tokens=32,
        ttl_device="{after: 5s, mode: absolute}", ttl_host="{after: 2s, mode: sliding}",
        ttl_store="{after: 3s, mode: absolute}", write_policy="write_through", branch_prob=0.2,
        new_tokens=8,
    )  # fmt: skip
    requests = build_workload(case, baseline_for(tp2_baselines, tiny_model, case, tmp_path))
    config = tmp_path / "hiradix.yaml"
    config.write_text(case.config_yaml(tmp_path / "pages", None))

    def pause(wave: int) -> None:
        if wave:
            time.sleep(PAUSES[wave - 1])

    _, metrics = replay_tp2(tiny_model, tmp_path, case, requests, config, {}, pause)
    assert len(requests) == 96 and metrics["verify_checked_pages"] > 0, metrics
    # the tiers served hits, and the TTLs fired (on the agreed clock, both ranks alike)
    assert metrics["l2_hit_tokens"] + metrics["l3_hit_tokens"] > 0, metrics
    assert metrics["l1_expired_tokens"] > 0 and metrics["l2_expired_tokens"] > 0, metrics
