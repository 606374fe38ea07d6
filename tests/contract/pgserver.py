"""A throwaway PostgreSQL server for tests: initdb + pg_ctl in a temp dir, on a free port.

Uses the Debian server binaries (``/usr/lib/postgresql/<v>/bin``) or whatever ``pg_ctl`` is on
PATH. PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres``
user and is driven through ``runuser``. Durability settings are off: this server holds test
data only.

A cluster outlives a test process that is killed (``pg_ctl`` detaches the server), so each
cluster's directory names the process that started it, and starting a cluster first stops and
removes those whose process is gone (an interrupted soak or a killed ``make test`` left them).
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


OWNER_FILE = "owner"
"""In a cluster's directory: ``<pid> <start time>`` of the process that started it."""


def process_identity(pid: int) -> str | None:
    """``<pid> <start time>`` of a live process (the start time tells a reused pid apart), or
    None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields from the state (3rd) on follow the command name, which may hold spaces; a zombie
    # (state Z: exited, not yet waited for) is gone. The start time is the 22nd.
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else f"{pid} {fields[19]}"


def reap_orphans(bindir: Path, runas: list[str], base: Path | None = None) -> list[Path]:
    """Stop and remove the throwaway clusters in ``base`` (the temp directory) whose starting
    process is gone; returns their directories. Clusters of live processes (another test run
    beside this one) are left."""
    reaped = []
    for root in (base or Path(tempfile.gettempdir())).glob("cascade-pg-*"):
        try:
            owner = (root / OWNER_FILE).read_text().strip()
        except OSError:
            continue  # being made by another process, or not ours to judge
        if process_identity(int(owner.split()[0])) == owner:
            continue
        if (root / "data" / "postmaster.pid").exists():
            subprocess.run([*runas, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m",
                            "immediate", "-w", "stop"], capture_output=True, timeout=60,
                           check=False)
        shutil.rmtree(root, ignore_errors=True)
        reaped.append(root)
    return reaped


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
    def start(cls, *, host: str = "127.0.0.1", trust_network: str | None = None,
              base: Path | None = None) -> PostgresServer:
        """``host``: an address it also listens on (besides 127.0.0.1), for clients in another
        network namespace; ``trust_network``: a CIDR whose clients may connect (no password);
        ``base``: the directory to make the cluster in (the temp directory; keep it short, the
        server's socket lives below it)."""
        bindir = find_bindir()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found")
        runas: list[str] = []
        if os.geteuid() == 0:
            runas = ["runuser", "-u", "postgres", "--"]
        reap_orphans(bindir, runas, base)
        root = Path(tempfile.mkdtemp(prefix="cascade-pg-", dir=base))
        identity = process_identity(os.getpid())
        assert identity is not None
        (root / OWNER_FILE).write_text(identity)
        if runas:
            user = pwd.getpwnam("postgres")
            os.chown(root, user.pw_uid, user.pw_gid)
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
