"""``make demo``: a real SGLang server with hiradix on CPU, a multi-turn chat workload, and
the numbers that show the tiers working, next to SGLang's own cache with the same L1.

The device pool (L1) is deliberately small, so that the users' conversations do not fit in
it: with SGLang's own cache older turns are evicted and recomputed; with hiradix they come
back from host memory (L2) or from the NVMe store (L3). Both servers run the testbed's
CPU extend attention (:mod:`hiradix.integration.testbed.cpu_attention`), which computes
only the new tokens' queries as GPU backends do, so TTFT shows what caching saves.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class TurnStats:
    ttft: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    tiers: dict[str, float] = field(default_factory=dict)


def run_workload(
    server: Any, users: int, turns: int, seed: int, new_tokens: int, hiradix: bool
) -> list[TurnStats]:
    """Each user sends ``turns`` requests; each request is the whole conversation so far
    plus a new user message, like a chat client does. Users take turns (round-robin)."""
    rng = random.Random(seed)
    system = [rng.randrange(4, 1000) for _ in range(64)]
    histories = [list(system) for _ in range(users)]
    stats = [TurnStats() for _ in range(turns)]
    for turn in range(turns):
        before = server.hiradix_metrics() if hiradix else {}
        for user in range(users):
            histories[user] += [rng.randrange(4, 1000) for _ in range(rng.randrange(150, 300))]
            result = server.generate(histories[user], new_tokens)
            stats[turn].ttft.append(float(result.meta.get("first_token_latency", result.latency_s)))
            stats[turn].prompt_tokens += len(histories[user])
            stats[turn].cached_tokens += result.cached_tokens
            histories[user] += result.output_ids
        if hiradix:
            after = server.hiradix_metrics()
            for tier in ("l1", "l2", "l3"):
                name = f"{tier}_hit_tokens"
                stats[turn].tiers[tier] = after.get(name, 0.0) - before.get(name, 0.0)
    return stats


def _print_table(title: str, stats: Sequence[TurnStats], base: Sequence[TurnStats] | None) -> None:
    print(f"\n{title}")
    head = f"{'turn':>4} {'TTFT p50 ms':>12} {'cached %':>9}"
    if stats and stats[0].tiers:
        head += f" {'L1 %':>6} {'L2 %':>6} {'L3 %':>6}"
    if base is not None:
        head += f" {'TTFT vs SGLang':>15}"
    print(head)
    print("-" * len(head))
    for i, s in enumerate(stats):
        p50 = statistics.median(s.ttft) * 1000
        row = f"{i + 1:>4} {p50:>12.1f} {100 * s.cached_tokens / max(1, s.prompt_tokens):>8.1f}%"
        if s.tiers:
            row += "".join(
                f" {100 * s.tiers[t] / max(1, s.prompt_tokens):>5.1f}%" for t in ("l1", "l2", "l3")
            )
        if base is not None:
            ratio = statistics.median(s.ttft) / max(1e-9, statistics.median(base[i].ttft))
            row += f" {ratio:>14.2f}x"
        print(row)


def main(argv: Sequence[str] | None = None) -> int:
    from hiradix.integration.testbed import cpu_attention
    from hiradix.integration.testbed.model_builder import build_tiny_model
    from hiradix.integration.testbed.sglang_server import SGLangServer

    from hiradix.config import default_config_path

    parser = argparse.ArgumentParser(prog="hiradix demo", description=__doc__)
    parser.add_argument("--config", default=None, help="hiradix config (default: embedded)")
    parser.add_argument("--workdir", default=".hiradix/demo", help="model, logs and pages")
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--l1-tokens", type=int, default=2048, help="--max-total-tokens")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--no-baseline", action="store_true", help="skip SGLang's own cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--preset",
        default="bench",
        choices=["tiny", "bench"],
        help="model size: 'bench' makes prefill cost what caching saves (about 1 s per 4K tokens)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"[demo] building the {args.preset!r} random Llama model under {work}")
    model = build_tiny_model(work / f"model-{args.preset}", preset=args.preset)
    config = args.config or default_config_path()
    print(f"[demo] hiradix config: {config} (pages under {Path.cwd() / '.hiradix'})")
    pages_dir = Path.cwd() / ".hiradix" / "pages"
    earlier = sum(1 for p in pages_dir.rglob("*") if p.is_file()) if pages_dir.is_dir() else 0
    if earlier:  # the store outlives the server: an earlier run's pages serve turn 1 too
        print(f"[demo] the NVMe store already holds {earlier} files from earlier runs, so "
              f"turn 1 can hit L3 (rm -rf {pages_dir} for a cold start)")  # fmt: skip

    results: dict[str, list[TurnStats]] = {}
    runs = [("hiradix", ["--enable-hiradix", "--hiradix-config", config])]
    if not args.no_baseline:
        runs.append(("sglang", []))
    for name, extra in runs:
        server = SGLangServer(
            model,
            extra_args=extra,
            log_path=work / f"{name}.log",
            max_total_tokens=args.l1_tokens,
            name=f"demo-{name}",
            # both servers: CPU extend attention over new tokens only, as GPU backends do,
            # so TTFT reflects what caching saves (see cpu_attention.py)
            env={cpu_attention.ENV: cpu_attention.MODE},
        )
        print(f"[demo] starting SGLang ({name}); log: {server.log_path}")
        with server:
            started = time.monotonic()
            server.wait_ready()
            print(f"[demo] ready in {time.monotonic() - started:.0f} s; "
                  f"{args.users} users x {args.turns} turns")  # fmt: skip
            if name == "hiradix":
                log = server.log_text()
                line = next((x for x in log.splitlines() if "Tree cache initialized" in x), "")
                print(f"[demo] {line.split('] ', 1)[-1]}")
            results[name] = run_workload(
                server, args.users, args.turns, args.seed, args.new_tokens, name == "hiradix"
            )
            if name == "hiradix":
                totals = server.hiradix_metrics()
        print(f"[demo] stopped {name}")

    base = results.get("sglang")
    _print_table("hiradix (L1 + L2 host memory + L3 NVMe)", results["hiradix"], base)
    if base is not None:
        _print_table("SGLang's own cache (same L1)", base, None)
    print("\nhiradix totals: " + ", ".join(
        f"{k}={int(totals.get(k, 0))}"
        for k in ("prompt_tokens", "l1_hit_tokens", "l2_hit_tokens", "l3_hit_tokens",
                  "l1_to_l2_tokens", "l2_to_l3_tokens", "l1_evicted_tokens", "l2_evicted_tokens")
    ))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
