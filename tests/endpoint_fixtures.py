"""Loopback endpoints for `generate.engine: openai` tests: the minimal server as a subprocess, and a fault proxy."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

SERVER = Path(__file__).with_name("minimal_openai_server.py")
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A free port between Ray's worker ports (10002-19999) and the kernel's ephemeral range (32768+): a server
    restarted on it after a crash must not find it taken by a Ray worker or a client connection meanwhile."""
    import random

    for port in random.sample(range(20000, 32000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


class LoopbackServer:
    """`tests/minimal_openai_server.py` in its own process group on a fixed port; start/kill/restart it."""

    def __init__(self, model: Path, log_dir: Path, *flags: str, port: int | None = None):
        self.model, self.flags, self.log_dir = model, list(flags), log_dir
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, *extra: str, timeout: float = 180) -> "LoopbackServer":
        self.starts += 1
        log = open(self.log_dir / f"server-{self.port}-{self.starts}.log", "w")
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(SERVER), "--model", str(self.model), "--port", str(self.port),
                                      *self.flags, *extra], stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.base_url}/models", timeout=2)
                return self
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"loopback server did not start; see {log.name}:\n{Path(log.name).read_text()[-2000:]}")
                time.sleep(0.5)

    def wait_dead(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@contextlib.contextmanager
def loopback_server(model: Path, log_dir: Path, *flags: str):
    server = LoopbackServer(model, log_dir, *flags).start()
    try:
        yield server
    finally:
        server.stop()


class FaultProxy:
    """An HTTP proxy on loopback that injects faults into POST /v1/completions, by request number n (1-based):

    n % 5 == 1  -> 429 Too Many Requests (with `Retry-After: 0` every other time)
    n % 5 == 3  -> the connection is dropped before the request is forwarded
    n % 7 == 4  -> forwarded, then the connection is dropped instead of the answer (the server did the work)
    n % 11 == 6 -> 503
    Everything else (and every other route) is forwarded as it is.
    """

    def __init__(self, upstream_port: int):
        self.upstream, self.counts, self.lock = upstream_port, {"requests": 0, "429": 0, "drop_before": 0,
                                                               "drop_after": 0, "503": 0, "forwarded": 0}, threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _forward(self, body: bytes | None) -> tuple[int, list, bytes]:
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream, timeout=300)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                return resp.status, resp.getheaders(), data

            def _reply(self, status: int, headers: list, data: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("content-length", "connection", "transfer-encoding", "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _drop(self) -> None:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

            def do_GET(self):  # noqa: N802
                self._reply(*self._forward(None))

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if not self.path.endswith("/completions"):
                    return self._reply(*self._forward(body))
                with proxy.lock:
                    proxy.counts["requests"] += 1
                    n = proxy.counts["requests"]
                if n % 5 == 1:
                    proxy._count("429")
                    extra = [("Retry-After", "0")] if n % 10 == 1 else []
                    return self._reply(429, [("Content-Type", "application/json"), *extra], b'{"error": {"message": "slow down"}}')
                if n % 5 == 3:
                    proxy._count("drop_before")
                    return self._drop()
                if n % 11 == 6:
                    proxy._count("503")
                    return self._reply(503, [("Content-Type", "application/json")], b'{"error": {"message": "overloaded"}}')
                status, headers, data = self._forward(body)
                if n % 7 == 4:
                    proxy._count("drop_after")
                    return self._drop()
                proxy._count("forwarded")
                self._reply(status, headers, data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
