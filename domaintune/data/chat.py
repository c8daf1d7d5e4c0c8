"""Chat conversations as instruction data (`ingest.messages_column`, base.task: generation).

A conversation cell is a list of {"role", "content"} messages (a JSON string in CSV/TSV, a list in
JSONL/Parquet) whose last message is the assistant's: that reply is the response, and the messages
before it are the prompt. Between stages the prompt is kept in the text column as the JSON of
those messages (`dump`), so hashing, dedupe and audit work on it like on any text; `messages`
turns a text column value back into the messages a chat template renders (a plain prompt is one
user message).

A cell that cannot be used is a problem of its row, never a traceback: not JSON, JSON nested deeper than
Python's recursion limit, numbers of any size (read as written, never converted), messages that are not
{"role", "content"} strings, and a role or content holding a lone surrogate (half of a UTF-16 pair, from a
"\\ud800" escape or a byte that is not UTF-8: not a character).
"""
from __future__ import annotations

import json
import re
import sys
from typing import Any, Optional

ROLES = ("system", "user", "assistant")
_MARK = '[{"role": '  # how dump() starts; a plain prompt that merely looks like it must also parse
# sources.SURROGATE (not imported: this module stays light, serve imports it; sources loads pandas)
SURROGATE = re.compile("[\ud800-\udfff]")
# numbers stay as written: a 5,000-digit one is not converted (Python refuses over 4,300 digits), NaN is no float
_DECODER = json.JSONDecoder(parse_int=str, parse_float=str, parse_constant=str)


def dump(messages: list[dict]) -> str:
    return json.dumps([{"role": m["role"], "content": m["content"]} for m in messages], ensure_ascii=False)


def messages(prompt: str) -> list[dict]:
    """The messages of a text-column value: a dumped conversation, else one user message."""
    if prompt.startswith(_MARK):
        try:
            msgs = _DECODER.decode(prompt)
        except (ValueError, RecursionError):
            msgs = None
        if isinstance(msgs, list) and all(isinstance(m, dict) and set(m) == {"role", "content"} for m in msgs):
            return msgs
    return [{"role": "user", "content": prompt}]


def split_conversation(cell: Any) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """(prompt text, response, problem) of one conversation cell; problem is None when it is usable."""
    msgs = cell
    if isinstance(cell, str):
        try:
            msgs = _DECODER.decode(cell)
        except json.JSONDecodeError as exc:
            return None, None, f"not a JSON list of messages ({exc.msg} at character {exc.pos})"
        except ValueError as exc:
            return None, None, f"not a JSON list of messages ({exc})"
        except RecursionError:
            return None, None, f"not a JSON list of messages (nested deeper than {sys.getrecursionlimit()} levels)"
    if hasattr(msgs, "tolist"):  # Parquet/Arrow lists arrive as numpy arrays
        msgs = msgs.tolist()
    if not isinstance(msgs, list) or len(msgs) < 2:
        return None, None, "needs a list of at least two messages (the prompt, then the assistant's reply)"
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return None, None, f"message {k + 1} is not an object with string 'role' and 'content'"
        for key in ("role", "content"):
            if found := SURROGATE.search(m[key]):
                return None, None, (f"message {k + 1} {key!r} holds a lone surrogate \\u{ord(found.group()):04x} at "
                                    f"character {found.start()} (not a character: a \\ud800-style JSON escape or a "
                                    "byte that is not UTF-8)")
        if m["role"] not in ROLES:
            return None, None, f"message {k + 1} has role {m['role']!r}; roles are {list(ROLES)}"
    if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
        return None, None, "the last message must be a non-empty 'assistant' reply (the response to learn)"
    if not any(m["role"] == "user" for m in msgs[:-1]):
        return None, None, "no 'user' message before the assistant's reply"
    return dump(msgs[:-1]), msgs[-1]["content"], None


def to_columns(table, column: str, response_column: str) -> None:
    """Replace a RawTable's conversation column by the prompt JSON and add `response_column`; a bad
    conversation is recorded in table.bad (reason bad_messages, field `column`), so ingest rejects
    or stops on it like on any bad cell."""
    if column not in table.frame.columns:
        return  # ingest names the missing column
    frame = table.frame.copy()
    prompts, responses = [], []
    for i, cell in enumerate(frame[column].tolist()):
        prompt, response, problem = split_conversation(cell)
        if problem is not None:
            table.bad.setdefault(i, []).append((column, "bad_messages", f"conversation {problem}"))
            prompt, response = "-", "-"  # filler keeping columns aligned: the row is rejected for the problem above
        prompts.append(prompt)
        responses.append(response)
    frame[column] = prompts
    frame[response_column] = responses
    table.frame = frame
