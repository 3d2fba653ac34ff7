"""
A real redis-server (Debian's package) for the cluster tests: on a free
port of 127.0.0.1, in a directory of the test's own, without persistence,
stopped when the test ends.
"""
from __future__ import annotations

import os
import select
import shutil
import subprocess
import threading
import time

from tests.common import WAIT_SECONDS, free_tcp_port

#: What redis-server prints once it takes connections.
_READY = b"Ready to accept connections"


class RedisServer:
    """
    @ivar url: the C{redis://} URL of its database 0; with C{tls}, the
        C{rediss://} URL with its password and the CA that signed its
        certificate.
    """

    def __init__(self, testcase, tls: bool = False) -> None:
        self._binary = shutil.which("redis-server")
        if self._binary is None:
            raise AssertionError(
                "redis-server is not installed: the cluster tests need it "
                "(apt-get install redis-server; .ci/run does)")
        self.port = free_tcp_port()
        self._directory = os.path.abspath(testcase.mktemp())
        os.makedirs(self._directory)
        self._options = ["--port", str(self.port)]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        if tls:
            self._options = ["--port", "0", "--tls-port", str(self.port),
                             *self._tls_options(), "--requirepass",
                             "s3cret"]
            ca = os.path.join(self._directory, "ca.pem")
            self.url = (f"rediss://:s3cret@127.0.0.1:{self.port}/0"
                        f"?ssl_ca_certs={ca}")
        self._process = None
        self.start()
        testcase.addCleanup(self.stop)

    def _tls_options(self) -> list:
        """A certificate for 127.0.0.1 from a CA of its own (ca.pem)."""
        import trustme
        ca = trustme.CA()
        issued = ca.issue_cert("127.0.0.1")
        paths = {name: os.path.join(self._directory, f"{name}.pem")
                 for name in ("ca", "cert", "key")}
        ca.cert_pem.write_to_path(paths["ca"])
        issued.cert_chain_pems[0].write_to_path(paths["cert"])
        issued.private_key_pem.write_to_path(paths["key"])
        return ["--tls-cert-file", paths["cert"], "--tls-key-file",
                paths["key"], "--tls-ca-cert-file", paths["ca"],
                "--tls-auth-clients", "no"]

    def start(self) -> None:
        """Start it (again, on the same port), and wait until it is
        ready."""
        self._process = subprocess.Popen(
            [self._binary, *self._options, "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self._directory,
             "--logfile", ""],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + WAIT_SECONDS
        seen = b""
        while _READY not in seen:
            left = deadline - time.monotonic()
            readable, _, _ = select.select([self._process.stdout], [], [],
                                           max(0.0, left))
            chunk = os.read(self._process.stdout.fileno(), 65536) \
                if readable else b""
            if not chunk:
                self.stop()
                raise AssertionError(f"redis-server did not start: "
                                     f"{seen.decode(errors='replace')}")
            seen += chunk
        # What it logs from now on is read, and dropped, so a full pipe
        # never stops it.
        threading.Thread(target=self._process.stdout.read,
                         daemon=True).start()

    def stop(self) -> None:
        """Stop it at once (SIGKILL: what it holds is gone)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def client(self):
        """A redis-py client of it, for a test to look and meddle."""
        import redis
        return redis.Redis.from_url(self.url)
