"""The bench's policy figures are drawn and non-empty; the shift corruptions are sane."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cascade.lab.bench.plots import (
    analyse_task,
    plot_latency,
    plot_shift,
    policy_phase,
    policy_report_lines,
    policy_targets,
)
from cascade.lab.bench.shift import (
    ShiftSpec,
    corrupt,
    corrupt_images,
    corrupt_numeric,
    corrupt_photos,
    corrupt_texts,
    corruption_kind,
    describe,
    shift_summary,
)
from cascade.policy import load_policy

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("matplotlib")


def assert_png_drawn(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert pixels[..., :3].std() > 0.05  # not a blank canvas


def fake_accuracy(tiers: list[str]) -> dict:
    rng = np.random.default_rng(0)
    return {
        "tier_alone_accuracy": dict(zip(tiers, [0.95, 0.97, 0.98, 0.99])),
        "cascade_accuracy": 0.985,
        "answered_share": dict(zip(tiers, [0.8, 0.1, 0.06, 0.04])),
        "latency_samples_ms": {t: list(rng.lognormal(i, 0.3, 50)) for i, t in enumerate(tiers)},
    }


def test_policy_phase_draws_every_figure_and_reports_them(models_dir, tmp_path):
    policy = ROOT / "policies/default.yaml"
    tiers = list(load_policy(policy).task("vision").tiers)
    accuracy = {"vision": fake_accuracy(tiers)}
    shifted = {"vision": {"corruption": "noise", "samples": 10, "errors": 0,
                          "tier_alone_accuracy": dict(zip(tiers, [0.85, 0.9, 0.92, 0.96])),
                          "cascade_accuracy": 0.95, "answered_share": {}, "cloud_share": 0.1,
                          "escalations_per_request": 0.6}}
    cfg = SimpleNamespace(models_dir=models_dir, policy=policy, out_dir=tmp_path)
    out = policy_phase(cfg, accuracy, shifted, ["vision"])
    assert out["figures"] == ["tradeoff-vision.png", "calibration-vision.png", "latency.png",
                              "shift.png"]
    for name in out["figures"]:
        assert_png_drawn(tmp_path / name)
    results = {"accuracy": accuracy, "shift": shifted, "policy": out}
    lines = "\n".join(policy_report_lines(results))
    assert "![tradeoff-vision.png](tradeoff-vision.png)" in lines
    assert "## Distribution shift" in lines
    rows = {target: met for target, _, met in policy_targets(results)}
    assert rows["vision under shift: cascade loses <= half of what the endpoint loses"] is True
    assert "vision: at most 10% of requests reach cloud" in rows


def test_analysis_of_the_default_policy_is_consistent(models_dir):
    a = analyse_task(models_dir, load_policy(ROOT / "policies/default.yaml"), "documents")
    s = a.summary
    # The oracle never needs more escalations than the policy for the same accuracy.
    assert s["oracle_escalations_per_request"] <= s["simulated_escalations_per_request"]
    assert sum(s["answered_share"].values()) == pytest.approx(1.0)
    esc, acc = a.oracle
    assert np.all(np.diff(esc) >= 0) and np.all(np.diff(acc) >= 0)
    assert acc[0] == pytest.approx(s["always_endpoint_accuracy"])
    for e, _ in a.sweeps.values():
        assert e.min() >= 0 and e.max() <= len(a.tiers) - 1
    assert set(s["ece"]) == set(a.tiers)


def test_latency_and_shift_figures_from_plain_numbers(tmp_path):
    tiers = ["endpoint", "edge-node", "edge-server", "cloud"]
    acc = fake_accuracy(tiers)
    assert_png_drawn(plot_latency({"vision": acc["latency_samples_ms"]}, tmp_path / "lat.png"))
    shifted = {"tier_alone_accuracy": dict(zip(tiers, [0.8, 0.85, 0.9, 0.95])),
               "cascade_accuracy": 0.93, "escalations_per_request": 0.9}
    assert_png_drawn(plot_shift({"vision": acc}, {"vision": shifted}, tmp_path / "shift.png"))
    summary = shift_summary({"vision": acc}, {"vision": {**shifted, "cloud_share": 0.2}})["vision"]
    assert summary["endpoint_drop"] == pytest.approx(0.15)
    assert summary["cascade_drop"] == pytest.approx(0.055)
    assert summary["escalations_per_request_clean"] == pytest.approx(0.1 + 0.12 + 0.12)


def test_image_corruption_is_seeded_bounded_and_occludes_a_share_of_frames():
    images = np.full((400, 64), 8.0, dtype=np.float32)
    spec = ShiftSpec(noise_sigma=0.0, occlusion=2, occluded_share=0.25)
    out = corrupt_images(images, spec)
    assert np.array_equal(out, corrupt_images(images, spec))
    occluded = (out == 0).reshape(400, -1).sum(axis=1)
    assert set(occluded.tolist()) == {0, 4}
    assert 0.18 < np.mean(occluded == 4) < 0.32
    noisy = corrupt_images(images, ShiftSpec(noise_sigma=3.0, occluded_share=0.0))
    assert noisy.min() >= 0 and noisy.max() <= 16 and noisy.std() > 1.0


def test_text_corruption_truncates_and_adds_typos():
    text = " ".join(f"word{i}" for i in range(100))
    (out,) = corrupt_texts([text], ShiftSpec(typo_rate=1.0, keep_fraction=0.3, min_words=15))
    words = out.split()
    assert len(words) == 30
    assert sum(w != f"word{i}" for i, w in enumerate(words)) >= 25  # (a swap of equal chars is a no-op)
    (short,) = corrupt_texts(["a b c"], ShiftSpec(typo_rate=0.0, keep_fraction=0.1, min_words=15))
    assert short == "a b c"


def test_photo_corruption_scales_to_the_image_size_and_pixel_range():
    photos = np.full((400, 32, 16, 3), 128.0, dtype=np.float32)
    out = corrupt_photos(photos, ShiftSpec(noise_sigma=0.0, occlusion=2, occluded_share=0.25))
    assert out.shape == photos.shape and out.dtype == np.float32
    blanked = (out == 0).reshape(400, -1).sum(axis=1)
    assert set(blanked.tolist()) == {0, 8 * 4 * 3}  # a patch of 2/8 of each side, every channel
    assert 0.18 < np.mean(blanked > 0) < 0.32
    noisy = corrupt_photos(photos, ShiftSpec(noise_sigma=2.0, occluded_share=0.0))
    assert noisy.min() >= 0 and noisy.max() <= 255
    assert noisy.std() == pytest.approx(2.0 * 255 / 16, rel=0.05)


def test_numeric_corruption_adds_noise_per_value_spread_and_sticks_some_readings():
    rng = np.random.default_rng(1)
    values = (rng.normal(0, 1, (2000, 10)) * np.arange(1, 11) + 100).astype(np.float32)
    quiet = corrupt_numeric(values, ShiftSpec(feature_noise=0.0, occluded_share=0.5,
                                              stuck_share=0.2))
    assert quiet.dtype == np.float32
    changed = (quiet != values).sum(axis=1)
    assert set(changed.tolist()) == {0, 2}  # 20% of 10 values, on about half of the samples
    assert 0.45 < np.mean(changed == 2) < 0.55
    rows, cols = np.nonzero(quiet != values)
    assert np.allclose(quiet[rows, cols], values.mean(axis=0)[cols], atol=1e-3)
    noisy = corrupt_numeric(values, ShiftSpec(feature_noise=0.5, occluded_share=0.0))
    ratio = (noisy - values).std(axis=0) / values.std(axis=0)
    assert np.allclose(ratio, 0.5, rtol=0.1)
    assert np.array_equal(noisy, corrupt_numeric(values, ShiftSpec(feature_noise=0.5,
                                                                    occluded_share=0.0)))


def test_registered_tasks_are_corrupted_by_their_input_kind():
    from cascade.contract.input_spec import FeaturesInput, ImageInput, TextInput

    spec = ShiftSpec()
    assert corruption_kind("vision") == "vision" and corruption_kind("documents") == "documents"
    assert corruption_kind("cancer", FeaturesInput(kind="features", length=3)) == "numeric"
    assert corruption_kind("notes", TextInput(kind="text")) == "documents"
    photo = ImageInput(kind="image", size=(4, 4), channels=1)
    assert corruption_kind("cam", photo) == "image"
    assert describe("cancer", spec, FeaturesInput(kind="features", length=3)).startswith(
        "sensor noise (Gaussian, sigma 0.5 x each value's spread)")
    texts = corrupt("notes", ["one two three"] * 3, spec, input_spec=TextInput(kind="text"))
    assert texts == corrupt_texts(["one two three"] * 3, spec)
