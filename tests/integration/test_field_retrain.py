"""``cascade models build --extra-data``: a real build (scikit-learn, ONNX export, int8) of the
ladders with exported hard examples in the endpoint's training split, into a copy of the
models directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cascade.cli import app
from cascade.lab.bench.run import bodies_for
from cascade.models.manifest import load_manifest, load_split

pytestmark = pytest.mark.integration


def test_build_retrains_the_chosen_tier_with_the_extra_data(models_dir: Path, tmp_path: Path):
    inputs, labels = load_split(models_dir, "vision", "calibration")
    bodies = bodies_for(models_dir, "vision", inputs[:25])
    data = tmp_path / "hard.jsonl"
    data.write_text("".join(json.dumps({**b, "label": str(y), "reason": "disagreed"}) + "\n"
                            for b, y in zip(bodies, labels[:25])))
    out = tmp_path / "models"
    shutil.copytree(models_dir, out, ignore=shutil.ignore_patterns(".build.lock"))
    before = load_manifest(out)
    runner = CliRunner()
    bad = runner.invoke(app, ["models", "build", "--out", str(out), "--extra-data", str(data),
                              "--extra-tier", "phone", "--quiet"])
    assert bad.exit_code == 1 and "--extra-tier 'phone'" in bad.output
    result = runner.invoke(app, ["models", "build", "--out", str(out), "--extra-data", str(data),
                                 "--extra-tier", "endpoint", "--quiet"])
    assert result.exit_code == 0, result.output
    after = load_manifest(out)
    assert after.build_key != before.build_key and "+" in after.build_key
    old, new = before.tasks["vision"].tiers, after.tasks["vision"].tiers
    assert new["endpoint"].train_samples == old["endpoint"].train_samples + 25
    assert {t: new[t].train_samples for t in ("edge-node", "edge-server", "cloud")} == \
        {t: old[t].train_samples for t in ("edge-node", "edge-server", "cloud")}
    assert after.tasks["vision"].splits.sha256 == before.tasks["vision"].splits.sha256
    # The same files again: up to date, nothing retrained.
    again = runner.invoke(app, ["models", "build", "--out", str(out), "--extra-data", str(data),
                                "--extra-tier", "endpoint", "--quiet"])
    assert again.exit_code == 0 and load_manifest(out).created_at == after.created_at
