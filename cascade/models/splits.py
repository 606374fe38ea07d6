"""Writing the held-out calibration and test splits at build time.

Their layout and the reader, ``load_split``, live in :mod:`cascade.models.manifest` with the
rest of the models-directory contract.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cascade.models.manifest import DOCUMENTS_SPLIT_FILE, NPZ_SUFFIX, VISION_SPLIT_FILE

__all__ = ["DOCUMENTS_SPLIT_FILE", "VISION_SPLIT_FILE", "save_array_split", "save_documents_split",
           "save_vision_split"]


def save_vision_split(
    path: Path,
    calibration: tuple[npt.NDArray[np.float32], Sequence[str]],
    test: tuple[npt.NDArray[np.float32], Sequence[str]],
) -> None:
    """Write the vision calibration and test splits to ``path`` (an ``.npz``)."""
    save_array_split(path, (np.asarray(calibration[0], np.float32), calibration[1]),
                     (np.asarray(test[0], np.float32), test[1]))


def save_array_split(
    path: Path,
    calibration: tuple[npt.NDArray[Any], Sequence[str]],
    test: tuple[npt.NDArray[Any], Sequence[str]],
) -> None:
    """Write calibration and test splits of array inputs (any shape and dtype) to an ``.npz``:
    ``X_calib``, ``y_calib``, ``X_test``, ``y_test``, as :func:`load_split` reads them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, (inputs, labels) in (("calibration", calibration), ("test", test)):
        arrays[f"X_{NPZ_SUFFIX[name]}"] = np.ascontiguousarray(inputs)
        arrays[f"y_{NPZ_SUFFIX[name]}"] = np.asarray(labels, dtype=str)
    with path.open("wb") as handle:
        np.savez_compressed(handle, **arrays)  # type: ignore[arg-type]


def save_documents_split(
    path: Path,
    classes: Sequence[str],
    calibration: tuple[Sequence[str], Sequence[str]],
    test: tuple[Sequence[str], Sequence[str]],
) -> None:
    """Write the documents calibration and test splits to ``path`` (a JSON file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "classes": list(classes),
        **{
            name: {"texts": list(texts), "labels": list(labels)}
            for name, (texts, labels) in (("calibration", calibration), ("test", test))
        },
    }
    path.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
