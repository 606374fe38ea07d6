"""Where a tier finds signed model bundles, and how it relays them to the tiers below it.

A tier's ``bundles.source`` is a directory or ``upstream``: the next tier's
``GET /v1/models/bundles``, which lists what that tier received, its own source's bundles and
(when its source is its upstream) those of the tiers above it. So a site with one uplink gets
its updates through its edge server: the edge server fetches a bundle once, verifies it, keeps
it under ``received/`` and serves it to every tier below. Nothing is installed or relayed
before its signature verifies with a trusted key.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from pathlib import Path
from typing import Any

import httpx

from cascade.errors import BundleRejected, CascadeError, NotFound, ServiceUnavailable
from cascade.models.bundle import BUNDLE_SUFFIX, peek_bundle, read_bundle
from cascade.tier.rollout import Rollout
from cascade.trust.tls import TierTls

__all__ = ["BundleSource"]

log = logging.getLogger("cascade.tier.bundles")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.bundle$")
_LIST_TIMEOUT_S = 10.0
_FETCH_TIMEOUT_S = 120.0


class BundleSource:
    """Lists, fetches, relays and pulls bundles for one tier's :class:`Rollout`."""

    def __init__(self, rollout: Rollout, upstream_url: str | None,
                 tls: TierTls | None = None) -> None:
        """``tls``: the tier's TLS (an https upstream is called with its client context)."""
        self.rollout = rollout
        self._tls = tls
        self.config = rollout.config
        self.received = rollout.store.root / "received"
        kind = self.config.source_kind()
        self.directory = Path(self.config.source or ".") if kind == "directory" else None
        self.upstream_url = upstream_url if kind == "upstream" else None
        if kind == "upstream" and not upstream_url:
            log.warning("bundles.source is 'upstream' but this tier has no upstream_url")

    def _verify(self) -> ssl.SSLContext | bool:
        """The upstream client's context (site CA, our certificate) on a TLS tier."""
        return self._tls.client_context() if self._tls is not None else True

    # -- what is offered --------------------------------------------------------------------------

    async def available(self) -> list[dict[str, Any]]:
        """Every bundle this tier can hand out: received, its directory's, its upstream's."""
        offered: dict[str, dict[str, Any]] = {}
        if self.upstream_url:
            for item in await self._upstream_list():
                offered[item["name"]] = {**item, "from": "upstream"}
        for folder, origin in ((self.directory, "directory"), (self.received, "received")):
            for path in sorted(folder.glob(f"*{BUNDLE_SUFFIX}")) if folder else ():
                meta = await asyncio.to_thread(peek_bundle, path)
                if meta is not None:
                    offered[path.name] = {
                        "name": path.name, "task": meta.task, "tier": meta.tier,
                        "version": meta.version, "created_at": meta.created_at.isoformat(),
                        "bytes": path.stat().st_size, "from": origin}
        return sorted(offered.values(), key=lambda item: (item["created_at"], item["name"]))

    async def _upstream_list(self) -> list[dict[str, Any]]:
        try:
            async with httpx.AsyncClient(timeout=_LIST_TIMEOUT_S, verify=self._verify()) as client:
                response = await client.get(f"{self.upstream_url}/v1/models/bundles")
                response.raise_for_status()
                return list(response.json()["bundles"])
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            log.warning("cannot list the upstream's bundles: %s", exc)
            return []

    async def fetch(self, name: str) -> bytes:
        """A bundle's bytes by name: received, directory, else from the upstream (verified,
        then kept under ``received/`` for the next tier below that asks)."""
        if not _NAME.match(name) or ".." in name:
            raise NotFound(f"no bundle named {name!r}", field="name")
        for folder in (self.received, self.directory):
            if folder is not None and (folder / name).is_file():
                return await asyncio.to_thread((folder / name).read_bytes)
        if not self.upstream_url:
            raise NotFound(f"no bundle named {name!r} here", field="name")
        try:
            async with httpx.AsyncClient(timeout=_FETCH_TIMEOUT_S,
                                         verify=self._verify()) as client:
                response = await client.get(f"{self.upstream_url}/v1/models/bundles/{name}")
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"cannot fetch {name} from the upstream: {exc}",
                                     code="upstream_unavailable") from None
        if response.status_code == 404:
            raise NotFound(f"no bundle named {name!r} here or upstream", field="name")
        if response.status_code != 200:
            raise ServiceUnavailable(f"the upstream answered {response.status_code} for {name}",
                                     code="upstream_unavailable")
        data = response.content
        await asyncio.to_thread(read_bundle, data, self.rollout.keys, what=name)  # relay only
        await asyncio.to_thread(_write_atomically, self.received / name, data)  # what verifies
        return data

    # -- pulling ----------------------------------------------------------------------------------

    async def pull(self) -> list[dict[str, Any]]:
        """Install the newest offered bundle of each served task that this tier has not refused
        (rolled back or failed), unless it is already active or in canary. One report per task:
        installed, up to date, refused before, or why it was refused now."""
        offered = await self.available()
        reports = []
        for task, model_tier in self.rollout.settings.tasks.items():
            state = self.rollout.store.state(task)
            mine = [b for b in offered if b["task"] == task and b["tier"] == model_tier]
            fresh = [b for b in mine if b["version"] not in state.refused]
            if mine and not fresh:
                reports.append({"task": task, "version": mine[-1]["version"],
                                "outcome": "refused_before"})
            if not fresh:
                continue
            newest = fresh[-1]
            if newest["version"] in (state.active, state.canary):
                reports.append({"task": task, "version": newest["version"],
                                "outcome": "up_to_date"})
                continue
            reports.append(await self._pull_one(task, newest["name"]))
        return reports

    async def _pull_one(self, task: str, name: str) -> dict[str, Any]:
        try:
            data = await self.fetch(name)
            report = await self.rollout.install(data, what=name)
        except BundleRejected as exc:
            return {"task": task, "bundle": name, "outcome": "refused", "code": exc.code,
                    "message": exc.message}
        except CascadeError as exc:
            return {"task": task, "bundle": name, "outcome": "failed", "code": exc.code,
                    "message": exc.message}
        if not (self.received / name).is_file():
            await asyncio.to_thread(_write_atomically, self.received / name, data)
        return {**report, "bundle": name}

    async def run_schedule(self) -> None:
        """Pull every ``pull_interval_s`` until cancelled; a failed pull is logged, not fatal."""
        while True:
            await asyncio.sleep(self.config.pull_interval_s)
            try:
                for report in await self.pull():
                    if report["outcome"] != "up_to_date":
                        log.info("scheduled pull: %s", report)
            except Exception:
                log.exception("scheduled bundle pull failed")


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
