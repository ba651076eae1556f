"""The simulator on small synthetic traces: ordering of the baselines, report keys,
determinism, and the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hiradix.integration.sim_cli import main as sim_main

from hiradix.config import parse_config
from hiradix.sim import SimOptions, simulate
from hiradix.sim.cost import Link, LinkSpec, percentile
from hiradix.sim.profiles import PROFILES, get_profile
from hiradix.sim.replay import load_trace

KEYS = (
    "hit_ratio",
    "ceiling_hit_ratio",
    "l1_only_hit_ratio",
    "ttft_p50_s",
    "ceiling_ttft_p50_s",
    "l1_only_ttft_p50_s",
    "ready_at_schedule",
    "l1_hit_ratio",
    "l2_hit_ratio",
    "l3_hit_ratio",
    "ttft_p90_s",
    "ttft_p99_s",
    "policy",
    "profile",
    "bytes_d2h",
    "bytes_h2d",
    "bytes_l3_read",
    "bytes_l3_write",
)


def synthetic_trace(path: Path, seed: int = 7, sessions: int = 12, docs: int = 10) -> Path:
    """Multi-turn sessions over two shared system prompts, plus one-shot long documents."""
    rng = random.Random(seed)
    next_block = 1000
    rows = []
    for s in range(sessions):
        blocks = [s % 2 * 10, s % 2 * 10 + 1]  # a 1024-token shared system prompt
        t = rng.uniform(0, 20)
        for _turn in range(4):
            for _ in range(rng.randint(2, 6)):
                blocks.append(next_block)
                next_block += 1
            length = 512 * (len(blocks) - 1) + rng.randint(1, 512)
            rows.append(
                {
                    "timestamp": int(t * 1000),
                    "input_length": length,
                    "output_length": rng.randint(10, 80),
                    "hash_ids": list(blocks),
                }
            )
            t += rng.uniform(15, 60)
    for _ in range(docs):
        blocks = list(range(next_block, next_block + 24))
        next_block += 24
        rows.append(
            {
                "timestamp": int(rng.uniform(0, 150) * 1000),
                "input_length": 24 * 512,
                "output_length": 20,
                "hash_ids": blocks,
            }
        )
    rows.sort(key=lambda row: row["timestamp"])
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_trace(tmp_path_factory.mktemp("trace") / "trace.jsonl")


def config(policy: str = "pattern", wait: str = "best_effort"):
    return parse_config({"store": {"kind": "redis"}, "prefetch": {"policy": policy, "wait": wait}})


@pytest.mark.parametrize("policy", ["none", "arrival", "session", "hot", "pattern"])
def test_baselines_bracket_every_policy(trace: Path, policy: str) -> None:
    requests = load_trace(trace)
    options = SimOptions(profile="llama3-8b-h100", l1_tokens=8192, l2_tokens=40960)
    report, results = simulate(config(policy), requests, options)
    assert report["ceiling_hit_ratio"] >= report["hit_ratio"] >= report["l1_only_hit_ratio"]
    assert report["ceiling_hit_ratio"] > report["l1_only_hit_ratio"]
    assert report["policy"] == policy and "policy_disabled" not in report
    for name, result in results.items():
        assert all(r.ttft > 0 for r in result.records), name


def test_report_keys_and_determinism(trace: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("store: {kind: redis}\nprefetch: {policy: session, wait: timeout}\n")
    outs = []
    for run in range(2):
        out = tmp_path / f"r{run}.json"
        argv = [
            "--trace",
            str(trace),
            "--config",
            str(cfg),
            "--json",
            str(out),
            "--profile",
            "llama3-8b-h100",
            "--l1-tokens",
            "8192",
            "--l2-tokens",
            "40960",
            "--no-progress",
        ]
        if run:
            argv += ["--plot", str(tmp_path / "p.png")]
        assert sim_main(argv) == 0
        outs.append(json.loads(out.read_text()))
    for key in KEYS:
        assert key in outs[0], key
    assert outs[0] == outs[1]
    assert outs[0]["bytes_l3_write"] > 0 and outs[0]["bytes_d2h"] > 0
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_cli_limit_and_errors(
    trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("prefetch: {policy: no_such_policy}\n")
    out = tmp_path / "o.json"
    base = ["--trace", str(trace), "--json", str(out), "--no-progress"]
    assert sim_main([*base, "--config", str(cfg)]) == 1
    assert "allowed:" in capsys.readouterr().err
    cfg.write_text("store: {kind: none}\n")
    assert sim_main([*base, "--config", str(cfg), "--limit", "5", "--policy", "hot"]) == 0
    report = json.loads(out.read_text())
    assert report["requests"] == 5 and report["policy"] == "hot"
    assert report["l3_hit_ratio"] == 0 and report["bytes_l3_read"] == 0
    assert sim_main([*base, "--config", str(cfg), "--limit", "0"]) == 2


def test_session_is_staged_back_before_its_next_turn(tmp_path: Path) -> None:
    """One conversation whose turns are 60 s apart, with an L2 too small to keep it while
    one-shot traffic flows: `session` brings it back from L3 before each turn."""
    rows, block = [], 5000
    turn = [1, 2, 3, 4]
    for k in range(4):
        t = k * 60.0
        rows.append(
            {
                "timestamp": int(t * 1000),
                "input_length": 512 * len(turn),
                "output_length": 10,
                "hash_ids": list(turn),
            }
        )
        for j in range(12):  # filler: one-shot prompts that churn L1 and L2
            rows.append(
                {
                    "timestamp": int((t + 5 + j * 4) * 1000),
                    "input_length": 4096,
                    "output_length": 5,
                    "hash_ids": list(range(block, block + 8)),
                }
            )
            block += 8
        turn = turn + [100 + k * 2, 101 + k * 2]
    rows.sort(key=lambda row: row["timestamp"])
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    options = SimOptions(profile="llama3-8b-h100", l1_tokens=8192, l2_tokens=12288)
    figures = {}
    for policy in ("arrival", "session"):
        report, _ = simulate(config(policy), load_trace(path), options)
        figures[policy] = report
    assert figures["session"]["ready_at_schedule"] > figures["arrival"]["ready_at_schedule"]
    assert figures["session"]["hit_ratio"] >= figures["arrival"]["hit_ratio"]


def test_cost_model_and_profiles() -> None:
    link = Link("x", LinkSpec(1e9, 0.001))
    assert link.submit(0.0, 10**9) == pytest.approx(1.001)
    assert link.submit(0.5, 10**9) == pytest.approx(2.001)  # queued behind the first
    assert link.backlog(0.5) == pytest.approx(1.5)
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    for profile in PROFILES.values():
        model = profile.model
        assert model.prefill_time(1000, 50000) > model.prefill_time(1000, 0) > 0
    assert get_profile("llama3-70b-tp8-h100").model.kv_bytes_per_token == 327_680
    assert get_profile("llama3-8b-h100").model.kv_bytes_per_token == 131_072
    with pytest.raises(ValueError, match="allowed"):
        get_profile("tpu")


def test_link_pool_and_layerwise_overlap() -> None:
    from hiradix.sim.cost import LinkPool, overlapped

    pool = LinkPool("x", LinkSpec(1e9, 0.0), instances=2)
    assert pool.submit(0.0, 10**9) == pytest.approx(1.0)
    assert pool.submit(0.0, 10**9) == pytest.approx(1.0)  # second instance's own path
    assert pool.submit(0.0, 10**9) == pytest.approx(2.0)  # never faster than one path
    assert pool.bytes_moved == 3 * 10**9
    # a load overlapped layer by layer costs the slower stage plus one layer of the other
    assert overlapped(1.0, 0.0, 80) == 1.0
    assert overlapped(1.0, 0.5, 80) == pytest.approx(1.0 + 0.5 / 80)
    assert overlapped(0.5, 1.0, 80) == pytest.approx(1.0 + 0.5 / 80)


def test_waiting_for_l3_holds_no_lane(tmp_path: Path) -> None:
    """A request whose L3 read is landing is passed over; the one behind it starts at
    once (SGLang skips requests whose prefetch is in progress)."""
    from hiradix.config import WaitMode
    from hiradix.policies.base import GuardedPolicy
    from hiradix.policies.builtin import NonePolicy
    from hiradix.sim.engine import SimSettings, Simulator
    from hiradix.sim.replay import TraceRequest

    doc = tuple(range(100, 140))  # 20480 tokens
    requests = [
        TraceRequest(0, 0.0, 512 * len(doc), 1, doc),  # writes the document through to L3
        TraceRequest(1, 100.0, 512 * 60, 1, tuple(range(1000, 1060))),  # evicts it
        TraceRequest(2, 200.0, 512 * len(doc), 1, doc),  # reads it back from L3
        TraceRequest(3, 200.001, 512, 1, (5000,)),  # a short one right behind it
    ]
    settings = SimSettings(
        l1_tokens=40960,
        l2_tokens=40960,
        l3_kind="nvme",  # eight drives: faster than recomputing, so worth waiting for
        wait=WaitMode.WAIT_COMPLETE,
        lanes=1,
        read_batch_tokens=8192,
    )
    profile = get_profile("llama3-70b-tp8-h100")
    sim = Simulator(requests, profile, settings, GuardedPolicy(NonePolicy()))
    records = sim.run().records
    reader, short = records[2], records[3]
    assert reader.l3_hit > 0 and reader.wait_s > 0
    # the short request did not queue behind the reader's wait
    assert short.ttft < reader.wait_s
    assert short.ttft == pytest.approx(profile.model.prefill_time(512, 0), rel=0.05)


def test_utilization_is_per_lane(trace: Path) -> None:
    requests = load_trace(trace)
    one = SimOptions(profile="llama3-8b-h100", l1_tokens=8192, l2_tokens=40960, lanes=1)
    two = SimOptions(profile="llama3-8b-h100", l1_tokens=8192, l2_tokens=40960, lanes=2)
    util_one = simulate(config("none"), requests, one)[0]["utilization"]
    util_two = simulate(config("none"), requests, two)[0]["utilization"]
    assert 0 < util_two < util_one <= 1.0
