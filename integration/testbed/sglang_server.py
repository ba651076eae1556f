"""Start and drive real SGLang servers on a CPU-only machine (tests, ``make demo``, benchmarks).

The parent process imports no sglang: each server is ``python -m sglang.launch_server``
in its own process group (launcher, ``sglang::scheduler`` and ``sglang::detokenizer``),
with the environment from :func:`cpu_server_env`. Requests go over HTTP
(``/generate`` with ``input_ids``, greedy), so a test sees exactly what a client sees.

The testbed's patches (:mod:`.cpu_attention`, :mod:`.slow_store`) reach only the servers
started here: :func:`cpu_server_env` puts ``sglang_plugins/`` first on ``PYTHONPATH``, a
directory holding nothing but a ``hiradix_testbed-0.dist-info`` whose entry points join
the ``sglang.srt.plugins`` group. SGLang's ``load_plugins()`` then runs them in the
launcher, in each spawned scheduler and in the detokenizer (children inherit the
environment), exactly as it runs hiradix's own plugin; an installed hiradix declares no
entry point but its own, so a user's server never imports them.

Typical use::

    model = build_tiny_model(tmp / "tiny")
    with SGLangServer(model, log_path=tmp / "server.log") as server:
        server.wait_ready()
        first = server.generate(prompt, max_new_tokens=8)
        again = server.generate(prompt, max_new_tokens=8)
        assert again.cached_tokens > 0 and again.output_ids == first.output_ids

Verified on sglang 0.5.23 (CPU, ``SGLANG_USE_CPU_ENGINE=1``): ``/health_generate``
returns 503 until the warm-up request has run and 200 after; ``/generate``,
``/flush_cache``, ``/abort_request`` and ``/metrics`` (needs ``--enable-metrics``,
which ``SGLangServer`` passes) all exist. SIGTERM to the launcher shuts the whole tree
down; SIGTERM to the whole group makes the launcher see its scheduler "crash" and
sleep 5 s before cleaning up, so :meth:`SGLangServer.stop` signals the launcher first.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)

#: Stand-ins live beside this file in ``cpu_standins/`` (a checkout; they are never
#: installed). ``HIRADIX_CPU_STANDINS_DIR`` overrides it for installs that are not a checkout.
_STANDINS_DIR = Path(__file__).resolve().parent / "cpu_standins"

#: On ``PYTHONPATH`` of every server the testbed starts: its ``*.dist-info`` declares the
#: testbed's ``sglang.srt.plugins`` entry points (each a no-op without its variable).
PLUGINS_DIR = Path(__file__).resolve().parent / "sglang_plugins"

#: module name -> directory (under cpu_standins/) that holds its import-only stand-in.
STANDINS: dict[str, str] = {
    "torchvision": "torchvision_standin",
    "sgl_kernel": "sgl_kernel_standin",
}

LOG_TAIL_LINES = 60
_HIRADIX_SERIES = re.compile(r"^hiradix_(\w+?)(?:_total)?\{[^}]*\} ([0-9.e+-]+)$")


class ServerError(RuntimeError):
    """The server process died, never became ready, or answered with an HTTP error."""


@dataclass(frozen=True, slots=True)
class GenerateResult:
    """One finished ``/generate`` request. ``meta`` is sglang's ``meta_info`` as sent."""

    output_ids: list[int]
    cached_tokens: int
    meta: dict[str, Any] = field(repr=False)

    @property
    def latency_s(self) -> float:
        """Server-side end-to-end latency (``meta_info.e2e_latency``), or NaN if absent."""
        return float(self.meta.get("e2e_latency", float("nan")))


def standins_root() -> Path:
    """Directory that holds the stand-in directories (see ``cpu_standins/README.md``)."""
    return Path(os.environ.get("HIRADIX_CPU_STANDINS_DIR", _STANDINS_DIR))


def needed_standin_dirs() -> list[Path]:
    """Stand-in directories for the modules that this interpreter cannot import for real.

    A module counts as really installed if ``importlib.util.find_spec`` finds it outside
    ``standins_root()`` (so a parent that already runs with stand-ins on ``sys.path`` still
    gives the right answer). A real install always wins: its stand-in is left out.
    """
    root = standins_root().resolve()
    needed = []
    for module, subdir in STANDINS.items():
        spec = importlib.util.find_spec(module)
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if origin is not None and root not in origin.parents:
            continue
        standin = root / subdir
        if not (standin / module / "__init__.py").is_file():
            raise FileNotFoundError(
                f"{module} is not installed and its CPU stand-in {standin} is missing; "
                "set HIRADIX_CPU_STANDINS_DIR to the checkout's integration/testbed/cpu_standins/"
            )
        needed.append(standin)
    return needed


