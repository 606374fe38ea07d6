"""Training-time augmentation: seeded, generic corruption families, originals kept first."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cascade.models.augment import augment_training_split, corrupt_texts, describe
from cascade.models.specs import (
    FIELD_IMAGES,
    FIELD_TEXTS,
    LADDERS,
    ImageAugmentation,
    TextAugmentation,
)

IMAGES = np.random.default_rng(0).integers(0, 17, size=(20, 64)).astype(np.float32)
IMAGE_LABELS = np.array([str(i % 10) for i in range(20)])
TEXTS = np.array(
    [
        "Shares rose after the central bank cut interest rates again on Monday",
        "The striker scored twice as the home side won the cup final",
        "A new phone with a folding screen goes on sale next month",
    ],
    dtype=object,
)
TEXT_LABELS = np.array(["business", "sport", "tech"])


EACH_FAMILY = pytest.mark.parametrize(
    ("augmentation", "inputs", "labels"),
    [(FIELD_IMAGES, IMAGES, IMAGE_LABELS), (FIELD_TEXTS, TEXTS, TEXT_LABELS)],
    ids=["images", "texts"],
)
"""Each test below runs once per augmentation family, on its sample split."""

def test_no_augmentation_returns_the_split_itself() -> None:
    inputs, labels = augment_training_split(None, IMAGES, IMAGE_LABELS)
    assert inputs is IMAGES and labels is IMAGE_LABELS
    no_copies = dataclasses.replace(FIELD_IMAGES, copies=0)
    assert augment_training_split(no_copies, IMAGES, IMAGE_LABELS)[0] is IMAGES


@EACH_FAMILY
def test_originals_come_first_then_labelled_copies(
    augmentation: ImageAugmentation | TextAugmentation, inputs: np.ndarray, labels: np.ndarray
) -> None:
    out, out_labels = augment_training_split(augmentation, inputs, labels)
    n, copies = len(inputs), augmentation.copies
    assert len(out) == len(out_labels) == n * (copies + 1)
    assert out[:n].tolist() == inputs.tolist()
    assert out_labels.tolist() == labels.tolist() * (copies + 1)
    assert out[n:].tolist() != inputs.tolist() * copies


@EACH_FAMILY
def test_seeded_same_seed_same_copies_other_seed_other_copies(
    augmentation: ImageAugmentation | TextAugmentation, inputs: np.ndarray, labels: np.ndarray
) -> None:
    first = augment_training_split(augmentation, inputs, labels)[0]
    again = augment_training_split(augmentation, inputs, labels)[0]
    other = augment_training_split(
        dataclasses.replace(augmentation, seed=augmentation.seed + 1), inputs, labels
    )[0]
    assert first.tolist() == again.tolist()
    assert first.tolist() != other.tolist()


def test_its_seeds_are_not_the_benchmarks() -> None:
    from cascade.lab.bench.shift import SHIFT_SEED

    seeds = {
        spec.augmentation.seed
        for ladder in LADDERS.values()
        for spec in ladder
        if spec.augmentation is not None
    }
    assert seeds and SHIFT_SEED not in seeds | {FIELD_IMAGES.seed, FIELD_TEXTS.seed}


def test_corrupted_images_stay_whole_pixel_counts_in_range() -> None:
    out = augment_training_split(FIELD_IMAGES, IMAGES, IMAGE_LABELS)[0][len(IMAGES) :]
    assert out.dtype == np.float32 and out.shape == (len(IMAGES) * FIELD_IMAGES.copies, 64)
    assert out.min() >= 0 and out.max() <= 16 and np.array_equal(out, np.round(out))


def test_erasing_blanks_one_rectangle_of_the_drawn_size() -> None:
    white = np.full((50, 64), 16.0, dtype=np.float32)
    erase_only = ImageAugmentation(
        copies=1, noise_sigma=(0.0, 0.0), erase_probability=1.0, erase_side=(2, 3), seed=0
    )
    out = augment_training_split(erase_only, white, np.array(["0"] * 50))[0][50:]
    for frame in out.reshape(-1, 8, 8):
        rows, cols = np.nonzero(frame == 0)
        height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert 2 <= height <= 3 and 2 <= width <= 3 and len(rows) == height * width
    assert set(np.unique(out)) == {0.0, 16.0}


def test_noise_sigma_is_drawn_per_copy_from_its_range() -> None:
    flat = np.full((400, 64), 8.0, dtype=np.float32)
    noise_only = ImageAugmentation(
        copies=1, noise_sigma=(1.0, 3.0), erase_probability=0.0, erase_side=(1, 1), seed=0
    )
    out = augment_training_split(noise_only, flat, np.array(["0"] * 400))[0][400:]
    spread = out.std(axis=1)
    assert 0.8 < spread.min() and spread.max() < 3.6 and spread.max() - spread.min() > 1.0


def test_truncation_keeps_a_prefix_of_the_drawn_length() -> None:
    text = " ".join(f"word{i}" for i in range(40))
    halve = TextAugmentation(
        copies=1,
        edit_rate=(0.0, 0.0),
        truncate_probability=1.0,
        keep_fraction=(0.5, 0.5),
        min_words=5,
        seed=0,
    )
    short = TextAugmentation(**{**dataclasses.asdict(halve), "keep_fraction": (0.01, 0.01)})
    rng = np.random.default_rng(0)
    assert corrupt_texts(np.array([text], object), halve, rng) == [" ".join(text.split()[:20])]
    assert corrupt_texts(np.array([text], object), short, rng) == [" ".join(text.split()[:5])]


def test_character_edits_change_each_word_by_one_edit_at_most() -> None:
    typos = TextAugmentation(
        copies=1,
        edit_rate=(1.0, 1.0),
        truncate_probability=0.0,
        keep_fraction=(1.0, 1.0),
        min_words=1,
        seed=0,
    )
    words = [f"{w}abcdefgh"[: 3 + i % 6] for i, w in enumerate("xyzuvw" * 10)]
    out = corrupt_texts(np.array([" ".join(words)], object), typos, np.random.default_rng(0))[0]
    edited = out.split()
    assert len(edited) == len(words)
    assert all(abs(len(a) - len(b)) <= 1 for a, b in zip(words, edited))
    assert sum(a != b for a, b in zip(words, edited)) > len(words) // 2


def test_describe_says_what_was_done() -> None:
    assert describe(FIELD_IMAGES) == (
        "4 copies (seed 1): Gaussian noise sigma 0-3 of 16; a 1-3 x 1-3 px patch erased on 50%"
    )
    assert describe(FIELD_TEXTS) == (
        "4 copies (seed 1): one character edit on 0-20% of the words; 60% cut to the first"
        " 10-100% of the words (at least 10)"
    )


def test_documents_vocabulary_comes_from_the_original_texts_only() -> None:
    pytest.importorskip("sklearn")
    from sklearn.feature_extraction.text import TfidfVectorizer

    from cascade.models.train import TOKEN_PATTERN, train_tier

    texts = np.concatenate([TEXTS] * 4)
    labels = np.concatenate([TEXT_LABELS] * 4)
    spec = next(s for s in LADDERS["documents"] if s.tier == "cloud")
    assert spec.augmentation is not None
    trained = train_tier("documents", spec, texts, labels)
    vocabulary = trained.pipeline.named_steps["tfidf"].vocabulary_
    clean = TfidfVectorizer(token_pattern=TOKEN_PATTERN).fit(texts).vocabulary_
    assert vocabulary == clean
    assert trained.train_samples == len(texts) * (spec.augmentation.copies + 1)
