"""Prompts per tier model: from a request's ``input`` to the :class:`CompletionInput` a
generative runner takes.

A tier's manifest entry names its prompt ``style``; the style knows how its model wants to be
asked:

- ``chatml``: an instruction-tuned chat model with the ChatML template (SmolLM2-Instruct):
  system and user turns, the document in the user turn, zero-shot;
- ``chatml-fewshot``: the same with worked examples as earlier user/assistant turns (the
  stronger prompt: longer, so a slower first token unless its prefix is cached);
- ``fewshot``: a base model without a chat template (Gemma 3 270M): a plain completion prompt,
  worked examples then the document, the answer starts after ``JSON:``.

Every style asks for one JSON object matching the task's schema (``json_schema``: runners
constrain decoding with it), and the worked examples are the first documents of the task's
seeded train split, so the prompt is the same on every machine and in every build.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, get_args

from cascade.contract.inputs import documents_input
from cascade.contract.outputs import CompletionInput
from cascade.errors import ModelError

if TYPE_CHECKING:
    from cascade.models.manifest import Manifest

__all__ = ["MAX_DOCUMENT_CHARS", "PROMPT_STYLES", "PromptStyle", "build_prompt",
           "completion_decoder", "completion_input", "tier_decoder"]

PromptStyle = Literal["chatml", "chatml-fewshot", "fewshot"]
PROMPT_STYLES: tuple[str, ...] = get_args(PromptStyle)
MAX_DOCUMENT_CHARS = 4_000
"""Longest document a tier takes (about 1,200 tokens: the prompt must fit the context)."""
MAX_ANSWER_TOKENS = 96
"""The longest answer of the schema is about 70 tokens; a cut answer is not valid JSON."""
SHOTS = {"chatml-fewshot": (1, 2, 4), "fewshot": (0, 3, 4, 1)}
"""Indices into the train split of each style's worked examples (kinds and difficulties mixed)."""

_SYSTEM = ("You extract fields from business documents. Answer with one JSON object and "
           "nothing else.")


@functools.cache
def _instructions() -> str:
    from cascade.models.extraction.fields import FIELD_HELP

    lines = [f"- {name}: {help_}" for name, help_ in FIELD_HELP.items()]
    template = ", ".join(f'"{name}": "..."' for name in FIELD_HELP)
    return ("Extract these fields from the document and answer with one JSON object "
            "(copy values as written):\n" + "\n".join(lines) + f"\nAnswer: {{{template}}}")


@functools.cache
def _examples(style: str) -> tuple[tuple[str, str], ...]:
    """(document, answer JSON) pairs of a style's worked examples."""
    from cascade.models.extraction.documents import split_documents

    train = split_documents("train")
    return tuple((train[i].text.strip(), _answer_json(train[i].written)) for i in SHOTS[style])


def _answer_json(values: dict[str, str]) -> str:
    from cascade.models.extraction.fields import FIELDS

    return json.dumps({f: values[f] for f in FIELDS}, ensure_ascii=False)


def _chatml(turns: list[tuple[str, str]]) -> str:
    body = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return body + "<|im_start|>assistant\n"


def build_prompt(style: PromptStyle, text: str) -> str:
    """The whole prompt of ``style`` for one document."""
    if style == "chatml":
        return _chatml([("system", _SYSTEM),
                        ("user", f"{_instructions()}\n\nDocument:\n{text.strip()}")])
    if style == "chatml-fewshot":
        turns = [("system", _SYSTEM)]
        for i, (doc, answer) in enumerate(_examples(style)):
            user = f"Document:\n{doc}" if i else f"{_instructions()}\n\nDocument:\n{doc}"
            turns += [("user", user), ("assistant", answer)]
        return _chatml([*turns, ("user", f"Document:\n{text.strip()}")])
    if style == "fewshot":
        shots = "".join(f"Document:\n{doc}\nJSON: {answer}\n\n###\n\n"
                        for doc, answer in _examples(style))
        return f"{_instructions()}\n\n###\n\n{shots}Document:\n{text.strip()}\nJSON:"
    raise ModelError(f"unknown prompt style {style!r}; allowed: {', '.join(PROMPT_STYLES)}",
                     field="prompt")


def completion_input(style: PromptStyle, text: str,
                     max_tokens: int | None = None) -> CompletionInput:
    """The runner's input for one (already validated) document under ``style``."""
    from cascade.models.extraction.fields import JSON_SCHEMA

    stop = ("<|im_end|>",) if style.startswith("chatml") else ("\n\n###", "\nDocument:")
    return CompletionInput(prompt=build_prompt(style, text),
                           max_tokens=max_tokens or MAX_ANSWER_TOKENS,
                           json_schema=JSON_SCHEMA, stop=stop, temperature=0.0)


def completion_decoder(style: str) -> Callable[..., CompletionInput]:
    """The input decoder of a generative tier (plugs into ``TaskRuntime.decode``).

    ``decode({"text": document}, max_text_chars=..., max_tokens=...)`` returns the
    :class:`CompletionInput` of the tier's prompt style (``max_tokens``: the request's, else
    :data:`MAX_ANSWER_TOKENS`). A missing, non-string, empty or oversize text is a 422
    :class:`~cascade.errors.InvalidInput` naming ``input.text``; the limit is the tier's
    ``max_text_chars`` or :data:`MAX_DOCUMENT_CHARS`, whichever is smaller. An unknown style
    is a :class:`ModelError` when the decoder is made, not per request.
    """
    if style not in PROMPT_STYLES:
        raise ModelError(f"unknown prompt style {style!r}; allowed: {', '.join(PROMPT_STYLES)}",
                         field="prompt")
    chosen: PromptStyle = style  # type: ignore[assignment]

    def decode(value: dict[str, Any], *, max_text_chars: int = MAX_DOCUMENT_CHARS,
               max_tokens: int | None = None, **_: Any) -> CompletionInput:
        (text,) = documents_input(value, max_text_chars=min(max_text_chars, MAX_DOCUMENT_CHARS))
        return completion_input(chosen, text, max_tokens)

    decode.__name__ = f"completion_decoder_{style.replace('-', '_')}"
    return decode


def tier_decoder(manifest: Manifest, task: str, tier: str) -> Callable[..., CompletionInput]:
    """The input decoder of one tier of a generative task: its manifest entry names the prompt
    style (:class:`ModelError` naming the task when it is not generative)."""
    from cascade.models.manifest import GenerativeTierEntry

    entry = manifest.tier(task, tier)
    if not isinstance(entry, GenerativeTierEntry):
        raise ModelError(f"task {task!r} is not generative: its tiers classify, they take no "
                         "prompt", field="task")
    return completion_decoder(entry.prompt)
