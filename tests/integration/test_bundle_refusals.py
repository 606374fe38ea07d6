"""A real endpoint refuses every bad bundle with a clear 422 and keeps serving its model:
tampered, unsigned, signed by an untrusted key, truncated, a model that fails its probe set,
a bundle for another tier. Then a good one installs (the tier was not left broken)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.bundle_kit import bundle_knobs, fleet, pack, read_state, rewrite_member
from tests.fault.harness import ROOT, default_policy_copy, hardest_images, wait_for

pytestmark = pytest.mark.integration
__all__ = ["fleet"]  # fixture, found by name


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def _rehash(model: bytes) -> Any:
    """HASHES rewritten for a tampered model: only the signature can tell."""
    def change(hashes: bytes) -> bytes:
        lines = [line for line in hashes.decode().splitlines() if not line.endswith("model.onnx")]
        lines.append(f"{hashlib.sha256(model).hexdigest()}  model.onnx")
        return ("\n".join(sorted(lines, key=lambda line: line.split("  ")[1])) + "\n").encode()
    return change


def _bad_bundles(fleet: dict[str, Path], models_dir: Path, out: Path) -> dict[str, Path]:
    good = fleet["good"]
    with __import__("tarfile").open(good) as tar:
        model = tar.extractfile("model.onnx").read()  # type: ignore[union-attr]
    truncated = out / "truncated.bundle"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return {
        "bundle_hash_mismatch": rewrite_member(good, out / "tampered.bundle", "model.onnx",
                                               _flip_last_byte),
        "bundle_bad_signature": rewrite_member(
            rewrite_member(good, out / "t1.bundle", "model.onnx", _flip_last_byte),
            out / "resigned.bundle", "HASHES", _rehash(_flip_last_byte(model))),
        "bundle_unsigned": rewrite_member(good, out / "unsigned.bundle", "SIGNATURE",
                                          lambda _: None),
        "bundle_untrusted_key": pack(models_dir, fleet["other_key"], out / "stranger", "v9"),
        "bundle_truncated": truncated,
        "probe_accuracy": fleet["bad"],
        "bundle_wrong_target": pack(models_dir, fleet["key"], out / "edge", "v3",
                                    tier="edge-node"),
    }


def test_bad_bundles_are_refused_and_the_model_keeps_serving(tiers, fleet, models_dir, tmp_path):
    store = tmp_path / "store"
    source = tmp_path / "source"
    source.mkdir()
    endpoint = tiers("endpoint", policy_path=default_policy_copy(tmp_path / "policy.yaml"),
                     tasks={"vision": "endpoint"},
                     bundles=bundle_knobs([fleet["pub"]], store, source=str(source),
                                          canary={"share": 0}))
    image = hardest_images(models_dir, 1, easiest=True)[0]
    bad = _bad_bundles(fleet, models_dir, tmp_path)
    with httpx.Client(base_url=endpoint.url, timeout=60) as client:
        for code, bundle in bad.items():
            response = client.post("/v1/models/pull", content=bundle.read_bytes(),
                                   headers={"Content-Type": "application/octet-stream"})
            assert response.status_code == 422, (code, response.text)
            error = response.json()["error"]
            assert error["code"] == code, (code, error)
            assert error["message"], code
            answer = client.post("/v1/infer", json={"task": "vision", "input": {"image": image}})
            assert answer.json()["hops"][0]["model"] == "vision/endpoint:MLP(16)-int8", code
        # The command line says why, and exits 1.
        refused = subprocess.run(
            [sys.executable, "-m", "cascade", "models", "pull", "--url", endpoint.url,
             "--file", str(bad["bundle_truncated"])],
            capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
        assert refused.returncode == 1 and "bundle_truncated" in refused.stderr, refused
        # The same refusal through a pull from the tier's source directory.
        (source / fleet["bad"].name).write_bytes(fleet["bad"].read_bytes())
        pulled = client.post("/v1/models/pull").json()["results"]
        assert pulled == [{"task": "vision", "version": "bad", "outcome": "refused_before"}], \
            "a version refused once is not tried again by a pull"
        versions = client.get("/readyz").json()["model_versions"]["vision"]
        assert versions["version"] == "manifest"
        assert set(versions["refused"]) == {"bad"}
        assert not list((store / "versions" / "vision").glob("*"))  # nothing refused kept
        assert not list((store / "staging").iterdir())
        # The tier is not left broken: a good bundle from the directory installs.
        (source / fleet["good"].name).write_bytes(fleet["good"].read_bytes())
        (result,) = client.post("/v1/models/pull").json()["results"]
        assert (result["outcome"], result["version"]) == ("promoted", "v2"), result
        answer = client.post("/v1/infer", json={"task": "vision", "input": {"image": image}})
        assert answer.json()["hops"][0]["model"] == "vision/endpoint:MLP(16)-int8@v2"
    assert read_state(store)["tasks"]["vision"]["active"] == "v2"
    wait_for(lambda: "probe accuracy" in endpoint.log(), 60, "the refusal logged")
