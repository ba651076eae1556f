"""End-to-end MLA (issue 15 item 4): a real SGLang server on CPU serving a tiny random
DeepSeek-V3 model (``MLATokenToKVPool``: one 80-wide latent per token and layer), with
hiradix's host tier and an NVMe store. The testbed's ``HIRADIX_CPU_MLA=absorbed``
(integration/testbed/cpu_mla.py) lets ``torch_native`` attention run the model.

The first pass over prompts without common prefixes computes every token (no cache hit
anywhere): its greedy outputs are the reference. A second pass on the same server (its
KV back from L1, L2 or L3) and a restarted server over the same directory (its KV from
L3) must reproduce them exactly, with verify mode on (tests/conftest.py)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from hiradix.integration.testbed.cpu_mla import build_tiny_mla_model
from hiradix.integration.testbed.sglang_server import SGLangServer

pytestmark = pytest.mark.e2e

L1_TOKENS = 1024  # 640 B/token: 640 KiB of device KV
NEW_TOKENS = 8
ENV = {
    "HIRADIX_CPU_MLA": "absorbed",
    "SGLANG_CHECK_KV_PAGE_INVARIANTS": "1",
    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1",
}
rng = random.Random(15)
PROMPTS = [[rng.randrange(4, 500) for _ in range(300)] for _ in range(6)]  # 1800 > L1


def _server(model: Path, tmp: Path, name: str, config: str) -> SGLangServer:
    return SGLangServer(
        model,
        extra_args=["--enable-hiradix", "--hiradix-config", config],
        env=ENV,
        log_path=tmp / f"{name}.log",
        max_total_tokens=L1_TOKENS,
        name=name,
    )


def _clean(server: SGLangServer) -> None:
    log = server.log_text()
    for bad in ("memory leak detected", "double free", "Traceback", "verify:"):
        assert bad not in log, f"{server.name}: {bad!r} in {server.log_path}"


def test_mla_server_serves_every_tier_exactly_and_restarts_from_nvme(tmp_path):
    model = build_tiny_mla_model(tmp_path / "mla")
    text = (
        "host: {size: 512KiB}\n"  # 819 tokens: part of the second pass comes from L3
        f"store: {{kind: nvme, block_tokens: 16, nvme: {{path: '{tmp_path / 'pages'}'}}}}\n"
        "prefetch: {wait: wait_complete}\n"
    )
    config = tmp_path / "mla.yaml"
    config.write_text(text)
    with _server(model, tmp_path, "mla-1", str(config)) as first:
        first.wait_ready()
        reference = [first.generate(p, NEW_TOKENS) for p in PROMPTS]
        assert all(r.cached_tokens == 0 for r in reference)  # computed, not cached
        deadline = time.monotonic() + 120
        while first.hiradix_metrics()["l2_to_l3_tokens"] < 6 * 288:
            assert time.monotonic() < deadline, "pages never reached the store"
            time.sleep(0.5)
        again = [first.generate(p, NEW_TOKENS) for p in PROMPTS]
        assert [r.output_ids for r in again] == [r.output_ids for r in reference]
        assert all(r.cached_tokens > 0 for r in again)
        metrics = first.hiradix_metrics()
        assert metrics["l2_to_l1_tokens"] > 0 and metrics["l3_hit_tokens"] > 0, metrics
        _clean(first)
    with _server(model, tmp_path, "mla-2", str(config)) as second:
        second.wait_ready()
        for prompt, ref in zip(PROMPTS, reference, strict=True):
            result = second.generate(prompt, NEW_TOKENS)
            assert result.output_ids == ref.output_ids
            assert result.cached_tokens >= 288
        assert second.hiradix_metrics()["l3_hit_tokens"] >= 6 * 288
        _clean(second)
