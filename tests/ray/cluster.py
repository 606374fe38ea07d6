"""A real two-node Ray cluster on this machine, for the multi-node tests.

The head node runs in this machine's network namespace, the worker node in a network namespace
of its own (``ip netns``), joined to the head by a veth pair: two nodes with their own address,
their own processes and resources, talking over a real link, as two machines would (they
still share this machine's CPUs and files). Both are started with ``ray start --block``, each
with its own temp dir and, on the head, its own ports, so nothing collides with another Ray on
this machine. Nothing here uses ``ray stop`` (it stops every Ray of the machine): a node is
stopped by killing its own processes, found by its network namespace (worker) or its temp dir
in their command line (head). That is also how the worker node is made to fail.

Ray's tools run in subprocesses (``tests/ray/cluster_driver.py``): the test process may
already be the driver of the session's local Ray, and a process drives one cluster at a time.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from cascade.deploy.replicas import REPLICA_HEADER
from tests.conftest import free_port_block
from tests.fault.harness import wait_for

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
NODE_CPUS = 2
OBJECT_STORE_BYTES = 80 * 1024 * 1024
START_TIMEOUT_S = 180


def netns_available() -> str | None:
    """None if network namespaces with veth pairs can be made here, else why not."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2 (ip netns, veth)"
    probe = f"cxp{os.getpid() % 100000}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"ip netns add failed: {exc.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@dataclass
class NetNs:
    """A network namespace joined to this one by a veth pair on a private /24."""

    name: str
    host_ip: str
    ns_ip: str
    host_if: str

    @classmethod
    def create(cls) -> NetNs:
        used = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True,
                              check=True).stdout
        for _ in range(50):
            net = ipaddress.ip_network(f"10.{random.randint(200, 250)}."
                                       f"{random.randint(0, 255)}.0/24")
            if f" {net.network_address + 1}/" not in used:
                break
        tag = f"{os.getpid() % 100000}{random.randint(0, 99)}"
        ns = cls(f"cascade-{tag}", str(net.network_address + 1), str(net.network_address + 2),
                 f"cxh{tag}")
        _ip("netns", "add", ns.name)
        _ip("link", "add", ns.host_if, "type", "veth", "peer", "name", f"cxw{tag}")
        _ip("link", "set", f"cxw{tag}", "netns", ns.name)
        _ip("addr", "add", f"{ns.host_ip}/24", "dev", ns.host_if)
        _ip("link", "set", ns.host_if, "up")
        for args in (("addr", "add", f"{ns.ns_ip}/24", "dev", f"cxw{tag}"),
                     ("link", "set", f"cxw{tag}", "up"), ("link", "set", "lo", "up")):
            _ip("netns", "exec", ns.name, "ip", *args)
        return ns

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                             text=True, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_all(self) -> None:
        """SIGKILL every process inside (a power cut of that node), until none is left."""
        def gone() -> bool:
            for pid in self.pids():
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return not self.pids()

        wait_for(gone, timeout_s=60, what=f"every process of netns {self.name} killed")

    def remove(self) -> None:
        self.kill_all()
        with suppress(subprocess.CalledProcessError):
            _ip("link", "del", self.host_if)
        with suppress(subprocess.CalledProcessError):
            _ip("netns", "del", self.name)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with suppress(OSError):
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def _kill_mentioning(text: str) -> None:
    def gone() -> bool:
        pids = _processes_mentioning(text)
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return not pids

    wait_for(gone, timeout_s=60, what=f"every process started with {text} killed")


