"""Distribution shift for ``cascade bench``: corrupt the test inputs the way the field does.

- ``vision`` (camera frames): sensor noise (Gaussian read noise on every pixel of every frame)
  and occlusion (on a share of the frames a random square patch is blanked: dirt on the lens,
  an object in the way).
- ``documents``: typos (per word, a swapped, dropped, doubled or neighbouring-key character)
  and truncation (only the first part of the text arrives: a preview, a cut-off upload).

A registered task is corrupted by its declared input kind, so the bench needs no code for it:
``text`` like ``documents``; ``image`` (any size, 0..255 pixels) with the same noise and
occlusion scaled to its range and size; ``features`` and ``tensor`` with sensor noise (Gaussian,
a share of each value's spread across the test split) and, on a share of the samples, stuck
readings (a share of the values replaced by their test-split mean: a sensor that stopped
updating).

Corruptions are seeded, so every run measures the same shifted split. The scenario measures,
for each tier alone and for the running chain: accuracy clean vs shifted, how much more the
cascade escalates, and where its accuracy lands.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SHIFT_SEED = 6


@dataclass(frozen=True)
class ShiftSpec:
    """Severity of the corruptions (defaults: a noticeable but realistic shift)."""

    noise_sigma: float = 2.0
    """Standard deviation of the pixel noise, on the 0..16 pixel scale."""
    occlusion: int = 2
    """Side of the blanked square patch, in pixels (of 8)."""
    occluded_share: float = 0.25
    """Share of frames with a blanked patch."""
    typo_rate: float = 0.15
    """Share of words that get one typo."""
    keep_fraction: float = 0.35
    """Share of each text's words that survive truncation."""
    min_words: int = 15
    feature_noise: float = 0.5
    """Noise on ``features``/``tensor`` values, as a share of each value's standard deviation."""
    stuck_share: float = 0.2
    """Share of a sample's values stuck at their mean, on ``occluded_share`` of the samples."""


DESCRIPTIONS = {
    "vision": "sensor noise (Gaussian, sigma {noise_sigma:g} of 16, every frame) + occlusion "
              "(a random {occlusion}x{occlusion} patch blanked on {occluded_share:.0%} of frames)",
    "documents": "typos ({typo_rate:.0%} of words) + truncation (first {keep_fraction:.0%} of "
                 "the words, at least {min_words})",
    "image": "sensor noise (Gaussian, sigma {noise_sigma:g}/16 of the pixel range, every frame) + "
             "occlusion (a square {occlusion}/8 of the side blanked on {occluded_share:.0%} of "
             "frames)",
    "numeric": "sensor noise (Gaussian, sigma {feature_noise:g} x each value's spread) + stuck "
               "readings ({stuck_share:.0%} of the values at their mean on {occluded_share:.0%} "
               "of samples)",
}


def corruption_kind(task: str, input_spec: Any = None) -> str:
    """Which corruption a task's inputs get: its own (built-in tasks) or its input kind's."""
    if input_spec is None:
        return "vision" if task == "vision" else "documents"
    kind = str(input_spec.kind)
    return {"text": "documents", "image": "image"}.get(kind, "numeric")


def describe(task: str, spec: ShiftSpec, input_spec: Any = None) -> str:
    """One line saying how ``task``'s inputs are corrupted."""
    return DESCRIPTIONS[corruption_kind(task, input_spec)].format(**spec.__dict__)


def corrupt_images(images: np.ndarray, spec: ShiftSpec, seed: int = SHIFT_SEED) -> np.ndarray:
    """Noisy, partly occluded copies of 8x8 images given as rows of 64 values in 0..16."""
    rng = np.random.default_rng(seed)
    x = np.asarray(images, dtype=np.float64).reshape(-1, 8, 8).copy()
    x += rng.normal(0.0, spec.noise_sigma, x.shape)
    k = spec.occlusion
    for img in x:
        if rng.random() < spec.occluded_share:
            r, c = rng.integers(0, 8 - k + 1, size=2)
            img[r:r + k, c:c + k] = 0.0
    return np.clip(np.round(x), 0.0, 16.0).reshape(-1, 64).astype(np.float32)


_KEYBOARD = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
_NEIGHBOURS = {
    ch: "".join(row[j] for j in (i - 1, i + 1) if 0 <= j < len(row))
    for row in _KEYBOARD for i, ch in enumerate(row)
}


