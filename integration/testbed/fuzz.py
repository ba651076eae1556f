"""Differential fuzzer: hiradix against SGLang's own cache on seeded random workloads.

Each case is drawn from a seed: a hiradix config (page size, L1 and L2 sizes, store, L3
page size, prefetch policy and wait mode, write and eviction policies, TTLs) and a
workload (conversations of several turns sharing a system prompt, histories that branch
from another conversation's earlier turn, prompts sent in waves at some concurrency, some
of them aborted). The workload is first run on a server with SGLang's default cache: its
greedy answers become the histories' assistant turns and the expected outputs. The same
prompts are then replayed, wave by wave, on a hiradix server with verify mode on
(``HIRADIX_VERIFY=fatal``) and, at TP > 1, the consensus checker
(``HIRADIX_CONSENSUS_CHECK=1``), and every answer that was not aborted must be identical.

Why this oracle is exact: the tiny test model is float32, where greedy outputs do not
depend on how much of a prompt came from cache (checked: SGLang's own cache with a small
and with a large L1 answers the same). In float16 they do: KV computed token by token
while decoding differs in its last bits from KV of the same tokens computed in a prefill,
and SGLang's own cache flips answers by reusing it exactly as hiradix does (see the
README's "Guarantee"); ``--dtype float16`` shows it.

On a mismatch, a hang or a verify failure the case is shrunk (requests after the first
failure dropped, then other conversations) on fresh servers, and the smallest failing case
is written as JSON that ``--replay`` runs again.

    python -m hiradix.integration.testbed.fuzz --minutes 60 --out out/fuzz
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hiradix.integration.testbed.model_builder import build_tiny_model
from hiradix.integration.testbed.redis_servers import RedisServer
from hiradix.integration.testbed.sglang_server import SGLangServer

logger = logging.getLogger(__name__)

VOCAB = (4, 1000)  # token ids drawn from here (the tiny model's vocab is 1024)
REQUEST_TIMEOUT = 180.0  # a request slower than this counts as a hang
STRICT = {"SGLANG_CHECK_KV_PAGE_INVARIANTS": "1", "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}
BAD_LOG_LINES = (
    "Traceback",
    "hiradix verify",
    "TP ranks disagree",
    "memory leak detected",
    "double free",
)


@dataclass(frozen=True)
class Case:
    """One drawn configuration and workload shape (everything follows from ``seed``)."""

    seed: int
    page_size: int
    l1_tokens: int
    host_size: float
    store: str
    block_tokens: int
    policy: str
    wait: str
    write_policy: str
    eviction: str
    ttl_device: str | None
    ttl_host: str | None
    ttl_store: str | None
    conversations: int
    turns: int
    system_tokens: int
    user_tokens: tuple[int, int]
    branch_prob: float
    concurrency: int
    abort_prob: float
    new_tokens: int
    tp: int = 1
    dtype: str = "float32"

    def config_yaml(self, nvme_dir: Path, redis_url: str | None) -> str:
        def ttl(value: str | None) -> str:
            return "null" if value is None else value

        store = f"store:\n  kind: {self.store}\n  block_tokens: {self.block_tokens}\n"
        if self.store == "nvme":
            store += f"  nvme: {{path: {nvme_dir}, size: 256MiB}}\n"
        elif self.store == "redis":
            store += f"  redis: {{url: '{redis_url}'}}\n"
        elif self.store == "memory":
            store += "  memory: {size: 256MiB}\n"
        return (
            f"host: {{size: {self.host_size}}}\n{store}"
            f"ttl: {{device: {ttl(self.ttl_device)}, host: {ttl(self.ttl_host)}, "
            f"store: {ttl(self.ttl_store)}}}\n"
            f"write_policy: {self.write_policy}\neviction_policy: {self.eviction}\n"
            f"prefetch: {{policy: {self.policy}, wait: {self.wait}}}\n"
        )


def draw_case(seed: int, *, small: bool = False, **force: Any) -> Case:
    """A random case for ``seed``; ``small`` keeps it short (the test suite's seeds);
    ``force`` pins fields (``tp=2``, ``store="redis"``...) before sizes are derived."""
    rng = random.Random(seed)
    page_size = rng.choice([1, 1, 16, 64])
    drawn: dict[str, Any] = {
        "seed": seed,
        "page_size": page_size,
        "block_tokens": page_size * rng.choice([1, 2, 4])
        if page_size > 1
        else rng.choice([16, 32, 64]),
        "host_size": rng.choice([0.5, 1.0, 2.0, 4.0]),
        "store": rng.choice(["none", "nvme", "nvme", "memory", "redis"]),
        "policy": rng.choice(["none", "arrival", "session", "hot", "pattern"]),
        "wait": rng.choice(["best_effort", "wait_complete", "timeout"]),
        "write_policy": rng.choice(
            ["write_through", "write_through", "write_through_selective", "write_back"]
        ),
        "eviction": rng.choice(["lru", "lfu", "fifo", "priority"]),
        "ttl_device": rng.choice([None, None, None, "2s"]),
        "ttl_host": rng.choice([None, None, "1s", "4s"]),
        "ttl_store": rng.choice(["24h", "24h", "3s"]),
        "conversations": rng.randint(3, 6) if small else rng.randint(4, 16),
        "turns": rng.randint(2, 4) if small else rng.randint(2, 6),
        "system_tokens": rng.choice([0, 64, 128, 256]),
        "user_tokens": (rng.randint(16, 64), rng.randint(80, 200)),
        "branch_prob": rng.choice([0.0, 0.2, 0.5]),
        "concurrency": rng.choice([1, 1, 2, 4, 8]),
        "abort_prob": rng.choice([0.0, 0.0, 0.1]),
        "new_tokens": rng.choice([8, 16]),
        "tp": 1,
        "dtype": "float32",
    }
    l1_factor = rng.choice([1.3, 2.0, 3.0])
    drawn.update(force)
    page = drawn["page_size"]
    if drawn["block_tokens"] % page:
        drawn["block_tokens"] = page * max(1, drawn["block_tokens"] // page)
    longest = drawn["system_tokens"] + drawn["turns"] * (
        drawn["user_tokens"][1] + drawn["new_tokens"]
    )
    if "l1_tokens" not in force:
        l1 = max(int((longest + page) * l1_factor), 1024)
        drawn["l1_tokens"] = l1 + (-l1 % max(page, 64))
    return Case(**drawn)


@dataclass
class Request:
    index: int
    wave: int
    conversation: int
    prompt: list[int]
    expected: list[int] = field(default_factory=list)
    abort: bool = False


@dataclass
class Outcome:
    """What a replay found: mismatching request indices, hung ones, and log/metric faults."""

    mismatches: list[dict[str, Any]] = field(default_factory=list)
    hung: list[int] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    answered: int = 0
    cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return bool(self.mismatches or self.hung or self.faults)


# ---------------------------------------------------------------------- servers
def server_args(case: Case) -> tuple[list[str], dict[str, str]]:
    args, env = [], dict(STRICT)
    if case.tp > 1:
        args += ["--tp-size", str(case.tp)]
        env["SGLANG_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(case.tp))
    return args, env


def start_server(model: Path, case: Case, log: Path, *, hiradix_config: str | None = None,
                 name: str = "sglang") -> SGLangServer:  # fmt: skip
    args, env = server_args(case)
    if hiradix_config is not None:
        args += ["--enable-hiradix", "--hiradix-config", hiradix_config]
        env["HIRADIX_VERIFY"] = "fatal"
        env["HIRADIX_CONSENSUS_CHECK"] = "1"
    server = SGLangServer(
        model, extra_args=args, env=env, log_path=log, max_total_tokens=case.l1_tokens,
        page_size=case.page_size, dtype=case.dtype, name=name,
    )  # fmt: skip
    server.start()
    server.wait_ready(timeout=300)
    return server


# ---------------------------------------------------------------------- workload
def build_workload(case: Case, baseline: SGLangServer) -> list[Request]:
    """Prompts of the case, with the baseline's answers as history and expectations."""
    rng = random.Random(case.seed * 1_000_003 + 7)
    system = [rng.randrange(*VOCAB) for _ in range(case.system_tokens)]
    histories: list[list[list[int]]] = [[list(system)] for _ in range(case.conversations)]
    requests: list[Request] = []
    for wave in range(case.turns):
        batch = []
        for conv in rng.sample(range(case.conversations), case.conversations):
            turns = histories[conv]
            if wave and rng.random() < case.branch_prob:  # fork another conversation's past
                other = histories[rng.randrange(case.conversations)]
                turns[:] = [list(t) for t in other[: rng.randint(1, len(other))]]
            user = [rng.randrange(*VOCAB) for _ in range(rng.randint(*case.user_tokens))]
            prompt = [t for turn in turns for t in turn] + user
            abort = rng.random() < case.abort_prob
            batch.append(Request(len(requests) + len(batch), wave, conv, prompt, abort=abort))
            turns.append(user)
        results = send_wave(baseline, batch, case, abort=False)
        for req, res in zip(batch, results, strict=True):
            if res is None:
                raise RuntimeError(f"baseline server failed request {req.index}")
            req.expected = res.output_ids
            histories[req.conversation].append(res.output_ids)
        requests += batch
    return requests


def send_wave(server: SGLangServer, batch: Sequence[Request], case: Case, *,
              abort: bool) -> list[Any]:  # fmt: skip
    """Send ``batch`` with ``case.concurrency`` in flight; aborted ones (if ``abort``) are
    cancelled a moment after they start. Returns a result (or None) per request."""

    def one(req: Request) -> Any:
        rid = f"fuzz-{req.index}-{uuid.uuid4().hex[:8]}"
        if abort and req.abort:
            threading.Timer(0.01, _quiet_abort, args=(server, rid)).start()
        try:
            result = server.generate(req.prompt, case.new_tokens, rid=rid, ignore_eos=True,
                                     timeout=REQUEST_TIMEOUT)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - an aborted request may end in any error
            result = exc
        # an aborted request's answer (cut short, empty or an HTTP error) is not compared
        return None if abort and req.abort else result

    with ThreadPoolExecutor(max(1, case.concurrency)) as pool:
        return list(pool.map(one, batch))


def _quiet_abort(server: SGLangServer, rid: str) -> None:
    try:
        server.abort(rid)
    except Exception as exc:  # noqa: BLE001 - the server may be gone; the replay reports that
        logger.debug("abort of %s failed: %r", rid, exc)


# ---------------------------------------------------------------------- replay
def replay(model: Path, case: Case, requests: Sequence[Request], workdir: Path) -> Outcome:
    """Run ``requests`` wave by wave on a fresh hiradix server; compare with expectations."""
    outcome = Outcome()
    with ExitStack() as stack:
        redis_url = None
        if case.store == "redis":
            redis = RedisServer().start()
            stack.callback(redis.stop)
            redis_url = redis.url
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "hiradix.yaml"
        config.write_text(case.config_yaml(workdir / "pages", redis_url))
        server = start_server(model, case, workdir / "hiradix.log",
                              hiradix_config=str(config), name="hiradix")  # fmt: skip
        stack.callback(server.stop)
        waves = sorted({r.wave for r in requests})
        for wave in waves:
            batch = [r for r in requests if r.wave == wave]
            for req, res in zip(batch, send_wave(server, batch, case, abort=True), strict=True):
                if res is None:
                    continue
                if isinstance(res, Exception):
                    outcome.hung.append(req.index)
                    outcome.faults.append(f"request {req.index}: {res!r}"[:300])
                    continue
                outcome.answered += 1
                outcome.cached_tokens += res.cached_tokens
                if res.output_ids != req.expected:
                    outcome.mismatches.append({
                        "index": req.index, "wave": wave, "conversation": req.conversation,
                        "prompt_tokens": len(req.prompt), "cached_tokens": res.cached_tokens,
                        "expected": req.expected, "got": res.output_ids,
                    })  # fmt: skip
            if outcome.hung:
                break  # a hung server answers nothing more
        try:
            outcome.metrics = server.hiradix_metrics()
        except Exception as exc:  # noqa: BLE001 - a dead server is itself the finding
            outcome.faults.append(f"metrics unavailable: {exc!r}"[:300])
        if outcome.metrics.get("verify_mismatches", 0):
            outcome.faults.append(f"verify_mismatches={outcome.metrics['verify_mismatches']}")
        text = server.log_text()
        outcome.faults += [f"log: {bad}" for bad in BAD_LOG_LINES if bad in text]
    return outcome


# ---------------------------------------------------------------------- shrink
def shrink(model: Path, case: Case, requests: list[Request], outcome: Outcome, workdir: Path,
           budget: int = 4) -> tuple[list[Request], Outcome]:  # fmt: skip
    """Smaller request lists that still fail, tried on fresh servers (``budget`` tries)."""
    best, best_outcome = requests, outcome
    failing = [m["index"] for m in outcome.mismatches] + outcome.hung
    if failing:
        last = min(failing)
        keep_conv = requests[last].conversation
        candidates = [
            [r for r in requests if r.index <= last],
            [r for r in requests if r.index <= last and r.conversation == keep_conv],
            [r for r in requests if r.index == last],
        ]
    else:
        candidates = [requests[: len(requests) // 2]]
    for i, candidate in enumerate(candidates[:budget]):
        if not candidate or len(candidate) >= len(best):
            continue
        trial = replay(model, case, candidate, workdir / f"shrink-{i}")
        if trial.failed:
            best, best_outcome = candidate, trial
    return best, best_outcome


# ---------------------------------------------------------------------- driver
@contextmanager
def baselines(model: Path, workdir: Path) -> Iterator[dict[tuple, SGLangServer]]:
    """SGLang default-cache servers, one per (page size, L1, TP, dtype), kept for reuse."""
    servers: dict[tuple, SGLangServer] = {}
    try:
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def baseline_for(servers: dict[tuple, SGLangServer], model: Path, case: Case,
                 workdir: Path) -> SGLangServer:  # fmt: skip
    key = (case.page_size, case.l1_tokens, case.tp, case.dtype)
    if key not in servers:
        for old in list(servers):  # keep one: memory is for the hiradix server
            servers.pop(old).stop()
        log = workdir / f"baseline-p{case.page_size}-l{case.l1_tokens}-tp{case.tp}.log"
        servers[key] = start_server(model, case, log, name="baseline")
    return servers[key]


def run_case(model: Path, case: Case, servers: dict[tuple, SGLangServer], workdir: Path,
             *, shrink_budget: int = 4) -> dict[str, Any]:  # fmt: skip
    """Run one case; returns its report (with the smallest failing case if it failed)."""
    started = time.monotonic()
    requests = build_workload(case, baseline_for(servers, model, case, workdir))
    outcome = replay(model, case, requests, workdir / f"case-{case.seed}")
    report: dict[str, Any] = {
        "seed": case.seed, "case": asdict(case), "requests": len(requests),
        "answered": outcome.answered, "cached_tokens": outcome.cached_tokens,
        "mismatches": len(outcome.mismatches), "hung": len(outcome.hung),
        "faults": outcome.faults, "metrics": outcome.metrics,
    }  # fmt: skip
    if outcome.failed:
        small, small_outcome = shrink(model, case, requests, outcome,
                                      workdir / f"case-{case.seed}", shrink_budget)  # fmt: skip
        report["shrunk"] = {
            "requests": [asdict(r) for r in small],
            "mismatches": small_outcome.mismatches, "hung": small_outcome.hung,
            "faults": small_outcome.faults,
        }  # fmt: skip
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="run new seeds this long")
    parser.add_argument("--seed", type=int, default=1000, help="first seed")
    parser.add_argument("--cases", type=int, default=0, help="stop after this many (0: time)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dtype", default="float32", help="float32 (exact oracle) or float16")
    parser.add_argument("--out", default="out/fuzz", help="reports and failing cases go here")
    parser.add_argument("--replay", help="a failing-case JSON written by an earlier run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(out / "model", preset="tiny", seed=0)
    if args.replay:
        saved = json.loads(Path(args.replay).read_text())
        case = Case(**{**saved["case"], "user_tokens": tuple(saved["case"]["user_tokens"])})
        requests = [Request(**r) for r in saved["shrunk"]["requests"]]
        result = replay(model, case, requests, Path(tempfile.mkdtemp(dir=out)))
        print(json.dumps(asdict(result), indent=1))
        return 1 if result.failed else 0
    deadline = time.monotonic() + args.minutes * 60
    failed, done, seed = 0, 0, args.seed
    with baselines(model, out) as servers:
        while time.monotonic() < deadline and (not args.cases or done < args.cases):
            case = draw_case(seed, tp=args.tp, dtype=args.dtype)
            report = run_case(model, case, servers, Path(tempfile.mkdtemp(dir=out)))
            done += 1
            status = "FAIL" if "shrunk" in report else "ok"
            print(f"seed {seed}: {status} {report['requests']} requests, "
                  f"{report['mismatches']} mismatches, {report['hung']} hung, "
                  f"faults {report['faults']}, {report['seconds']} s", flush=True)  # fmt: skip
            with open(out / "fuzz.jsonl", "a") as log:
                log.write(json.dumps(report) + "\n")
            if "shrunk" in report:
                failed += 1
                path = out / f"fail-{seed}.json"
                path.write_text(json.dumps(report, indent=1))
                print(
                    f"  smallest failing case: {len(report['shrunk']['requests'])} requests; "
                    f"replay: python -m hiradix.integration.testbed.fuzz --replay {path}"
                )
            seed += 1
    print(f"{done} cases, {failed} failed (seeds {args.seed}..{seed - 1})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
