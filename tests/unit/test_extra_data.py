"""Extra training data for ``cascade models build --extra-data``: decoded like serving decodes
requests, errors naming the file and line, added to the training split of the chosen tiers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cascade.errors import ModelError
from cascade.models.extra import load_extra_data


def write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rows_are_decoded_and_stacked_for_the_chosen_tiers(tmp_path):
    image = [[float(c) for c in range(8)] for _ in range(8)]
    data = write(tmp_path / "hard.jsonl", [
        {"task": "vision", "input": {"image": image}, "label": "3", "reason": "disagreed"},
        {"task": "documents", "input": {"text": "shares fell"}, "label": "business"},
    ])
    extra = load_extra_data([data], tiers=["endpoint"])
    base = np.zeros((2, 64), np.float32)
    inputs, labels = extra.stack("vision", "endpoint", base, np.array(["1", "2"]))
    assert inputs.shape == (3, 64) and list(labels) == ["1", "2", "3"]
    assert inputs[2].tolist() == [float(c) for c in range(8)] * 8
    same, _ = extra.stack("vision", "cloud", base, np.array(["1", "2"]))  # not an extra tier
    assert same is base
    texts, labels = extra.stack("documents", "endpoint", np.array(["a"], dtype=object),
                                np.array(["tech"]))
    assert list(texts) == ["a", "shares fell"] and list(labels) == ["tech", "business"]
    assert extra.digest and extra.digest != load_extra_data([data]).digest  # tiers count


def test_errors_name_the_file_and_line(tmp_path):
    data = write(tmp_path / "bad.jsonl", [
        {"task": "vision", "input": {"image": [[0] * 8] * 8}, "label": "3"},
        {"task": "vision", "input": {"image": [[0] * 7]}, "label": "3"},
    ])
    with pytest.raises(ModelError, match=r"bad.jsonl, line 2: bad input"):
        load_extra_data([data])
    data = write(tmp_path / "wrong.jsonl", [{"task": "audio", "input": {}, "label": "x"}])
    with pytest.raises(ModelError, match=r"wrong.jsonl, line 1: not a labelled input"):
        load_extra_data([data])
    data = write(tmp_path / "label.jsonl", [{"task": "vision", "input": {"image": [[0] * 8] * 8},
                                             "label": "eleven"}])
    extra = load_extra_data([data])
    with pytest.raises(ModelError, match=r"label.jsonl, line 1: label 'eleven' is not a class"):
        extra.check_classes("vision", tuple(str(i) for i in range(10)))