def _typo(word: str, rng: np.random.Generator) -> str:
    if len(word) < 2:
        return word
    i = int(rng.integers(0, len(word) - 1))
    kind = int(rng.integers(0, 4))
    if kind == 0:  # swap two adjacent characters
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:  # drop one
        return word[:i] + word[i + 1:]
    if kind == 2:  # double one
        return word[:i] + word[i] + word[i:]
    near = _NEIGHBOURS.get(word[i].lower())  # hit a neighbouring key
    return word[:i] + (near[int(rng.integers(0, len(near)))] if near else word[i]) + word[i + 1:]


FIELD_FAMILIES = ("translate", "blur", "gain")
"""Camera-frame corruptions no built-in tier trains on (``corrupt_frames``): ``translate``
(the frame moved by one pixel in a random direction: a knocked camera mount), ``blur`` (a
3x3 box blur mixed in: focus drift, motion), ``gain`` (per frame, contrast scaled down and an
offset added: exposure and sensor gain drift)."""


def corrupt_frames(images: np.ndarray, families: Sequence[str], *, severity: float = 1.0,
                   seed: int = SHIFT_SEED) -> np.ndarray:
    """Copies of 8x8 images (rows of 64 values in 0..16) with the :data:`FIELD_FAMILIES`
    named applied in order; ``severity`` (0..1) scales blur and gain."""
    if bad := [f for f in families if f not in FIELD_FAMILIES]:
        raise ValueError(f"unknown corruption family {bad[0]!r}; allowed: {FIELD_FAMILIES}")
    rng = np.random.default_rng(seed)
    x = np.asarray(images, dtype=np.float64).reshape(-1, 8, 8).copy()
    for family in families:
        if family == "translate":
            for i, (dr, dc) in enumerate(rng.choice([(0, 1), (0, -1), (1, 0), (-1, 0)],
                                                    size=len(x))):
                x[i] = np.roll(x[i], (int(dr), int(dc)), axis=(0, 1))
        elif family == "blur":
            padded = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
            box = sum(padded[:, r:r + 8, c:c + 8] for r in range(3) for c in range(3)) / 9.0
            x = (1.0 - 0.6 * severity) * x + 0.6 * severity * box
        else:  # gain: per frame, contrast down by up to 50% and an offset of up to 4 of 16
            contrast = 1.0 - 0.5 * severity * rng.uniform(0.5, 1.0, (len(x), 1, 1))
            x = x * contrast + 4.0 * severity * rng.uniform(0.5, 1.0, (len(x), 1, 1))
    return np.clip(np.round(x), 0.0, 16.0).reshape(-1, 64).astype(np.float32)


def corrupt_texts(texts: Sequence[str], spec: ShiftSpec, seed: int = SHIFT_SEED) -> list[str]:
    """Truncated copies of ``texts`` with typos."""
    rng = np.random.default_rng(seed)
    out = []
    for text in texts:
        words = text.split()
        keep = max(spec.min_words, int(len(words) * spec.keep_fraction))
        words = [(_typo(w, rng) if rng.random() < spec.typo_rate else w) for w in words[:keep]]
        out.append(" ".join(words) or text[:1])
    return out


