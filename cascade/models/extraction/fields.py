"""The fields of the ``extraction`` task: what the answer holds, its JSON schema, and how an
answer is compared with the truth (exact match of every field after normalisation).

Every document kind (invoice, letter, shipping notice) answers the same five fields, in this
(alphabetical) order: JSON-schema grammars keep the schema's property order, and a runner that
serialises the schema with sorted keys must not change what the prompts' examples show.

- ``amount``: the total due, the outstanding balance, the declared value (currency left out);
- ``company``: who issued the invoice, the company that sent the letter, the carrier;
- ``date``: the document's date (of issue, of the letter, of dispatch), any common spelling;
- ``number``: the invoice number, the letter's own reference ("Our ref"), the tracking number;
- ``type``: ``invoice``, ``letter`` or ``shipping_notice``.

Normalisation makes the comparison fair to spelling, not to content: a date in any of the
spellings documents use becomes ISO, an amount loses its currency and thousands separators,
a number loses spaces, a company name its case and surrounding punctuation.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from cascade.contract.answer import json_object

parse_answer = json_object
"""The model's answer as a mapping, or None when it is not a JSON object."""

__all__ = ["DOC_TYPES", "FIELDS", "JSON_SCHEMA", "canonical", "field_matches", "is_correct",
           "normalise", "parse_answer"]

FIELDS: tuple[str, ...] = ("amount", "company", "date", "number", "type")
DOC_TYPES: tuple[str, ...] = ("invoice", "letter", "shipping_notice")

FIELD_HELP: dict[str, str] = {
    "amount": "total due, outstanding balance or declared value, without currency",
    "company": "company that issued the invoice or sent the letter; for a shipping notice "
               "the carrier",
    "date": "date of the invoice, of the letter or of dispatch",
    "number": "invoice number, the letter's own reference (Our ref) or the tracking number",
    "type": "invoice, letter or shipping_notice",
}

JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "amount": {"type": "string"},
        "company": {"type": "string"},
        "date": {"type": "string"},
        "number": {"type": "string"},
        "type": {"type": "string", "enum": list(DOC_TYPES)},
    },
    "required": list(FIELDS),
    "additionalProperties": False,
}
"""What the model's answer must match (llama.cpp turns it into a grammar)."""

_MONTHS = {m.lower(): i for i, m in enumerate(
    ("January", "February", "March", "April", "May", "June", "July", "August", "September",
     "October", "November", "December"), start=1)}
_MONTHS.update({name[:3]: i for name, i in list(_MONTHS.items())})
_MONTHS["sept"] = 9
_DATE_NUMERIC = (
    re.compile(r"^(?P<y>\d{4})-(?P<m>\d{1,2})-(?P<d>\d{1,2})$"),
    re.compile(r"^(?P<d>\d{1,2})\.\s?(?P<m>\d{1,2})\.\s?(?P<y>\d{4})$"),
    re.compile(r"^(?P<d>\d{1,2})/(?P<m>\d{1,2})/(?P<y>\d{4})$"),
    re.compile(r"^(?P<y>\d{4})/(?P<m>\d{1,2})/(?P<d>\d{1,2})$"),
)
_DATE_WORDS = (
    re.compile(r"^(?P<d>\d{1,2})(?:st|nd|rd|th)?\s+(?:of\s+)?(?P<mon>[a-z]+)\.?,?\s+(?P<y>\d{4})$"),
    re.compile(r"^(?P<mon>[a-z]+)\.?\s+(?P<d>\d{1,2})(?:st|nd|rd|th)?,?\s+(?P<y>\d{4})$"),
)
_CURRENCY = re.compile(r"(?i)eur|usd|gbp|chf|sek|dkk|pln|[€$£]")


def _date(value: str) -> str:
    text = re.sub(r"\s+", " ", value.strip().lower().rstrip("."))
    for pattern in _DATE_NUMERIC:
        m = pattern.match(text)
        if m:
            return _iso(int(m["y"]), int(m["m"]), int(m["d"]), value)
    for pattern in _DATE_WORDS:
        m = pattern.match(text)
        if m and m["mon"] in _MONTHS:
            return _iso(int(m["y"]), _MONTHS[m["mon"]], int(m["d"]), value)
    return text


def _iso(year: int, month: int, day: int, raw: str) -> str:
    try:
        return dt.date(year, month, day).isoformat()
    except ValueError:
        return raw.strip().lower()


def _amount(value: str) -> str:
    text = _CURRENCY.sub("", value).replace(" ", "").replace("\u00a0", "").strip()
    text = text.rstrip(".-").lstrip("=:")
    if re.fullmatch(r"\d{1,3}(\.\d{3})+(,\d{1,2})?", text) or re.fullmatch(r"\d+,\d{1,2}", text):
        text = text.replace(".", "").replace(",", ".")  # 1.234,50 (European)
    else:
        text = text.replace(",", "").replace("'", "")  # 1,234.50 and 1'234.50
    try:
        return f"{Decimal(text):.2f}"
    except InvalidOperation:
        return value.strip().lower()


def normalise(field: str, value: Any) -> str:
    """The comparable form of one field's value (unknown fields: trimmed and lowercased)."""
    text = "" if value is None else str(value)
    if field == "type":
        return re.sub(r"[\s-]+", "_", text.strip().lower())
    if field == "number":
        return re.sub(r"[\s]+", "", text).upper().strip(".,;:")
    if field == "date":
        return _date(text)
    if field == "amount":
        return _amount(text)
    if field == "company":
        return re.sub(r"\s+", " ", text).strip(" .,;:\"'").casefold()
    return text.strip().lower()


def canonical(answer: Mapping[str, Any], fields: tuple[str, ...] = FIELDS) -> str:
    """One string per answer, equal for answers that are equal field by field after
    normalisation: compact JSON of the normalised fields in schema order."""
    return json.dumps({f: normalise(f, answer.get(f)) for f in fields}, ensure_ascii=False,
                      separators=(",", ":"))


def field_matches(answer: Mapping[str, Any], truth: Mapping[str, Any]) -> dict[str, bool]:
    """Per field of the task, whether the answer's value equals the truth after normalisation
    (a missing field never matches)."""
    return {f: f in answer and normalise(f, answer[f]) == normalise(f, truth[f]) for f in FIELDS}


def is_correct(answer: Mapping[str, Any] | None, truth: Mapping[str, Any]) -> bool:
    """An answer is correct when every field matches."""
    return answer is not None and all(field_matches(answer, truth).values())
