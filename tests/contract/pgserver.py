"""A throwaway PostgreSQL server for tests: initdb + pg_ctl in a temp dir, on a free port.

Uses the Debian server binaries (``/usr/lib/postgresql/<v>/bin``) or whatever ``pg_ctl`` is on
PATH. PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres``
user and is driven through ``runuser``. Durability settings are off: this server holds test
data only.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


def find_bindir() -> Path | None:
    """Directory with initdb and pg_ctl, or None if PostgreSQL is not installed."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    for cand in reversed(candidates):
        if (Path(cand) / "initdb").exists():
            return Path(cand)
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


@dataclass
class PostgresServer:
    """A running cluster; :meth:`stop` removes it."""

    bindir: Path
    root: Path
    port: int
    runas: list[str]
    host: str = "127.0.0.1"
    """Where clients reach it (also the address of database URLs)."""

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://cascade@{self.host}:{self.port}/cascade"

    @classmethod
    def start(cls, *, host: str = "127.0.0.1", trust_network: str | None = None) -> PostgresServer:
        """``host``: an address it also listens on (besides 127.0.0.1), for clients in another
        network namespace; ``trust_network``: a CIDR whose clients may connect (no password)."""
        bindir = find_bindir()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found")
        root = Path(tempfile.mkdtemp(prefix="cascade-pg-"))
        runas: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(root, user.pw_uid, user.pw_gid)
            runas = ["runuser", "-u", "postgres", "--"]
        # A port from this run's own slice, not the kernel's ephemeral range: initdb takes
        # seconds, in which an outgoing connection could take an ephemeral port checked free.
        from tests.conftest import free_port_block

        server = cls(bindir, root, free_port_block(1), runas, host)
        server._run("initdb", "-D", str(root / "data"), "-U", "cascade", "--auth=trust",
                    "-E", "UTF8", "--no-sync", "--no-instructions")
        if trust_network is not None:
            with open(root / "data" / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {trust_network} trust\n")
        listen = ",".join(dict.fromkeys(("127.0.0.1", host)))
        opts = (f"-p {server.port} -k {root} -c listen_addresses={listen} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50")
        server._run("pg_ctl", "-D", str(root / "data"), "-o", opts, "-l", str(root / "log"),
                    "-w", "-t", "60", "start")
        server._run("createdb", "-h", "127.0.0.1", "-p", str(server.port), "-U", "cascade",
                    "cascade")
        return server

    def create_database(self, name: str) -> str:
        """A new empty database on this server; returns its URL."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "cascade", name)
        return f"postgresql+psycopg://cascade@{self.host}:{self.port}/{name}"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [*self.runas, str(self.bindir / tool), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            log = ""
            if (self.root / "log").exists():
                log = (self.root / "log").read_text()[-2000:]
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stderr.strip()}\n{log}")

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
