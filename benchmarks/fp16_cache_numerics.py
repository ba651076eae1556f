"""Why a float16 multi-turn workload answers differently with more or less cache, with
SGLang's own cache alone (no hiradix): the evidence behind the README's "Guarantee".

Two servers with SGLang's default cache and the same flags except ``--max-total-tokens``
(a small L1 that evicts each conversation's history, a large one that keeps it) serve the
same multi-turn workload: 16 conversations sharing a 256-token system prompt, user turns of
48-160 random tokens, 16 greedy tokens per answer, one request at a time; every prompt is
built from the small-L1 server's answers, so both servers see identical prompts. In float16
some answers differ: the large L1 reuses the previous turn's answer tokens, whose KV was
computed one token per decode step, where the small L1 recomputes them in a prefill, and the
last bits differ. In float32 they agree. hiradix with a small L1 reuses KV exactly like the
large L1 does.

    .venv/bin/python benchmarks/fp16_cache_numerics.py --seed 1 --turns 5 --dtype float16
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from hiradix.integration.testbed.model_builder import build_tiny_model
from hiradix.integration.testbed.sglang_server import SGLangServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--dtype", default="float16", help="float16 or float32")
    parser.add_argument("--small-l1", type=int, default=2500)
    parser.add_argument("--large-l1", type=int, default=30000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fp16-numerics-"))
    model = build_tiny_model(tmp / "tiny", preset="tiny", seed=0)
    rng = random.Random(args.seed)
    system = [rng.randrange(4, 1000) for _ in range(256)]
    users = [
        [[rng.randrange(4, 1000) for _ in range(rng.randrange(48, 161))] for _ in range(args.turns)]
        for _ in range(args.conversations)
    ]
    prompts: list[list[int]] = []
    answers: dict[str, list[list[int]]] = {}
    for name, l1 in (("small", args.small_l1), ("large", args.large_l1)):
        out = []
        with SGLangServer(model, dtype=args.dtype, max_total_tokens=l1,
                          log_path=tmp / f"{name}.log", name=name) as server:  # fmt: skip
            server.wait_ready()
            if not prompts:  # histories from the first server's answers
                history = [list(system) for _ in range(args.conversations)]
                for turn in range(args.turns):
                    for c in range(args.conversations):
                        history[c] += users[c][turn]
                        prompts.append(list(history[c]))
                        result = server.generate(history[c], 16, ignore_eos=True)
                        out.append(result.output_ids)
                        history[c] += result.output_ids
            else:
                out = [server.generate(p, 16, ignore_eos=True).output_ids for p in prompts]
        answers[name] = out
    differ = [i for i, (a, b) in enumerate(zip(answers["small"], answers["large"])) if a != b]
    print(json.dumps({"dtype": args.dtype, "seed": args.seed, "requests": len(prompts),
                      "differ": len(differ), "differing_requests": differ}))  # fmt: skip


if __name__ == "__main__":
    main()
