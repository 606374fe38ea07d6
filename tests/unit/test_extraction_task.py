"""The extraction task's data: a seeded generator with exact answers, and exact match after
normalisation."""

from collections import Counter

import pytest

from cascade.models.extraction.documents import SPLIT_SIZES, generate, split_documents
from cascade.models.extraction.fields import (
    FIELDS,
    JSON_SCHEMA,
    canonical,
    field_matches,
    is_correct,
    normalise,
    parse_answer,
)


def test_same_seed_same_documents_other_split_other_documents():
    a, b = split_documents("calibration"), split_documents("calibration")
    assert [d.text for d in a] == [d.text for d in b]
    assert [d.truth for d in a] == [d.truth for d in b]
    test = split_documents("test")
    assert not {d.text for d in a} & {d.text for d in test}
    assert [d.text for d in generate(6, seed=1)] != [d.text for d in generate(6, seed=2)]


def test_splits_have_their_sizes_and_every_kind_easy_and_hard():
    for split, size in SPLIT_SIZES.items():
        docs = split_documents(split)
        assert len(docs) == size
    counts = Counter((d.kind, d.difficulty) for d in split_documents("calibration"))
    assert counts == {(kind, level): SPLIT_SIZES["calibration"] // 6 for kind in ("invoice", "letter", "shipping_notice")
                      for level in ("easy", "hard")}


def test_hard_documents_carry_distractors_and_another_trick():
    docs = split_documents("calibration")
    hard = [d for d in docs if d.difficulty == "hard"]
    assert all("distractors" in d.tricks and len(d.tricks) >= 2 for d in hard)
    assert all(d.tricks == () for d in docs if d.difficulty == "easy")
    tricks = Counter(t for d in hard for t in d.tricks)
    assert set(tricks) == {"distractors", "reordered", "indirect", "ocr"}


def test_every_value_is_in_the_document_as_written_and_normalises_to_the_truth():
    for split in SPLIT_SIZES:
        for doc in split_documents(split):
            for name in FIELDS:
                if name != "type":
                    assert doc.written[name] in doc.text, (name, doc.text)
            assert is_correct(doc.written, doc.truth), (doc.written, doc.truth)


def test_hard_invoice_has_distractor_numbers_but_one_answer():
    doc = next(d for d in split_documents("calibration")
               if d.kind == "invoice" and "distractors" in d.tricks and "ocr" not in d.tricks)
    assert "Subtotal" in doc.text and ("Due date" in doc.text or "VAT" in doc.text)
    assert doc.text.count(doc.written["amount"]) == 1


@pytest.mark.parametrize(("field", "spellings", "expected"), [
    ("date", ["2024-03-05", "05.03.2024", "5 March 2024", "March 5, 2024", "5th of March 2024",
              "5 Mar 2024", "2024/03/05"], "2024-03-05"),
    ("amount", ["EUR 1,234.50", "1.234,50 EUR", "€1234.5", "1234.50", "$ 1,234.50"], "1234.50"),
    ("number", ["1Z 999 AA1", "1z999aa1", " 1Z999AA1 "], "1Z999AA1"),
    ("company", ["Lumen Optics GmbH", "lumen optics gmbh.", "  Lumen  Optics GmbH "],
     "lumen optics gmbh"),
    ("type", ["shipping notice", "Shipping_Notice", "shipping-notice"], "shipping_notice"),
])
def test_normalisation_is_fair_to_spelling(field, spellings, expected):
    assert {normalise(field, s) for s in spellings} == {expected}


def test_normalisation_is_idempotent_so_canonical_truths_compare():
    for doc in split_documents("calibration"):
        once = {f: normalise(f, doc.truth[f]) for f in FIELDS}
        assert {f: normalise(f, once[f]) for f in FIELDS} == once
        assert canonical(once) == doc.label


def test_exact_match_needs_every_field():
    truth = {"amount": "10.00", "company": "UPS", "date": "2024-01-02", "number": "A1",
             "type": "shipping_notice"}
    assert is_correct({**truth, "amount": "EUR 10"}, truth)
    assert not is_correct({**truth, "amount": "10.01"}, truth)
    assert not is_correct({k: v for k, v in truth.items() if k != "date"}, truth)
    assert not is_correct(None, truth)
    assert field_matches({**truth, "number": "A2"}, truth) == {**dict.fromkeys(FIELDS, True),
                                                                "number": False}


def test_answers_parse_only_as_json_objects():
    assert parse_answer('{"amount": "1"}') == {"amount": "1"}
    assert parse_answer('["amount"]') is None
    assert parse_answer('{"amount": "1"') is None


def test_schema_requires_every_field_in_order():
    assert list(JSON_SCHEMA["properties"]) == list(FIELDS) == sorted(FIELDS)
    assert JSON_SCHEMA["required"] == list(FIELDS)
    assert JSON_SCHEMA["additionalProperties"] is False
