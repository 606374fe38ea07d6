"""Building blocks for fault tests and benchmarks: real tier processes on 127.0.0.1 with node
configs and policies written per run (fast timers), a callback receiver, polling helpers, and the
SIGKILL loop shared by tests/fault/test_crash.py and benchmarks/bench_outbox.py."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml

from cascade.deploy.supervisor import Chain
from cascade.trust.certs import SiteCerts

ROOT = Path(__file__).resolve().parents[2]

def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (outside the ephemeral range; see conftest)."""
    from tests.conftest import free_port_block

    return free_port_block(1)


FAST_OUTBOX = {
    "idle_poll_s": 0.05, "sweep_interval_s": 0.2, "retry_initial_s": 0.05, "retry_max_s": 0.2,
    "poll_initial_s": 0.05, "poll_max_s": 0.2, "callback_retry_initial_s": 0.05,
    "callback_retry_max_s": 0.2, "send_timeout_ms": 3000,
}


LOOPBACK_CALLBACKS = {"schemes": ["http"], "allow_cidrs": ["127.0.0.0/8"]}
"""Node config ``callbacks`` block of a tier whose test receiver listens on 127.0.0.1 (refused by
the default callback policy: loopback is not a public address)."""

FAST_BREAKER = {"breaker_failure_threshold": 2, "breaker_reset_s": 0.3,
                "upstream_max_attempts": 2, "upstream_connect_timeout_ms": 300}


def write_policy(path: Path, *, ttl_s: float = 3600, max_attempts: int = 20,
                 deadline_ms: int = 2000, escalating: tuple[str, ...] = ("endpoint",)) -> Path:
    """The ``escalating`` tiers escalate everything (threshold 1.0); the others answer all."""
    tiers = {t: {"signal": "max_prob", "threshold": 1.0 if t in escalating else 0.0}
             for t in ("endpoint", "edge-node", "edge-server", "cloud")}
    task = {"deadline_ms": deadline_ms, "offline": "provisional",
            "queue": {"ttl_s": ttl_s, "max_attempts": max_attempts}, "tiers": tiers}
    path.write_text(yaml.safe_dump({"version": 1, "name": "fault-tests",
                                    "tasks": {"vision": task, "documents": task}}))
    return path


def default_policy_copy(path: Path, *, drift: dict[str, dict[str, Any]] | None = None) -> Path:
    """``policies/default.yaml`` (calibrated thresholds, drift references, actions) written to
    ``path``, with its decision log beside it instead of the repository's ``var/``, and the
    ``drift`` settings of each task given updated (e.g. a small window)."""
    policy = yaml.safe_load((ROOT / "policies/default.yaml").read_text())
    policy["decision_log"]["path"] = str(path.parent / "decisions-{tier}.db")
    for task, settings in (drift or {}).items():
        policy["tasks"][task]["drift"] = {**policy["tasks"][task].get("drift", {}), **settings}
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


class Tier:
    """One real tier process (a one-tier :class:`Chain`) with its own config and database."""

    def __init__(self, tmp: Path, tier: str, models_dir: Path, policy: Path, *,
                 upstream: str | None = None, tasks: dict[str, str] | None = None,
                 outbox: dict[str, Any] | None = None, db_dir: Path | None = None,
                 fast: bool = True, host: str = "127.0.0.1", launcher: tuple[str, ...] = (),
                 ready_timeout_s: float = 120.0, tls: SiteCerts | None = None,
                 client_cert: str = "never", **knobs: Any) -> None:
        """``fast``: test timers (short polls, backoffs, breaker); False keeps the defaults.
        ``host``/``launcher``: where it listens and the command prefix that starts it (a tier
        in a network namespace: its address there, ``ip netns exec NAME``).
        ``ready_timeout_s``: generous, a loaded machine loads slowly (language models more).
        ``tls``: serve HTTPS with this site's certificate for ``tier``, asking callers for
        client certificates as ``client_cert`` says; None: plain HTTP, the explicit
        development mode most tests use."""
        self.tier = tier
        self.tls = tls
        self.dir = tmp / tier
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db = (db_dir or self.dir) / f"{tier}.db"
        self.config = self.dir / f"{tier}.yaml"
        config = {
            "tier": tier, "tasks": tasks or {"vision": tier, "documents": tier},
            "models_dir": str(models_dir), "policy": str(policy),
            "outbox_url": f"sqlite:///{self.db}",
            "outbox": {**(FAST_OUTBOX if fast else {}), **(outbox or {})},
            **(FAST_BREAKER if fast else {}), **knobs,
        }
        if tls is not None:
            config["tls"] = {"cert_file": str(tls.cert_file(tier)),
                             "key_file": str(tls.key_file(tier)), "ca_file": str(tls.ca_file),
                             "client_cert": client_cert}
        self.config.write_text(yaml.safe_dump(config))
        self.upstream = upstream
        self.ready_timeout_s = ready_timeout_s
        self.host, self.launcher = host, launcher
        self.chain: Chain | None = None

    def start(self, port: int | None = None) -> Tier:
        """Start the process (on ``port``, else a free one) and wait until it is ready."""
        env = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        for attempt in range(1, 4):
            logged = len(self.log())
            chain = Chain([self.config], base_port=port or free_port(), env=env,
                          log_dir=self.dir / "logs", top_upstream_url=self.upstream,
                          host=self.host, launcher=self.launcher,
                          ready_timeout_s=self.ready_timeout_s, tls=self.tls)
            try:
                self.chain = chain.start()
                return self
            except (RuntimeError, TimeoutError) as exc:
                new_log = self.log()[logged:]
                # A free port is only free when we look: on a busy machine another process may
                # bind it before this tier (seconds later, models loaded) does. Take another.
                if port is None and attempt < 3 and "address already in use" in new_log:
                    continue
                # Say why here: the log lives in the test's tmp dir, which does not outlive it.
                raise RuntimeError(f"{exc}; the {self.tier} log ends:\n{new_log[-4000:]}") from exc
        raise AssertionError("unreachable")

    @property
    def url(self) -> str:
        assert self.chain is not None
        return self.chain.entry_url

    @property
    def pid(self) -> int:
        assert self.chain is not None
        return self.chain.tiers[0].pid

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no flush."""
        assert self.chain is not None
        proc = self.chain.tiers[0].process
        proc.kill()
        proc.wait(10)

    def stop(self) -> None:
        if self.chain is not None:
            self.chain.stop()
            self.chain = None

    def log(self) -> str:
        path = self.dir / "logs" / f"{self.tier}.log"
        return path.read_text() if path.exists() else ""

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Read this tier's outbox database directly (a separate SQLite connection)."""
        conn = sqlite3.connect(self.db, timeout=10)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()  # (a `with` block would only commit, not close)

    def states(self) -> dict[str, str]:
        return dict(self.query("SELECT id, state FROM cascade_outbox"))


