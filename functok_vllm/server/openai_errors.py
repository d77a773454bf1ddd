"""OpenAI-style error bodies: `{"error": {"message", "type", "param", "code"}}` for every 4xx and 5xx we send."""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from functok_vllm.validation import describe

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
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
    409: "conflict",
    500: "internal_error",
    501: "not_implemented",
    504: "timeout",
}


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


def from_validation(errors: list[dict], prefix: tuple = ()) -> APIError:
    """A 400 naming the first invalid field and its value, from pydantic / FastAPI validation errors."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        why = (first.get("ctx") or {}).get("error", "JSON decode error")
        return APIError(400, f"the request body is not valid JSON: {why}", code="invalid_json")
    param, msg = describe(errors, prefix)
    return APIError(400, f"{param or 'body'}: {msg}", param=param, code="invalid_value")


async def validation_handler(_request, exc: RequestValidationError) -> JSONResponse:
    return from_validation(list(exc.errors())).response()


async def api_error_handler(_request, exc: APIError) -> JSONResponse:
    return exc.response()
