"""Confidence of a generation from its token log-probabilities, whole and per field."""

import math

import numpy as np
import pytest

from cascade.contract.outputs import Classification, Generation
from cascade.errors import ModelError
from cascade.gating.gate import Calibration, GateRule, assess, decide, raw_confidence
from cascade.gating.logprobs import (
    GENERATION_SIGNAL_NAMES,
    NO_EVIDENCE,
    GenerationSignals,
    generation_signals,
    json_value_spans,
    token_spans,
    vector_confidence,
)
from cascade.gating.scoring import assess_output

FIELDS = ("amount", "company")


def gen(tokens, logprobs, finish="stop"):
    return Generation("".join(tokens), tuple(tokens), tuple(logprobs), finish, 10, len(tokens))


# tokens as a BPE tokenizer splits them: punctuation merged with quotes, values in pieces
TOKENS = ['{"', 'amount', '":', ' "', '12', '.50', '",', ' "', 'company', '":', ' "', 'AC', 'ME',
          ' Ltd', '"}']
LOGPROBS = [-0.01, -0.02, -0.03, -0.04, -0.5, -0.1, -0.2, -0.01, -0.01, -0.01, -0.05, -1.0,
            -0.3, -0.4, -0.6]


def test_value_spans_cover_string_contents_and_other_literals():
    text = ' { "a" : "x y", "b": 12.5 ,"c":null, "d": {"e": [1]} } '
    spans = json_value_spans(text)
    assert {k: (v, text[lo:hi]) for k, (v, lo, hi) in spans.items()} == {
        "a": ("x y", 'x y"'), "b": (12.5, "12.5"), "c": (None, "null"),
        "d": ({"e": [1]}, '{"e": [1]}')}


@pytest.mark.parametrize("text", ['{"a": "x"', '{"a": "x"} trailing', '["a"]', "", "{a: 1}",
                                  '{"a" "x"}', '{"a": "x",}'])
def test_value_spans_refuse_what_is_not_one_json_object(text):
    assert json_value_spans(text) is None


def test_token_spans_follow_the_text():
    text = "".join(TOKENS)
    spans = token_spans(TOKENS, text)
    assert [text[a:b] for a, b in spans] == TOKENS


def test_token_spans_tolerate_partial_multibyte_tokens():
    # llama.cpp gives a token holding half of "é" an empty text
    tokens = ['{"', 'company', '": "', 'Vall', '', '', 'e', ' Verte', '"}']
    text = '{"company": "Vallée Verte"}'
    spans = token_spans(tokens, text)
    assert text[spans[3][0]:spans[3][1]] == "Vall"
    e_acute = text.index("é")
    assert spans[4] == (e_acute, e_acute + 1)  # the first piece takes the skipped character
    assert spans[5] == (e_acute + 1, e_acute + 1)  # the second sits, empty, inside the value
    assert text[spans[6][0]:spans[6][1]] == "e"
    s = generation_signals(gen(tokens, [-0.1, -0.1, -0.1, -0.2, -3.0, -0.4, -0.1, -0.1, -0.1]),
                           ("company",))
    assert s.fields[0].tokens == 6 and s.field_min_logprob == -3.0


def test_signals_whole_answer_and_per_field():
    s = generation_signals(gen(TOKENS, LOGPROBS), FIELDS)
    assert s.valid
    assert s.mean_logprob == pytest.approx(sum(LOGPROBS) / len(LOGPROBS))
    assert s.min_logprob == -1.0
    amount, company = s.fields
    # amount: '12', '.50' and the closing-quote token '",'
    assert (amount.name, amount.value, amount.tokens) == ("amount", "12.50", 3)
    assert amount.sum_logprob == pytest.approx(-0.8)
    # company: 'AC', 'ME', ' Ltd' and '"}'
    assert (company.value, company.tokens, company.min_logprob) == ("ACME Ltd", 4, -1.0)
    assert s.field_mean_logprob == pytest.approx(min(-0.8 / 3, -2.3 / 4))
    assert s.field_min_logprob == -1.0
    assert s.answer_logprob == pytest.approx(-0.8 - 2.3)


def test_field_signals_ignore_the_json_punctuation():
    noisy = list(LOGPROBS)
    noisy[0] = noisy[2] = -9.0  # the model wanted something other than '{"' and '":'
    clean = generation_signals(gen(TOKENS, LOGPROBS), FIELDS)
    s = generation_signals(gen(TOKENS, noisy), FIELDS)
    assert s.min_logprob == -9.0
    assert s.field_min_logprob == clean.field_min_logprob
    assert s.answer_logprob == clean.answer_logprob


