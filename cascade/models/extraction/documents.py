"""A seeded generator of business documents with exact answers: the ``extraction`` task's data.

Three kinds (invoices, letters, shipping notices), each **easy** (labelled fields in the usual
places, in plain formats) or **hard** (a mix of: distractor numbers, amounts and dates next to
the real ones; blocks in another order; fields stated only indirectly, in a sentence or a
footer; OCR-like noise in the text around the values). The values themselves are never
corrupted, so every document has exactly one right answer (:mod:`.fields`).

The same ``(split, size, seed)`` always gives the same documents: splits are data, not
randomness, so calibration and test numbers are reproducible.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from cascade.models.extraction.fields import canonical

__all__ = ["Document", "generate", "split_documents"]

_T = TypeVar("_T")
Difficulty = Literal["easy", "hard"]
SPLIT_SIZES: dict[str, int] = {"train": 24, "calibration": 150, "test": 120}
"""Train is the pool few-shot examples come from; calibration and test are held out (150 and
120: a threshold fitted on 48 documents, three of them answered right by the endpoint model, let
wrong answers through on the test split; see the README)."""

_COMPANIES = (
    "Brightwave Energy Ltd", "Nordlicht Maschinenbau GmbH", "Harbor & Finch LLC",
    "Kestrel Analytics Inc.", "Vallée Verte S.A.", "Polar Timber Oy", "Meridian Foods B.V.",
    "Ostrava Steelworks a.s.", "Blue Fjord Seafood AS", "Castellan Furniture S.r.l.",
    "Greenfield Agritech Ltd", "Altamira Textiles S.L.", "Quantum Leaf Software AG",
    "Redwood Print Co.", "Sundstrom Elektro AB", "Pioneer Medical Supplies Ltd",
    "Ironbridge Engineering plc", "Lumen Optics GmbH", "Copperline Cables Inc.",
    "Atlas Office Partners LLP", "Silverline Travel GmbH", "Tidewater Marine Ltd",
    "Orchard Lane Bakery", "Summit Outdoor Gear Inc.", "Baltic Amber Trading UAB",
)
_RECIPIENTS = (
    "Northwind Traders Ltd", "Contoso Retail GmbH", "Fabrikam Logistics", "Adatum Clinics",
    "Litware Publishing", "Tailspin Toys Inc.", "Wingtip Hotels AG", "Proseware Systems",
    "Coho Winery", "Fourth Coffee Ltd", "Lucerne Legal LLP", "Alpine Ski House",
)
_CARRIERS = ("DHL Express", "UPS", "FedEx", "DPD", "GLS", "Royal Mail", "PostNL", "TNT",
             "Hermes", "Chronopost", "Posti", "Bring")
_PEOPLE = ("Anna Keller", "James O'Brien", "Sofia Lindqvist", "Marco Bianchi", "Chloé Martin",
           "Piotr Nowak", "Emma Brown", "Lukas Huber", "Ines Duarte", "Tom Baker")
_CITIES = (("Berlin", "10115"), ("Leeds", "LS1 4AP"), ("Lyon", "69002"), ("Turku", "20100"),
           ("Rotterdam", "3011 AA"), ("Brno", "602 00"), ("Bergen", "5003"), ("Porto", "4000-123"),
           ("Graz", "8010"), ("Malmö", "211 20"), ("Vilnius", "01103"), ("Denver", "80202"))
_STREETS = ("Harbour Road", "Lindenstraße", "Rue Garibaldi", "Kauppakatu", "Coolsingel",
            "Mill Lane", "Strandgaten", "Rua das Flores", "Herrengasse", "Baker Street")
_ITEMS = ("Consulting services", "Steel brackets M8", "Annual licence", "Oak desk",
          "Fibre cable 50 m", "Installation", "Printer toner", "Travel expenses",
          "Safety gloves (box)", "Maintenance visit", "LED panels", "Freight")
_CURRENCIES = ("EUR", "USD", "GBP", "€", "$", "£", "CHF", "SEK")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")
_OCR = {"o": "0", "O": "0", "l": "1", "i": "l", "e": "c", "a": "o", "m": "rn", "S": "5",
        "B": "8", "u": "v"}


@dataclass(frozen=True)
class Document:
    """One generated document and its exact answer (``truth``, the task's five fields)."""

    text: str
    truth: dict[str, str]
    kind: str
    difficulty: Difficulty
    tricks: tuple[str, ...] = ()
    """What makes a hard document hard (distractors, reordered, indirect, ocr)."""
    written: dict[str, str] = field(default_factory=dict)
    """The answer's values as the document spells them (few-shot answers copy these)."""

    @property
    def label(self) -> str:
        """The truth in the form splits store it (canonical JSON of the normalised fields)."""
        return canonical(self.truth)


@dataclass
class _Draft:
    """A document being written: blocks of lines (reorderable), the header stays first."""

    header: list[str]
    blocks: list[list[str]]
    footer: list[str] = field(default_factory=list)
    tricks: list[str] = field(default_factory=list)


class _Writer:
    """Writes one document with its own random stream."""

    def __init__(self, rng: random.Random, difficulty: Difficulty) -> None:
        self.rng = rng
        self.hard = difficulty == "hard"

    # -- values ---------------------------------------------------------------------------------

    def pick(self, options: Sequence[_T]) -> _T:
        return options[self.rng.randrange(len(options))]

    def date(self) -> tuple[int, int, int]:
        return self.rng.randint(2022, 2025), self.rng.randint(1, 12), self.rng.randint(1, 28)

    def spell_date(self, ymd: tuple[int, int, int], *, plain: bool) -> str:
        y, m, d = ymd
        if plain:
            return self.pick((f"{y}-{m:02d}-{d:02d}", f"{d:02d}.{m:02d}.{y}"))
        month = _MONTHS[m - 1]
        return self.pick((f"{d} {month} {y}", f"{month} {d}, {y}", f"{d} {month[:3]} {y}",
                          f"{d:02d}.{m:02d}.{y}", f"{d}{_suffix(d)} of {month} {y}"))

    def amount(self, low: float = 20.0, high: float = 25_000.0) -> float:
        return round(self.rng.uniform(low, high), 2)

    def spell_amount(self, value: float, currency: str, *, plain: bool) -> str:
        english = f"{value:,.2f}"
        if plain:
            return f"{currency} {english}"
        european = english.replace(",", "_").replace(".", ",").replace("_", ".")
        return self.pick((f"{currency} {english}", f"{english} {currency}",
                          f"{european} {currency}", f"{currency}{value:.2f}"))

    def code(self, pattern: str) -> str:
        """``A`` a capital letter, ``9`` a digit, anything else kept."""
        return "".join(chr(65 + self.rng.randrange(26)) if c == "A" else
                       str(self.rng.randrange(10)) if c == "9" else c for c in pattern)

    # -- tricks ---------------------------------------------------------------------------------

    def choose_tricks(self) -> set[str]:
        if not self.hard:
            return set()
        extra = self.rng.sample(("reordered", "indirect", "ocr"), self.rng.randint(1, 2))
        return {"distractors", *extra}

    def finish(self, draft: _Draft, kind: str, truth: dict[str, str], tricks: set[str],
               difficulty: Difficulty, written: dict[str, str]) -> Document:
        blocks = list(draft.blocks)
        if "reordered" in tricks:
            self.rng.shuffle(blocks)
        lines = draft.header + [""] + [line for b in blocks for line in [*b, ""]] + draft.footer
        if "ocr" in tricks:
            keep = set(written.values())
            lines = [self.ocr(line, keep) for line in lines]
        text = "\n".join(lines).strip() + "\n"
        return Document(text, truth, kind, difficulty, tuple(sorted(tricks)),
                        {"type": truth["type"], **written})

    def ocr(self, line: str, keep: set[str]) -> str:
        """Scanner noise in a line, never inside a value of the answer."""
        protected = [(line.find(v), line.find(v) + len(v)) for v in keep if v and v in line]
        out = []
        for i, ch in enumerate(line):
            safe = not any(a <= i < b for a, b in protected)
            if safe and ch in _OCR and self.rng.random() < 0.12:
                out.append(_OCR[ch])
            elif safe and ch == " " and self.rng.random() < 0.05:
                out.append("  ")
            else:
                out.append(ch)
        return "".join(out)


def _suffix(day: int) -> str:
    return "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


def _written(number: str, date: str, company: str, amount: str) -> dict[str, str]:
    return {"number": number, "date": date, "company": company, "amount": amount}


def _address(w: _Writer) -> str:
    city, code = w.pick(_CITIES)
    return f"{w.rng.randint(1, 180)} {w.pick(_STREETS)}, {code} {city}"


def _invoice(w: _Writer, difficulty: Difficulty) -> Document:
    tricks = w.choose_tricks()
    issuer, customer = w.pick(_COMPANIES), w.pick(_RECIPIENTS)
    number = w.code(w.pick(("INV-99999", "9999-0999", "RE-999999", "F9999-00999", "AA/9999/99")))
    ymd, currency = w.date(), w.pick(_CURRENCIES)
    items = [(w.pick(_ITEMS), w.rng.randint(1, 12), w.amount(5, 900)) for _ in range(w.rng.randint(1, 4))]
    net = round(sum(q * p for _, q, p in items), 2)
    vat = round(net * 0.2, 2) if w.hard else 0.0
    total = round(net + vat, 2)
    plain = not w.hard
    date_text = w.spell_date(ymd, plain=plain)
    total_text = w.spell_amount(total, currency, plain=plain)
    indirect = "indirect" in tricks
    header = ([] if indirect else [issuer, _address(w)]) + [w.pick(("INVOICE", "Invoice", "TAX INVOICE"))]
    meta = [f"Invoice No: {number}", f"Date: {date_text}", f"Bill to: {customer}"]
    if "distractors" in tricks:
        due = (ymd[0] + (ymd[1] == 12), ymd[1] % 12 + 1, ymd[2])
        meta = [f"Customer no.: {w.code('99999')}", f"Invoice number: {number}",
                f"Order ref: {w.code('PO-99999')}", f"Invoice date: {date_text}",
                f"Due date: {w.spell_date(due, plain=False)}", f"Bill to: {customer}"]
        w.rng.shuffle(meta)
    if indirect:
        meta = [m for m in meta if "nvoice n" not in m.lower() and "No:" not in m]
        meta.append(f"Please quote invoice {number} with your payment.")
    lines = [f"{name:<22} {q:>3} x {p:>9,.2f}" for name, q, p in items]
    totals = [f"Total: {total_text}"]
    if "distractors" in tricks:
        totals = [f"Subtotal: {net:,.2f}", f"VAT 20%: {vat:,.2f}", f"Total due: {total_text}"]
    if indirect:
        totals = [f"Subtotal: {net:,.2f}", f"VAT 20%: {vat:,.2f}",
                  f"Please transfer {total_text} within 30 days."]
    footer = [f"{issuer} · Registered office: {_address(w)} · VAT ID {w.code('AA999999999')}",
              f"Payments to {issuer}, IBAN {w.code('AA99 9999 9999 9999 99')}"] if indirect else []
    truth = _truth("invoice", number, ymd, issuer, total)
    draft = _Draft(header, [meta, lines, totals], footer)
    return w.finish(draft, "invoice", truth, tricks, difficulty,
                    _written(number, date_text, issuer, total_text))


def _truth(kind: str, number: str, ymd: tuple[int, int, int], company: str,
           amount: float) -> dict[str, str]:
    """A document's exact answers, in the form the normalised fields take."""
    return {"type": kind, "number": number, "date": f"{ymd[0]}-{ymd[1]:02d}-{ymd[2]:02d}",
            "company": company, "amount": f"{amount:.2f}"}


def _letter(w: _Writer, difficulty: Difficulty) -> Document:
    tricks = w.choose_tricks()
    sender, recipient, person = w.pick(_COMPANIES), w.pick(_RECIPIENTS), w.pick(_PEOPLE)
    number = w.code(w.pick(("LR-9999", "AA/9999/AA", "REF 99-9999", "9999-AA")))
    ymd, currency = w.date(), w.pick(_CURRENCIES)
    balance = w.amount(50, 9_000)
    plain = not w.hard
    date_text = w.spell_date(ymd, plain=plain)
    balance_text = w.spell_amount(balance, currency, plain=plain)
    city = w.pick(_CITIES)[0]
    indirect = "indirect" in tricks
    header = [] if indirect else [sender, _address(w)]
    to = [f"{w.pick(_PEOPLE)}", recipient, _address(w)]
    refs = [f"Date: {date_text}", f"Our ref: {number}"]
    if "distractors" in tricks:
        refs = [f"{city}, {date_text}", f"Your ref: {w.code('AA-99999')}", f"Our ref: {number}",
                f"Customer account: {w.code('9999999')}"]
    if indirect:
        refs = [r for r in refs if not r.startswith("Our ref")]
    body = [f"Dear {w.pick(_PEOPLE).split()[0]},", "",
            f"our records show an outstanding balance of {balance_text} on your account."]
    if "distractors" in tricks:
        paid = w.amount(10, 2_000)
        paid_on = w.spell_date(w.date(), plain=False)
        body[2:] = [f"thank you for your payment of {currency} {paid:,.2f} received on {paid_on}.",
                    f"After it, an outstanding balance of {balance_text} remains on your account."]
    if indirect:
        body.append(f"Please quote our reference {number} in all correspondence.")
    body.append("We kindly ask you to settle it within 14 days.")
    sign = ["Yours sincerely,", person,
            f"For and on behalf of {sender}" if indirect else sender]
    truth = _truth("letter", number, ymd, sender, balance)
    draft = _Draft(header, [to, refs, body], sign)
    return w.finish(draft, "letter", truth, tricks, difficulty,
                    _written(number, date_text, sender, balance_text))


def _shipping(w: _Writer, difficulty: Difficulty) -> Document:
    tricks = w.choose_tricks()
    merchant, carrier = w.pick(_COMPANIES), w.pick(_CARRIERS)
    number = w.code(w.pick(("1Z999AA99999999999", "JD99999999999999", "99999999999999999999",
                            "AA999999999AA", "9999 9999 9999")))
    ymd, currency = w.date(), w.pick(_CURRENCIES)
    value = w.amount(10, 5_000)
    plain = not w.hard
    date_text = w.spell_date(ymd, plain=plain)
    value_text = w.spell_amount(value, currency, plain=plain)
    indirect = "indirect" in tricks
    header = [w.pick(("SHIPPING NOTICE", "Shipping notice", "DISPATCH NOTE")), f"From: {merchant}"]
    facts = [f"Carrier: {carrier}", f"Tracking number: {number}", f"Dispatch date: {date_text}",
             f"Declared value: {value_text}"]
    if "distractors" in tricks:
        later = (ymd[0], ymd[1], min(28, ymd[2] + w.rng.randint(1, 6)))
        facts = [f"Order no.: {w.code('99999999')}", f"Tracking number: {number}",
                 f"Carrier: {carrier}", f"Shipped on: {date_text}",
                 f"Expected delivery: {w.spell_date(later, plain=False)}",
                 f"Parcels: {w.rng.randint(1, 4)}, weight {w.rng.randint(1, 40)}.{w.rng.randint(0, 9)} kg",
                 f"Shipping fee: {currency} {w.amount(3, 60):,.2f}",
                 f"Declared value for customs: {value_text}"]
        w.rng.shuffle(facts)
    if indirect:
        facts = [f for f in facts if not f.startswith(("Carrier", "Tracking"))]
        facts.insert(0, f"Your parcel is on its way with our partner {carrier}; follow it with "
                        f"the code {number}.")
    body = [f"Dear customer, your order from {merchant} has been dispatched."]
    truth = _truth("shipping_notice", number, ymd, carrier, value)
    draft = _Draft(header, [body, facts], [f"{merchant} customer service"])
    return w.finish(draft, "shipping_notice", truth, tricks, difficulty,
                    _written(number, date_text, carrier, value_text))


_KINDS = {"invoice": _invoice, "letter": _letter, "shipping_notice": _shipping}


def generate(n: int, seed: int) -> list[Document]:
    """``n`` documents, the kinds in turn and easy and hard alternating, from ``seed``."""
    rng = random.Random(seed)
    kinds = list(_KINDS)
    out = []
    for i in range(n):
        difficulty: Difficulty = "easy" if i % 2 == 0 else "hard"
        kind = kinds[(i // 2) % len(kinds)]
        doc_rng = random.Random(rng.getrandbits(64))
        out.append(_KINDS[kind](_Writer(doc_rng, difficulty), difficulty))
    return out


def split_seed(split: str, seed: int) -> int:
    """The seed of one split: distinct per split, stable across Python versions."""
    return int.from_bytes(hashlib.sha256(f"extraction:{split}:{seed}".encode()).digest()[:8], "big")


def split_documents(split: str, seed: int = 0, size: int | None = None) -> list[Document]:
    """The documents of one split (``train``, ``calibration`` or ``test``)."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLIT_SIZES)}")
    return generate(SPLIT_SIZES[split] if size is None else size, split_seed(split, seed))
