"""TokenText: UTF-8 split over tokens, stop sequences held back and cut, texts that join."""

from __future__ import annotations

from cascade.runners.token_text import TokenText


def feed(text: TokenText, *pieces: bytes) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for index, piece in enumerate(pieces):
        out += text.add(piece, -float(index))
        if text.stopped:
            return out
    return out + text.finish()


def test_a_character_split_over_tokens_belongs_to_the_token_that_completes_it() -> None:
    assert feed(TokenText(), b"caf", b"\xc3", b"\xa9!") == [("caf", 0.0), ("", -1.0),
                                                          ("é!", -2.0)]


def test_a_stop_sequence_is_held_back_then_cut_with_what_follows() -> None:
    text = TokenText(stop=["\n\n"])
    assert text.add(b"Hello", 0.0) == [("Hello", 0.0)]
    assert text.add(b"\n", -1.0) == []  # could be the start of "\n\n"
    assert text.add(b"\nmore", -2.0) == [] and text.stopped


def test_text_held_back_is_released_once_it_cannot_start_a_stop() -> None:
    text = TokenText(stop=["###"])
    assert text.add(b"a#", -0.5) == []
    assert text.add(b"b", -0.25) == [("a#", -0.5), ("b", -0.25)]
    assert not text.stopped


def test_the_token_a_stop_starts_in_keeps_its_text_before_the_cut() -> None:
    assert feed(TokenText(stop=["END", "never"]), b"fooEN", b"Dbar", b"baz") == [("foo", 0.0)]


def test_at_the_end_held_text_is_emitted() -> None:
    assert feed(TokenText(stop=["###"]), b"x", b"##") == [("x", 0.0), ("##", -1.0)]


def test_without_stops_every_token_is_emitted_at_once() -> None:
    text = TokenText()
    assert text.add(b"a", -1.0) == [("a", -1.0)]
    assert text.add(b"", -2.0) == [("", -2.0)]
