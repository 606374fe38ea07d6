"""Training-time augmentation: seeded, corrupted copies of the training split.

Field inputs are noisier than curated datasets: camera frames carry sensor noise and partial
occlusions, documents arrive with typos or cut short. A model that saw corrupted copies next to
the originals can learn to cope with them, if it has the capacity: which tiers use which family
(and why the others do not) is in :mod:`cascade.models.specs`. The families are generic, each
with its own seed and ranges, and only ever applied to the training split:
:func:`cascade.models.train.train_tier` is handed nothing else.

- images: Gaussian noise with a per-copy sigma drawn from a range, and random erasing of a
  rectangle of random size and position on a share of the copies;
- texts: random character edits (delete, insert, substitute, transpose) on a per-copy share of
  the words, and truncation of a share of the copies to a random-length prefix.
"""

from __future__ import annotations

import string
from typing import Any

import numpy as np
import numpy.typing as npt

from cascade.models.specs import (
    VISION_PIXEL_MAX,
    Augmentation,
    ImageAugmentation,
    TextAugmentation,
)

_IMAGE_SIDE = 8
_EDIT_ALPHABET = string.ascii_lowercase


def augment_training_split(
    augmentation: Augmentation | None, inputs: npt.NDArray[Any], labels: npt.NDArray[np.str_]
) -> tuple[npt.NDArray[Any], npt.NDArray[np.str_]]:
    """``inputs`` and ``labels`` followed by ``augmentation.copies`` corrupted copies of each.

    The originals come first and unchanged; ``None`` returns them alone.
    """
    if augmentation is None or augmentation.copies == 0:
        return inputs, labels
    rng = np.random.default_rng(augmentation.seed)
    copies: list[npt.NDArray[Any]] = []
    for _ in range(augmentation.copies):
        if isinstance(augmentation, ImageAugmentation):
            copies.append(corrupt_images(inputs, augmentation, rng))
        else:
            copies.append(np.array(corrupt_texts(inputs, augmentation, rng), dtype=object))
    return (
        np.concatenate([inputs, *copies]),
        np.concatenate([labels] * (augmentation.copies + 1)),
    )


def describe(augmentation: Augmentation) -> str:
    """One line for the manifest, e.g. ``4 copies (seed 1): Gaussian noise sigma 0-3 of 16; ...``."""
    head = f"{augmentation.copies} copies (seed {augmentation.seed})"
    if isinstance(augmentation, ImageAugmentation):
        low, high = augmentation.erase_side
        return (
            f"{head}: Gaussian noise sigma {_range(augmentation.noise_sigma)} of"
            f" {VISION_PIXEL_MAX:g}; a {low}-{high} x {low}-{high} px patch erased on"
            f" {augmentation.erase_probability:.0%}"
        )
    return (
        f"{head}: one character edit on {_range(augmentation.edit_rate, percent=True)} of the"
        f" words; {augmentation.truncate_probability:.0%} cut to the first"
        f" {_range(augmentation.keep_fraction, percent=True)} of the words"
        f" (at least {augmentation.min_words})"
    )


def _range(bounds: tuple[float, float], *, percent: bool = False) -> str:
    low, high = (100 * b for b in bounds) if percent else bounds
    return f"{low:g}-{high:g}{'%' if percent else ''}"


def corrupt_images(
    images: npt.NDArray[Any], augmentation: ImageAugmentation, rng: np.random.Generator
) -> npt.NDArray[np.float32]:
    """One corrupted copy of ``images`` (rows of 64 pixels in 0..16)."""
    frames = np.asarray(images, dtype=np.float64).reshape(-1, _IMAGE_SIDE, _IMAGE_SIDE).copy()
    sigma = rng.uniform(*augmentation.noise_sigma, size=(len(frames), 1, 1))
    frames += rng.standard_normal(frames.shape) * sigma
    low, high = augmentation.erase_side
    for frame in frames:
        if rng.random() < augmentation.erase_probability:
            height, width = rng.integers(low, high + 1, size=2)
            row = rng.integers(0, _IMAGE_SIDE - height + 1)
            col = rng.integers(0, _IMAGE_SIDE - width + 1)
            frame[row : row + height, col : col + width] = 0.0
    corrupted = np.clip(np.round(frames), 0.0, VISION_PIXEL_MAX)
    return corrupted.reshape(len(frames), -1).astype(np.float32)


def corrupt_texts(
    texts: npt.NDArray[Any], augmentation: TextAugmentation, rng: np.random.Generator
) -> list[str]:
    """One corrupted copy of each of ``texts``."""
    out = []
    for text in texts:
        words = str(text).split()
        if rng.random() < augmentation.truncate_probability:
            share = rng.uniform(*augmentation.keep_fraction)
            words = words[: max(augmentation.min_words, round(len(words) * share))]
        rate = rng.uniform(*augmentation.edit_rate)
        edited = [_edit_word(w, rng) if rng.random() < rate else w for w in words]
        out.append(" ".join(edited) or str(text))
    return out


def _edit_word(word: str, rng: np.random.Generator) -> str:
    if len(word) < 2:
        return word
    i = int(rng.integers(0, len(word)))
    kind = int(rng.integers(0, 4))
    letter = _EDIT_ALPHABET[int(rng.integers(0, len(_EDIT_ALPHABET)))]
    if kind == 0:  # delete
        return word[:i] + word[i + 1 :]
    if kind == 1:  # insert
        return word[:i] + letter + word[i:]
    if kind == 2:  # substitute
        return word[:i] + letter + word[i + 1 :]
    j = min(i, len(word) - 2)  # transpose with the next character
    return word[:j] + word[j + 1] + word[j] + word[j + 2 :]
