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
    @ivar url: the C{redis://} URL of its database 0.
    """

    def __init__(self, testcase) -> None:
        self._binary = shutil.which("redis-server")
        if self._binary is None:
            raise AssertionError(
                "redis-server is not installed: the cluster tests need it "
                "(apt-get install redis-server; .ci/run does)")
        self.port = free_tcp_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._directory = testcase.mktemp()
        os.makedirs(self._directory)
        self._process = None
        self.start()
        testcase.addCleanup(self.stop)

    def start(self) -> None:
        """Start it (again, on the same port), and wait until it is
        ready."""
        self._process = subprocess.Popen(
            [self._binary, "--port", str(self.port), "--bind", "127.0.0.1",
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
