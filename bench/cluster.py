#!/usr/bin/env python3
"""
Cluster mode on loopback: three real daemons (twistd -n failnozzle) sharing
one real redis-server, against a single daemon in the same run.

    python bench/cluster.py                  # load, then the fault runs
    python bench/cluster.py --scenario load --rate 4000 --seconds 10
    python bench/cluster.py --scenario faults

load     A paced load split between three nodes (--rate per node, over
         --unique errors from --hosts hosts, for --seconds), then a wait
         until the digests say what was sent: the digests' total against
         what was sent (double counts and losses), how many digests each
         node sent (one node sends them all, one per flush), the CPU
         microseconds per datagram of each node against a single node
         taking the same rate in the same run, alone and as one of three
         side by side (which share the machine as the cluster's nodes
         do), and Redis' traffic per node per second (bytes in and out,
         commands), also at twice the rate: it follows the changed
         errors, not the datagrams.
faults   The same load (--fault-rate per node) while: the lease holder is
         killed (SIGKILL) mid-period: the errors lost and the seconds from
         the kill to the next digest; Redis is stopped for --outage
         seconds (SIGTERM, appendonly everysec) and started again: the
         digests sent meanwhile (each node's own), and the double counts
         and losses after; a node is stopped (SIGTERM) and started again
         on the same ports during a period: losses and double counts.

Needs redis-server on the PATH (Debian's package).  Everything talks to
127.0.0.1 only, and every wait is bounded.
"""
from __future__ import annotations

import argparse
import email
import email.policy
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from bench.common import (Daemon, cpu_seconds, datagram_maker,  # noqa: E402
                          digest_total, send_paced)

