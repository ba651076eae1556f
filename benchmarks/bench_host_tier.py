"""Second pass over many conversations with and without hiradix's host tier (same L1).

Two hiradix servers on CPU, run one after the other in this process: L1 only
(``host.size: 0``) and L1 + L2 (host memory large enough for the whole working set); no L3.
Each serves every conversation once (first pass), then again (second pass); the table
shows the second pass's TTFT and where its prompt tokens came from.

    python benchmarks/bench_host_tier.py [--conversations 100] [--l1-tokens 4096] --json OUT
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from hiradix.integration.testbed.model_builder import build_tiny_model
from hiradix.integration.testbed.sglang_server import SGLangServer


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(4, 4000) for _ in range(128)]
    return [
        system + [rng.randrange(4, 4000) for _ in range(rng.randrange(700, 1100))] for _ in range(n)
    ]


def run(model: Path, work: Path, name: str, host: str, prompts, l1: int) -> dict:
    cfg = work / f"{name}.yaml"
    cfg.write_text(f"host: {{size: {host}}}\nstore: {{kind: none}}\n")
    server = SGLangServer(
        model,
        extra_args=["--enable-hiradix", "--hiradix-config", str(cfg)],
        log_path=work / f"{name}.log",
        max_total_tokens=l1,
        name=name,
    )
    with server:
        server.wait_ready()
        for prompt in prompts:
            server.generate(prompt, 4)
        before = server.hiradix_metrics()
        ttft, outputs = [], []
        for prompt in prompts:
            result = server.generate(prompt, 4)
            ttft.append(float(result.meta.get("first_token_latency", result.latency_s)))
            outputs.append(result.output_ids)
        after = server.hiradix_metrics()
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return {
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p90_s": statistics.quantiles(ttft, n=10)[-1],
        "prompt_tokens": delta.get("prompt_tokens", 0.0),
        "l1_hit_tokens": delta.get("l1_hit_tokens", 0.0),
        "l2_hit_tokens": delta.get("l2_hit_tokens", 0.0),
        "outputs": outputs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument("--l1-tokens", type=int, default=8192)
    parser.add_argument("--preset", default="bench", choices=["tiny", "bench"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hiradix-host-"))
    model = build_tiny_model(work / "model", preset=args.preset)
    prompts = _prompts(args.conversations, 0)
    total = sum(len(p) for p in prompts)
    print(f"{args.conversations} conversations, {total} prompt tokens, L1 {args.l1_tokens} tokens")
    started = time.monotonic()
    results = {
        "l1_only": run(model, work, "l1-only", "0", prompts, args.l1_tokens),
        "l1_l2": run(model, work, "l1-l2", "512MiB", prompts, args.l1_tokens),
    }
    same = sum(a == b for a, b in zip(results["l1_only"]["outputs"], results["l1_l2"]["outputs"]))
    print(f"\nsecond pass ({time.monotonic() - started:.0f} s in all)")
    print(f"{'run':<8} {'TTFT p50 ms':>12} {'TTFT p90 ms':>12} {'L1 hit %':>9} {'L2 hit %':>9}")
    for name, r in results.items():
        prompt = max(1.0, r["prompt_tokens"])
        print(
            f"{name:<8} {r['ttft_p50_s'] * 1e3:>12.1f} {r['ttft_p90_s'] * 1e3:>12.1f} "
            f"{100 * r['l1_hit_tokens'] / prompt:>8.1f}% {100 * r['l2_hit_tokens'] / prompt:>8.1f}%"
        )
    ratio = results["l1_l2"]["ttft_p50_s"] / results["l1_only"]["ttft_p50_s"]
    print(
        f"TTFT p50 with / without the host tier: {ratio:.2f}x; identical outputs {same}/{len(prompts)}"
    )
    if args.json:
        out = {k: {kk: vv for kk, vv in v.items() if kk != "outputs"} for k, v in results.items()}
        out.update(ttft_p50_ratio=ratio, identical_outputs=same, conversations=len(prompts))
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
