"""A real Redis Cluster on loopback for integration tests: six ``redis-server --cluster-enabled``
processes on free ports joined by ``redis-cli --cluster create`` (3 masters, 1 replica each).

Started once per test session (see the ``redis_cluster`` fixture in conftest.py); a test that
kills a master leaves the cluster with a promoted replica, which every later test can use too.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import _wait_for_port  # one readiness wait for every test server


def _free_ports(count: int) -> list[int]:
    """Ports whose port+10000 (the cluster bus) is below 65536, none repeated."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 < 65536 and port not in ports:
            ports.append(port)
    return ports


def _cli(port: int, *args: str) -> str:
    binary = shutil.which("redis-cli") or "redis-cli"
    return subprocess.run([binary, "-p", str(port), *args], capture_output=True, text=True, timeout=30,
                          check=False).stdout


@dataclass
class RedisCluster:
    workdir: Path
    server: str
    nodes: int = 6
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        live = [p for p, proc in self.processes.items() if proc.poll() is None]
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in live)

    def start(self) -> RedisCluster:
        for port in _free_ports(self.nodes):
            self._spawn(port)
        for port in self.processes:
            _wait_for_port(port)
        addresses = [f"127.0.0.1:{p}" for p in self.processes]
        binary = shutil.which("redis-cli") or "redis-cli"
        subprocess.run([binary, "--cluster", "create", *addresses, "--cluster-replicas", "1",
                        "--cluster-yes"], capture_output=True, timeout=60, check=True)
        self.wait_ok()
        return self

    def _spawn(self, port: int) -> None:
        node_dir = self.workdir / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        self.processes[port] = subprocess.Popen(
            [self.server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", str(node_dir / "nodes.conf"), "--cluster-node-timeout", "1000",
             "--save", "", "--appendonly", "no", "--dir", str(node_dir),
             "--logfile", str(node_dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node reports ``cluster_state:ok`` and all 16384 slots are served."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            infos = [_cli(p, "cluster", "info") for p, proc in self.processes.items() if proc.poll() is None]
            if infos and all("cluster_state:ok" in i and "cluster_slots_ok:16384" in i for i in infos):
                return
            time.sleep(0.1)
        raise RuntimeError("the Redis cluster did not become ok")

    def masters(self) -> list[int]:
        """Ports of the live masters."""
        out = []
        for line in _cli(self._any_live(), "cluster", "nodes").splitlines():
            parts = line.split()
            if len(parts) > 2 and "master" in parts[2] and "fail" not in parts[2]:
                port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
                if port in self.processes and self.processes[port].poll() is None:
                    out.append(port)
        return sorted(out)

    def master_of(self, key: str) -> int:
        """The port of the live master serving the key's slot."""
        slot = int(_cli(self._any_live(), "cluster", "keyslot", key).strip())
        for line in _cli(self._any_live(), "cluster", "nodes").splitlines():
            parts = line.split()
            if len(parts) > 8 and "master" in parts[2] and "fail" not in parts[2]:
                for span in parts[8:]:
                    low, _, high = span.partition("-")
                    if low.isdigit() and int(low) <= slot <= int(high or low):
                        return int(parts[1].split("@")[0].rsplit(":", 1)[1])
        raise RuntimeError(f"no master serves slot {slot}")

    def kill(self, port: int) -> None:
        """SIGKILL one node (its replica is promoted after the node timeout)."""
        self.processes[port].kill()
        self.processes[port].wait(timeout=10)

    def restart(self, port: int) -> None:
        """Bring a killed node back (it rejoins as a replica of its promoted replica)."""
        self._spawn(port)
        _wait_for_port(port)

    def _any_live(self) -> int:
        return next(p for p, proc in self.processes.items() if proc.poll() is None)

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
