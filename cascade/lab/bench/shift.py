"""Distribution shift for ``cascade bench``: corrupt the test inputs the way the field does.

- ``vision`` (camera frames): sensor noise (Gaussian read noise on every pixel of every frame)
  and occlusion (on a share of the frames a random square patch is blanked: dirt on the lens,
  an object in the way).
- ``documents``: typos (per word, a swapped, dropped, doubled or neighbouring-key character)
  and truncation (only the first part of the text arrives: a preview, a cut-off upload).

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


DESCRIPTIONS = {
    "vision": "sensor noise (Gaussian, sigma {noise_sigma:g} of 16, every frame) + occlusion "
              "(a random {occlusion}x{occlusion} patch blanked on {occluded_share:.0%} of frames)",
    "documents": "typos ({typo_rate:.0%} of words) + truncation (first {keep_fraction:.0%} of "
                 "the words, at least {min_words})",
}


def describe(task: str, spec: ShiftSpec) -> str:
    """One line saying how ``task``'s inputs are corrupted."""
    return DESCRIPTIONS[task].format(**spec.__dict__)


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


def corrupt(task: str, inputs: Any, spec: ShiftSpec) -> Any:
    """The shifted copy of a task's test inputs."""
    return corrupt_images(inputs, spec) if task == "vision" else corrupt_texts(inputs, spec)


def shift_phase(cfg: Any, chain: Any, tasks: Sequence[str], spec: ShiftSpec | None = None) -> dict[str, Any]:
    """Every corrupted test sample through each tier's model alone and through the chain."""
    from cascade.contract.inputs import request_body
    from cascade.lab.bench.run import _send_all
    from cascade.lab.evaluation import predict_inputs
    from cascade.models.manifest import load_split

    spec = spec or ShiftSpec()
    tiers = [t.tier for t in chain.tiers]
    out: dict[str, Any] = {}
    for task in tasks:
        inputs, labels = load_split(cfg.models_dir, task, "test")
        shifted = corrupt(task, inputs, spec)
        alone = predict_inputs(cfg.models_dir, task, tiers, shifted, labels)
        cfg.log(f"  {task}: {len(labels)} shifted test samples through the chain")
        answers = asyncio.run(_send_all(chain.entry_url, [request_body(task, x) for x in shifted]))
        n = len(answers)
        answered = {t: sum(a.get("answered_by") == t for a in answers) / n for t in tiers}
        out[task] = {
            "corruption": describe(task, spec),
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
