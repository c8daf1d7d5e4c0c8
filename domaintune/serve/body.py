"""Request bodies and refusals, shared by every route of `domaintune serve`.

ApiError is the one way a route refuses a request (rendered flat, or in OpenAI's shape on /v1);
read_json reads a JSON body under the size limit; check_texts checks a list of texts against the limits.
"""
from __future__ import annotations

import json


class ApiError(Exception):
    """A refused request: its HTTP status, a message, and the field of the body at fault (if one is)."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field

    def body(self) -> dict:
        return {"error": self.message, **({"field": self.field} if self.field else {})}

    def openai_body(self) -> dict:
        """OpenAI's error shape (what its clients parse), for the /v1 routes."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.field, "code": None}}


async def read_json(request, limit: int):
    """The request body parsed as JSON, refusing bodies over `limit` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {int(declared)} bytes is over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes")
    if not body.strip():
        raise ApiError(422, "empty request body: expected a JSON object")
    try:
        return json.loads(bytes(body))
    except UnicodeDecodeError:
        raise ApiError(422, "request body is not UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise ApiError(422, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise ApiError(422, "malformed JSON: nested too deeply") from None


def check_texts(texts, field: str, settings) -> list[str]:
    if not isinstance(texts, list):
        raise ApiError(422, f"expected a list of strings, got {type(texts).__name__}", field)
    if not texts:
        raise ApiError(422, "empty list: give at least one text", field)
    if len(texts) > settings.max_texts:
        raise ApiError(413, f"{len(texts)} texts, the limit is {settings.max_texts} per request", field)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ApiError(422, f"expected a string, got {type(t).__name__}", f"{field}[{i}]")
        if len(t) > settings.max_chars:
            raise ApiError(413, f"{len(t)} characters, the limit is {settings.max_chars} per text", f"{field}[{i}]")
    return texts