def corrupt_photos(images: Any, spec: ShiftSpec, seed: int = SHIFT_SEED) -> np.ndarray:
    """Noisy, partly occluded copies of images [N, H, W(, C)] of 0..255 pixels (a registered
    ``image`` task's split): the built-in corruption scaled to the range and the size."""
    rng = np.random.default_rng(seed)
    x = np.asarray(images, dtype=np.float64).copy()
    x += rng.normal(0.0, spec.noise_sigma * 255.0 / 16.0, x.shape)
    height, width = x.shape[1], x.shape[2]
    k_h, k_w = max(1, height * spec.occlusion // 8), max(1, width * spec.occlusion // 8)
    for img in x:
        if rng.random() < spec.occluded_share:
            r = int(rng.integers(0, height - k_h + 1))
            c = int(rng.integers(0, width - k_w + 1))
            img[r:r + k_h, c:c + k_w] = 0.0
    return np.clip(np.round(x), 0.0, 255.0).astype(np.float32)


def corrupt_numeric(values: Any, spec: ShiftSpec, seed: int = SHIFT_SEED) -> np.ndarray:
    """Noisy copies of ``features``/``tensor`` samples [N, ...], some with stuck readings."""
    rng = np.random.default_rng(seed)
    x = np.asarray(values, dtype=np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    out = x + rng.normal(0.0, 1.0, x.shape) * std * spec.feature_noise
    flat, flat_mean = out.reshape(len(out), -1), mean.ravel()
    n_stuck = max(1, round(flat.shape[1] * spec.stuck_share))
    for row in flat:
        if rng.random() < spec.occluded_share:
            idx = rng.choice(flat.shape[1], size=n_stuck, replace=False)
            row[idx] = flat_mean[idx]
    return np.asarray(flat.reshape(x.shape), dtype=np.asarray(values).dtype)


def corrupt(task: str, inputs: Any, spec: ShiftSpec, seed: int = SHIFT_SEED,
            input_spec: Any = None) -> Any:
    """The shifted copy of a task's test inputs (``input_spec``: a registered task's declared
    input; None for the built-in tasks)."""
    kind = corruption_kind(task, input_spec)
    if kind == "vision":
        return corrupt_images(inputs, spec, seed)
    if kind == "documents":
        return corrupt_texts(inputs, spec, seed)
    if kind == "image":
        return corrupt_photos(inputs, spec, seed)
    return corrupt_numeric(inputs, spec, seed)


def shift_phase(cfg: Any, chain: Any, tasks: Sequence[str], spec: ShiftSpec | None = None) -> dict[str, Any]:
    """Every corrupted test sample through each tier's model alone and through the chain."""
    from cascade.lab.bench.run import _send_all, bodies_for
    from cascade.lab.evaluation import predict_inputs
    from cascade.models.manifest import load_manifest, load_split

    spec = spec or ShiftSpec()
    tiers = [t.tier for t in chain.tiers]
    manifest = load_manifest(cfg.models_dir)
    out: dict[str, Any] = {}
    for task in tasks:
        inputs, labels = load_split(cfg.models_dir, task, "test")
        input_spec = manifest.task(task).input
        shifted = corrupt(task, inputs, spec, input_spec=input_spec)
        alone = predict_inputs(cfg.models_dir, task, tiers, shifted, labels)
        cfg.log(f"  {task}: {len(labels)} shifted test samples through the chain")
        answers = asyncio.run(_send_all(chain.entry_url, bodies_for(cfg.models_dir, task, shifted)))
        n = len(answers)
        answered = {t: sum(a.get("answered_by") == t for a in answers) / n for t in tiers}
        out[task] = {
            "corruption": describe(task, spec, input_spec),
            "samples": n,
            "errors": sum(a["_status_code"] != 200 for a in answers),
            "tier_alone_accuracy": {t: alone[t].accuracy for t in tiers},
            "cascade_accuracy": float(np.mean([a.get("label") == y for a, y in zip(answers, labels)])),
            "answered_share": answered,
            "cloud_share": answered[tiers[-1]],
            "escalations_per_request": float(np.mean([len(a.get("hops", [])) - 1 for a in answers])),
        }
    return out


def shift_summary(clean: dict[str, Any], shifted: dict[str, Any]) -> dict[str, Any]:
    """Accuracy drops (endpoint alone vs cascade) and extra escalation, per task."""
    out = {}
    for task, s in shifted.items():
        c = clean[task]
        tiers = list(c["tier_alone_accuracy"])
        endpoint_drop = c["tier_alone_accuracy"][tiers[0]] - s["tier_alone_accuracy"][tiers[0]]
        cascade_drop = c["cascade_accuracy"] - s["cascade_accuracy"]
        clean_esc = sum(i * share for i, share in enumerate(c["answered_share"].values()))
        out[task] = {
            "endpoint_drop": endpoint_drop,
            "cascade_drop": cascade_drop,
            "drop_ratio": cascade_drop / endpoint_drop if endpoint_drop > 0 else float("nan"),
            "escalations_per_request_clean": clean_esc,
            "escalations_per_request_shifted": s["escalations_per_request"],
            "cloud_share_clean": c["answered_share"][tiers[-1]],
            "cloud_share_shifted": s["cloud_share"],
        }
    return out