@dataclass
class TwoNodeCluster:
    """Head (this namespace, ``head_ip``) and worker (``netns``, ``netns.ns_ip``)."""

    netns: NetNs
    head_temp: str
    worker_temp: str
    gcs_port: int
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def head_ip(self) -> str:
        return self.netns.host_ip

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.gcs_port}"

    def driver(self, command: str, *args: str, timeout_s: float = 300) -> Any:
        """Run ``tests/ray/cluster_driver.py <command>`` against this cluster; its JSON."""
        proc = subprocess.run(
            [sys.executable, "-m", "tests.ray.cluster_driver", command, self.address, *args],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout_s,
            check=False)
        if proc.returncode != 0:
            raise AssertionError(f"driver {command} failed ({proc.returncode}):\n"
                                 f"{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def alive_nodes(self) -> list[dict[str, Any]]:
        return list(self.driver("nodes"))

    def kill_worker_node(self) -> None:
        """The worker node fails: every one of its processes is SIGKILLed at once."""
        self.netns.kill_all()

    def stop(self) -> None:
        """Kill both nodes' processes, remove the namespace and the temp dirs."""
        with suppress(Exception):
            self.netns.remove()
        for proc in self.procs:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        _kill_mentioning(self.head_temp)
        for proc in self.procs:
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        for path in (self.head_temp, self.worker_temp):
            shutil.rmtree(path, ignore_errors=True)


def _head_command(ip: str, temp: str, ports: int) -> list[str]:
    names = ("port", "ray-client-server-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
             "node-manager-port", "object-manager-port")
    args = [f"--{name}={ports + i}" for i, name in enumerate(names)]
    return [RAY, "start", "--head", "--block", f"--node-ip-address={ip}", f"--temp-dir={temp}",
            f"--num-cpus={NODE_CPUS}", f"--object-store-memory={OBJECT_STORE_BYTES}",
            "--include-dashboard=false", "--disable-usage-stats",
            f"--min-worker-port={ports + 10}", f"--max-worker-port={ports + 49}",
            '--resources={"head_node": 1}', *args]


def _worker_command(ns: NetNs, address: str, temp: str) -> list[str]:
    return ["ip", "netns", "exec", ns.name, RAY, "start", "--block", f"--address={address}",
            f"--node-ip-address={ns.ns_ip}", f"--temp-dir={temp}", f"--num-cpus={NODE_CPUS}",
            f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats",
            '--resources={"worker_node": 1}']


@contextmanager
def two_node_cluster(log_dir: Path) -> Iterator[TwoNodeCluster]:
    """Start the head, then the worker node; yield once both are alive; always stop both."""
    ns = NetNs.create()
    ports = free_port_block(50)
    # Token authentication off (a private test cluster); the head's proxy routes to replicas on
    # every node, not first to its own node's (Serve's default), so load reaches both nodes.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
           "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}
    cluster = TwoNodeCluster(ns, tempfile.mkdtemp(prefix="rh-", dir="/tmp"),
                             tempfile.mkdtemp(prefix="rw-", dir="/tmp"), ports, env)
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        for name, cmd in (("head", _head_command(ns.host_ip, cluster.head_temp, ports)),
                          ("worker", _worker_command(ns, cluster.address, cluster.worker_temp))):
            with open(log_dir / f"ray-{name}.log", "wb") as out:
                cluster.procs.append(subprocess.Popen(
                    cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True))
            if name == "head":  # the worker joins once the head's GCS answers
                wait_for(lambda: _answers(cluster), timeout_s=START_TIMEOUT_S,
                         what="the head node up")
        wait_for(lambda: len(_quiet_nodes(cluster)) == 2, timeout_s=START_TIMEOUT_S,
                 what="both nodes alive")
        yield cluster
    finally:
        cluster.stop()


def _answers(cluster: TwoNodeCluster) -> bool:
    if any(proc.poll() is not None for proc in cluster.procs):
        raise AssertionError("a ray start process exited; see its log")
    return len(_quiet_nodes(cluster)) >= 1


def _quiet_nodes(cluster: TwoNodeCluster) -> list[dict[str, Any]]:
    try:
        return cluster.alive_nodes()
    except (AssertionError, subprocess.TimeoutExpired, json.JSONDecodeError):
        return []


def replica_nodes(url: str, seen: dict[str, str]) -> set[str]:
    """Ask /readyz once; the node addresses of every replica seen so far."""
    try:
        response = httpx.get(f"{url}/readyz", timeout=10)
    except httpx.HTTPError:
        return set()
    if response.status_code == 200:
        replica = response.headers[REPLICA_HEADER]
        seen[replica] = replica.rsplit("@", 1)[1]
    return set(seen.values())


def answered_per_node(url: str) -> dict[str, float]:
    """/v1/infer answers (200) per node, from each replica's own /metrics (the proxy picks
    the replica: ask until both have answered)."""
    counts: dict[str, float] = {}

    def both() -> bool:
        response = httpx.get(f"{url}/metrics", timeout=10)
        samples = {(s.name, frozenset(s.labels.items())): s.value
                   for family in text_string_to_metric_families(response.text)
                   for s in family.samples}
        key = frozenset({"tier": "cloud", "route": "/v1/infer", "code": "200"}.items())
        node = response.headers[REPLICA_HEADER].rsplit("@", 1)[1]
        counts[node] = samples.get(("cascade_http_responses_total", key), 0.0)
        return len(counts) == 2

    wait_for(both, timeout_s=60, what="/metrics from both replicas")
    return counts
