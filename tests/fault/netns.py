"""Real network partitions: a tier in its own network namespace, joined to the host by a veth
pair, and the link between them cut or degraded by the kernel (``ip``, ``tc``).

Faults (:meth:`Partition.apply`):

* ``down``       ``ip link set <host end> down``: the host has no route to the namespace; a
                 fallback ``unreachable`` route (metric 4242, installed with the pair) makes
                 that "no path" rather than whatever the default route leads to.
* ``blackhole``  a blackhole route for the host's address inside the namespace: the tier
                 there receives but can never answer; the host sees silence (connect timeouts,
                 established connections that hang), like a dead WAN link.
* ``slow``       ``tc qdisc tbf`` on both ends: 64 kbit/s with a 300 ms queue (queueing delay,
                 tail drop): a degraded link that still carries some traffic.
* ``lossy``      ``tc qdisc netem`` delay 200 ms and 20 % loss on both ends. Kernels without
                 ``sch_netem`` (this CI's) get the loss without the delay: nftables in the
                 namespace drops a random 20 % of the packets crossing its end of the pair,
                 each way (:func:`loss_method` says which, :func:`loss_unavailable` why
                 neither can).

Names are unique per process and partition (``cxpart-<pid>-<n>``); :func:`sweep_stale`
removes namespaces of processes that no longer exist (a run killed before its cleanup).
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import subprocess
from typing import Self

PREFIX = "cxpart-"
_LOSS_TABLE = "cxloss"
FAULTS = ("down", "blackhole", "slow", "lossy")
_numbers = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=30)


@functools.cache
def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be used here (None: they can): no ``ip`` command, or not
    permitted (not root, or a sandbox without CAP_NET_ADMIN)."""
    probe = f"{PREFIX}probe-{os.getpid()}"
    try:
        made = _ip("ip", "netns", "add", probe, check=False)
    except FileNotFoundError:
        return "the ip command (iproute2) is not installed"
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("ip", "netns", "del", probe, check=False)
    return None


@functools.cache
def netem_unavailable() -> str | None:
    """Why ``tc netem`` cannot be used here (None: it can)."""
    if reason := namespaces_unavailable():
        return reason
    with Partition() as probe:
        out = _ip("tc", "qdisc", "add", "dev", probe.host_if, "root", "netem", "delay", "1ms",
                  check=False)
        if out.returncode != 0:
            return f"tc netem: {out.stderr.strip()} (the kernel has no sch_netem)"
    return None


@functools.cache
def loss_method() -> str | None:
    """How the ``lossy`` fault drops packets here: ``netem`` (with its delay), ``nftables``
    (loss only), or None (:func:`loss_unavailable` says why)."""
    if netem_unavailable() is None:
        return "netem"
    return "nftables" if _nftables_unavailable() is None else None


def loss_unavailable() -> str | None:
    """Why the ``lossy`` fault cannot be made here (None: it can, see :func:`loss_method`)."""
    if loss_method() is not None:
        return None
    return f"{netem_unavailable()}; and {_nftables_unavailable()}"


@functools.cache
def _nftables_unavailable() -> str | None:
    if reason := namespaces_unavailable():
        return reason
    with Partition() as probe:
        try:
            out = probe._drop_randomly(check=False)
        except FileNotFoundError:
            return "the nft command is not installed (apt-get install nftables)"
        if out.returncode != 0:
            return f"nft: {out.stderr.strip()} (the kernel has no nf_tables)"
    return None


def sweep_stale() -> list[str]:
    """Delete the namespaces of this module left by processes that are gone; their names."""
    out = _ip("ip", "netns", "list", check=False).stdout.split()
    gone = []
    for name in out:
        if name.startswith(PREFIX) and name.split("-")[1].isdigit():
            pid = int(name.split("-")[1])
            if not os.path.exists(f"/proc/{pid}"):
                _ip("ip", "netns", "del", name, check=False)
                gone.append(name)
    return gone


