"""The OpenAI-compatible API of `domaintune serve` on a generation export.

    POST /v1/completions        {"prompt": "..." | ["...", ...], "max_tokens", "temperature", "top_p", "stop",
                                 "seed", "stream", "stream_options": {"include_usage": true}}
    POST /v1/chat/completions   {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}], ...}
    GET  /v1/models             the one model, "domaintune"

A completion prompt is rendered as training rendered a prompt (one user message, through the tokenizer's
chat template; domaintune.modeling.llm.prompt_text), exactly as `domaintune predict` renders a text
column; chat messages are rendered as training rendered a conversation. Unset max_tokens, temperature and
top_p come from the export's generation_config.json (temperature 0: greedy). `stream: true` answers with
server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. Requests go through the same
micro-batcher, limits (413: body, prompts or messages per request, characters, max_tokens over
--max-new-tokens), X-Model-Version header, hot-swap and /metrics as the classifier's routes. A body that
does not validate is a 422 naming the field, in OpenAI's error shape {"error": {"message", "type",
"param", "code"}}; on a classifier export these routes answer 404 (and the classifier's routes do on a
generation export). Not offered: n > 1, logprobs, echo, penalties, logit_bias, tools.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from dataclasses import dataclass

from fastapi import Request  # module level: FastAPI resolves the endpoints' (string) annotations here
from fastapi.responses import JSONResponse, StreamingResponse

from domaintune.data import chat
from domaintune.serve.batcher import GenerationJob, wrong_task
from domaintune.serve.body import ApiError, check_texts, read_json
from domaintune.serve.settings import MODEL_NAME, VERSION_HEADER

PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models")
MAX_STOP = 4  # stop strings per request, as OpenAI allows
COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "user", "n",
          "logprobs", "presence_penalty", "frequency_penalty", "logit_bias"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
# accepted only at the value that changes nothing (what clients send by default)
NEUTRAL = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (False, 0), "top_logprobs": (0,),
           "presence_penalty": (0,), "frequency_penalty": (0,), "suffix": ("",), "logit_bias": ({},)}


@dataclass
class GenerationRequest:
    """A validated /v1 request."""
    prompts: list[str]            # text-column values (chat: the dumped conversation)
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, low: float, high: float, low_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v < low or v > high or (low_open and v == low):
        raise ApiError(422, f"expected a number in {'(' if low_open else '['}{low:g}, {high:g}], got {v!r}", name)
    return float(v)


def _integer(body: dict, name: str, low: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or (low is not None and v < low):
        raise ApiError(422, f"expected an integer{'' if low is None else f' >= {low}'}, got {v!r}", name)
    return v


def _common(body: dict, fields: set[str], settings) -> dict:
    unknown = sorted(set(body) - fields)
    if unknown:
        raise ApiError(422, f"unknown or unsupported field (known: {', '.join(sorted(fields))})", unknown[0])
    for name, ok in NEUTRAL.items():
        if body.get(name) is not None and body[name] not in ok:
            raise ApiError(422, f"only {ok[0]!r} is supported, got {body[name]!r}", name)
    model = body.get("model")
    if model is not None and model != MODEL_NAME:
        raise ApiError(404, f"no model {model!r}; this server serves {MODEL_NAME!r}", "model")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ApiError(422, f"expected a string, got {type(body['user']).__name__}", "user")
    limit_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, limit_field, 1)
    if max_tokens is not None and max_tokens > settings.max_new_tokens:
        raise ApiError(413, f"{max_tokens} tokens asked for, the limit is {settings.max_new_tokens} per request",
                       limit_field)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP:
        raise ApiError(422, f"expected a string or a list of at most {MAX_STOP} strings", "stop")
    for i, s in enumerate(stop):
        if not isinstance(s, str) or not s:
            raise ApiError(422, f"expected a non-empty string, got {s!r}", f"stop[{i}]")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ApiError(422, f"expected true or false, got {stream!r}", "stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {"include_usage"}
                                    and isinstance(options.get("include_usage", False), bool)):
        raise ApiError(422, 'expected {"include_usage": true|false}', "stream_options")
    return {"max_tokens": max_tokens, "temperature": _number(body, "temperature", 0, 2),
            "top_p": _number(body, "top_p", 0, 1, low_open=True), "stop": stop, "seed": _integer(body, "seed"),
            "stream": bool(stream), "include_usage": bool((options or {}).get("include_usage"))}


def _opened(body, field: str, shape: str, allowed, settings) -> tuple[dict, object]:
    """(the common options, body[field]) of a /v1 request body, or a 422 naming what is wrong."""
    if not isinstance(body, dict):
        raise ApiError(422, f'expected a JSON object {{"{field}": {shape}}}, got {type(body).__name__}')
    opts = _common(body, allowed, settings)
    if field not in body:
        raise ApiError(422, "missing field", field)
    return opts, body[field]


def parse_completion(body, settings) -> GenerationRequest:
    opts, prompt = _opened(body, "prompt", "...", COMPLETION_FIELDS, settings)
    if isinstance(prompt, list) and prompt and all(isinstance(t, (int, list)) for t in prompt):
        raise ApiError(422, "token-id prompts are not supported: send text", "prompt")
    if not isinstance(prompt, str):
        return GenerationRequest(check_texts(prompt, "prompt", settings), **opts)
    if len(prompt) > settings.max_chars:
        raise ApiError(413, f"{len(prompt)} characters, the limit is {settings.max_chars} per prompt", "prompt")
    return GenerationRequest([prompt], **opts)


def _content(m: dict, where: str):
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    content = m.get("content")
    if isinstance(content, list):
        if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                   for part in content):
            raise ApiError(422, 'content parts must be {"type": "text", "text": "..."} (text only)', f"{where}.content")
        return "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise ApiError(422, f"expected a string, got {type(content).__name__}", f"{where}.content")
    return content


def parse_chat(body, settings) -> GenerationRequest:
    opts, msgs = _opened(body, "messages", "[...]", CHAT_FIELDS, settings)
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(422, "expected a non-empty list of messages", "messages")
    if len(msgs) > settings.max_texts:
        raise ApiError(413, f"{len(msgs)} messages, the limit is {settings.max_texts} per request", "messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(422, f"expected an object, got {type(m).__name__}", where)
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise ApiError(422, "unknown or unsupported field (known: role, content, name)", f"{where}.{extra[0]}")
        if m.get("role") not in chat.ROLES:
            raise ApiError(422, f"role must be one of {list(chat.ROLES)}, got {m.get('role')!r}", f"{where}.role")
        text = _content(m, where)
        if len(text) > settings.max_chars:
            raise ApiError(413, f"{len(text)} characters, the limit is {settings.max_chars} per message",
                           f"{where}.content")
        out.append({"role": m["role"], "content": text})
    if not any(m["role"] == "user" for m in out):
        raise ApiError(422, "no 'user' message", "messages")
    return GenerationRequest([chat.dump(out)], **opts)


def _usage(done) -> dict:
    p, c = sum(g.prompt_tokens for g in done), sum(g.completion_tokens for g in done)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def completion_body(rid: str, created: int, model, done, is_chat: bool) -> dict:
    if is_chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": g.text}, "logprobs": None,
                    "finish_reason": g.finish_reason} for i, g in enumerate(done)]
    else:
        choices = [{"index": i, "text": g.text, "logprobs": None, "finish_reason": g.finish_reason}
                   for i, g in enumerate(done)]
    return {"id": rid, "object": "chat.completion" if is_chat else "text_completion", "created": created,
            "model": MODEL_NAME, "system_fingerprint": model.version, "choices": choices, "usage": _usage(done)}


class Chunks:
    """The server-sent events of one streamed answer, in OpenAI's chunk format."""

    def __init__(self, rid: str, created: int, model, is_chat: bool, include_usage: bool):
        self.head = {"id": rid, "object": "chat.completion.chunk" if is_chat else "text_completion",
                     "created": created, "model": MODEL_NAME, "system_fingerprint": model.version}
        self.is_chat, self.include_usage = is_chat, include_usage

    def event(self, choices: list[dict], **extra) -> str:
        body = {**self.head, "choices": choices, **({"usage": None} if self.include_usage else {}), **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def choice(self, index: int, text: str | None, finish: str | None = None) -> dict:
        if self.is_chat:
            delta = {} if text is None else {"content": text}
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}

    def opening(self, n: int) -> list[str]:
        """Chat's first chunk names the role (OpenAI's clients expect it)."""
        if not self.is_chat:
            return []
        return [self.event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None} for i in range(n)])]

    def closing(self, done) -> list[str]:
        out = [self.event([self.choice(i, None, g.finish_reason) for i, g in enumerate(done)])]
        if self.include_usage:
            out.append(f"data: {json.dumps({**self.head, 'choices': [], 'usage': _usage(done)})}\n\n")
        return out + ["data: [DONE]\n\n"]


