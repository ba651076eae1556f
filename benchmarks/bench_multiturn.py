"""Multi-turn chat against real SGLang CPU servers: SGLang's own cache vs hiradix (L1+L2+L3).

The workload is the one of SGLang's ``benchmark/hicache/bench_multiturn.py``: N clients,
R rounds each. A client's first request is ``--request-length`` random tokens (after an
optional ``--shared-system-prompt`` common to every client); each later round appends the
previous output and a new ``--request-length``-token user turn to the client's history and
sends the whole history again. Requests leave a ready queue (random or fifo order) at
Poisson (or uniform) intervals of mean ``1 / --request-rate``, at most ``--max-parallel``
in flight, ``--output-length`` greedy tokens each (``ignore_eos``).

One difference, on by default: a barrier between rounds (``--no-round-barrier`` turns it
off and runs SGLang's free-running order). The barrier lets the script read hiradix's
Prometheus counters between rounds, so each round gets its own share of prompt tokens
served per tier (``hiradix_{prompt,l1_hit,l2_hit,l3_hit}_tokens`` deltas). Without it
the tier split is reported for the whole run only.

Servers, started one at a time by this script on this machine, same model, same L1
(``--max-total-tokens``), ``--skip-tokenizer-init`` (token ids in, token ids out):

* ``baseline``      SGLang 0.5.23 with its default prefix cache
* ``hiradix_nvme``  ``--enable-hiradix``: L1 + L2 host memory + NVMe L3 in a temp dir
* ``hiradix_redis`` ``--enable-hiradix``: L1 + L2 host memory + Redis L3 (a redis-server
  that this script starts on a free port and stops)
* ``hiradix_host``  (only when named in ``--servers``) L1 + L2, no L3: isolates the store
* ``hiradix_l1``    (only when named in ``--servers``) L1 only: hiradix's tree as SGLang's cache
* ``hiradix_slow``  (only when named in ``--servers``) ``hiradix_nvme`` whose store takes
  ``--slow-store-latency`` seconds longer per call (a slow Redis, a cold disk; the
  testbed's :mod:`hiradix.integration.testbed.slow_store`). Run with ``hiradix_host`` (same
  L1 and L2, no store: what recomputing costs) to see the cost model at work; the script
  then prints and writes ``slow_store_ttft_p50_over_recompute``.
* ``hiradix_events`` (only when named in ``--servers``) ``hiradix_nvme`` publishing SGLang's
  KV events for every tier (``--kv-events-config``, ZMQ PUB on loopback, no subscriber):
  with ``hiradix_nvme`` in the same ``--interleave`` run, what the events cost
* ``baseline_b``    (only when named in ``--servers``) a second ``baseline``: the A/A
  control, how far apart two identical server processes are (its ratios end in ``_aa``
  and are not counted in the goals).

TTFT is measured by the client: ``"stream": true`` on ``/generate``, time to the first
chunk that carries an output token. Latency is the time to ``[DONE]``. Throughput of a
round is its request count over (last completion - first send) of that round.

``--no-reuse``: every request is a fresh random prompt of ``--request-length`` tokens (no
history, no shared prefix), so no cache can help and the ratios measure hiradix's
overhead (goal: TTFT and throughput within 5% of the default cache).

Model: ``build_tiny_model(dir, preset="bench")`` (random weights, built once): Llama,
hidden 768, 4 layers, 4 heads and 4 KV heads of 64, MLP 4096, vocab 4096, bfloat16,
about 45 M parameters; KV bytes per token = 2 (K, V) x 4 layers x 4 KV heads x 64 x 2 B =
4096 (``kv_bytes_per_token("bench")``). A 4K-token prefill takes about 0.9 s on an idle 2-core
AMX Xeon. SGLang's CPU attention (``torch_native``) pads every extend query to the whole
sequence, so as shipped a fully cached prompt still costs about half of a cold one, which
no GPU backend does. ``--attention new_queries`` (default) starts every server, the
baseline included, with the testbed's extend attention that computes only the new
tokens' queries (:mod:`hiradix.integration.testbed.cpu_attention`); ``--attention sglang``
runs it as shipped. ``--calibrate`` (on by default) measures cold vs fully cached TTFT on
the idle baseline server before the workload and reports both.

Run from the repository root (about 4 minutes with the defaults on 2 cores)::

    .venv/bin/python benchmarks/bench_multiturn.py --json benchmarks/results/multiturn.json
    .venv/bin/python benchmarks/bench_multiturn.py --no-reuse --json /tmp/multiturn_noreuse.json

Overhead at the 5% level (``--no-reuse``) needs ``--interleave`` (this machine's speed
drifts within minutes) and ``--repeat`` (a server process can be a few percent faster or
slower than an identical one for its whole life), with ``baseline_b`` to show that
spread; each server's CPU milliseconds per request, by process and thread, are printed
and written (``cpu_ms_per_request``)::

    .venv/bin/python benchmarks/bench_multiturn.py --no-reuse --num-rounds 2 --request-length 1536 \
        --max-parallel 1 --request-rate 0 --no-calibrate --interleave --repeat 4 \
        --servers baseline baseline_b hiradix_nvme hiradix_redis --json benchmarks/results/multiturn_noreuse_repeat.json

At TP=2 (``--tp 2``: every server, the baseline included, runs ``--tp-size 2`` with one
rank per core; hiradix then agrees its IO once per scheduler step, a MIN all-reduce
between the ranks, which the no-reuse run measures)::

    .venv/bin/python benchmarks/bench_multiturn.py --tp 2 --servers baseline hiradix_nvme \
        --json benchmarks/results/multiturn_tp2.json
    .venv/bin/python benchmarks/bench_multiturn.py --tp 2 --no-reuse --num-rounds 2 \
        --request-length 1536 --max-parallel 1 --request-rate 0 --no-calibrate --interleave \
        --repeat 2 --servers baseline baseline_b hiradix_nvme \
        --json benchmarks/results/multiturn_tp2_noreuse.json

Not collected by pytest (STYLE.md item 12).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from hiradix.integration.testbed import cpu_attention, slow_store
from hiradix.integration.testbed.model_builder import (
    build_tiny_model,
    get_preset,
    kv_bytes_per_token,
)
from hiradix.integration.testbed.redis_servers import RedisServer
from hiradix.integration.testbed.sglang_server import SGLangServer, free_port

logger = logging.getLogger(__name__)

SERVERS = (
    "baseline",
    "hiradix_l1",
    "hiradix_host",
    "hiradix_nvme",
    "hiradix_redis",
    "hiradix_slow",
    "hiradix_events",
    "baseline_b",
)
HIRADIX = tuple(n for n in SERVERS if n.startswith("hiradix_"))
# what a server's ratios to ``baseline`` are called (``baseline_b``: the A/A control)
TAGS = {n: n.split("_", 1)[1] for n in HIRADIX} | {"baseline_b": "aa"}
TIER_COUNTERS = ("prompt_tokens", "l1_hit_tokens", "l2_hit_tokens", "l3_hit_tokens")
MIB = 1 << 20
NOISY_OTHER_CORES = 0.25  # other jobs' average cores above which a run is flagged


# ----------------------------------------------------------------------------- client


@dataclass(slots=True)
class Outcome:
    """One finished request as the client saw it (times in seconds, perf_counter)."""

    client: int
    round: int
    prompt_tokens: int
    sent: float
    ttft: float
    latency: float
    output_ids: list[int]
    cached_tokens: int
    ok: bool = True
    error: str = ""


def stream_generate(
    base_url: str, input_ids: Sequence[int], max_new_tokens: int
) -> tuple[float, float, list[int], dict[str, Any]]:
    """Streaming ``/generate``: (ttft, latency, output ids, final meta_info)."""
    body = json.dumps(
        {
            "input_ids": list(input_ids),
            "sampling_params": {
                "temperature": 0,
                "max_new_tokens": max_new_tokens,
                "ignore_eos": True,
            },
            "stream": True,
        }
    ).encode()
    req = urllib.request.Request(base_url + "/generate", data=body, method="POST")
    req.add_header("Content-Type", "application/json")
    start = time.perf_counter()
    ttft = float("nan")
    output: list[int] = []
    meta: dict[str, Any] = {}
    with urllib.request.urlopen(req, timeout=900) as resp:
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            chunk = json.loads(payload)
            ids = chunk.get("output_ids") or []
            if ids and math.isnan(ttft):  # first token not seen yet
                ttft = time.perf_counter() - start
            # sglang streams the cumulative output ids; tolerate incremental chunks too
            output = list(ids) if len(ids) >= len(output) else output + list(ids)
            meta = chunk.get("meta_info", meta)
    return ttft, time.perf_counter() - start, output, meta


@dataclass(slots=True)
class Job:
    client: int
    round: int
    input_ids: list[int]


def send(base_url: str, job: Job, output_length: int, sent: float) -> Outcome:
    """One request; ``sent`` is recorded as its send time. A failure is recorded (latency:
    until it failed), never raised."""
    started = time.perf_counter()
    try:
        ttft, lat, out, meta = stream_generate(base_url, job.input_ids, output_length)
    except Exception as err:  # noqa: BLE001 - a failed request is recorded, not fatal
        return Outcome(job.client, job.round, len(job.input_ids), sent, float("nan"),
                       time.perf_counter() - started, [], 0, ok=False, error=repr(err))  # fmt: skip
    return Outcome(job.client, job.round, len(job.input_ids), sent, ttft, lat, out,
                   int(meta.get("cached_tokens", 0)))  # fmt: skip


class Driver:
    """Open-loop sender: Poisson/uniform gaps, a ready queue, at most ``max_parallel`` in flight.

    ``follow_up(outcome)`` may return the client's next job (free-running mode); it is
    appended to the ready queue as soon as the response is complete.
    """

    def __init__(self, base_url: str, args: argparse.Namespace, rng: random.Random) -> None:
        self.base_url = base_url
        self.args = args
        self.rng = rng
        self.cond = threading.Condition()

    def run(
        self, jobs: list[Job], total: int, follow_up: Callable[[Outcome], Job | None] | None = None
    ) -> list[Outcome]:
        args = self.args
        ready = list(jobs)
        done: list[Outcome] = []
        in_flight = 0

        def finish(job: Job, sent: float) -> None:
            nonlocal in_flight
            outcome = send(self.base_url, job, args.output_length, sent)
            nxt = follow_up(outcome) if follow_up is not None and outcome.ok else None
            with self.cond:
                done.append(outcome)
                in_flight -= 1
                if nxt is not None:
                    ready.append(nxt)
                self.cond.notify_all()

        with ThreadPoolExecutor(max_workers=args.max_parallel) as pool:
            sent_count = 0
            while sent_count < total:
                with self.cond:
                    while not (ready and in_flight < args.max_parallel):
                        if len(done) >= total:
                            break
                        self.cond.wait(0.05)
                    if not ready:
                        break  # a failed request ended a client early
                    index = (
                        self.rng.randrange(len(ready)) if args.ready_queue_policy == "random" else 0
                    )
                    job = ready.pop(index)
                    in_flight += 1
                pool.submit(finish, job, time.perf_counter())
                sent_count += 1
                time.sleep(self._gap())
        return done

    def _gap(self) -> float:
        rate = self.args.request_rate
        if rate <= 0:
            return 0.0
        if self.args.distribution == "poisson":
            return self.rng.expovariate(rate)
        return self.rng.uniform(0, 2 / rate)


# ----------------------------------------------------------------------------- workload


class Workload:
    """Prompts of every client, built from one seed so every server sees the same tokens."""

    def __init__(self, args: argparse.Namespace, vocab: int, seed: int | None = None) -> None:
        self.args = args
        rng = random.Random(args.seed if seed is None else seed)
        # ids 0-3 are special tokens of the bench tokenizer
        self.draw = lambda n: [rng.randrange(4, vocab) for _ in range(n)]
        self.system = self.draw(args.shared_system_prompt) if not args.no_reuse else []
        self.turns = {(c, r): self.draw(args.request_length) for c in range(args.num_clients)
                      for r in range(args.num_rounds)}  # fmt: skip
        self.history: dict[int, list[int]] = {}

    def first(self, client: int) -> Job:
        prompt = self.system + self.turns[(client, 0)]
        self.history[client] = list(prompt)
        return Job(client, 1, prompt)

    def next(self, outcome: Outcome) -> Job | None:
        """The client's next job after ``outcome`` (history + output + new turn), or None."""
        if outcome.round >= self.args.num_rounds:
            return None
        turn = self.turns[(outcome.client, outcome.round)]
        if self.args.no_reuse:
            return Job(outcome.client, outcome.round + 1, list(turn))
        history = self.history[outcome.client]
        history += outcome.output_ids + turn
        return Job(outcome.client, outcome.round + 1, list(history))

    def working_set_tokens(self) -> int:
        """Tokens of every client's final history (the shared prompt counted once)."""
        a = self.args
        if a.no_reuse:
            return a.num_clients * a.num_rounds * a.request_length
        per_client = a.num_rounds * a.request_length + (a.num_rounds - 1) * a.output_length
        return a.shared_system_prompt + a.num_clients * per_client