class Partition:
    """A network namespace and a veth pair to it: ``host_ip`` on the host, ``ns_ip`` inside.

    Use as a context manager (the namespace, its end of the pair and every process still in
    it go at exit, also on failure); run a tier inside with :attr:`launcher`."""

    def __init__(self) -> None:
        n = next(_numbers)
        pid = os.getpid()
        self.name = f"{PREFIX}{pid}-{n}"
        self.host_if, self.ns_if = f"cx{pid:x}n{n}h", f"cx{pid:x}n{n}p"
        index = (pid * 16 + n) % (1 << 20)  # a /30 of 10.64.0.0/10 per (pid, n)
        base = (10 << 24) | (64 << 16) | (index << 2)
        self.subnet = f"{_dotted(base)}/30"
        self.host_ip, self.ns_ip = _dotted(base + 1), _dotted(base + 2)
        self.fault: str | None = None
        self.dropped_packets = 0
        """Packets the ``lossy`` fault dropped by nftables, counted when it is healed."""

    @property
    def launcher(self) -> tuple[str, ...]:
        """The command prefix that runs a process inside the namespace."""
        return ("ip", "netns", "exec", self.name)

    def __enter__(self) -> Self:
        try:
            for command in (
                ("ip", "netns", "add", self.name),
                ("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if,
                 "netns", self.name),
                ("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if),
                ("ip", "link", "set", self.host_if, "up"),
                ("ip", "route", "add", "unreachable", self.subnet, "metric", "4242"),
                ("ip", "-n", self.name, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if),
                ("ip", "-n", self.name, "link", "set", self.ns_if, "up"),
                ("ip", "-n", self.name, "link", "set", "lo", "up"),
            ):
                _ip(*command)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        pids = _ip("ip", "netns", "pids", self.name, check=False).stdout.split()
        for pid in pids:
            _ip("kill", "-9", pid, check=False)
        _ip("ip", "netns", "del", self.name, check=False)  # takes the pair with it
        _ip("ip", "link", "del", self.host_if, check=False)
        _ip("ip", "route", "del", "unreachable", self.subnet, "metric", "4242", check=False)

    def apply(self, fault: str) -> None:
        """Cut or degrade the link (one of :data:`FAULTS`); :meth:`heal` undoes it."""
        if fault not in FAULTS:
            raise ValueError(f"fault {fault!r}; allowed: {', '.join(FAULTS)}")
        self.heal()
        if fault == "down":
            _ip("ip", "link", "set", self.host_if, "down")
        elif fault == "blackhole":
            _ip("ip", "-n", self.name, "route", "add", "blackhole", f"{self.host_ip}/32")
        elif fault == "lossy" and loss_method() == "nftables":
            self._drop_randomly()
        else:
            qdisc = (("tbf", "rate", "64kbit", "burst", "4kb", "latency", "300ms")
                     if fault == "slow" else ("netem", "delay", "200ms", "loss", "20%"))
            _ip("tc", "qdisc", "replace", "dev", self.host_if, "root", *qdisc)
            _ip("ip", "netns", "exec", self.name, "tc", "qdisc", "replace", "dev", self.ns_if,
                "root", *qdisc)
        self.fault = fault

    def heal(self) -> None:
        """The link as created: up, no blackhole, no queueing discipline."""
        _ip("ip", "link", "set", self.host_if, "up", check=False)
        _ip("ip", "-n", self.name, "route", "del", "blackhole", f"{self.host_ip}/32",
            check=False)
        _ip("tc", "qdisc", "del", "dev", self.host_if, "root", check=False)
        _ip("ip", "netns", "exec", self.name, "tc", "qdisc", "del", "dev", self.ns_if, "root",
            check=False)
        if self.fault == "lossy" and loss_method() == "nftables":
            rules = _ip("ip", "netns", "exec", self.name, "nft", "list", "table", "inet",
                        _LOSS_TABLE, check=False).stdout
            counts = re.findall(r"counter packets (\d+)", rules)
            self.dropped_packets += sum(int(n) for n in counts)
            _ip("ip", "netns", "exec", self.name, "nft", "delete", "table", "inet", _LOSS_TABLE,
                check=False)
        self.fault = None

    def _drop_randomly(self, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """nftables in the namespace: drop 20 % of the packets leaving and entering by its end
        of the pair, each chosen at random (the namespace's loopback is untouched)."""
        rules = (f"table inet {_LOSS_TABLE} {{\n"
                 "  chain in { type filter hook input priority 0; "
                 f'iifname "{self.ns_if}" numgen random mod 5 == 0 counter drop; }}\n'
                 "  chain out { type filter hook output priority 0; "
                 f'oifname "{self.ns_if}" numgen random mod 5 == 0 counter drop; }}\n'
                 "}\n")
        return subprocess.run(("ip", "netns", "exec", self.name, "nft", "-f", "-"), input=rules,
                              capture_output=True, text=True, check=check, timeout=30)


def _dotted(address: int) -> str:
    return ".".join(str((address >> shift) & 255) for shift in (24, 16, 8, 0))
