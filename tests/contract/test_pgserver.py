"""The throwaway PostgreSQL servers of the tests do not outlive a killed test run.

``pg_ctl`` detaches the server it starts, so a test process killed with SIGKILL (an interrupted
soak, a CI timeout) used to leave a running postmaster and its directory in /tmp, run after
run. Starting a cluster now stops and removes those whose starting process is gone.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.contract.pgserver import PostgresServer, process_identity, reap_orphans
from tests.fault.harness import wait_for

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ("import sys, time\nfrom pathlib import Path\n"
          "from tests.contract.pgserver import PostgresServer\n"
          "s = PostgresServer.start(base=Path(sys.argv[1]))\nprint(s.root, s.port, flush=True)\n"
          "time.sleep(600)")


def test_a_cluster_left_by_a_killed_process_is_stopped_and_removed(postgres_server) -> None:
    # Two processes start a cluster each in a directory of this test's own, so that
    # no other test run's reaper sees them; one is killed. Reaping that directory stops and
    # removes the killed one's cluster only: the other's keeps serving until its process ends.
    live: PostgresServer = postgres_server  # (skips or fails, as the store contract, without it)
    base = Path(tempfile.mkdtemp(prefix="pgt-"))  # short: the server's socket lives below it
    base.chmod(0o755)  # the postgres user must reach the clusters in it
    children = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(base)], cwd=ROOT, text=True,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)},
                                 stdout=subprocess.PIPE) for _ in range(2)]
    try:
        started = []
        for child in children:
            assert child.stdout is not None
            root, port = child.stdout.readline().split()
            pid = int((Path(root) / "data" / "postmaster.pid").read_text().split()[0])
            started.append((Path(root), int(port), pid))
        (killed, _, orphan), (kept, kept_port, kept_pid) = started
        children[0].send_signal(signal.SIGKILL)
        children[0].wait()
        assert killed.exists() and process_identity(orphan) is not None  # orphaned, running

        assert reap_orphans(live.bindir, live.runas, base) == [killed]
        assert not killed.exists()
        wait_for(lambda: process_identity(orphan) is None, what="the orphan postmaster to stop")
        assert kept.exists() and process_identity(kept_pid) is not None
        server = PostgresServer(live.bindir, kept, kept_port, live.runas)
        server.create_database("still_serving")  # the live process's cluster was left alone
    finally:
        for child in children:
            child.kill()
            child.wait()
        reap_orphans(live.bindir, live.runas, base)  # the second cluster, now orphaned too
        shutil.rmtree(base, ignore_errors=True)