def cpu_server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a CPU SGLang server: ``os.environ`` plus the CPU settings.

    Sets ``SGLANG_USE_CPU_ENGINE=1`` (else sglang takes the CUDA path), offline hub
    flags, hides GPUs, and prepends only the needed stand-in dirs to ``PYTHONPATH``.
    ``extra`` is applied last and wins, except that :data:`PLUGINS_DIR` is put first on
    whatever ``PYTHONPATH`` results (the testbed's patches load only through it).
    """
    env = dict(os.environ)
    env.update(
        {
            "SGLANG_USE_CPU_ENGINE": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": "",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",  # log lines reach the file as they happen
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
    )
    paths = [str(p) for p in needed_standin_dirs()]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    if extra:
        env.update(extra)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(PLUGINS_DIR), *paths])
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def checkpoint_dtype(model_dir: str | os.PathLike[str]) -> str | None:
    """The ``dtype`` (or legacy ``torch_dtype``) in ``model_dir/config.json``, if any."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    dtype = config.get("dtype") or config.get("torch_dtype")
    return str(dtype) if dtype else None


def wait_for(check: Callable[[], Any], what: str, timeout: float = 60.0) -> None:
    """Poll ``check`` every 0.25 s until it returns something true; ``AssertionError``
    naming ``what`` after ``timeout`` seconds (servers publish metrics and events late)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting until {what}")


class SGLangServer:
    """One ``sglang.launch_server`` process tree on CPU; a context manager that stops it.

    ``start()`` returns at once; call ``wait_ready()`` before sending requests.
    HTTP methods may be called from any thread (``generate_many`` does).
    ``dtype="checkpoint"`` (default) serves in the dtype of the model's config.json,
    ``None`` leaves sglang's ``auto`` (float32 checkpoints become float16), any other
    string is passed as ``--dtype``. ``extra_args`` are appended last.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        max_total_tokens: int = 4096,
        page_size: int = 1,
        skip_tokenizer_init: bool = True,
        dtype: str | None = "checkpoint",
        enable_metrics: bool = True,
        name: str = "sglang",
    ) -> None:
        self.model_dir = Path(model_dir)
        self.port = port if port is not None else free_port()
        self.extra_args = list(extra_args)
        self.env = dict(env) if env else None
        self.max_total_tokens = max_total_tokens
        self.page_size = page_size
        self.skip_tokenizer_init = skip_tokenizer_init
        self.dtype = dtype
        self.enable_metrics = enable_metrics
        self.name = name
        if log_path is None:
            log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"{name}-{self.port}.log"
        self.log_path = Path(log_path)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None
        self.ready_after_s: float | None = None
        # psutil.Process objects, not bare PIDs: they detect PID reuse, so stop() never
        # signals an unrelated process that inherited a dead child's PID.
        self._children: dict[int, Any] = {}

    # -- lifecycle ---------------------------------------------------------------------

    def command(self) -> list[str]:
        """The full launch command line."""
        cmd = [
            sys.executable, "-m", "sglang.launch_server",
            "--model-path", str(self.model_dir),
            "--device", "cpu",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--attention-backend", "torch_native",
            "--max-total-tokens", str(self.max_total_tokens),
            "--page-size", str(self.page_size),
            "--log-level", "info",
        ]  # fmt: skip
        dtype = checkpoint_dtype(self.model_dir) if self.dtype == "checkpoint" else self.dtype
        if dtype:
            # sglang's --dtype auto turns a float32 checkpoint into float16.
            cmd += ["--dtype", dtype]
        if self.skip_tokenizer_init:
            cmd.append("--skip-tokenizer-init")
        if self.enable_metrics:
            cmd.append("--enable-metrics")
        return cmd + self.extra_args

    def start(self) -> SGLangServer:
        """Launch the server (non-blocking). Raises ``ServerError`` if already started."""
        if self.proc is not None:
            raise ServerError(f"{self.name} already started (pid {self.proc.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = cpu_server_env(self.env)
        cmd = self.command()
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(cmd)}\n".encode())
            log.flush()
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: stop() reaches every child
            )
        logger.info("%s: pid %d port %d log %s", self.name, self.proc.pid, self.port, self.log_path)
        return self

    def wait_ready(self, timeout: float = 300.0) -> float:
        """Block until ``/health_generate`` answers 200; return seconds since ``start()``.

        Fails fast with the log tail if the process exits, and after ``timeout`` s.
        """
        proc = self._require_proc()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServerError(self._failure(f"exited with code {proc.returncode} before ready"))
            try:
                status, _ = self._request("GET", "/health_generate", timeout=10)
                if status == 200:
                    self.ready_after_s = time.monotonic() - (self.started_at or 0.0)
                    self._remember_children()
                    return self.ready_after_s
            except (OSError, ServerError):
                pass  # not listening yet, or 503 while warming up
            time.sleep(0.5)
        raise ServerError(self._failure(f"not ready after {timeout:.0f} s"))

    def stop(self, timeout: float = 30.0) -> int:
        """Stop the whole process tree; return the launcher's exit code.

        SIGTERM to the launcher (which shuts its children down), then SIGTERM and finally
        SIGKILL to the process group and any child seen earlier. Leaves no process behind.
        """
        if self.proc is None:
            return 0
        proc = self.proc
        self._remember_children()
        if proc.poll() is None:
            _signal_pid(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s: no exit %.0f s after SIGTERM; killing", self.name, timeout)
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self._reap_children(grace_s=5.0)
        return int(proc.returncode)

    def __enter__(self) -> SGLangServer:  # noqa: PYI034 - Python 3.10 has no Self
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def pids(self) -> list[int]:
        """Live PIDs of the launcher and its descendants, including children seen earlier
        that have since been re-parented (for leak checks)."""
        self._remember_children()
        live = [p.pid for p in self._children.values() if _alive(p)]
        if self.proc is not None and self.proc.poll() is None:
            live.append(self.proc.pid)
        return sorted(live)

    # -- requests ----------------------------------------------------------------------

    def generate(
        self,
        input_ids: Sequence[int],
        max_new_tokens: int = 16,
        *,
        rid: str | None = None,
        ignore_eos: bool = True,
        timeout: float = 120.0,
    ) -> GenerateResult:
        """Greedy ``/generate`` on token ids. ``ignore_eos`` keeps output lengths fixed."""
        payload = {
            "input_ids": [int(t) for t in input_ids],
            "sampling_params": {
                "temperature": 0,
                "max_new_tokens": max_new_tokens,
                "ignore_eos": ignore_eos,
            },
            "rid": rid or uuid.uuid4().hex,
        }
        _, body = self._request("POST", "/generate", payload, timeout=timeout, check=True)
        data = json.loads(body)
        meta = data.get("meta_info", {})
        return GenerateResult(
            output_ids=list(data["output_ids"]),
            cached_tokens=int(meta.get("cached_tokens", 0)),
            meta=meta,
        )

    def generate_many(
        self,
        prompts: Sequence[Sequence[int]],
        concurrency: int = 8,
        max_new_tokens: int = 16,
        *,
        timeout: float = 300.0,
    ) -> list[GenerateResult]:
        """``generate`` for each prompt with up to ``concurrency`` in flight; results in order."""
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            futures = [
                pool.submit(self.generate, prompt, max_new_tokens, timeout=timeout)
                for prompt in prompts
            ]
            return [future.result() for future in futures]

    def abort(self, rid: str) -> None:
        """Ask the server to abort request ``rid`` (``/abort_request``; unknown rids are fine)."""
        self._request("POST", "/abort_request", {"rid": rid}, timeout=30, check=True)

    def flush_cache(self) -> bool:
        """``/flush_cache``; False when the server refuses (requests running or waiting)."""
        status, _ = self._request("POST", "/flush_cache", timeout=60)
        return status == 200

    def get_metrics_text(self) -> str:
        """Prometheus text from ``/metrics`` (needs ``enable_metrics=True``, the default)."""
        _, body = self._request("GET", "/metrics", timeout=30, check=True)
        return body.decode()

    def hiradix_metrics(self) -> dict[str, float]:
        """hiradix's Prometheus series summed over label sets, keyed without the
        ``hiradix_`` prefix and ``_total`` suffix (e.g. ``l2_hit_tokens``)."""
        out: dict[str, float] = {}
        for line in self.get_metrics_text().splitlines():
            m = _HIRADIX_SERIES.match(line)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
        return out

    def get_model_info(self) -> dict[str, Any]:
        """``/get_model_info`` as a dict."""
        _, body = self._request("GET", "/get_model_info", timeout=30, check=True)
        return dict(json.loads(body))

    def log_text(self) -> str:
        """The whole server log so far ('' before the first start)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- internals ---------------------------------------------------------------------

    def _require_proc(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise ServerError(f"{self.name} not started; call start() first")
        return self.proc

    def _request(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        timeout: float,
        check: bool = False,
    ) -> tuple[int, bytes]:
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as err:
            body = err.read()
            if check:
                raise ServerError(
                    f"{self.name}: {method} {path} -> HTTP {err.code}: {body[:500]!r} "
                    f"(log: {self.log_path})"
                ) from None
            return int(err.code), body

    def _failure(self, what: str) -> str:
        tail = "\n".join(self.log_text().splitlines()[-LOG_TAIL_LINES:])
        return f"{self.name} {what}; log: {self.log_path}\n--- log tail ---\n{tail}"

    def _remember_children(self) -> None:
        import psutil

        if self.proc is None:
            return
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            self._children.setdefault(child.pid, child)

    def _reap_children(self, grace_s: float) -> None:
        """SIGTERM, then SIGKILL, whatever is left of the group or of the children seen."""
        import psutil

        if self.proc is None:
            return
        pgid = self.proc.pid
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (
            _group_alive(pgid) or any(_alive(p) for p in self._children.values())
        ):
            time.sleep(0.1)
        _signal_group(pgid, signal.SIGKILL)
        for child in self._children.values():
            if _alive(child):
                logger.warning("%s: child %d outlived its group; SIGKILL", self.name, child.pid)
                with contextlib.suppress(psutil.Error):  # gone meanwhile
                    child.kill()  # psutil checks the PID was not reused


def _signal_pid(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    """True while a non-zombie process is in group ``pgid`` (zombies await a reaper)."""
    import psutil

    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, PermissionError):
            continue
    return False


def _alive(process: Any) -> bool:
    """True while a ``psutil.Process`` runs (same PID *and* start time) and is no zombie."""
    import psutil

    try:
        return bool(process.is_running()) and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
