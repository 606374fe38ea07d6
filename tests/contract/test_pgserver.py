"""The throwaway PostgreSQL servers of the tests do not outlive a killed test run.

``pg_ctl`` detaches the server it starts, so a test process killed with SIGKILL (an interrupted
soak, a CI timeout) used to leave a running postmaster and its directory in /tmp, run after
run. Starting a cluster now stops and removes those whose starting process is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.contract.pgserver import PostgresServer, process_identity, reap_orphans
from tests.fault.harness import wait_for

ROOT = Path(__file__).resolve().parents[2]


def test_a_cluster_left_by_a_killed_process_is_stopped_and_removed(postgres_server) -> None:
    live: PostgresServer = postgres_server  # this run's own: its process is alive
    script = ("from tests.contract.pgserver import PostgresServer\n"
              "s = PostgresServer.start()\nprint(s.root, flush=True)\n"
              "import time\ntime.sleep(600)")
    child = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        root = Path(child.stdout.readline().strip())
        postmaster = int((root / "data" / "postmaster.pid").read_text().split()[0])
        assert process_identity(postmaster) is not None
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert root.exists() and process_identity(postmaster) is not None  # orphaned, running

    reaped = reap_orphans(live.bindir, live.runas)
    assert root in reaped and not root.exists()
    wait_for(lambda: process_identity(postmaster) is None, what="the orphan postmaster to stop")
    assert live.root.exists() and live.root not in reaped
    live.create_database("still_serving")  # the live cluster was left alone
