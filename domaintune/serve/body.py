"""Request bodies and refusals, shared by every route of `domaintune serve`.

ApiError is the one way a route refuses a request (rendered flat, or in OpenAI's shape on /v1);
read_json reads a JSON body under the size limit and the body-read timeout, and refuses, naming the
field, any value no route can answer: text that is not valid Unicode (a lone surrogate, sent escaped
as "\\ud800" or as the raw bytes ED A0 80), NaN, Infinity or a number that overflows to it, and an
integer beyond 64 bits (a 5,000-digit one would otherwise hit Python's int-string limit). A body that
passes reaches the batcher with nothing that can fail the batch it joins. check_texts checks a list
of texts against the limits.
"""
from __future__ import annotations

import asyncio
import json
import math

MAX_INT = 2**63 - 1  # integers in a body are 64-bit (no field needs more)
MAX_NESTED = 20_000  # values in lists and objects that hold lists or objects (at least; 4 x max_texts if more)


class ApiError(Exception):
    """A refused request: its HTTP status, a message, and the field of the body at fault (if one is)."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers

    def body(self) -> dict:
        return {"error": self.message, **({"field": self.field} if self.field else {})}

    def openai_body(self) -> dict:
        """OpenAI's error shape (what its clients parse), for the /v1 routes."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.field, "code": None}}