# ----------------------------------------------------------------------------- metrics


def settled_counters(
    server: SGLangServer, before: dict[str, float], expect_prompt: int
) -> dict[str, float]:
    """Counters once this phase's admissions are exported (prompt_tokens grew by ``expect_prompt``).

    hiradix exports on the scheduler's housekeeping pass, so the last admission of a
    phase may show a moment after its response; wait up to 10 s for it.
    """
    deadline = time.monotonic() + 10
    while True:
        now = server.hiradix_metrics()
        grown = now.get("prompt_tokens", 0) - before.get("prompt_tokens", 0)
        if grown >= expect_prompt or time.monotonic() > deadline:
            if grown < expect_prompt:
                logger.warning("prompt_tokens grew %d of %d expected", grown, expect_prompt)
            return now
        time.sleep(0.2)


def tier_shares(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in TIER_COUNTERS}
    prompt = max(1.0, delta["prompt_tokens"])
    shares = {f"{k[:2]}_share": delta[f"{k[:2]}_hit_tokens"] / prompt for k in ("l1", "l2", "l3")}
    shares["recompute_share"] = max(0.0, 1.0 - sum(shares.values()))
    shares["prompt_tokens"] = delta["prompt_tokens"]
    return shares


def counter_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in sorted(after)}


def pct(values: Sequence[float], q: float) -> float:
    vals = sorted(v for v in values if not math.isnan(v))
    if not vals:
        return float("nan")
    pos = (len(vals) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def summarize(outcomes: list[Outcome], *, busy: bool = False) -> dict[str, Any]:
    """Per-request statistics; throughput is requests over the span from the first send
    to the last completion, or with ``busy`` (one request at a time, as in
    ``--interleave``) over the sum of the latencies: the server's busy time."""
    ok = [o for o in outcomes if o.ok]
    if not ok:
        return {"requests": 0, "failed": len(outcomes)}
    if busy:
        span = sum(o.latency for o in ok)
    else:
        span = max(o.sent + o.latency for o in ok) - min(o.sent for o in ok)
    prompt = sum(o.prompt_tokens for o in ok)
    return {
        "requests": len(ok),
        "failed": len(outcomes) - len(ok),
        "prompt_tokens_mean": prompt / len(ok),
        "ttft_p50_s": pct([o.ttft for o in ok], 0.5),
        "ttft_p90_s": pct([o.ttft for o in ok], 0.9),
        "latency_p50_s": pct([o.latency for o in ok], 0.5),
        "latency_mean_s": sum(o.latency for o in ok) / len(ok),
        "span_s": span,
        "throughput_rps": len(ok) / span if span > 0 else float("nan"),
        "cached_share": sum(o.cached_tokens for o in ok) / max(1, prompt),
    }


class CpuMeter:
    """CPU use during one phase: ours (server tree, redis, this client) vs everyone else's.

    The host is shared: other jobs' CPU time (``other_cores``: average cores busy with
    processes that are not ours, steal included) is what makes two sequential server runs
    incomparable, so each run reports it.
    """

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        import psutil

        self._psutil = psutil
        self._pids = pids
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, dict[int, float]]:
        psutil = self._psutil
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        ours: dict[int, float] = {}
        for pid in {*self._pids(), os.getpid()}:
            try:
                cpu = psutil.Process(pid).cpu_times()
                ours[pid] = cpu.user + cpu.system
            except psutil.Error:
                continue
        return time.monotonic(), busy, ours

    def stop(self) -> dict[str, float]:
        t0, busy0, ours0 = self._start
        t1, busy1, ours1 = self._sample()
        wall = max(1e-9, t1 - t0)
        ours = sum(v - ours0.get(pid, 0.0) for pid, v in ours1.items())
        return {
            "wall_s": wall,
            "machine_busy_cores": (busy1 - busy0) / wall,
            "our_cores": ours / wall,
            "other_cores": max(0.0, busy1 - busy0 - ours) / wall,
        }


