"""Issue 16 item 7: ``rediss://`` against a real TLS-only redis-server.

The test makes its own PKI with openssl (a CA, a server certificate for ``localhost``, a
client certificate, and an unrelated CA) and starts ``redis-server --port 0 --tls-port P
--tls-auth-clients yes``: no plain-text port at all. It covers verification on and off,
the required client certificate, a wrong CA, a wrong host name and a missing CA file.
Every failure must reach the caller as ``StoreUnavailable`` (the tier's miss) with a
message that says what went wrong, never as another exception.
"""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hiradix.backends.base import PageStore, make_key
from hiradix.backends.redis_store import RedisStore
from hiradix.backends.registry import create_store
from hiradix.integration.testbed.redis_servers import free_port, require_binary

from hiradix.config import parse_config
from hiradix.errors import StoreUnavailable

logger = logging.getLogger(__name__)

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed"),
]

NS = "cd" * 16


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN=hiradix test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)  # fmt: skip
    return cert, key


def _make_leaf(
    directory: Path, name: str, ca: tuple[Path, Path], extensions: str
) -> tuple[Path, Path]:
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.crt"
    ext = directory / f"{name}.ext"
    ext.write_text(extensions)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", csr, "-subj", f"/CN={name}", cwd=directory)  # fmt: skip
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", ext, cwd=directory)  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = _make_ca(directory, "ca")
    server = _make_leaf(directory, "server", ca,
                        "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n")  # fmt: skip
    client = _make_leaf(directory, "client", ca, "extendedKeyUsage=clientAuth\n")
    other_ca, _ = _make_ca(directory, "other-ca")
    return Pki(ca[0], server[0], server[1], client[0], client[1], other_ca)


def _handshake_ok(port: int, pki: Pki) -> bool:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"PING\r\n")
            return tls.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="module")
def tls_port(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A TLS-only redis-server that requires client certificates."""
    workdir = tmp_path_factory.mktemp("redis-tls")
    port = free_port()
    args = [require_binary("redis-server"), "--port", "0", "--tls-port", str(port),
            "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir),
            "--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key),
            "--tls-ca-cert-file", str(pki.ca), "--tls-auth-clients", "yes"]  # fmt: skip
    log = workdir / "redis.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not _handshake_ok(port, pki):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"TLS redis-server did not come up: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _store(port: int, host: str = "localhost", **tls: Any) -> PageStore:
    """A store built the way the server builds it: from a parsed config."""
    cfg = parse_config({"store": {"kind": "redis", "redis": {
        "url": f"rediss://{host}:{port}/0", "timeout": "2s", "tls": tls}}})  # fmt: skip
    store = create_store(cfg.store)
    assert isinstance(store, RedisStore)
    return store


def _key(i: int) -> Any:
    return make_key("hiradix:", NS, f"{i:064x}")


def _round_trip(store: PageStore) -> None:
    blob = bytes(range(256)) * 64
    assert store.put_many([(_key(1), blob), (_key(2), b"x")], ttl=60.0) == [True, True]
    assert store.get_many([_key(1), _key(3)], refresh_ttl=60.0) == [blob, None]
    assert store.exists_many([_key(1), _key(2), _key(3)]) == [True, True, False]
    assert sorted(store.scan(NS)) == sorted([_key(1), _key(2)])
    assert store.delete_many([_key(1), _key(2)]) == 2


def _every_operation_is_unavailable(store: PageStore, why: str) -> None:
    """Every call fails with StoreUnavailable (nothing else), and says ``why``."""
    calls: list[Callable[[], object]] = [
        lambda: store.put_many([(_key(1), b"x")], ttl=60.0),
        lambda: store.get_many([_key(1)]),
        lambda: store.get_many_into([_key(1)], []),
        lambda: store.exists_many([_key(1)]),
        lambda: store.delete_many([_key(1)]),
        lambda: list(store.scan()),
        lambda: store.stats(),
    ]
    for call in calls:
        with pytest.raises(StoreUnavailable) as info:
            call()
        message = str(info.value)
        assert why in message.lower(), message
        assert "rediss://localhost" in message or "rediss://127.0.0.1" in message
    store.close()


def test_verify_on_with_ca_and_client_certificate(pki: Pki, tls_port: int) -> None:
    store = _store(tls_port, ca_file=str(pki.ca), cert_file=str(pki.client_cert),
                   key_file=str(pki.client_key), verify=True)  # fmt: skip
    _round_trip(store)
    store.close()


def test_verify_off_accepts_a_server_it_cannot_verify(pki: Pki, tls_port: int) -> None:
    """verify: false with no CA (the server's CA is unknown to the client) and a host
    name the certificate does not carry: still encrypted, not authenticated."""
    store = _store(tls_port, host="127.0.0.1", cert_file=str(pki.client_cert),
                   key_file=str(pki.client_key), verify=False)  # fmt: skip
    _round_trip(store)
    store.close()


def test_client_certificate_is_required(pki: Pki, tls_port: int) -> None:
    """The server runs with --tls-auth-clients yes: without a client certificate the
    handshake is refused, and that is an outage (a miss), not a crash."""
    store = _store(tls_port, ca_file=str(pki.ca), verify=True)
    _every_operation_is_unavailable(store, "no client certificate is configured")


def test_wrong_ca_is_a_clear_error_and_a_miss(pki: Pki, tls_port: int) -> None:
    store = _store(tls_port, ca_file=str(pki.other_ca), cert_file=str(pki.client_cert),
                   key_file=str(pki.client_key), verify=True)  # fmt: skip
    _every_operation_is_unavailable(store, "certificate verify failed")


def test_wrong_host_name_is_a_clear_error_and_a_miss(pki: Pki, tls_port: int) -> None:
    """The certificate names localhost only; verification checks the host name too."""
    store = _store(tls_port, host="127.0.0.1", ca_file=str(pki.ca),
                   cert_file=str(pki.client_cert), key_file=str(pki.client_key))  # fmt: skip
    _every_operation_is_unavailable(store, "127.0.0.1")


def test_missing_ca_file_is_a_clear_error_and_a_miss(
    pki: Pki, tls_port: int, tmp_path: Path
) -> None:
    missing = tmp_path / "nope" / "ca.pem"
    store = _store(tls_port, ca_file=str(missing), cert_file=str(pki.client_cert),
                   key_file=str(pki.client_key))  # fmt: skip
    _every_operation_is_unavailable(store, "no such file")
