"""Every built-in prefetch policy on a trace, next to the ceiling and L1-only, as a table.

    python benchmarks/sim_table.py --profile llama3-70b-tp8-h100 \
        --json benchmarks/results/sim_llama3-70b-tp8-h100.json [--md TABLES.md]

The issue-5 setting: L1 = 5% and L2 = 25% of the trace's distinct tokens, L3 (NVMe)
unbounded, the embedded default config otherwise (wait ``timeout``). For each number of
prefill instances (``--lanes``, default 1 and 3) it runs the ceiling (unbounded L1,
free hits), SGLang-like L1-only LRU and every built-in policy once, on the same
settings. A few minutes per profile on one core. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from hiradix.config import PrefetchConfig, load_default_config
from hiradix.policies.registry import create_policy
from hiradix.sim import SimOptions, baselines, load_trace, run_one, settings_for
from hiradix.sim.replay import distinct_tokens
from hiradix.sim.report import summarize

POLICIES = ("none", "arrival", "session", "hot", "pattern")
TRACE = "../shared/traces/mooncake_synthetic_trace.jsonl"


def table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    head = ("| run | hit | L1 | L2 | L3 | ready@sched | TTFT p50 s | p90 s | p99 s | util | "
            "GB h2d | GB L3 read | L1 evicted Mtok |")  # fmt: skip
    out = [head, "|" + "---|" * 13]
    for name, s in rows:
        out.append(
            f"| {name} | {s['hit_ratio']:.3f} | {s['l1_hit_ratio']:.3f} | {s['l2_hit_ratio']:.3f}"
            f" | {s['l3_hit_ratio']:.3f} | {s['ready_at_schedule']:.3f} | {s['ttft_p50_s']:.3f}"
            f" | {s['ttft_p90_s']:.3f} | {s['ttft_p99_s']:.3f} | {s['utilization']:.2f}"
            f" | {s['bytes_h2d'] / 1e9:.0f} | {s['bytes_l3_read'] / 1e9:.0f}"
            f" | {s['counters']['l1_evicted_tokens'] / 1e6:.1f} |"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="llama3-70b-tp8-h100")
    parser.add_argument("--trace", default=TRACE)
    parser.add_argument("--lanes", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    parser.add_argument("--json", required=True)
    parser.add_argument("--md", default=None, help="also write the printed tables here")
    args = parser.parse_args(argv)

    config = load_default_config()
    requests = load_trace(args.trace)
    distinct = distinct_tokens(list(requests))
    l1, l2 = int(distinct * 0.05), int(distinct * 0.25)
    data: dict[str, Any] = {"trace": args.trace, "profile": args.profile, "by_lanes": {}}
    md = [
        f"# hiradix sim: {args.profile} on the Mooncake synthetic trace\n",
        (
            f"Embedded default config (store nvme, wait {config.prefetch.wait.value}, LRU, "
            f"{config.write_policy.value}); page 64; L1 = 5% and L2 = 25% of the trace's "
            f"{distinct / 1e6:.1f}M distinct tokens; L3 unbounded. 'lanes' = prefill "
            "instances sharing one tree. ready@sched: share of the L2/L3 hit tokens found at "
            "arrival whose KV had landed in L1/L2 when the request was first considered. "
            "Hit columns are by tier at the time a request starts (a prefix staged to the "
            "device while the request waited counts as L1). Produced by "
            "`benchmarks/sim_table.py`.\n"
        ),
    ]
    for lanes in args.lanes:
        options = SimOptions(args.profile, l1_tokens=l1, l2_tokens=l2, lanes=lanes)
        settings = settings_for(config, requests, options)
        ceiling, l1_only = baselines(settings)
        none = create_policy(PrefetchConfig("none", {}, config.prefetch.wait, 0.0, 0.0))
        rows: list[tuple[str, dict[str, Any]]] = []
        for name, run_settings in (("ceiling", ceiling), ("l1_only", l1_only)):
            rows.append((name, summarize(run_one(requests, args.profile, run_settings, none))))
        for policy in args.policies:
            started = time.perf_counter()
            spec = replace(config.prefetch, policy=policy, options={})
            result = run_one(requests, args.profile, settings, create_policy(spec))
            rows.append((policy, summarize(result)))
            print(f"lanes {lanes} {policy}: {time.perf_counter() - started:.0f} s", flush=True)
        data["by_lanes"][str(lanes)] = {"l1_tokens": l1, "l2_tokens": l2, "runs": dict(rows)}
        md.append(
            f"**{args.profile}, {lanes} prefill instance(s)**, L1 {l1:,} tok, L2 {l2:,} tok\n"
        )
        md.append(table(rows) + "\n")
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
