"""The systemd units of infra/systemd/ (statically: this machine runs no systemd as PID 1)."""

from __future__ import annotations

import configparser
import importlib.util
import shutil
import subprocess

import pytest

from tests.helpers import REPO_ROOT

UNITS = REPO_ROOT / "infra/systemd"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(UNITS / name)
    return parser


def test_the_tier_unit_runs_one_tier_and_restarts_it_with_backoff_within_a_budget() -> None:
    tier = unit("cascade-tier@.service")
    command = tier["Service"]["ExecStart"].split()
    assert command[1:4] == ["-m", "cascade.deploy.process", "--config"]
    assert command[4] == "/etc/cascade/%i.yaml"
    assert importlib.util.find_spec("cascade.deploy.process") is not None
    service = tier["Service"]
    assert (service["Restart"], service["RestartSec"], service["RestartMaxDelaySec"]) == (
        "on-failure", "1", "30")
    assert service["RestartPreventExitStatus"] == "2"  # a bad config: process.py exits 2
    assert (tier["Unit"]["StartLimitBurst"], tier["Unit"]["StartLimitIntervalSec"]) == (
        "5", "300")
    assert tier["Install"]["WantedBy"] == "cascade.target" == tier["Unit"]["PartOf"]
    assert unit("cascade.target")["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_finds_nothing_but_what_this_machine_lacks() -> None:
    out = subprocess.run(["systemd-analyze", "verify", str(UNITS / "cascade-tier@.service")],
                         capture_output=True, text=True, check=False)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    # Tolerated: keys of a newer systemd than this one (backoff steps, systemd >= 254) and the
    # install location (/opt/cascade) missing on a development machine.
    unexpected = [line for line in lines
                  if not ("Unknown key 'RestartSteps'" in line
                          or "Unknown key 'RestartMaxDelaySec'" in line
                          or "/opt/cascade" in line)]
    assert unexpected == [], lines
