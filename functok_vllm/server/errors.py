"""OpenAI-style error bodies: `{"error": {"message", "type", "param", "code"}}` for every 4xx and 5xx we send."""

from __future__ import annotations

import re

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    501: "not_implemented_error",
    503: "server_error",
    504: "timeout_error",
}
DEFAULT_CODES = {
    400: "invalid_value",
    404: "not_found",
    405: "method_not_allowed",
    500: "internal_error",
    501: "not_implemented",
    504: "timeout",
}
MAX_SHOWN = 120  # characters of a bad value echoed back in an error message
UNION_TAG = re.compile(r"(str|int|float|bool|dict|list|none)(\[.*\])?")  # how pydantic names union members


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error")
        code = self.code or DEFAULT_CODES.get(self.status)
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def shown(value) -> str:
    r = repr(value)
    return r if len(r) <= MAX_SHOWN else r[: MAX_SHOWN - 3] + "..."


def dotted(loc) -> str:
    """("steering", "edits", 0, "feature") -> "steering.edits[0].feature"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _field_path(loc) -> tuple:
    """A pydantic error location without "body" and without the names pydantic gives union members."""
    loc = tuple(loc)[1:] if tuple(loc)[:1] == ("body",) else tuple(loc)
    return tuple(p for p in loc if not (isinstance(p, str) and (p[:1].isupper() or UNION_TAG.fullmatch(p))))


def from_validation(errors: list[dict], prefix: tuple = ()) -> APIError:
    """A 400 naming the first invalid field and its value, from pydantic / FastAPI validation errors."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        why = (first.get("ctx") or {}).get("error", "JSON decode error")
        return APIError(400, f"the request body is not valid JSON: {why}", code="invalid_json")
    loc = _field_path(first.get("loc", ()))
    same = [e for e in errors if _field_path(e.get("loc", ())) == loc]  # a union's members fail together
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
    more = f" (and {rest} more problems)" if rest else ""
    return APIError(400, f"{param or 'body'}: {msg}{more}", param=param, code="invalid_value")


async def validation_handler(_request, exc: RequestValidationError) -> JSONResponse:
    return from_validation(list(exc.errors())).response()


async def api_error_handler(_request, exc: APIError) -> JSONResponse:
    return exc.response()