async def read_json(request, settings):
    """The request body parsed as JSON, refusing bodies over settings.max_body_bytes before reading them all,
    bodies not received within settings.body_timeout_s (408, and the connection is closed), and values no
    route can answer (module doc)."""
    limit, timeout = settings.max_body_bytes, settings.body_timeout_s
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {int(declared)} bytes is over the limit of {limit} bytes")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, f"request body is over the limit of {limit} bytes")
    except TimeoutError:
        raise ApiError(408, f"request body not received within {timeout:g} s ({len(body)} bytes came)",
                       headers={"Connection": "close"}) from None
    if not body.strip():
        raise ApiError(422, "empty request body: expected a JSON object")
    try:
        text = bytes(body).decode("utf-8-sig")
    except UnicodeDecodeError:
        try:  # the bytes of a surrogate (ED A0 80) become one, refused below with its field
            text = bytes(body).decode("utf-8-sig", "surrogatepass")
        except UnicodeDecodeError:
            raise ApiError(422, "request body is not UTF-8 JSON") from None
    try:
        try:
            value = json.loads(text, parse_constant=_Refused)
        except ValueError as exc:
            if isinstance(exc, json.JSONDecodeError):
                raise
            # an integer past Python's int-string limit (4,300 digits): parse again, keeping it as its text
            value = json.loads(text, parse_int=_parse_int, parse_constant=_Refused)
    except json.JSONDecodeError as exc:
        raise ApiError(422, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise ApiError(422, "malformed JSON: nested too deeply") from None
    check_values(value, max(MAX_NESTED, 4 * settings.max_texts))
    return value


class _Refused(str):
    """A JSON literal kept as its text, to be refused with its field: NaN, Infinity, -Infinity, a huge integer."""


def _parse_int(literal: str):
    return int(literal) if len(literal) <= 20 else _Refused(literal)


def check_values(value, max_nested: int = MAX_NESTED) -> None:
    """Raise a 422 naming the first field (in document order) holding a lone surrogate (in a value or a key),
    a non-finite number or an integer beyond 64 bits. Iterative, so JSON nested as deep as the parser allows
    is fine; a list (or object) of plain values is checked in bulk (C loops), and a body nesting more than
    `max_nested` values in lists and objects that hold lists or objects is refused (413), so checking a body
    costs about what parsing it does."""
    stack, nested = [(value, None)], 0
    while stack:
        obj, path = stack.pop()
        if type(obj) is dict:
            if not all(map(str.isascii, obj)):
                for key in obj:
                    at = _surrogate_at(key)
                    if at is not None:
                        raise ApiError(422, f"this key is not valid Unicode: a lone surrogate (U+{ord(key[at]):04X}) "
                                            f"at character {at}", _field((path, key)))
            names, values = list(obj), list(obj.values())
        elif type(obj) is list:
            names, values = range(len(obj)), obj
        else:
            problem = _problem(obj)
            if problem:
                raise ApiError(422, problem, _field(path))
            continue
        kinds = set(map(type, values))
        if dict in kinds or list in kinds:
            nested += len(values)
            if nested > max_nested:
                raise ApiError(413, f"more than {max_nested} values nested in lists and objects", _field(path))
            stack.extend(zip(reversed(values), ((path, name) for name in reversed(names))))
        elif not _all_fine(values, kinds):
            for name, v in zip(names, values):
                problem = _problem(v)
                if problem:
                    raise ApiError(422, problem, _field((path, name)))


def _problem(v) -> str | None:
    """What is wrong with one plain JSON value (None: nothing)."""
    kind = type(v)
    if kind is _Refused:
        if v.lstrip("-").isdigit():
            return f"integer of {len(v.lstrip('-'))} digits is out of range (64-bit integers only)"
        return f"{v} is not allowed: finite numbers only"
    if kind is str:
        at = _surrogate_at(v)
        return None if at is None else f"not valid Unicode: a lone surrogate (U+{ord(v[at]):04X}) at character {at}"
    if kind is float and not math.isfinite(v):
        return "number out of range: it overflows to infinity (finite numbers only)"
    if kind is int and not -MAX_INT - 1 <= v <= MAX_INT:
        return f"integer {v} is out of range (64-bit integers only)"
    return None


def _all_fine(values, kinds: set) -> bool:
    """Whether plain values of these types all pass _problem, checked a type at a time in C loops."""
    if _Refused in kinds:
        return False
    for kind in kinds & {str, int, float}:
        same = values if len(kinds) == 1 else [v for v in values if type(v) is kind]
        if kind is str and not all(map(str.isascii, same)) and any(_surrogate_at(v) is not None for v in same):
            return False
        if kind is int and (min(same) < -MAX_INT - 1 or max(same) > MAX_INT):
            return False
        if kind is float and not all(map(math.isfinite, same)):
            return False
    return True


def _surrogate_at(s: str) -> int | None:
    if s.isascii():
        return None
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _printable(s: str) -> str:
    """`s` with each lone surrogate written as its escape (\\ud800), so a field name can be sent back."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _field(path) -> str | None:
    """texts[3], inputs[0].data[1], id: the name of a place in the body (None: the body itself)."""
    keys = []
    while path is not None:
        path, key = path
        keys.append(key)
    name = ""
    for key in reversed(keys):
        name += f"[{key}]" if isinstance(key, int) else f".{_printable(key)}" if name else _printable(key)
    return name or None


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


MAX_ID_CHARS = 256  # characters per client id


def check_ids(ids, n: int, field: str) -> list[str] | None:
    """The client's ids of its n texts (strings or integers, one per text, unique in the request), as text;
    None when it sent none (the server makes them)."""
    if ids is None:
        return None
    if not isinstance(ids, list):
        raise ApiError(422, f"expected a list of ids, one per text, got {type(ids).__name__}", field)
    if len(ids) != n:
        raise ApiError(422, f"{len(ids)} ids for {n} texts: give one id per text", field)
    out = []
    for i, v in enumerate(ids):
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ApiError(422, f"expected a string or an integer, got {type(v).__name__}", f"{field}[{i}]")
        v = str(v)
        if not v.strip() or len(v) > MAX_ID_CHARS:
            raise ApiError(422, f"an id must be 1 to {MAX_ID_CHARS} characters, not blank", f"{field}[{i}]")
        out.append(v)
    if len(set(out)) != n:
        dup = next(i for i, v in enumerate(out) if v in out[:i])
        raise ApiError(422, f"id {out[dup]!r} given twice in this request", f"{field}[{dup}]")
    return out
