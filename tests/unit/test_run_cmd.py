"""What ``cascade up`` prints, on a console that is not a terminal (``make run > run.log``)."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from cascade.cli.common import print_whole
from cascade.cli.run_cmd import chain_table

TIERS = ["endpoint", "edge-node", "edge-server", "cloud"]


def fake_chain(log_dir: str) -> SimpleNamespace:
    tiers = [SimpleNamespace(tier=t, url=f"http://127.0.0.1:{8101 + i}", pid=40_000 + i,
                             log_path=Path(log_dir) / f"{t}.log") for i, t in enumerate(TIERS)]
    return SimpleNamespace(tiers=tiers, ready_s={t: 1.25 for t in TIERS}, model_servers=[])


@pytest.mark.parametrize("width", [None, 40, 20])
def test_urls_and_log_paths_stay_whole_at_any_width(width: int | None) -> None:
    # A long log directory squeezes the table: the URLs were folded onto two lines.
    log_dir = "/var/lib/cascade/a-rather-long-deployment-directory/logs"
    out = io.StringIO()
    console = Console(file=out, width=width, soft_wrap=True)  # like cascade.cli.common.console
    assert not console.is_terminal
    chain = fake_chain(log_dir)
    print_whole(console, chain_table(chain))
    lines = out.getvalue().splitlines()
    for t in chain.tiers:
        (row,) = [line for line in lines if f" {t.tier} " in line]
        assert t.url in row and str(t.log_path) in row and str(t.pid) in row
    assert "…" not in out.getvalue()
