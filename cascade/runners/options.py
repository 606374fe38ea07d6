"""Runtime options (``ModelSpec.options``) validated once, when a model loads: a wrong or
unknown key stops the tier with an error naming the model, the option and the allowed keys."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from cascade.errors import ModelError

__all__ = ["parse_options"]

OptionsT = TypeVar("OptionsT", bound=BaseModel)


def parse_options(model: type[OptionsT], options: Mapping[str, Any], *, where: str,
                  runtime: str) -> OptionsT:
    """``options`` as ``model``; :class:`ModelError` (``field="options.<key>"``) otherwise."""
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "options"
        allowed = ", ".join(model.model_fields)
        raise ModelError(f"{where}: option {key!r}: {first['msg']} ({runtime} options: "
                         f"{allowed})", field=f"options.{key}") from None