class CallbackReceiver:
    """An HTTP server on 127.0.0.1 that records every callback POST.

    ``fail_first``: the first that many POSTs *of each request id* are answered ``fail_status``
    (a receiver that is down for a while). ``received`` holds the POSTs answered 2xx (key, body);
    ``attempts`` every POST as (key, the X-Cascade-Callback-Attempt header, status answered).
    ``port``: listen there (0: any free port), e.g. where a callback used to find no one.
    ``redirect_to``: failing answers carry ``Location: <redirect_to>`` (a redirecting receiver).
    ``raw`` holds every POST's headers and raw body (to check signatures).
    """

    def __init__(self, *, fail_first: int = 0, fail_status: int = 503, port: int = 0,
                 redirect_to: str | None = None) -> None:
        received: list[tuple[str, dict[str, Any]]] = []
        attempts: list[tuple[str, int, int]] = []
        raw: list[tuple[dict[str, str], bytes]] = []
        self.received = received
        self.attempts = attempts
        self.raw = raw
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                data = self.rfile.read(length)
                body = json.loads(data)
                key = self.headers.get("Idempotency-Key", "")
                with lock:
                    raw.append((dict(self.headers.items()), data))
                    seen = sum(k == key for k, _, _ in attempts)
                    status = fail_status if seen < fail_first else 200
                    attempts.append((key, int(self.headers.get("X-Cascade-Callback-Attempt", 0)),
                                     status))
                    if status == 200:
                        received.append((key, body))
                self.send_response(status)
                if status != 200 and redirect_to:
                    self.send_header("Location", redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/callback"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def scrape(url: str, *, verify: Any = True, headers: dict[str, str] | None = None,
           ) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a tier's ``/metrics``, keyed by (name, labels); ``verify``: an
    ``ssl.SSLContext`` trusting an https tier's CA; ``headers``: e.g. an API key."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{url}/metrics", timeout=10, verify=verify, headers=headers)
    assert r.status_code == 200, r.text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    """One sample of a :func:`scrape`; a KeyError (not 0) when the tier does not export it."""
    return samples[(name, frozenset(labels.items()))]