def is_hiradix(name: str) -> bool:
    return name in HIRADIX


def thread_cpu(pids: Sequence[int]) -> dict[str, float]:
    """CPU seconds (user + system) so far of every thread of ``pids``, summed by
    ``process name/thread name`` (a process's first thread is ``main``; Linux ``/proc``,
    empty elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out: dict[str, float] = {}
    for pid in pids:
        try:
            proc = Path(f"/proc/{pid}/comm").read_text().strip()
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            if task.name == str(pid):
                name = "main"
            fields = stat[stat.rindex(")") + 2 :].split()
            key = f"{proc}/{name}"
            out[key] = out.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


# ----------------------------------------------------------------------------- servers


def hiradix_config(
    args: argparse.Namespace, store: str, tmp: Path, redis_url: str | None, host_bytes: int
) -> Path:
    if store in ("host", "l1"):
        l3 = "kind: none"
    elif store in ("nvme", "slow"):
        l3 = f"kind: nvme, block_tokens: {args.block_tokens}, nvme: {{path: '{tmp / 'pages'}', size: 16GiB}}"
    else:
        l3 = f"kind: redis, block_tokens: {args.block_tokens}, redis: {{url: '{redis_url}'}}"
    host = 0 if store == "l1" else host_bytes
    text = f"host: {{size: {host}}}\nstore: {{{l3}}}\nprefetch: {{wait: {args.wait}}}\n"
    path = tmp / f"hiradix-{store}.yaml"
    path.write_text(text)
    return path


@contextmanager
def serving(
    name: str, model: Path, args: argparse.Namespace, tmp: Path, host_bytes: int
) -> Iterator[tuple[SGLangServer, dict[str, Any], list[int]]]:
    """One ready server (and its Redis): (server, result dict so far, Redis pids)."""
    with ExitStack() as stack:
        extra: list[str] = []
        config_text = None
        redis: RedisServer | None = None
        if is_hiradix(name):
            store = name.split("_", 1)[1]
            if store == "events":  # hiradix_nvme publishing KV events
                store = "nvme"
            if store == "redis":
                redis = stack.enter_context(RedisServer())
            redis_url = redis.url if redis is not None else None
            (tmp / name).mkdir()
            cfg = hiradix_config(args, store, tmp / name, redis_url, host_bytes)
            config_text = cfg.read_text()
            extra = ["--enable-hiradix", "--hiradix-config", str(cfg)]
        env = {} if args.attention == "sglang" else {cpu_attention.ENV: cpu_attention.MODE}
        if args.tp > 1:  # one scheduler process per rank, each pinned to its own core
            extra += ["--tp-size", str(args.tp)]
            env["SGLANG_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(args.tp))
        if name == "hiradix_slow":
            env[slow_store.ENV] = str(args.slow_store_latency)
        if args.kv_events or name == "hiradix_events":  # SGLang's KV events, PUB on loopback
            endpoint = f"tcp://127.0.0.1:{free_port()}"
            extra += ["--kv-events-config",
                      json.dumps({"publisher": "zmq", "endpoint": endpoint, "bind": True})]  # fmt: skip
        server = SGLangServer(model, extra_args=extra + args.server_arg, log_path=tmp / f"{name}.log",
                              max_total_tokens=args.max_total_tokens, page_size=args.page_size,
                              name=name, env=env)  # fmt: skip
        stack.enter_context(server)
        ready = server.wait_ready(timeout=300)
        print(f"\n== {name}: ready in {ready:.0f} s (log {server.log_path})", flush=True)
        result: dict[str, Any] = {"ready_s": ready, "hiradix_config": config_text}
        redis_pids = [redis.proc.pid] if redis is not None and redis.proc is not None else []
        yield server, result, redis_pids
        result["log_tracebacks"] = server.log_text().count("Traceback")


def run_server(
    name: str, model: Path, args: argparse.Namespace, tmp: Path, host_bytes: int
) -> dict[str, Any]:
    """Start one server (and its Redis), run calibration and the workload, stop it."""
    with serving(name, model, args, tmp, host_bytes) as (server, result, redis_pids):
        if args.calibrate and name == "baseline" and not args.no_reuse:
            result["calibration"] = calibrate(server, args)
        meter = CpuMeter(lambda: server.pids() + redis_pids)
        result.update(run_workload(server, args, hiradix=is_hiradix(name)))
        result["cpu"] = meter.stop()
        print(
            "  cpu: {machine_busy_cores:.2f} cores busy, ours {our_cores:.2f}, "
            "other jobs {other_cores:.2f}".format(**result["cpu"]),
            flush=True,
        )
    return result


def set_running(server: SGLangServer, running: bool) -> None:
    """SIGCONT / SIGSTOP a server's process tree (an idle SGLang scheduler polls its
    queues and keeps a core busy, which would slow whichever server is serving)."""
    import psutil

    for pid in server.pids():
        try:
            proc = psutil.Process(pid)
            proc.resume() if running else proc.suspend()
        except psutil.Error:
            continue


def run_interleaved(
    model: Path, args: argparse.Namespace, tmp: Path, host_bytes: int
) -> dict[str, Any]:
    """Closed loop with every server up at once: each request goes to every server in
    turn (who goes first rotates) while the others are stopped, so this machine's drift
    in speed falls on all servers alike. A server's throughput is its requests over the
    sum of its own latencies (its busy time).

    ``--repeat K`` does it K times, each time with freshly started servers and fresh
    prompts: two server processes doing identical work can differ by several percent for
    their whole life (the ``baseline_b`` A/A control shows how much), so overhead
    figures at the 5% level need more than one process per server. Summaries pool every
    repeat's requests; ``repeats`` keeps each repeat's ratios."""
    names = list(args.servers)
    pooled: dict[str, dict[str, Any]] = {
        n: {"outcomes": [], "busy": 0.0, "threads": {}, "counters": {}, "ready_s": []}
        for n in names
    }
    results: dict[str, Any] = {n: {} for n in names}
    per_repeat: list[dict[str, float]] = []
    for rep in range(args.repeat):
        if args.repeat > 1:
            print(f"\n=== repeat {rep + 1} of {args.repeat}", flush=True)
        once = _interleaved_once(model, args, tmp / f"repeat{rep}", host_bytes, args.seed + rep)
        for name in names:
            mine, acc = once[name], pooled[name]
            acc["outcomes"] += [replace(o, client=o.client + rep * args.num_clients)
                                for o in mine["outcomes"]]  # fmt: skip
            acc["busy"] += mine["busy"]
            acc["ready_s"].append(mine["ready_s"])
            for key in ("threads", "counters"):
                for k, v in mine.get(key, {}).items():
                    acc[key][k] = acc[key].get(k, 0.0) + v
            results[name]["hiradix_config"] = mine["hiradix_config"]
            results[name]["cpu"] = mine["cpu"]
            results[name]["log_tracebacks"] = (
                results[name].get("log_tracebacks", 0) + mine["log_tracebacks"]
            )
        if "baseline" in once:
            per_repeat.append(
                ratios(
                    {n: {"all": summarize(once[n]["outcomes"], busy=True)} for n in names}, "all"
                )
            )
    for name in names:
        acc = pooled[name]
        mine = acc["outcomes"]
        per_request = {k: 1e3 * v / max(1, len(mine)) for k, v in acc["threads"].items()}
        by_thread = {k: round(v, 2) for k, v in sorted(per_request.items(), key=lambda kv: -kv[1])
                     if v >= 0.1}  # fmt: skip
        print(f"  {name}: CPU ms per request {sum(by_thread.values()):.0f}: "
              + ", ".join(f"{k} {v:.1f}" for k, v in list(by_thread.items())[:8]), flush=True)  # fmt: skip
        rounds = [{"round": r, **summarize([o for o in mine if o.round == r], busy=True)}
                  for r in range(1, args.num_rounds + 1)]  # fmt: skip
        results[name].update({
            "ready_s": acc["ready_s"],
            "wall_s": acc["busy"],
            "per_round": rounds,
            "rounds_ge2": summarize([o for o in mine if o.round >= 2], busy=True),
            "all_rounds": summarize(mine, busy=True),
            "failures": [o.error for o in mine if not o.ok][:5],
            "outputs": {f"{o.client}:{o.round}": o.output_ids for o in mine},
            "cpu_ms_per_request": by_thread,
        })  # fmt: skip
        if is_hiradix(name):
            results[name]["tiers_all_rounds"] = tier_shares({}, acc["counters"])
            results[name]["hiradix_counters_delta"] = acc["counters"]
    if "baseline" in pooled:
        base = pooled["baseline"]["outcomes"]
        for name in names:
            if name == "baseline":
                continue
            pairs = [m.ttft / b.ttft for m, b in zip(pooled[name]["outcomes"], base, strict=True)
                     if m.ok and b.ok and b.ttft > 0]  # fmt: skip
            results[name]["paired_ttft_ratio_p50"] = pct(pairs, 0.5)
            print(f"  {name}: median of per-request TTFT ratios to baseline "
                  f"{pct(pairs, 0.5):.3f}", flush=True)  # fmt: skip
    if per_repeat:
        results["repeats"] = per_repeat
        for i, row in enumerate(per_repeat, 1):
            print(f"  repeat {i}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                 if k.endswith(tuple(TAGS.values()))), flush=True)  # fmt: skip
    return results


def _interleaved_once(
    model: Path, args: argparse.Namespace, tmp: Path, host_bytes: int, seed: int
) -> dict[str, dict[str, Any]]:
    """One interleaved run with freshly started servers: per server its outcomes, busy
    time, per-thread CPU seconds and hiradix counter deltas."""
    names = list(args.servers)
    tmp.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, Any]] = {}
    with ExitStack() as stack:
        servers: dict[str, SGLangServer] = {}
        redis_of: dict[str, list[int]] = {}
        for name in names:
            server, result, redis_of[name] = stack.enter_context(
                serving(name, model, args, tmp, host_bytes)
            )
            servers[name], out[name] = server, result
            set_running(server, False)
        for server in servers.values():
            stack.callback(set_running, server, True)
        workload = Workload(args, get_preset(args.preset).vocab_size, seed)
        outcomes: dict[str, list[Outcome]] = {n: [] for n in names}
        busy = dict.fromkeys(names, 0.0)
        start_counters: dict[str, dict[str, float]] = {}
        for name in names:
            if is_hiradix(name):
                set_running(servers[name], True)
                start_counters[name] = servers[name].hiradix_metrics()
                set_running(servers[name], False)
        meter = CpuMeter(lambda: [pid for s in servers.values() for pid in s.pids()])
        threads0 = {n: thread_cpu(servers[n].pids() + redis_of[n]) for n in names}
        t0 = time.perf_counter()
        jobs = [workload.first(c) for c in range(args.num_clients)]
        step = 0
        for rnd in range(1, args.num_rounds + 1):
            follow: list[Job] = []
            for job in jobs:
                order = names[step % len(names) :] + names[: step % len(names)]
                step += 1
                for name in order:
                    set_running(servers[name], True)
                    try:
                        outcome = send(servers[name].base_url, job, args.output_length, busy[name])
                    finally:
                        set_running(servers[name], False)
                    busy[name] += outcome.latency
                    outcomes[name].append(outcome)
                lead = outcomes[names[0]][-1]
                nxt = workload.next(lead) if lead.ok else None
                if nxt is not None:
                    follow.append(nxt)
            jobs = follow
            print(f"  round {rnd}: {len(outcomes[names[0]])} requests per server, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
        cpu = meter.stop()
        for name in names:
            threads1 = thread_cpu(servers[name].pids() + redis_of[name])
            out[name].update({
                "outcomes": outcomes[name],
                "busy": busy[name],
                "cpu": cpu,
                "threads": {k: v - threads0[name].get(k, 0.0) for k, v in threads1.items()},
            })  # fmt: skip
            if is_hiradix(name):
                set_running(servers[name], True)
                end = settled_counters(servers[name], start_counters[name], 0)
                set_running(servers[name], False)
                out[name]["counters"] = counter_delta(start_counters[name], end)
    return out


def calibrate(server: SGLangServer, args: argparse.Namespace) -> list[dict[str, float]]:
    """Cold vs fully cached TTFT (minimum of 2 and 3 runs) of one request on the idle server."""
    rng = random.Random(args.seed + 99)
    rows = []
    for n in args.calibrate_tokens:
        if n >= args.max_total_tokens - 16:
            continue
        prompt = [rng.randrange(4, 4096) for _ in range(n)]
        # minimum of repeats: the host is shared, and the minimum is the least disturbed
        colds = []
        for _ in range(2):
            server.flush_cache()
            colds.append(stream_generate(server.base_url, prompt, 1)[0])
        cold = min(colds)
        warm = [stream_generate(server.base_url, prompt, 1)[0] for _ in range(3)]
        rows.append({"prompt_tokens": n, "cold_ttft_s": cold, "cached_ttft_s": min(warm),
                     "cached_over_cold": min(warm) / cold})  # fmt: skip
        print(f"  calibrate {n:6d} tokens: cold {cold:6.3f} s, fully cached {min(warm):6.3f} s "
              f"({min(warm) / cold:.2f} of cold)", flush=True)  # fmt: skip
    server.flush_cache()
    return rows


def run_workload(
    server: SGLangServer, args: argparse.Namespace, *, hiradix: bool
) -> dict[str, Any]:
    vocab = get_preset(args.preset).vocab_size
    workload = Workload(args, vocab)
    driver = Driver(server.base_url, args, random.Random(args.seed + 1))
    counters = server.hiradix_metrics() if hiradix else {}
    start_counters = dict(counters)
    outcomes: list[Outcome] = []
    per_round_tiers: dict[int, dict[str, float]] = {}
    t0 = time.perf_counter()
    if args.round_barrier:
        jobs = [workload.first(c) for c in range(args.num_clients)]
        for rnd in range(1, args.num_rounds + 1):
            done = driver.run(jobs, len(jobs))
            outcomes += done
            if hiradix:
                after = settled_counters(
                    server, counters, sum(o.prompt_tokens for o in done if o.ok)
                )
                per_round_tiers[rnd] = tier_shares(counters, after)
                counters = after
            jobs = [
                j
                for j in (workload.next(o) for o in sorted(done, key=lambda o: o.client) if o.ok)
                if j
            ]
            print(
                f"  round {rnd}: {len(done)} requests, {time.perf_counter() - t0:.0f} s", flush=True
            )
    else:
        jobs = [workload.first(c) for c in range(args.num_clients)]
        outcomes = driver.run(jobs, args.num_clients * args.num_rounds, follow_up=workload.next)
    wall = time.perf_counter() - t0
    rounds = []
    for rnd in range(1, args.num_rounds + 1):
        row = {"round": rnd, **summarize([o for o in outcomes if o.round == rnd])}
        row.update(per_round_tiers.get(rnd, {}))
        rounds.append(row)
    later = summarize([o for o in outcomes if o.round >= 2])
    if args.round_barrier and later.get("requests"):
        later["span_s"] = sum(r["span_s"] for r in rounds if r["round"] >= 2 and "span_s" in r)
        later["throughput_rps"] = later["requests"] / later["span_s"]
    out: dict[str, Any] = {
        "wall_s": wall,
        "per_round": rounds,
        "rounds_ge2": later,
        "all_rounds": summarize(outcomes),
        "failures": [o.error for o in outcomes if not o.ok][:5],
        "outputs": {f"{o.client}:{o.round}": o.output_ids for o in outcomes},
    }
    if hiradix:
        end = settled_counters(server, start_counters, 0)
        out["tiers_all_rounds"] = tier_shares(start_counters, end)
        out["hiradix_counters_delta"] = counter_delta(start_counters, end)
    return out


# ----------------------------------------------------------------------------- report


def ratio(num: float, den: float) -> float:
    return num / den if den and not math.isnan(den) and not math.isnan(num) else float("nan")


def ratios(results: dict[str, Any], section: str) -> dict[str, float]:
    """Every server / baseline for TTFT p50 and throughput; the unsuffixed keys are the
    worse of hiradix's (the A/A control ``baseline_b`` is reported, not counted)."""
    base = results["baseline"][section]
    out: dict[str, float] = {}
    for name, tag in TAGS.items():
        if name not in results:
            continue
        mine = results[name][section]
        out[f"ttft_p50_ratio_{tag}"] = ratio(mine["ttft_p50_s"], base["ttft_p50_s"])
        out[f"throughput_ratio_{tag}"] = ratio(mine["throughput_rps"], base["throughput_rps"])
    ttft = [v for k, v in out.items() if k.startswith("ttft") and not k.endswith("_aa")]
    thr = [v for k, v in out.items() if k.startswith("throughput") and not k.endswith("_aa")]
    if ttft:
        out["ttft_p50_ratio"] = max(ttft)  # higher TTFT ratio is worse
        out["throughput_ratio"] = min(thr)  # lower throughput ratio is worse
    return out


