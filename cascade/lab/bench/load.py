"""Load generators that are not the bottleneck: ``wrk`` when installed, else client processes.

Both post a rotating list of JSON bodies to one URL for a fixed time with a fixed number of
connections and report requests/s and latency percentiles measured by the client.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson


@dataclass(frozen=True)
class LoadResult:
    """What one load run measured."""

    generator: str
    connections: int
    duration_s: float
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bodies = { %(bodies)s }
local i = 0
request = function()
  i = (i %% #bodies) + 1
  return wrk.format(nil, "%(path)s", nil, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("CASCADE_RESULT %%d %%d %%d %%d %%d %%f\\n", summary.requests,
    summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout + e.status, latency.mean))
end
"""


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(url: str, bodies: Sequence[bytes], *, connections: int, duration_s: float) -> LoadResult:
    """Drive ``url`` with wrk (one thread: the server gets the other core)."""
    base, _, path = url.partition("//")[2].partition("/")
    lua_bodies = ", ".join("[==[" + b.decode() + "]==]" for b in bodies)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_LUA % {"bodies": lua_bodies, "path": "/" + path})
        script = f.name
    try:
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s", "-s", script,
             "--timeout", "5s", url.split("/", 3)[0] + "//" + base],
            capture_output=True, text=True, timeout=duration_s + 30, check=True,
        ).stdout
    finally:
        Path(script).unlink(missing_ok=True)
    line = next(x for x in out.splitlines() if x.startswith("CASCADE_RESULT"))
    requests, duration_us, p50, p99, errors, mean = line.split()[1:]
    dur = int(duration_us) / 1e6
    return LoadResult("wrk", connections, dur, int(requests), int(errors), int(requests) / dur,
                      int(p50) / 1000, int(p99) / 1000, float(mean) / 1000)


async def _client_loop(url: str, bodies: Sequence[bytes], connections: int, duration_s: float,
                       offset: int) -> tuple[list[float], int]:
    import httpx

    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration_s
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=5) as client:

        async def one(worker: int) -> None:
            nonlocal errors
            i = worker + offset
            while time.perf_counter() < stop_at:
                body = bodies[i % len(bodies)]
                i += connections
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, content=body,
                                          headers={"Content-Type": "application/json"})
                    ok = r.status_code == 200
                except Exception:  # noqa: BLE001 - any failure of a request is an error to count
                    ok = False
                latencies.append(time.perf_counter() - t0)
                errors += not ok

        await asyncio.gather(*(one(w) for w in range(connections)))
    return latencies, errors


def _proc_main(args: tuple[str, list[bytes], int, float, int]) -> tuple[list[float], int]:
    return asyncio.run(_client_loop(*args))


def run_httpx(url: str, bodies: Sequence[bytes], *, connections: int, duration_s: float,
              processes: int = 2) -> LoadResult:
    """Fallback load generator: ``processes`` client processes sharing the connections."""
    procs = max(1, min(processes, connections))
    per = [connections // procs + (i < connections % procs) for i in range(procs)]
    with mp.get_context("spawn").Pool(procs) as pool:
        parts = pool.map(_proc_main, [(url, list(bodies), n, duration_s, i * 7919)
                                      for i, n in enumerate(per)])
    lat = sorted(x for part, _ in parts for x in part)
    errors = sum(e for _, e in parts)
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else [lat[0]] * 99
    return LoadResult("httpx", connections, duration_s, len(lat), errors, len(lat) / duration_s,
                      q[49] * 1000, q[98] * 1000, statistics.fmean(lat) * 1000)


def run_load(url: str, bodies: Sequence[dict[str, Any]] | Sequence[bytes], *, connections: int,
             duration_s: float) -> LoadResult:
    """Drive ``url`` with the best available generator."""
    raw = [b if isinstance(b, bytes) else orjson.dumps(b) for b in bodies]
    if have_wrk():
        return run_wrk(url, raw, connections=connections, duration_s=duration_s)
    return run_httpx(url, raw, connections=connections, duration_s=duration_s)
