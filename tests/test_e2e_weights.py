"""End to end: a weight update moves hiradix to a new weights epoch (issue 15 item 2).

A hiradix server with a host tier and an NVMe store serves a multi-turn workload on model
A, ``/update_weights_from_disk`` switches it to model B (the same config, other random
weights), and the same workload must answer exactly as a fresh model-B server with
SGLang's own cache; then a hiradix server restarted on B over the same store (which holds
A's pages and the pages the updated server wrote for B) must answer the same again, and
read B's pages from L3.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from hiradix.integration.testbed.sglang_server import SGLangServer

pytestmark = pytest.mark.e2e

L1_TOKENS = 1024
NEW_TOKENS = 8
STRICT = {"SGLANG_CHECK_KV_PAGE_INVARIANTS": "1", "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}
USERS, TURNS = 6, 3


def workload(server: SGLangServer) -> list[list[int]]:
    """USERS conversations of TURNS turns over a shared system prompt, turn by turn (each
    prompt: the conversation so far, the server's answers included, plus a new message).
    Returns every answer in order."""
    rng = random.Random(15)
    system = [rng.randrange(4, 1000) for _ in range(48)]
    history = [system + [rng.randrange(4, 1000) for _ in range(40)] for _ in range(USERS)]
    answers = []
    for _ in range(TURNS):
        for user in range(USERS):
            out = server.generate(history[user], NEW_TOKENS).output_ids
            answers.append(out)
            history[user] = history[user] + out + [rng.randrange(4, 1000) for _ in range(60)]
    return answers


def _hiradix(model: Path, tmp: Path, name: str, config: str) -> SGLangServer:
    return SGLangServer(
        model,
        extra_args=["--enable-hiradix", "--hiradix-config", config],
        env=STRICT,
        log_path=tmp / f"{name}.log",
        max_total_tokens=L1_TOKENS,
        name=name,
    )


def _assert_clean_log(server: SGLangServer) -> None:
    log = server.log_text()
    for bad in ("memory leak detected", "double free", "use-after-free", "Traceback"):
        assert bad not in log, f"{server.name}: {bad!r} in {server.log_path}"


def _settle(server: SGLangServer, timeout: float = 60.0) -> dict[str, float]:
    """Metrics once write-through has drained (nothing in flight)."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.hiradix_metrics()
        if m.get("in_flight", 0) == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.25)


def test_update_weights_from_disk_starts_a_new_epoch(tiny_model, tmp_path):
    from hiradix.integration.testbed.model_builder import build_tiny_model

    model_b = build_tiny_model(tmp_path / "model-b", preset="tiny", seed=1)
    with SGLangServer(
        model_b, env=STRICT, log_path=tmp_path / "baseline-b.log",
        max_total_tokens=L1_TOKENS, name="baseline-b",
    ) as baseline:  # fmt: skip
        baseline.wait_ready()
        expected = workload(baseline)
        _assert_clean_log(baseline)

    cfg = tmp_path / "hiradix.yaml"
    cfg.write_text(
        "host: {size: 1MiB}\n"
        f"store: {{kind: nvme, block_tokens: 16, nvme: {{path: '{tmp_path / 'pages'}'}}}}\n"
        "prefetch: {wait: wait_complete}\n"
    )
    with _hiradix(tiny_model, tmp_path, "hiradix-a", str(cfg)) as server:
        server.wait_ready()
        on_a = workload(server)
        assert sum(a != b for a, b in zip(on_a, expected)) >= len(expected) // 2, (
            "models A and B answer alike: the test would prove nothing"
        )
        m = _settle(server)
        assert m["l2_to_l3_tokens"] > 0, m  # A's pages are in the store
        status, body = server._request(
            "POST", "/update_weights_from_disk", {"model_path": str(model_b)}, timeout=300
        )
        assert status == 200 and b'"success":true' in body.replace(b" ", b""), body
        assert "weights epoch 1 after update_weights_from_disk" in server.log_text()
        on_b = workload(server)
        assert on_b == expected, [i for i, (a, b) in enumerate(zip(on_b, expected)) if a != b]
        written_for_b = _settle(server)["l2_to_l3_tokens"] - m["l2_to_l3_tokens"]
        _assert_clean_log(server)

    with _hiradix(model_b, tmp_path, "hiradix-b", str(cfg)) as restarted:
        restarted.wait_ready()
        again = workload(restarted)
        assert again == expected, [i for i, (a, b) in enumerate(zip(again, expected)) if a != b]
        m = _settle(restarted)
        # the updated server's pages for B are this server's identity too: read back
        assert written_for_b > 0 and m["l3_hit_tokens"] > 0, m
        _assert_clean_log(restarted)
