"""A user's labelled held-out file, read as decoded inputs of the task's declared input.

Two formats:

* ``.npz`` with arrays ``x`` (one row per sample, as the decoder returns it without the batch
  dimension: features [N, length], tensors [N, *shape], images [N, H, W] or [N, H, W, C] of
  0..255 pixels at any size, texts a string array) and ``y`` (class names);
* ``.jsonl``: one ``{"input": {...}, "label": "..."}`` per line, where ``input`` is exactly
  what a client sends to ``/v1/infer`` (a PNG or JPEG works too), decoded by the same decoder.

Every error names the file and the array, line or field.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cascade.contract.decoders import decoder_for, image_array
from cascade.contract.input_spec import ImageInput, InputSpec, TextInput
from cascade.errors import InvalidInput, RegistrationError
from cascade.runners.prepare import decoded_shape

__all__ = ["HeldOut", "read_heldout", "split_heldout"]

MIN_ROWS = 4


@dataclass(frozen=True)
class HeldOut:
    """Decoded inputs (an array [N, ...] or a list of texts) and their class names."""

    inputs: npt.NDArray[Any] | list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, indices: Sequence[int]) -> HeldOut:
        """The samples at ``indices``, in that order."""
        if isinstance(self.inputs, list):
            return HeldOut([self.inputs[i] for i in indices], [self.labels[i] for i in indices])
        return HeldOut(self.inputs[np.asarray(indices, dtype=np.intp)],
                       [self.labels[i] for i in indices])


def read_heldout(path: Path, spec: InputSpec, classes: Sequence[str]) -> HeldOut:
    """Read a labelled ``.npz`` or ``.jsonl`` file; :class:`RegistrationError` names what is
    wrong and where."""
    path = Path(path)
    if not path.is_file():
        raise RegistrationError(f"{path}: no such held-out file", file=str(path))
    if path.suffix == ".npz":
        heldout = _read_npz(path, spec)
    elif path.suffix == ".jsonl":
        heldout = _read_jsonl(path, spec)
    else:
        raise RegistrationError(f"{path}: a held-out file is .npz (arrays x, y) or .jsonl "
                                f"(lines {{\"input\": ..., \"label\": ...}}); got "
                                f"{path.suffix or 'no suffix'}", file=str(path))
    known = set(classes)
    for i, label in enumerate(heldout.labels):
        if label not in known:
            where = f"y[{i}]" if path.suffix == ".npz" else f"line {i + 1}: label"
            raise RegistrationError(f"{path}: {where}: {label!r} is not a class of the task; "
                                    f"allowed: {', '.join(classes)}", file=str(path), key=where)
    if len(heldout) < MIN_ROWS:
        raise RegistrationError(f"{path}: {len(heldout)} labelled samples; at least {MIN_ROWS}",
                                file=str(path))
    return heldout


def split_heldout(heldout: HeldOut, *, seed: int = 0) -> tuple[HeldOut, HeldOut]:
    """Calibration and test halves, stratified by class and seeded (same file, same split)."""
    rng = np.random.default_rng(seed)
    calibration: list[int] = []
    test: list[int] = []
    labels = np.asarray(heldout.labels)
    for label in sorted(set(heldout.labels)):
        rows = rng.permutation(np.flatnonzero(labels == label))
        half = len(rows) // 2
        calibration += rows[:half].tolist()
        test += rows[half:].tolist()
    return heldout.rows(sorted(calibration)), heldout.rows(sorted(test))


def _read_npz(path: Path, spec: InputSpec) -> HeldOut:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [name for name in ("x", "y") if name not in arrays.files]
            if missing:
                raise RegistrationError(f"{path}: array {missing[0]!r} is missing; a held-out "
                                        f".npz holds x (inputs) and y (class names); it has "
                                        f"{', '.join(arrays.files) or 'none'}",
                                        file=str(path), key=missing[0])
            x, y = arrays["x"], arrays["y"]
    except (OSError, ValueError) as exc:
        raise RegistrationError(f"{path}: not a readable .npz file ({exc})",
                                file=str(path)) from None
    if y.ndim != 1 or len(y) != len(x):
        raise RegistrationError(f"{path}: y: must be one label per row of x ({len(x)}); got "
                                f"shape {list(y.shape)}", file=str(path), key="y")
    labels = [str(v) for v in y.tolist()]
    if isinstance(spec, TextInput):
        if x.dtype.kind not in "US" or x.ndim != 1:
            raise RegistrationError(f"{path}: x: a text task's x is a 1-D string array; got "
                                    f"{x.dtype} {list(x.shape)}", file=str(path), key="x")
        return HeldOut([str(t) for t in x.tolist()], labels)
    if x.dtype.kind not in "iuf":
        raise RegistrationError(f"{path}: x: must hold numbers; got {x.dtype}", file=str(path),
                                key="x")
    if isinstance(spec, ImageInput):
        if x.ndim not in (3, 4):
            raise RegistrationError(f"{path}: x: images are [N, H, W] or [N, H, W, C]; got "
                                    f"{list(x.shape)}", file=str(path), key="x")
        try:
            images = [image_array(row, spec, field=f"x[{i}]") for i, row in enumerate(x)]
        except InvalidInput as exc:
            raise RegistrationError(f"{path}: {exc.field}: {exc.message}", file=str(path),
                                    key=exc.field) from None
        return HeldOut(np.stack(images), labels)
    expected = decoded_shape(spec)
    if tuple(x.shape[1:]) != expected:
        raise RegistrationError(f"{path}: x: rows must have shape {list(expected)} (the declared "
                                f"input); got {list(x.shape[1:])}", file=str(path), key="x")
    dtype = getattr(spec, "dtype", "float32")
    return HeldOut(np.ascontiguousarray(x, dtype=dtype), labels)


def _read_jsonl(path: Path, spec: InputSpec) -> HeldOut:
    decode = decoder_for(spec)
    inputs: list[Any] = []
    labels: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {number}"
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise RegistrationError(f"{where}: not JSON ({exc})", file=str(path),
                                        key=f"line {number}") from None
            if not isinstance(record, dict) or set(record) != {"input", "label"}:
                got = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise RegistrationError(f"{where}: must be an object with exactly 'input' and "
                                        f"'label'; got {got}", file=str(path),
                                        key=f"line {number}")
            try:
                decoded = decode(record["input"])
            except InvalidInput as exc:
                raise RegistrationError(f"{where}: {exc.field}: {exc.message}", file=str(path),
                                        key=f"line {number}: {exc.field}") from None
            inputs.append(decoded[0])
            labels.append(str(record["label"]))
    if isinstance(spec, TextInput):
        return HeldOut([str(t) for t in inputs], labels)
    if not inputs:
        raise RegistrationError(f"{path}: no samples", file=str(path))
    return HeldOut(np.stack(inputs), labels)