def add_routes(app, holder, batcher, settings) -> None:
    """The /v1 routes (module docstring) on the FastAPI app of domaintune/serve/app.py."""

    def generation_model():
        cur = holder.current
        if cur.task != "generation":
            raise wrong_task(cur, "generation")
        return cur

    @app.get("/v1/models")
    async def models():
        cur = generation_model()
        return JSONResponse({"object": "list", "data": [{"id": MODEL_NAME, "object": "model",
                                                         "created": int(cur.loaded_at), "owned_by": "domaintune",
                                                         "root": cur.version}]},
                            headers={VERSION_HEADER: cur.version})

    async def answer(req: GenerationRequest, is_chat: bool):
        rid = f"{'chatcmpl' if is_chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        events: asyncio.Queue = asyncio.Queue()
        job = GenerationJob(req.prompts, req.max_tokens, req.temperature, req.top_p, req.stop, req.seed,
                            on_text=(lambda i, delta: events.put_nowait((i, delta))) if req.stream else None)
        await batcher.submit_generation(job)
        if not req.stream:
            model, done = await job.future
            return JSONResponse(completion_body(rid, created, model, done, is_chat),
                                headers={VERSION_HEADER: model.version})
        # a refusal (prompt over the context, another task swapped in) is still an HTTP error until it starts
        await asyncio.wait([job.started, job.future], return_when=asyncio.FIRST_COMPLETED)
        if job.future.done() and job.future.exception() is not None:
            raise job.future.exception()
        model = job.started.result()
        job.future.add_done_callback(lambda _: events.put_nowait(None))
        chunks = Chunks(rid, created, model, is_chat, req.include_usage)

        async def stream():
            for line in chunks.opening(len(req.prompts)):
                yield line
            while (item := await events.get()) is not None:
                yield chunks.event([chunks.choice(item[0], item[1])])
            exc = job.future.exception()
            if exc is not None:
                err = exc if isinstance(exc, ApiError) else ApiError(500, f"generation failed: {exc}")
                yield f"data: {json.dumps(err.openai_body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            for line in chunks.closing(job.future.result()[1]):
                yield line

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={VERSION_HEADER: model.version, "Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        generation_model()
        return await answer(parse_completion(await read_json(request, settings), settings), False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        generation_model()
        return await answer(parse_chat(await read_json(request, settings), settings), True)
