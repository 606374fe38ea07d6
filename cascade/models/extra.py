"""Extra training data for ``cascade models build --extra-data``: datasets of labelled
requests (what ``cascade examples export`` writes: one ``{"task", "input", "label"}`` JSON
object per line), decoded into training rows of the built-in tasks.

Each input is decoded by the task's serving decoder (an 8x8 image or PNG for ``vision``, a
text for ``documents``), so a model retrains on exactly what a tier saw. The rows join the
training split only: the calibration and test splits stay the same, so the new models are
measured and calibrated on what the old ones were.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cascade.errors import CascadeError, ModelError

__all__ = ["ExtraData", "load_extra_data"]

_KINDS = {"vision": "image8x8", "documents": "text"}


@dataclass
class ExtraData:
    """Extra training rows per built-in task, and what they are (for the build key)."""

    rows: dict[str, tuple[list[Any], list[str], list[str]]] = field(default_factory=dict)
    """Per task: decoded inputs, labels, and where each came from (file and line)."""
    digest: str = ""
    """sha256 of the files and the tiers they train (empty: no extra data)."""
    tiers: frozenset[str] | None = None
    """Tiers that train with them (None: every tier)."""

    def for_tier(self, task: str, tier: str) -> tuple[list[Any], list[str]]:
        """The extra (inputs, labels) of ``task`` that ``tier`` trains with."""
        if self.tiers is not None and tier not in self.tiers:
            return [], []
        inputs, labels, _ = self.rows.get(task, ([], [], []))
        return inputs, labels

    def check_classes(self, task: str, classes: Sequence[str]) -> None:
        """A :class:`ModelError` naming the file and line of a label ``task`` does not have."""
        _, labels, wheres = self.rows.get(task, ([], [], []))
        for label, where in zip(labels, wheres):
            if label not in classes:
                raise ModelError(f"{where}: label {label!r} is not a class of {task}; "
                                 f"allowed: {', '.join(classes)}")

    def stack(self, task: str, tier: str, inputs: npt.NDArray[Any],
              labels: npt.NDArray[np.str_]) -> tuple[npt.NDArray[Any], npt.NDArray[np.str_]]:
        """The training split of ``task`` followed by the extra rows ``tier`` trains with."""
        extra_inputs, extra_labels = self.for_tier(task, tier)
        if not extra_inputs:
            return inputs, labels
        if task == "vision":
            stacked: npt.NDArray[Any] = np.vstack([inputs, np.asarray(extra_inputs, np.float32)])
        else:
            stacked = np.concatenate([inputs, np.array(extra_inputs, dtype=object)])
        return stacked, np.concatenate([labels, np.array(extra_labels, dtype=str)])


def load_extra_data(paths: Sequence[Path], *, tiers: Sequence[str] | None = None) -> ExtraData:
    """Read and decode the datasets at ``paths``; a :class:`ModelError` names the file and
    line of anything that is not a labelled input of a built-in task (classes are checked by
    :meth:`ExtraData.check_classes` once the task's dataset is loaded)."""
    from cascade.contract.inputs import input_decoder

    extra = ExtraData(tiers=frozenset(tiers) if tiers else None)
    digest = hashlib.sha256(json.dumps(sorted(tiers or [])).encode())
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ModelError(f"--extra-data {path}: cannot read: {exc.strerror or exc}") from None
        digest.update(data)
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if not line.strip():
                continue
            where = f"--extra-data {path}, line {number}"
            try:
                row = json.loads(line)
                task, label = row["task"], str(row["label"])
                decoded = input_decoder(_KINDS[task])(row["input"], max_text_chars=1_000_000,
                                                      max_tokens=None)
            except (ValueError, KeyError, TypeError) as exc:
                raise ModelError(f"{where}: not a labelled input of a built-in task "
                                 f"({', '.join(_KINDS)}): {exc!s}") from None
            except CascadeError as exc:
                raise ModelError(f"{where}: bad input: {exc.message}") from None
            inputs, labels, wheres = extra.rows.setdefault(task, ([], [], []))
            inputs.append(np.asarray(decoded[0]) if task == "vision" else decoded[0])
            labels.append(label)
            wheres.append(where)
    extra.digest = digest.hexdigest()[:24] if paths else ""
    return extra
