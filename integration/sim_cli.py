"""``hiradix sim``: replay a Mooncake-format trace through the real tree and policies.

    hiradix sim --trace FILE --config FILE --json OUT [--profile NAME] [--l1-tokens N]
                [--l2-tokens N] [--plot PNG] [--policy NAME] [--limit N] [--page-size N]
                [--tick S] [--lanes N] [--no-progress]

Runs the configured prefetch policy (or ``--policy``) and two baselines on the same
requests: L1-only LRU with the same L1, and an unbounded L1 whose hits cost nothing (the
ceiling). Prints a table, writes the JSON report (and a PNG with ``--plot``). Exit codes:
0 done, 1 bad config / trace / policy, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Any

from hiradix.config import ConfigError, load_config
from hiradix.sim import SimOptions, simulate
from hiradix.sim.profiles import DEFAULT_PROFILE, PROFILES
from hiradix.sim.replay import load_trace
from hiradix.sim.report import markdown_table, plot

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hiradix sim", description="Replay a request trace in the hiradix simulator."
    )
    parser.add_argument("--trace", required=True, help="Mooncake-format JSONL trace")
    parser.add_argument("--config", required=True, help="hiradix config file")
    parser.add_argument("--json", required=True, metavar="OUT", help="write the report here")
    parser.add_argument(
        "--profile", default=DEFAULT_PROFILE, choices=sorted(PROFILES), help="hardware/model"
    )
    parser.add_argument("--l1-tokens", type=int, help="L1 tokens (default: 5%% of distinct)")
    parser.add_argument("--l2-tokens", type=int, help="L2 tokens (default: config host.size)")
    parser.add_argument("--plot", metavar="PNG", help="write TTFT / hit-ratio plots")
    parser.add_argument("--policy", help="prefetch policy, overriding the config's")
    parser.add_argument("--limit", type=int, help="replay only the first N requests")
    parser.add_argument("--page-size", type=int, default=64, help="tree page size (tokens)")
    parser.add_argument("--tick", type=float, default=1.0, help="policy tick (virtual s)")
    parser.add_argument(
        "--lanes",
        type=int,
        default=1,
        help="prefill instances (each a whole server with its own links); same for every run",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _progress(total: int, enabled: bool) -> tuple[Any, Any]:
    if not enabled:
        return None, None
    try:
        from tqdm import tqdm
    except ImportError:
        return None, None
    bar = tqdm(total=total, unit="req", desc="hiradix sim", file=sys.stderr)
    return bar, bar.update


def _clean(value: Any) -> Any:
    """JSON without NaN/inf (null instead)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    return value


def main(argv: list[str] | None = None) -> int:
    """Run ``hiradix sim``; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as stop:
        return int(stop.code or 0)
    for name in ("l1_tokens", "l2_tokens", "limit", "page_size", "lanes"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "l2_tokens" else 1):
            print(
                f"error: --{name.replace('_', '-')} must be positive, got {value}", file=sys.stderr
            )
            return 2
    try:
        config = load_config(args.config)
        requests = load_trace(args.trace, args.limit)
    except ConfigError as error:
        for line in str(error).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    options = SimOptions(
        profile=args.profile,
        l1_tokens=args.l1_tokens,
        l2_tokens=args.l2_tokens,
        policy=args.policy,
        page_size=args.page_size,
        tick_s=args.tick,
        lanes=args.lanes,
    )
    bar, update = _progress(3 * len(requests), not args.no_progress)
    try:
        report, results = simulate(config, requests, options, progress=update)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
    with open(args.json, "w", encoding="utf-8") as file:
        json.dump(_clean(report), file, indent=2, sort_keys=False)
        file.write("\n")
    runs = report["runs"]
    print(
        markdown_table(
            [
                (f"{report['policy']} (policy)", runs["policy"]),
                ("L1-only LRU", runs["l1_only"]),
                ("unbounded (ceiling)", runs["ceiling"]),
            ]
        )
    )
    if args.plot:
        plot(
            [
                (report["policy"], results["policy"]),
                ("L1-only", results["l1_only"]),
                ("ceiling", results["ceiling"]),
            ],
            args.plot,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