def wait_for(check: Callable[[], Any], timeout_s: float = 30.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


def post(client: httpx.Client, url: str, body: dict[str, Any], key: str | None = None,
         timeout: float = 10.0) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return client.post(f"{url}/v1/infer", json=body, headers=headers, timeout=timeout)


def hardest_images(models_dir: Path, n: int = 200, *,
                   easiest: bool = False) -> list[list[list[float]]]:
    """Vision test images on which the endpoint model is least sure (they always escalate);
    ``easiest``: the ones it is surest of (it answers them itself)."""
    import numpy as np

    from cascade.contract.inputs import image_grid
    from cascade.lab.evaluation import predict_split
    from cascade.models.manifest import load_split

    inputs, _ = load_split(models_dir, "vision", "test")
    _, preds = predict_split(models_dir, "vision", ["endpoint"], "test")
    confidences = preds["endpoint"].confidences("max_prob")
    order = np.argsort(-confidences if easiest else confidences)[:n]
    return [image_grid(inputs[i]) for i in order]


def _burst(url: str, prefix: str, body: dict[str, Any], acked: dict[str, str],
           stop: threading.Event, clients: int) -> None:
    """Keyed requests from ``clients`` threads until ``stop``; records every 200 in ``acked``."""

    def client(worker: int) -> None:
        with httpx.Client() as c:
            for j in range(1_000_000):
                if stop.is_set():
                    return
                key = f"{prefix}{worker}-{j}"
                try:
                    r = post(c, url, body, key=key, timeout=5)
                except httpx.HTTPError:
                    return  # the server died under us: this request was never acknowledged
                if r.status_code == 200:
                    acked[key] = r.json()["status"]

    threads = [threading.Thread(target=client, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(10)


def crash_rounds(endpoint: Tier, upstream: Tier, proxy: Any, body: dict[str, Any], *,
                 rounds: int, seed: int, clients: int = 6) -> dict[str, Any]:
    """SIGKILL ``endpoint`` at a random moment of each of ``rounds`` bursts, then let it drain.

    Even rounds cut the uplink (the endpoint queues); odd rounds restore it (the forwarder
    drains earlier rounds while new work is escalated online). After every kill the database
    gets ``PRAGMA integrity_check`` and is searched for every acknowledged request (and every
    provisional one in its outbox); at the end every provisional answer must be delivered and
    every key computed exactly once upstream. Returns the counts (``lost``, ``not_queued``,
    ``undelivered``, ``never_upstream``, ``duplicates``: 0 when all is well;
    ``integrity_ok``: of ``integrity_checks``) with examples of each, for the caller to assert
    on or report; the seed replays the same kill moments.
    """
    rng = random.Random(seed)
    acked: dict[str, str] = {}
    lost: set[str] = set()
    not_queued: set[str] = set()
    integrity: list[str] = []
    for round_no in range(rounds):
        proxy.set(mode="reset" if round_no % 2 == 0 else "pass")
        endpoint.start()
        stop = threading.Event()
        prefix = f"k{round_no}-"
        burst = threading.Thread(target=_burst,
                                 args=(endpoint.url, prefix, body, acked, stop, clients))
        burst.start()
        # Kill at a random moment once work flows (the round's first answer), so a slow machine
        # still kills mid-burst rather than before it.
        wait_for(lambda p=prefix: any(k.startswith(p) for k in list(acked)), timeout_s=30,
                 what=f"round {round_no} (seed {seed}): a first answer")
        time.sleep(rng.uniform(0.0, 0.4))
        endpoint.kill()
        stop.set()
        burst.join(20)
        integrity.append(str(endpoint.query("PRAGMA integrity_check")[0][0]))
        stored = {row[0] for row in endpoint.query("SELECT id FROM cascade_results")}
        lost |= {k for k in acked if k not in stored}
        queued = {row[0] for row in endpoint.query("SELECT id FROM cascade_outbox")}
        not_queued |= {k for k, st in acked.items() if st == "provisional" and k not in queued}
    provisional = [k for k, st in acked.items() if st == "provisional"]
    proxy.set(mode="pass")
    endpoint.start()
    wait_for(lambda: endpoint.query(
        "SELECT count(*) FROM cascade_outbox WHERE state IN ('queued','forwarding')") == [(0,)],
        timeout_s=120, what=f"the backlog drained (seed {seed})")
    states = endpoint.states()
    undelivered = [k for k in provisional if states.get(k) != "done"]
    computed = dict(upstream.query("SELECT id, computations FROM cascade_results"))
    never = [k for k in acked if k not in computed]
    duplicates = {k: n for k, n in computed.items() if n != 1}
    integrity.append(str(endpoint.query("PRAGMA integrity_check")[0][0]))
    return {"seed": seed, "kills": rounds, "acknowledged": len(acked),
            "provisional": len(provisional), "lost": len(lost), "not_queued": len(not_queued),
            "undelivered": len(undelivered), "never_upstream": len(never),
            "duplicates": len(duplicates), "integrity_checks": len(integrity),
            "integrity_ok": integrity.count("ok"),
            "examples": {"lost": sorted(lost)[:5], "not_queued": sorted(not_queued)[:5],
                         "undelivered": undelivered[:5], "never_upstream": never[:5],
                         "duplicates": dict(list(duplicates.items())[:5]),
                         "integrity": [r for r in integrity if r != "ok"][:3]}}


def assert_crash_safe(report: dict[str, Any]) -> None:
    """Fail, naming the seed and examples, unless :func:`crash_rounds` found nothing wrong."""
    bad = {key: report[key] for key in ("lost", "not_queued", "undelivered", "never_upstream",
                                        "duplicates") if report[key]}
    if report["integrity_ok"] != report["integrity_checks"]:
        bad["integrity_not_ok"] = report["integrity_checks"] - report["integrity_ok"]
    assert not bad, f"seed {report['seed']}: {bad}; examples {report['examples']}"
    assert report["provisional"], f"seed {report['seed']}: no round queued anything"
