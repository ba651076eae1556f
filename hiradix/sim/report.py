"""Figures of a simulated run, the JSON report, a markdown table and the PNG plot."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from hiradix.sim.cost import percentile
from hiradix.sim.engine import SimResult

logger = logging.getLogger(__name__)


def summarize(result: SimResult) -> dict[str, Any]:
    """Per-run figures: hit ratios per tier, readiness, TTFT percentiles, bytes per link."""
    records = result.records
    prompt = sum(r.prompt for r in records) or 1
    l1 = sum(r.l1_hit for r in records)
    l2 = sum(r.l2_hit for r in records)
    l3 = sum(r.l3_hit for r in records)
    deep = sum(r.deep for r in records)
    ready = sum(r.ready for r in records)
    ttfts = [r.ttft for r in records if not math.isnan(r.ttft)]
    waits = [r.wait_s for r in records]
    out: dict[str, Any] = {
        "policy": result.policy,
        "requests": len(records),
        "prompt_tokens": prompt,
        "hit_ratio": (l1 + l2 + l3) / prompt,
        "l1_hit_ratio": l1 / prompt,
        "l2_hit_ratio": l2 / prompt,
        "l3_hit_ratio": l3 / prompt,
        "ready_at_schedule": ready / deep if deep else 1.0,
        "ttft_mean_s": sum(ttfts) / len(ttfts) if ttfts else math.nan,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p90_s": percentile(ttfts, 90),
        "ttft_p99_s": percentile(ttfts, 99),
        "l3_wait_mean_s": sum(waits) / len(waits) if waits else 0.0,
        # share of the lanes' time spent prefilling (busy_s sums over every lane)
        "utilization": (
            result.busy_s / (result.makespan_s * max(1, result.lanes))
            if result.makespan_s > 0
            else 0.0
        ),
    }
    for link, moved in sorted(result.bytes_by_link.items()):
        out[f"bytes_{link}"] = moved
    out["counters"] = dict(result.counters)
    if result.policy_disabled:
        out["policy_disabled"] = result.policy_disabled
    return out


def combine(
    policy: SimResult, ceiling: SimResult, l1_only: SimResult, *, profile: str, settings: dict
) -> dict[str, Any]:
    """The JSON report: the configured policy's figures at the top level, the baselines'
    headline figures as ``ceiling_*`` / ``l1_only_*``, and each run in full under ``runs``."""
    main = summarize(policy)
    base_ceiling = summarize(ceiling)
    base_l1 = summarize(l1_only)
    report: dict[str, Any] = {key: value for key, value in main.items() if key != "counters"}
    report["profile"] = profile
    for prefix, run in (("ceiling", base_ceiling), ("l1_only", base_l1)):
        for key in ("hit_ratio", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s"):
            report[f"{prefix}_{key}"] = run[key]
    report["hit_ratio_vs_ceiling"] = (
        main["hit_ratio"] / base_ceiling["hit_ratio"] if base_ceiling["hit_ratio"] else math.nan
    )
    report["ttft_p50_vs_ceiling"] = (
        main["ttft_p50_s"] / base_ceiling["ttft_p50_s"] if base_ceiling["ttft_p50_s"] else math.nan
    )
    report["settings"] = settings
    report["runs"] = {"policy": main, "ceiling": base_ceiling, "l1_only": base_l1}
    return report


_TABLE_COLUMNS = (
    ("hit", "hit_ratio", "{:.3f}"),
    ("L1", "l1_hit_ratio", "{:.3f}"),
    ("L2", "l2_hit_ratio", "{:.3f}"),
    ("L3", "l3_hit_ratio", "{:.3f}"),
    ("ready@sched", "ready_at_schedule", "{:.3f}"),
    ("TTFT p50 s", "ttft_p50_s", "{:.3f}"),
    ("p90 s", "ttft_p90_s", "{:.3f}"),
    ("p99 s", "ttft_p99_s", "{:.3f}"),
)


def markdown_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Rows of (label, summarize() output) as a markdown table."""
    head = "| run | " + " | ".join(title for title, _, _ in _TABLE_COLUMNS) + " |"
    lines = [head, "|---" * (len(_TABLE_COLUMNS) + 1) + "|"]
    for label, figures in rows:
        cells = [fmt.format(figures[key]) for _, key, fmt in _TABLE_COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: Sequence[tuple[str, SimResult]], path: str) -> None:
    """TTFT distributions (CDF) and hit ratios per tier, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, result in results:
        ttfts = sorted(r.ttft for r in result.records if not math.isnan(r.ttft))
        if ttfts:
            ys = [(i + 1) / len(ttfts) for i in range(len(ttfts))]
            left.plot(ttfts, ys, label=label)
    left.set_xscale("log")
    left.set_xlabel("modelled TTFT (s)")
    left.set_ylabel("share of requests")
    left.set_title("TTFT distribution")
    left.grid(True, which="both", alpha=0.3)
    left.legend()
    labels = [label for label, _ in results]
    bottoms = [0.0] * len(results)
    for tier in ("l1", "l2", "l3"):
        values = [summarize(result)[f"{tier}_hit_ratio"] for _, result in results]
        right.bar(labels, values, bottom=bottoms, label=tier.upper())
        bottoms = [b + v for b, v in zip(bottoms, values)]
    right.set_ylabel("share of prompt tokens")
    right.set_title("hit ratio by tier")
    right.set_ylim(0, 1)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
