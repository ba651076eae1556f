"""Cost awareness: fetch from a tier only while it beats recomputing."""

from __future__ import annotations

import logging

from hiradix.cost_model import CostModel


def test_fetches_until_both_speeds_are_known():
    cost = CostModel()
    assert cost.decide(1000, 4096).fetch
    cost.observe_prefill(4000, 1.0)
    assert cost.decide(1000, 4096).fetch  # no fetch measured yet


def test_fast_store_is_used_slow_store_is_skipped_with_probes(caplog):
    cost = CostModel(probe_every=4)
    cost.observe_prefill(4000, 1.0)  # 4k tokens/s
    cost.observe_fetch(0, 0.0005)  # 0.5 ms round trip
    cost.observe_fetch(100 * 2**20, 0.1)  # ~1 GB/s
    assert cost.decide(1000, 4096).fetch  # 4 MB: ~5 ms vs 250 ms
    slow = CostModel(alpha=1.0, probe_every=4)
    slow.observe_prefill(4000, 1.0)
    slow.observe_fetch(0, 0.2)  # a store answering in 200 ms
    slow.observe_fetch(4 * 2**20, 2.0)  # 2 MB/s
    with caplog.at_level(logging.WARNING):
        decisions = [slow.decide(1000, 4096).fetch for _ in range(8)]
    assert decisions == [False, False, False, True, False, False, False, True]
    assert sum("skipped: recomputing is faster" in r.message for r in caplog.records) == 1
    # the store recovers: the next probe measures it fast and loads resume
    slow.observe_fetch(0, 0.0005)
    slow.observe_fetch(100 * 2**20, 0.1)
    assert slow.decide(1000, 4096).fetch
