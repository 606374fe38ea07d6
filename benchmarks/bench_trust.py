"""What the trust controls cost, measured side by side in one run (issue 15).

A. The tier-to-tier hop, plain HTTP against mTLS: two real edge-node processes on 127.0.0.1
   (same config and models; one serves plain HTTP, one TLS asking for client certificates on
   its API), called the way a tier calls its upstream (httpx, HTTP/1.1 keep-alive, the TLS
   context a tier's upstream client uses: site CA only, the endpoint's certificate). Rounds
   alternate the two so drift on this shared machine hits both alike:
     * latency with connection reuse: sequential requests, the two modes taking turns request
       by request, p50/p99 over every round;
     * throughput with connection reuse: both modes loaded at the same time, ``--concurrency``
       requests in flight each, for a fixed time (requests/s each, median over rounds);
     * latency without reuse (a new connection, hence a full handshake, per request), the
       modes again taking turns, to show what keep-alive saves.
B. The API key check per request, in process: ``KeyGuard.check`` for a key with a rate limit
   and a quota (header parse, SHA-256, two token buckets), against a tier with no keys.

Writes reports/trust.json and reports/trust.md.
Run: python benchmarks/bench_trust.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx

from cascade.trust.certs import SiteCerts, issue_site
from cascade.trust.keys import ClientAuthSettings, ClientKey, KeyGuard, hash_key, new_key
from cascade.trust.keys import presented_key as parse_key
from cascade.trust.tls import TierTls, TlsSettings
from tests.fault.harness import Tier, write_policy

BODY = {"task": "documents", "input": {"text": "Shares rose after the central bank cut rates"}}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_ms(client: httpx.AsyncClient, url: str) -> float:
    started = time.perf_counter()
    response = await client.post(f"{url}/v1/infer", json=BODY)
    elapsed = (time.perf_counter() - started) * 1000
    assert response.status_code == 200, response.text
    return elapsed


async def paired_ms(clients: dict[str, httpx.AsyncClient], urls: dict[str, str],
                    n: int) -> dict[str, list[float]]:
    """``n`` requests per mode, the modes taking turns request by request, so a burst of load
    on this shared machine lands on both alike."""
    out: dict[str, list[float]] = {mode: [] for mode in urls}
    for i in range(n):
        for mode in (list(urls) if i % 2 == 0 else list(reversed(urls))):
            out[mode].append(await one_ms(clients[mode], urls[mode]))
    return out


async def side_by_side_rps(clients: dict[str, httpx.AsyncClient], urls: dict[str, str],
                           concurrency: int, seconds: float) -> dict[str, float]:
    """Both modes loaded at once (``concurrency`` in flight each) for ``seconds``: requests/s
    of each under the same conditions."""
    done = dict.fromkeys(urls, 0)
    stop_at = time.perf_counter() + seconds

    async def worker(mode: str) -> None:
        while time.perf_counter() < stop_at:
            await one_ms(clients[mode], urls[mode])
            done[mode] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(mode) for mode in urls for _ in range(concurrency)))
    return {mode: done[mode] / (time.perf_counter() - started) for mode in urls}


def client(verify: Any, *, reuse: bool) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64 if reuse else 0)
    return httpx.AsyncClient(verify=verify, http1=True, http2=False, limits=limits, timeout=30)


async def measure_hop(urls: dict[str, str], verify: dict[str, Any], *, rounds: int, n: int,
                      concurrency: int, seconds: float) -> dict[str, Any]:
    latency: dict[str, list[float]] = {m: [] for m in urls}
    fresh: dict[str, list[float]] = {m: [] for m in urls}
    rps: dict[str, list[float]] = {m: [] for m in urls}
    for r in range(rounds):
        reused = {mode: client(verify[mode], reuse=True) for mode in urls}
        no_reuse = {mode: client(verify[mode], reuse=False) for mode in urls}
        try:
            await paired_ms(reused, urls, 20)  # connect, warm up
            for mode, values in (await paired_ms(reused, urls, n)).items():
                latency[mode] += values
            for mode, value in (await side_by_side_rps(reused, urls, concurrency,
                                                       seconds)).items():
                rps[mode].append(value)
            for mode, values in (await paired_ms(no_reuse, urls, max(20, n // 5))).items():
                fresh[mode] += values
        finally:
            for c in (*reused.values(), *no_reuse.values()):
                await c.aclose()
        print(f"round {r + 1}/{rounds}: " + ", ".join(
            f"{m} p50 {statistics.median(latency[m]):.2f} ms" for m in urls), flush=True)
    return {mode: {"n": len(latency[mode]),
                   "p50_ms": round(pct(latency[mode], 0.5), 3),
                   "p99_ms": round(pct(latency[mode], 0.99), 3),
                   "rps": round(statistics.median(rps[mode]), 1),
                   "rps_rounds": [round(x, 1) for x in rps[mode]],
                   "no_reuse_p50_ms": round(pct(fresh[mode], 0.5), 3),
                   "no_reuse_p99_ms": round(pct(fresh[mode], 0.99), 3)}
            for mode in urls}


def measure_key_check(number: int) -> dict[str, float]:
    key = new_key()
    keyed = KeyGuard(ClientAuthSettings(keys=(ClientKey(
        name="app", sha256=hash_key(key), rate_per_s=1e9, burst=10**9, quota=10**12),)))
    open_guard = KeyGuard(ClientAuthSettings())
    headers = {b"authorization": f"Bearer {key}".encode(), b"content-type": b"application/json"}

    def checked() -> None:
        keyed.check("api", parse_key(headers))

    def unchecked() -> None:
        open_guard.check("api", None)

    out = {}
    for name, fn in (("with_key_ns", checked), ("no_keys_ns", unchecked)):
        best = min(timeit.repeat(fn, number=number, repeat=5))
        out[name] = round(best / number * 1e9, 1)
    return out


def write_report(results: dict[str, Any], path: Path) -> None:
    hop, keys = results["hop"], results["key_check"]
    plain, mtls = hop["plain"], hop["mtls"]
    lines = [
        "# Trust controls: what they cost", "",
        (f"Measured by `python benchmarks/bench_trust.py` on {results['machine']} "
        f"({results['rounds']} rounds; 2 vCPUs shared with other work, so read the "
        "ratios, not the absolute numbers)."), "",
        "## Tier-to-tier hop: plain HTTP vs mTLS", "",
        ("One edge-node process per mode (same config and models), called as a tier calls its "
         "upstream (httpx, HTTP/1.1 keep-alive, the tier's TLS context). The two modes take "
         "turns request by request, and their throughput is measured with both loaded at the "
         "same time, so the machine's other load falls on both alike."), "",
        "| | plain | mTLS | mTLS / plain |", "|---|---:|---:|---:|",
    ]
    for label, key in (("p50 latency, reused connection (ms)", "p50_ms"),
                       ("p99 latency, reused connection (ms)", "p99_ms"),
                       ((f"throughput, both loaded at once, {results['concurrency']} in flight each "
                        "(req/s, median round)"),
                        "rps"),
                       ("p50 latency, new connection per request (ms)", "no_reuse_p50_ms"),
                       ("p99 latency, new connection per request (ms)", "no_reuse_p99_ms")):
        lines.append(f"| {label} | {plain[key]} | {mtls[key]} | "
                     f"{mtls[key] / plain[key]:.2f} |")
    lines += [
        "", (f"Requests per mode for the percentiles: {plain['n']}. Throughput per round: plain "
        f"{plain['rps_rounds']}, mTLS {mtls['rps_rounds']}."), "",
        "## API key check per request", "",
        "| | ns per request |", "|---|---:|",
        (f"| key with rate limit and quota (parse header, SHA-256, two buckets) | "
        f"{keys['with_key_ns']} |"),
        f"| tier without keys (the check returns at once) | {keys['no_keys_ns']} |", "",
        (f"The key check adds {keys['with_key_ns'] / 1000:.2f} µs to a request, "
        f"{keys['with_key_ns'] / 1e6 / plain['p50_ms'] * 100:.2f} % of the plain hop's p50."),
    ]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=500, help="sequential per round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0, help="throughput per round")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.requests, args.seconds = 2, 150, 1.0
    from tests.conftest import ROOT as root

    models = root / "models"
    with tempfile.TemporaryDirectory(prefix="bench-trust-") as tmp_dir:
        tmp = Path(tmp_dir)
        site = SiteCerts(tmp / "certs")
        issue_site(site, ["endpoint", "edge-node"])
        policy = write_policy(tmp / "policy.yaml", escalating=())
        plain = Tier(tmp / "plain", "edge-node", models, policy, fast=False).start()
        mtls = Tier(tmp / "mtls", "edge-node", models, policy, fast=False, tls=site,
                    client_cert="api").start()
        try:
            endpoint_tls = TierTls(TlsSettings(cert_file=site.cert_file("endpoint"),
                                               key_file=site.key_file("endpoint"),
                                               ca_file=site.ca_file))
            hop = asyncio.run(measure_hop(
                {"plain": plain.url, "mtls": mtls.url},
                {"plain": True, "mtls": endpoint_tls.client_context()},
                rounds=args.rounds, n=args.requests, concurrency=args.concurrency,
                seconds=args.seconds))
        finally:
            plain.stop()
            mtls.stop()
    import platform

    results = {"machine": f"{platform.machine()} {platform.python_implementation()} "
                          f"{platform.python_version()}",
               "rounds": args.rounds, "concurrency": args.concurrency, "hop": hop,
               "key_check": measure_key_check(20_000 if args.quick else 200_000)}
    reports = ROOT / "reports"
    (reports / "trust.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(results, reports / "trust.md")
    print((reports / "trust.md").read_text())


if __name__ == "__main__":
    main()