def output_agreement(results: dict[str, Any]) -> dict[str, float]:
    """Share of requests whose greedy output equals the baseline's (same client and round)."""
    base = results["baseline"]["outputs"]
    agree = {}
    for name in TAGS:
        if name in results:
            mine = results[name]["outputs"]
            same = sum(1 for k, v in mine.items() if base.get(k) == v)
            agree[name] = same / max(1, len(mine))
    return agree


def fmt(value: Any, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def print_tables(results: dict[str, Any], args: argparse.Namespace) -> None:
    head = (f"{'server':14} {'rnd':>3} {'n':>3} {'prompt':>7} {'TTFT p50':>9} {'TTFT p90':>9} "
            f"{'lat p50':>8} {'lat mean':>8} {'req/s':>6} {'cached':>7} {'L1':>6} {'L2':>6} {'L3':>6} {'recomp':>6}")  # fmt: skip
    print("\n" + head + "\n" + "-" * len(head))
    for name in SERVERS:
        if name not in results:
            continue
        rows = [*results[name]["per_round"], {"round": ">=2", **results[name]["rounds_ge2"],
                                               **results[name].get("tiers_all_rounds", {})}]  # fmt: skip
        for row in rows:
            l1 = row.get("l1_share", row.get("cached_share") if not is_hiradix(name) else None)
            print(f"{name:14} {row['round']!s:>3} {row.get('requests', 0):3d} {fmt(row.get('prompt_tokens_mean'), '.0f'):>7} "
                  f"{fmt(row.get('ttft_p50_s'), '.3f'):>9} {fmt(row.get('ttft_p90_s'), '.3f'):>9} "
                  f"{fmt(row.get('latency_p50_s')):>8} {fmt(row.get('latency_mean_s')):>8} {fmt(row.get('throughput_rps')):>6} "
                  f"{fmt(row.get('cached_share'), '.0%'):>7} {fmt(l1, '.0%'):>6} {fmt(row.get('l2_share'), '.0%'):>6} "
                  f"{fmt(row.get('l3_share'), '.0%'):>6} {fmt(row.get('recompute_share'), '.0%'):>6}")  # fmt: skip
    print("(tier columns of the '>=2' rows: hiradix counters over all rounds)")
    if "baseline" not in results:
        return
    print(f"\n{'ratio hiradix/SGLang':24} " + " ".join(f"{'rnd ' + str(r):>8}" for r in range(1, args.num_rounds + 1))
          + f" {'>=2' if not args.no_reuse else 'all':>8}")  # fmt: skip
    section = "all_rounds" if args.no_reuse else "rounds_ge2"
    summary = ratios(results, section)
    for name, tag in TAGS.items():
        if name not in results:
            continue
        for metric, key in (("TTFT p50", "ttft_p50_s"), ("throughput", "throughput_rps")):
            cells = [
                ratio(m[key], b[key])
                for m, b in zip(results[name]["per_round"], results["baseline"]["per_round"])
            ]
            total = summary[f"{'ttft_p50' if key.startswith('ttft') else 'throughput'}_ratio_{tag}"]
            print(
                f"{tag + ' ' + metric:24} "
                + " ".join(f"{fmt(c):>8}" for c in cells)
                + f" {fmt(total):>8}"
            )


def goals(summary: dict[str, float], no_reuse: bool) -> dict[str, Any]:
    if no_reuse:
        return {
            "ttft_within_5pct": summary.get("ttft_p50_ratio", float("nan")) <= 1.05,
            "throughput_within_5pct": summary.get("throughput_ratio", float("nan")) >= 0.95,
        }
    return {
        "ttft_p50_3x_lower": summary.get("ttft_p50_ratio", float("nan")) <= 1 / 3,
        "throughput_2x": summary.get("throughput_ratio", float("nan")) >= 2.0,
    }


def machine() -> dict[str, Any]:
    model = ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in lscpu.splitlines()
                if ln.startswith("Model name")
            ),
            "",
        )
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as fh:
            mem = int(fh.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "mem_gib": round(mem / 2**30, 1),
            "loadavg_start": os.getloadavg(), "python": platform.python_version()}  # fmt: skip


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True, help="where to write results")
    p.add_argument("--num-clients", type=int, default=16)
    p.add_argument("--num-rounds", type=int, default=6)
    p.add_argument("--request-length", type=int, default=1024, help="tokens of each new user turn")
    p.add_argument(
        "--output-length",
        type=int,
        default=8,
        help="greedy tokens per request (8: a CPU decode step takes ~50 ms here, so 8 tokens "
        "keep decode:prefill time near a GPU's for 32-64 tokens)",
    )
    p.add_argument(
        "--shared-system-prompt",
        type=int,
        default=0,
        help="tokens of a prompt common to every client",
    )
    p.add_argument(
        "--request-rate", type=float, default=4.0, help="mean requests per second (0: no gaps)"
    )
    p.add_argument("--distribution", choices=("poisson", "uniform"), default="poisson")
    p.add_argument("--max-parallel", type=int, default=16, help="requests in flight at most")
    p.add_argument("--ready-queue-policy", choices=("random", "fifo"), default="random")
    p.add_argument("--round-barrier", action=argparse.BooleanOptionalAction, default=True,
                   help="wait for every client's round before the next (per-round tier counters)")  # fmt: skip
    p.add_argument(
        "--no-reuse", action="store_true", help="fresh random prompts only: hiradix's overhead"
    )
    p.add_argument(
        "--max-total-tokens",
        type=int,
        default=12288,
        help="L1 (device KV pool) tokens, all servers",
    )
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--block-tokens", type=int, default=64, help="hiradix store.block_tokens")
    p.add_argument("--host-size", default="auto",
                   help="hiradix host.size in bytes; auto: max(4 x L1, 1.25 x working set)")  # fmt: skip
    p.add_argument("--servers", nargs="+", choices=SERVERS,
                   default=["baseline", "hiradix_nvme", "hiradix_redis"])  # fmt: skip
    p.add_argument("--wait", choices=("best_effort", "wait_complete", "timeout"),
                   default="timeout", help="hiradix prefetch.wait")  # fmt: skip
    p.add_argument("--preset", default="bench", help="model preset of build_tiny_model")
    p.add_argument(
        "--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "hiradix-bench-model"
    )
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="cold vs fully cached TTFT on the idle baseline server first")  # fmt: skip
    p.add_argument("--calibrate-tokens", type=int, nargs="+", default=[1536, 3072, 6144])
    p.add_argument(
        "--server-arg", action="append", default=[], help="extra sglang flag (repeatable)"
    )
    p.add_argument("--attention", choices=("new_queries", "sglang"), default="new_queries",
                   help="CPU extend attention of every server: new_queries computes only the "
                   "new tokens' queries, as GPU backends do (hiradix.integration.sglang."
                   "cpu_attention); sglang: torch_native as shipped (pads to the whole sequence)")  # fmt: skip
    p.add_argument("--slow-store-latency", type=float, default=0.5,
                   help="seconds the hiradix_slow server's store adds to every call")  # fmt: skip
    p.add_argument("--interleave", action="store_true",
                   help="closed loop with every server up at once, each request sent to every "
                   "server in turn (the others stopped): ratios free of this machine's drift")  # fmt: skip
    p.add_argument("--repeat", type=int, default=1,
                   help="with --interleave: run it this many times, each with freshly started "
                   "servers and fresh prompts, and pool the requests (one server process can be "
                   "several percent faster or slower than another for its whole life)")  # fmt: skip
    p.add_argument("--keep-tmp", action="store_true", help="keep server logs and stores")
    p.add_argument("--kv-events", action="store_true",
                   help="every server publishes KV events (--kv-events-config, ZMQ PUB on a "
                   "loopback port, nothing subscribed): compare a run with and without")  # fmt: skip
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel size of every server (--tp-size; rank i on core i)")  # fmt: skip
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


