"""The OpenAPI document is exact: schemathesis, every check on, against a real tier process.

Schema-valid requests must be accepted, schema-violating ones refused with a 4xx, every answer
must match its documented status, content type, headers and schema (405s name their ``Allow``
methods). The run is bounded (``MAX_EXAMPLES`` per operation) and deterministic
(``--generation-deterministic``: hypothesis derandomized, no example database), so a red run
replays as it was. The hooks module teaches schemathesis
the document's picture formats and gives each call its own idempotency key (why: its
docstring); ``schemathesis.toml`` beside this file says why 413 counts as a refusal.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fault.harness import ROOT, write_policy

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent
MAX_EXAMPLES = int(os.environ.get("CASCADE_SCHEMATHESIS_EXAMPLES", "40"))


def run_schemathesis(url: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    """The ``schemathesis run`` CLI with every check, bounded and deterministic, against ``url``."""
    cli = Path(sys.executable).with_name("schemathesis")
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.integration.schemathesis_hooks",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [str(cli), "--no-color", "--config-file", str(HERE / "schemathesis.toml"), "run",
         f"{url}/openapi.json", "--checks", "all", "--max-examples", str(MAX_EXAMPLES),
         "--generation-deterministic",
         "--workers", "1", "--request-timeout", "30"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=900, check=False)


def test_schemathesis_finds_no_difference_between_the_document_and_the_tier(tiers, tmp_path):
    # Every request is answered at this tier (no upstream): what is checked is the contract
    # of one tier's HTTP API, for the built-in tasks it serves (vision, documents).
    policy = write_policy(tmp_path / "answer-all.yaml", escalating=())
    tier = tiers("cloud", policy_path=policy)
    result = run_schemathesis(tier.url, tmp_path)
    summary = result.stdout[result.stdout.rfind("SUMMARY"):] or result.stdout[-4000:]
    assert result.returncode == 0, f"schemathesis found failures:\n{result.stdout[-12000:]}\n" \
                                   f"{result.stderr[-2000:]}"
    # Warnings are allowed (GET /v1/results/{id} answers 404 to ids it never saw: right).
    generated = re.search(r"(\d+) generated, (\d+) passed", summary)
    assert generated and generated[1] == generated[2] and int(generated[1]) > 100, summary
    # The run tested every operation of the document (none skipped as unreachable).
    selected = re.search(r"Selected: (\d+)/(\d+)", summary)
    tested = re.search(r"Tested: (\d+)", summary)
    assert selected and tested and selected[1] == selected[2] == tested[1], summary
