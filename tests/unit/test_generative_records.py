"""Recorded generations: round trip, validity per split, and merging saves per split."""

from __future__ import annotations

from cascade.contract.outputs import Generation
from cascade.lab.generative.build import _merge_save
from cascade.lab.generative.records import (
    Record,
    RecordedRun,
    Recordings,
    latency_summary,
    predictions_path,
    split_digest,
)

GEN = Generation('{"a": "1"}', ('{"', "a", '": "', "1", '"}'), (-0.1, -0.2, -0.01, -0.5, -0.02),
                 "stop", 300, 5, ttft_ms=120.0)


def test_a_record_round_trips_exactly():
    record = Record(GEN, 400.0)
    assert Record.from_json(record.to_json()) == record


def test_records_are_valid_only_for_the_same_documents():
    run = RecordedRun("m", "ab" * 32, "chatml", {"test": [Record(GEN, 1.0)]},
                      {"test": split_digest(["doc"], ["label"])})
    assert run.records("test", split_digest(["doc"], ["label"])) == [Record(GEN, 1.0)]
    assert run.records("test", split_digest(["doc", "doc2"], ["label", "l2"])) is None
    assert run.records("calibration", split_digest(["doc"], ["label"])) is None


def test_two_processes_saving_splits_of_one_run_keep_both(tmp_path):
    path = predictions_path(tmp_path, "extraction")
    calibration = RecordedRun("m", "ab" * 32, "fewshot", {"calibration": [Record(GEN, 1.0)]},
                              {"calibration": "c"})
    test = RecordedRun("m", "ab" * 32, "fewshot", {"test": [Record(GEN, 2.0)] * 2},
                       {"test": "t"})
    _merge_save(path, test, "test")
    _merge_save(path, calibration, "calibration")  # knew nothing of the test split
    (run,) = Recordings.load(path, "extraction").runs.values()
    assert {s: len(r) for s, r in run.splits.items()} == {"calibration": 1, "test": 2}
    assert run.split_digest == {"calibration": "c", "test": "t"}


def test_latency_summary():
    summary = latency_summary([Record(GEN, 400.0), Record(GEN, 600.0)])
    assert summary["latency_ms_p50"] == 500.0 and summary["ttft_ms_p50"] == 120.0
    assert summary["tokens_per_s"] is not None and summary["tokens_per_s"] > 0