#: The longest wait for the digests to say what was sent.
SETTLE_SECONDS = 60


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Redis:
    """A redis-server of its own on a free port of 127.0.0.1."""

    def __init__(self, directory: str, persistent: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed "
                             "(apt-get install redis-server)")
        os.makedirs(directory, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._command = [binary, "--port", str(self.port), "--bind",
                         "127.0.0.1", "--dir", directory, "--save", "",
                         "--appendonly", "yes" if persistent else "no",
                         "--appendfsync", "everysec", "--logfile",
                         os.path.join(directory, "redis.log")]
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(self._command)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.info()
                return
            except OSError:
                time.sleep(0.02)
        raise SystemExit("redis-server did not start")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(10)

    def calls(self) -> tuple:
        """C{(requests, commands)}: the calls of clients (a script once),
        and the commands run (a script's own included)."""
        stats = {name[len("cmdstat_"):]: int(value.split(",")[0].split("=")[1])
                 for name, value in self.info("commandstats").items()
                 if name.startswith("cmdstat_") and name != "cmdstat_info"}
        inner = {"get", "set", "expire", "pexpire", "incr", "rpush", "sadd",
                 "smembers", "lrange", "del", "srem"}
        scripts = stats.get("evalsha", 0) + stats.get("eval", 0)
        direct = sum(count for name, count in stats.items()
                     if name not in inner and name not in ("evalsha",
                                                           "eval"))
        return scripts + direct, sum(stats.values())

    def info(self, section: str = "stats") -> dict:
        """INFO, read by hand (RESP) so as to load Redis no more."""
        with socket.create_connection(("127.0.0.1", self.port), 2) as sock:
            sock.sendall(b"INFO " + section.encode() + b"\r\n")
            data = b""
            while not data.endswith(b"\r\n") or data.count(b"\r\n") < 2:
                chunk = sock.recv(65536)
                if not chunk:
                    raise OSError("closed")
                data += chunk
                header, _, rest = data.partition(b"\r\n")
                if len(rest) >= int(header[1:]) + 2:
                    break
        lines = data.decode().splitlines()[1:]
        return {name: value for name, _, value in
                (line.partition(":") for line in lines) if value}


def node_settings(redis: Redis | None, **more) -> dict:
    settings = dict(FLUSH_SECONDS=2, GROUP_WAIT_SECONDS=0,
                    MAX_UNIQUE_MESSAGES=10_000, **more)
    if redis is not None:
        settings.update(CLUSTER_URL=redis.url, CLUSTER_NAME="bench",
                        CLUSTER_LEASE_SECONDS=3)
    return settings


def start_nodes(root: str, count: int, redis: Redis | None,
                **more) -> list:
    nodes = []
    for index in range(count):
        directory = os.path.join(root, f"node{index}")
        os.makedirs(directory, exist_ok=True)
        nodes.append(Daemon(directory, **node_settings(redis, **more)))
    return nodes


def counted(directories: list) -> tuple:
    """The total of every digest in the nodes' maildirs, the digests per
    node, and the mtimes of all of them."""
    total, per_node, times = 0, [], []
    for directory in directories:
        paths = glob.glob(os.path.join(directory, "failnozzle-mail", "new",
                                       "*"))
        per_node.append(len(paths))
        for path in paths:
            with open(path, "rb") as stored:
                message = email.message_from_binary_file(
                    stored, policy=email.policy.default)
            total += digest_total(message.get_content())
            times.append((os.path.getmtime(path),
                          message["Subject"].startswith("(")))
    return total, per_node, sorted(times)


def wait_counted(directories: list, sent: int) -> int:
    """Wait (bounded) until the digests count C{sent}, or stop changing."""
    deadline = time.monotonic() + SETTLE_SECONDS
    total = counted(directories)[0]
    while time.monotonic() < deadline and total < sent:
        time.sleep(0.5)
        total = counted(directories)[0]
    return total


def load(nodes: list, rate: float, seconds: float, unique: int,
         hosts: int, events=()) -> list:
    """Send to every node at C{rate} a second for C{seconds}, from a thread
    each; run C{(at, action)} C{events} meanwhile.  @return: sent per
    node."""
    datagram = datagram_maker(unique, hosts)
    start = time.monotonic() + 0.2
    sent = [0] * len(nodes)

    def send(index: int) -> None:
        sent[index] = send_paced(nodes[index].port, datagram, rate, seconds,
                                 int(rate * seconds), first=index,
                                 step=len(nodes), start=start)

    threads = [threading.Thread(target=send, args=(index,))
               for index in range(len(nodes))]
    for thread in threads:
        thread.start()
    for at, action in events:
        time.sleep(max(0.0, start + at - time.monotonic()))
        action()
    for thread in threads:
        thread.join(seconds + 30)
    return sent


def leader(nodes: list) -> Daemon:
    holders = [node for node in nodes
               if "holds the flush lease" in node.read_log()]
    return holders[-1]


def stop_all(nodes: list) -> None:
    for node in nodes:
        if node.process.poll() is None:
            node.stop()


def loaded_cpu(nodes: list, rate: float, options) -> tuple:
    """Load C{nodes} at C{rate} each: what was sent to each, and the CPU
    microseconds per datagram each used."""
    before = [cpu_seconds(node.pid) for node in nodes]
    sent = load(nodes, rate, options.seconds, options.unique, options.hosts)
    used = [cpu_seconds(node.pid) - then for node, then in zip(nodes, before)]
    return sent, [seconds / count * 1e6 for seconds, count in zip(used, sent)]


def single_references(root: str, rate: float, options) -> tuple:
    """
    The CPU per datagram of a single node (no cluster) at C{rate}: alone
    on the machine, and as the median of three taking it side by side,
    which share the machine as a cluster's three nodes do (their senders
    and the kernel's work on the same two cores).
    """
    alone = start_nodes(os.path.join(root, f"alone{rate:g}"), 1, None)
    _, [alone_us] = loaded_cpu(alone, rate, options)
    stop_all(alone)
    side = start_nodes(os.path.join(root, f"side{rate:g}"), 3, None)
    _, side_us = loaded_cpu(side, rate, options)
    stop_all(side)
    return alone_us, sorted(side_us)[1]


def run_load(options, root: str) -> None:
    print(f"load: {options.rate:,.0f} datagrams/s per node for "
          f"{options.seconds:g} s, {options.unique} errors from "
          f"{options.hosts} hosts")
    for factor in (1, 2):
        rate = options.rate * factor
        alone_us, side_us = single_references(root, rate, options)
        print(f"  single node at {factor}x: {alone_us:.1f} us CPU per "
              f"datagram alone, {side_us:.1f} as one of three side by side")
        redis = Redis(os.path.join(root, f"redis{factor}"))
        try:
            nodes = start_nodes(os.path.join(root, f"cluster{factor}"), 3,
                                redis)
            directories = [node.directory for node in nodes]
            time.sleep(1)
            stats, calls = redis.info(), redis.calls()
            began = time.monotonic()
            sent, us = loaded_cpu(nodes, rate, options)
            elapsed = time.monotonic() - began
            after = redis.info()
            calls = [now - then for now, then in zip(redis.calls(), calls)]
            total = wait_counted(directories, sum(sent))
            _, per_node, _ = counted(directories)
            stop_all(nodes)
        finally:
            redis.stop()
        traffic = {name: (int(after[name]) - int(stats[name])) / elapsed / 3
                   for name in ("total_net_input_bytes",
                                "total_net_output_bytes")}
        print(f"  cluster of 3 at {factor}x: {sum(sent):,} sent, "
              f"{total:,} in the digests ({total - sum(sent):+,}); digests "
              f"per node {per_node}")
        print(f"    CPU per datagram {', '.join(f'{u:.1f}' for u in us)} us, "
              f"the most x{max(us) / alone_us:.2f} of a single node alone, "
              f"x{max(us) / side_us:.2f} of one side by side")
        print(f"    Redis per node per second: "
              f"{traffic['total_net_input_bytes'] / 1024:.1f} kB in, "
              f"{traffic['total_net_output_bytes'] / 1024:.1f} kB out, "
              f"{calls[0] / elapsed / 3:.1f} requests running "
              f"{calls[1] / elapsed / 3:.0f} commands")


def run_faults(options, root: str) -> None:
    rate, seconds = options.fault_rate, options.fault_seconds
    print(f"faults: {rate:,.0f} datagrams/s per node for {seconds:g} s, "
          f"{options.unique} errors from {options.hosts} hosts")
    unique, hosts = options.unique, options.hosts

    # The lease holder killed with SIGKILL mid-period.
    redis = Redis(os.path.join(root, "redis-kill"))
    try:
        nodes = start_nodes(os.path.join(root, "kill"), 3, redis)
        time.sleep(1)
        killed = {}

        def kill() -> None:
            victim = leader(nodes)
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait()
            killed.update(node=victim, at=time.time())

        sent = load(nodes, rate, seconds, unique, hosts,
                    [(seconds / 2 + 0.7, kill)])
        directories = [node.directory for node in nodes]
        total = wait_counted(directories, sum(sent))
        _, _, times = counted(directories)
        survivors = [node for node in nodes if node is not killed["node"]]
        stop_all(survivors)
    finally:
        redis.stop()
    after = [when for when, _ in times if when > killed["at"]]
    print(f"  kill -9 of the leader at {seconds / 2 + 0.7:g} s: "
          f"{sum(sent):,} sent, {total:,} in the digests, "
          f"{sum(sent) - total:,} lost; the next digest "
          f"{after[0] - killed['at']:.1f} s after the kill")

    # Redis stopped for the outage, then started again.
    redis = Redis(os.path.join(root, "redis-outage"), persistent=True)
    try:
        nodes = start_nodes(os.path.join(root, "outage"), 3, redis,
                            CLUSTER_GRACE_SECONDS=options.grace)
        time.sleep(1)
        moments = {}

        def stop_redis() -> None:
            redis.stop()
            moments["stopped"] = time.time()

        def start_redis() -> None:
            redis.start()
            moments["started"] = time.time()

        outage_seconds = options.outage + 20
        sent = load(nodes, rate, outage_seconds, unique, hosts,
                    [(5, stop_redis), (5 + options.outage, start_redis)])
        directories = [node.directory for node in nodes]
        total = wait_counted(directories, sum(sent))
        _, per_node, times = counted(directories)
        stop_all(nodes)
    finally:
        redis.stop()
    alone = sum(1 for _, was_alone in times if was_alone)
    print(f"  Redis stopped {options.outage:g} s (CLUSTER_GRACE_SECONDS = "
          f"{options.grace:g}): {sum(sent):,} sent, {total:,} in the "
          f"digests: {max(0, total - sum(sent)):,} double counted, "
          f"{max(0, sum(sent) - total):,} lost; {alone} digests sent by "
          f"nodes alone, digests per node {per_node}")

    # A node stopped and started again on the same ports mid-period.
    redis = Redis(os.path.join(root, "redis-restart"))
    try:
        udp = free_port(socket.SOCK_DGRAM)
        nodes = start_nodes(os.path.join(root, "restart"), 2, redis)
        directory = os.path.join(root, "restart", "node2")
        os.makedirs(directory)
        restarted = [Daemon(directory, **node_settings(
            redis, UDP_BIND=("127.0.0.1", udp)))]
        nodes.append(restarted[0])
        time.sleep(1)

        def restart() -> None:
            restarted[0].stop()
            restarted[0] = Daemon(directory, **node_settings(
                redis, UDP_BIND=("127.0.0.1", udp)))

        sent = load(nodes, rate, seconds, unique, hosts,
                    [(seconds / 2 + 0.5, restart)])
        nodes[2] = restarted[0]
        directories = [node.directory for node in nodes]
        total = wait_counted(directories, sum(sent))
        stop_all(nodes)
    finally:
        redis.stop()
    print(f"  a node restarted mid-period: {sum(sent):,} sent, {total:,} "
          f"in the digests: {max(0, total - sum(sent)):,} double counted, "
          f"{max(0, sum(sent) - total):,} lost (sent while it was down, "
          f"which no daemon can count, included)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=["load", "faults", "all"],
                        default="all")
    parser.add_argument("--rate", type=float, default=4000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--unique", type=int, default=200)
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--fault-rate", type=float, default=1000)
    parser.add_argument("--fault-seconds", type=float, default=12)
    parser.add_argument("--outage", type=float, default=30)
    parser.add_argument("--grace", type=float, default=10)
    options = parser.parse_args()
    root = tempfile.mkdtemp(prefix="failnozzle-cluster-bench.")
    try:
        if options.scenario in ("load", "all"):
            run_load(options, root)
        if options.scenario in ("faults", "all"):
            run_faults(options, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