def host_bytes_for(args: argparse.Namespace, working_set: int, kv_bytes: int) -> int:
    if args.host_size != "auto":
        return int(args.host_size)
    tokens = max(4 * args.max_total_tokens, int(1.25 * working_set))
    return -(-tokens * kv_bytes // MIB) * MIB


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = build_tiny_model(args.model_dir, preset=args.preset)
    kv_bytes = kv_bytes_per_token(args.preset)
    working_set = Workload(args, get_preset(args.preset).vocab_size).working_set_tokens()
    host_bytes = host_bytes_for(args, working_set, kv_bytes)
    tmp = Path(tempfile.mkdtemp(prefix="bench-multiturn-"))
    print(f"model {args.preset}: {kv_bytes} KV bytes/token; L1 {args.max_total_tokens} tokens "
          f"({args.max_total_tokens * kv_bytes / MIB:.0f} MiB); working set {working_set} tokens "
          f"= {working_set / args.max_total_tokens:.1f} x L1; hiradix host {host_bytes / MIB:.0f} MiB "
          f"({host_bytes // kv_bytes} tokens); logs in {tmp}", flush=True)  # fmt: skip
    data: dict[str, Any] = {
        "benchmark": "multiturn" + ("_no_reuse" if args.no_reuse else ""),
        "argv": sys.argv[1:],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(),
        "model": {
            "preset": args.preset,
            **asdict(get_preset(args.preset)),
            "kv_bytes_per_token": kv_bytes,
        },
        "working_set_tokens": working_set,
        "working_set_over_l1": working_set / args.max_total_tokens,
        "host_bytes": host_bytes,
        "rounds": list(range(1, args.num_rounds + 1)),
    }
    t0 = time.perf_counter()
    try:
        if args.interleave:
            data.update(run_interleaved(model, args, tmp, host_bytes))
        else:
            for name in args.servers:
                data[name] = run_server(name, model, args, tmp, host_bytes)
    finally:
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    data["total_wall_s"] = time.perf_counter() - t0
    data["machine"]["loadavg_end"] = os.getloadavg()
    print_tables(data, args)
    if "baseline" in data:
        summary = ratios(data, "all_rounds" if args.no_reuse else "rounds_ge2")
        data.update(summary)
        data["ratio_section"] = "all_rounds" if args.no_reuse else "rounds_ge2"
        data["goals"] = goals(summary, args.no_reuse)
        # other jobs on a shared host slow whichever server they overlap: flag the run
        other = max(data[n]["cpu"]["other_cores"] for n in SERVERS if n in data)
        data["max_other_cores"] = other
        data["goals"]["host_quiet"] = other <= NOISY_OTHER_CORES
        if other > NOISY_OTHER_CORES:
            print(f"WARNING: other jobs used up to {other:.2f} cores during a server run; "
                  "ratios are not reliable (repeat on a quiet host)")  # fmt: skip
        data["outputs_equal_to_baseline"] = output_agreement(data)
    if "hiradix_slow" in data and "hiradix_host" in data:
        section = "all_rounds" if args.no_reuse else "rounds_ge2"
        slow, host = data["hiradix_slow"][section], data["hiradix_host"][section]
        over = ratio(slow["ttft_p50_s"], host["ttft_p50_s"])
        data["slow_store_ttft_p50_over_recompute"] = over
        counters = data["hiradix_slow"].get("hiradix_counters_delta", {})
        print(f"slow store ({args.slow_store_latency} s a call) TTFT p50 / recomputing "
              f"(hiradix_host): {over:.3f}; loads skipped for recomputing: "
              f"{counters.get('recompute_instead_of_load', 0):.0f}, L3 hit tokens: "
              f"{counters.get('l3_hit_tokens', 0):.0f}", flush=True)  # fmt: skip
    for name in SERVERS:
        if name in data:
            data[name].pop("outputs", None)
    return data


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.max_parallel < 1 or args.num_clients < 1 or args.num_rounds < 1:
        raise SystemExit("--max-parallel, --num-clients and --num-rounds must be >= 1")
    if args.repeat < 1 or (args.repeat > 1 and not args.interleave):
        raise SystemExit("--repeat needs --interleave and must be >= 1")
    if args.interleave and (args.max_parallel != 1 or args.request_rate != 0):
        raise SystemExit(
            "--interleave is a closed loop: it needs --max-parallel 1 --request-rate 0"
        )
    data = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2, default=float) + "\n", encoding="utf-8")
    brief = {
        k: data[k]
        for k in data
        if k.startswith(("ttft_p50_ratio", "throughput_ratio", "goals", "outputs_equal"))
    }
    print("\n" + json.dumps(brief, indent=2))
    print(f"wrote {args.json} ({data['total_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
