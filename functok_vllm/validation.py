"""Readable messages from pydantic validation errors (the dotted path of the first bad field and what is wrong), and
the strict base every user-facing object shares."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from functok_vllm.core.spec import SpecError

StrictInt = Annotated[int, Field(strict=True)]
StrictFloat = Annotated[float, Field(strict=True)]  # strict floats take JSON ints too, but never strings or bools


class Strict(BaseModel):
    """Our own objects forbid unknown keys (a misspelt `strenght` is an error, not a silent no-op) and NaN/Inf."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class FieldError(ValueError):
    """A value error of one field of an edit, raised where pydantic only knows the edit: the parser names the field."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.field = name


MAX_SHOWN = 120  # characters of a bad value echoed back in an error message
UNION_TAG = re.compile(r"(str|int|float|bool|dict|list|none)(\[.*\])?")  # how pydantic names union members


def shown(value) -> str:
    r = repr(value)
    return r if len(r) <= MAX_SHOWN else r[: MAX_SHOWN - 3] + "..."


def dotted(loc) -> str:
    """("steering", "edits", 0, "feature") -> "steering.edits[0].feature"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def field_path(loc) -> tuple:
    """A pydantic error location without "body" and without the names pydantic gives union members."""
    loc = tuple(loc)[1:] if tuple(loc)[:1] == ("body",) else tuple(loc)
    return tuple(p for p in loc if not (isinstance(p, str) and (p[:1].isupper() or UNION_TAG.fullmatch(p))))


def describe(errors: list[dict], prefix: tuple = ()) -> tuple[str | None, str]:
    """(dotted field or None, message) for the first invalid field of pydantic `errors`, under `prefix`."""
    first = errors[0]
    loc = field_path(first.get("loc", ()))
    same = [e for e in errors if field_path(e.get("loc", ())) == loc]  # a union's members fail together
    param = dotted(prefix + loc) or None
    msg = " or ".join(dict.fromkeys(e.get("msg", "invalid value").removeprefix("Value error, ") for e in same)).replace(
        " or Input should be ", " or "
    )
    if first.get("type") == "extra_forbidden":
        msg = "unknown field (check its spelling)"
    elif first.get("type") == "missing":
        msg = "this field is required"
    elif "input" in first and not isinstance(first["input"], dict):
        msg += f" (got {shown(first['input'])})"
    rest = len(errors) - len(same)
    return param, msg + (f" (and {rest} more problems)" if rest else "")


def validated(model, given, param: str):
    """`given` (a user's JSON object at `param`) as an instance of the pydantic `model`; SpecError naming the first bad
    field (`features.layers[0]`) otherwise."""
    if not isinstance(given, dict):
        raise SpecError(param, f"must be a JSON object, got {shown(given)}")
    try:
        return model.model_validate(given)
    except ValidationError as e:
        where, msg = describe(e.errors(), (param,))
        raise SpecError(where or param, msg) from None