@pytest.mark.parametrize(("tokens", "finish"), [
    (TOKENS[:-1], "length"),                          # cut at max_tokens: not JSON
    (['{"', 'amount', '": "', '1', '"}'], "stop"),    # a field missing
    (TOKENS, "deadline"),                             # cut by the deadline
])
def test_unusable_structured_answers_have_confidence_zero(tokens, finish):
    s = generation_signals(gen(tokens, [-0.01] * len(tokens), finish), FIELDS)
    assert not s.valid and s.vector() == [NO_EVIDENCE] * 5
    for signal in GENERATION_SIGNAL_NAMES:
        assert vector_confidence(s.vector(), signal) == 0.0


def test_free_text_judged_as_a_whole():
    s = generation_signals(gen(["The", " answer", " is", " 42"], [-0.1, -0.2, -0.3, -0.4]))
    assert s.valid and s.fields == ()
    assert s.field_min_logprob == s.min_logprob == -0.4
    assert s.answer_logprob == pytest.approx(-1.0)


def test_without_fields_a_json_answer_is_held_to_json():
    assert generation_signals(gen(TOKENS, LOGPROBS)).fields[1].name == "company"
    assert not generation_signals(gen(TOKENS[:-1], LOGPROBS[:-1])).valid


def test_confidence_is_exp_of_the_signal_with_temperature_and_curve():
    vector = generation_signals(gen(TOKENS, LOGPROBS), FIELDS).vector()
    rule = GateRule("field_min_logprob", 0.3)
    _, conf = assess(vector, rule)
    assert conf == pytest.approx(math.exp(-1.0))
    assert raw_confidence(vector, "answer_logprob") == pytest.approx(math.exp(-3.1))
    hot = GateRule("field_min_logprob", 0.3, calibration=Calibration(temperature=2.0))
    assert assess(vector, hot)[1] == pytest.approx(math.exp(-0.5))
    curved = GateRule("field_min_logprob", 0.3, calibration=Calibration(curve=((0.0, 0.0),
                                                                                (1.0, 0.5))))
    assert assess(vector, curved)[1] == pytest.approx(math.exp(-1.0) / 2)


def test_vector_round_trip():
    s = generation_signals(gen(TOKENS, LOGPROBS), FIELDS)
    back = GenerationSignals.from_vector(s.vector())
    assert back.vector() == s.vector() and back.valid
    with pytest.raises(ValueError, match="5 values"):
        GenerationSignals.from_vector([0.0, 0.0])


def test_assess_output_of_a_generation_gives_the_answer_as_label():
    rule = GateRule("field_mean_logprob", 0.6)
    scored = assess_output(gen(TOKENS, LOGPROBS), rule, fields=FIELDS)
    assert scored.label == '{"amount":"12.50","company":"ACME Ltd"}'
    assert scored.fields == {"amount": "12.50", "company": "ACME Ltd"}
    assert scored.text == "".join(TOKENS)
    assert scored.probabilities.tolist() == scored.signals.vector()
    assert scored.signals.max_prob is None  # not a classification: the log's columns stay NULL
    assert decide(scored.confidence, scored.label, rule, has_upstream=True).value == "escalate"


def test_an_unusable_answer_escalates_and_keeps_its_text():
    rule = GateRule("mean_logprob", 0.0)
    scored = assess_output(gen(TOKENS[:-2], LOGPROBS[:-2], "length"), rule, fields=FIELDS)
    assert scored.confidence == 0.0 and scored.fields is None
    assert scored.label == "".join(TOKENS[:-2]).strip()
    rule = GateRule("mean_logprob", 0.01)
    assert decide(scored.confidence, scored.label, rule, has_upstream=True).value == "escalate"


def test_signal_kinds_must_match_the_output():
    probs = Classification(np.array([0.9, 0.1]), ("a", "b"))
    with pytest.raises(ModelError, match="scores generations") as info:
        assess_output(probs, GateRule("mean_logprob", 0.5))
    assert info.value.field == "signal"
    with pytest.raises(ModelError, match="scores classifications"):
        assess_output(gen(TOKENS, LOGPROBS), GateRule("max_prob", 0.5))
