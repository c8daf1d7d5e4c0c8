"""Dynamic micro-batching: concurrent requests share one model pass.

Each request puts its texts on a queue and awaits a future. One collector task
takes the first waiting request, then more until the batch holds `max_batch`
texts or the first request has waited `max_wait_ms`, and runs the batch in a
single worker thread, length-sorted in forward passes of `infer_batch` texts (padding
to the longest text of each pass, not of the whole batch), (the event loop stays free to accept and parse requests;
while a batch runs, the next one gathers). A request larger than `max_batch`
runs as a batch of its own. The batch uses the model the holder has when it
starts, and every request in it learns which version answered.

With a shadow candidate, the same texts then go to the candidate on a second
worker thread, off the response path; when more than `shadow_queue` shadow
batches are waiting, further ones are skipped and counted, never queued without bound.

Generation jobs (the /v1 routes on a generation export) have their own queue, gathered
the same way (`max_batch` prompts, `max_wait_ms`) and run on the same worker thread.
Within a batch, jobs that can share a `model.generate` call do: every greedy job, and
unseeded sampled jobs with the same temperature and top-p; a seeded sampled job runs
alone, so its seed alone decides its draws. Each job keeps its own token budget and stop
strings, learns when it has started (its prompts fit the context; before that a refusal
is still an HTTP error, not a broken stream), and gets its text as it is generated
through `on_text`, called on the event loop.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from domaintune.predict.generation import PromptTooLong
from domaintune.serve.body import ApiError

log = logging.getLogger("domaintune.serve")


@dataclass
class _Item:
    texts: list[str]
    future: asyncio.Future
    enqueued: float


@dataclass
class GenerationJob:
    """One /v1 request: its prompts (text-column values: a prompt or a dumped conversation) and options."""
    prompts: list[str]
    max_new_tokens: int | None = None       # None: the export's default (GenerationPredictor.defaults)
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    on_text: Callable[[int, str], None] | None = None  # (prompt index, text delta), on the event loop
    started: asyncio.Future | None = None   # -> the LoadedModel generating it, once its prompts fit
    future: asyncio.Future | None = None    # -> (LoadedModel, [Generated per prompt])
    enqueued: float = 0.0


def wrong_task(model, needs: str) -> ApiError:
    """The refusal of a route the served model's task does not answer."""
    routes = {"classification": "POST /predict or /v2/models/domaintune/infer",
              "generation": "POST /v1/completions or /v1/chat/completions"}
    return ApiError(404, f"the served model ({model.version}) is a {model.task} export, this route needs a {needs} "
                         f"export; use {routes.get(model.task, 'another route')}")


class MicroBatcher:
    def __init__(self, holder, settings, metrics, shadow_log=None):
        self.holder, self.settings, self.metrics, self.shadow_log = holder, settings, metrics, shadow_log
        self._queue: asyncio.Queue | None = None
        self._gen_queue: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []
        self._infer = ThreadPoolExecutor(1, thread_name_prefix="domaintune-infer")
        self._shadow = ThreadPoolExecutor(1, thread_name_prefix="domaintune-shadow")
        self._shadow_pending = 0
        self._shadow_lock = threading.Lock()

    async def start(self) -> None:
        self._queue, self._gen_queue = asyncio.Queue(), asyncio.Queue()
        self._tasks = [asyncio.create_task(self._collect(self._queue, self._run, lambda it: len(it.texts)),
                                           name="domaintune-batcher"),
                       asyncio.create_task(self._collect(self._gen_queue, self._run_generation,
                                                         lambda job: len(job.prompts)),
                                           name="domaintune-generation-batcher")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._infer.shutdown(wait=True)
        self._shadow.shutdown(wait=True)  # the shadow log gets every batch already taken

    async def submit(self, texts: list[str]):
        """(the LoadedModel that answered, calibrated probabilities [len(texts), labels])."""
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(texts, fut, time.perf_counter()))
        return await fut

    async def submit_generation(self, job: GenerationJob) -> GenerationJob:
        """Queue a generation job and return it at once: await job.started (or job.future) to follow it."""
        loop = asyncio.get_running_loop()
        job.started, job.future, job.enqueued = loop.create_future(), loop.create_future(), time.perf_counter()
        await self._gen_queue.put(job)
        return job

    async def _collect(self, queue: asyncio.Queue, run, size) -> None:
        carry = None
        while True:
            first = carry or await queue.get()
            carry = None
            batch, n = [first], size(first)
            deadline = first.enqueued + self.settings.max_wait_ms / 1000
            while n < self.settings.max_batch:
                try:
                    item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    wait = deadline - time.perf_counter()
                    if wait <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(queue.get(), wait)
                    except TimeoutError:
                        break
                if n + size(item) > self.settings.max_batch:
                    carry = item  # starts the next batch
                    break
                batch.append(item)
                n += size(item)
            await run(batch)

    async def _run(self, batch: list[_Item]) -> None:
        live = [it for it in batch if not it.future.done()]  # a client that went away is not waited for
        if not live:
            return
        model = self.holder.current
        texts = [t for it in live for t in it.texts]
        self.metrics.batch_texts.observe(len(texts))
        self.metrics.batch_requests.observe(len(live))
        try:
            probs = await asyncio.get_running_loop().run_in_executor(self._infer, self._predict, model, texts)
        except Exception as exc:  # noqa: BLE001 - a model failure answers these requests with a 500, not the loop
            log.exception("inference failed on a batch of %d texts", len(texts))
            for it in live:
                if not it.future.done():
                    it.future.set_exception(exc)
            return
        self.metrics.texts.labels("served").inc(len(texts))
        start = 0
        for it in live:
            if not it.future.done():
                it.future.set_result((model, probs[start:start + len(it.texts)]))
            start += len(it.texts)
        if self.holder.shadow is not None:
            self._run_shadow(model, texts, probs)

    def _predict(self, model, texts: list[str]) -> np.ndarray:
        if model.task != "classification":  # swapped to another task since the route checked
            raise wrong_task(model, "classification")
        return predict_sorted(model.predict_proba, texts, self.settings.infer_batch)

    async def _run_generation(self, batch: list[GenerationJob]) -> None:
        live = [job for job in batch if not job.future.done()]
        if not live:
            return
        model = self.holder.current
        self.metrics.batch_texts.observe(sum(len(job.prompts) for job in live))
        self.metrics.batch_requests.observe(len(live))
        loop = asyncio.get_running_loop()
        try:
            outcomes = await loop.run_in_executor(self._infer, self._generate, model, live, loop)
        except Exception as exc:  # noqa: BLE001 - a failure answers these requests with a 500, not the loop
            log.exception("generation failed on a batch of %d jobs", len(live))
            outcomes = [exc] * len(live)
        for job, outcome in zip(live, outcomes):
            if isinstance(outcome, Exception):
                if not isinstance(outcome, ApiError):
                    log.error("generation failed on a job of %d prompts: %s", len(job.prompts), outcome,
                              exc_info=outcome)
                if not job.future.done():
                    job.future.set_exception(outcome)
                continue
            self.metrics.texts.labels("served").inc(len(outcome))
            self.metrics.tokens.labels("prompt").inc(sum(g.prompt_tokens for g in outcome))
            self.metrics.tokens.labels("completion").inc(sum(g.completion_tokens for g in outcome))
            if not job.future.done():
                job.future.set_result((model, outcome))

    def _generate(self, model, jobs: list[GenerationJob], loop) -> list:
        """On the worker thread: each job's [Generated] or the exception that ended it (see the module doc)."""
        if model.task != "generation":
            return [wrong_task(model, "generation")] * len(jobs)
        pred = model.predictor
        out: list = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}  # (temperature, top_p, seed, ...) -> jobs generated together
        for k, job in enumerate(jobs):
            try:
                pred.check_context(pred.encode(job.prompts), job.max_new_tokens or pred.defaults["max_new_tokens"])
            except PromptTooLong as exc:
                out[k] = ApiError(422, f"{exc}; shorten the prompt or lower max_tokens", "max_tokens")
                continue
            loop.call_soon_threadsafe(_resolve, job.started, model)
            t = pred.defaults["temperature"] if job.temperature is None else job.temperature
            p = pred.defaults["top_p"] if job.top_p is None else job.top_p
            key = (0.0, 1.0, None) if t == 0 else (t, p, None) if job.seed is None else (t, p, job.seed, k)
            groups.setdefault(key, []).append(k)
        for (t, p, seed, *_), ks in groups.items():
            rows = [(k, i) for k in ks for i in range(len(jobs[k].prompts))]

            def emit(r, delta, rows=rows):
                k, i = rows[r]
                if jobs[k].on_text is not None:
                    loop.call_soon_threadsafe(jobs[k].on_text, i, delta)

            try:
                done = pred.generate([jobs[k].prompts[i] for k, i in rows],
                                     max_new_tokens=[jobs[k].max_new_tokens for k, _ in rows],
                                     temperature=t, top_p=p, stop=[jobs[k].stop for k, _ in rows], seed=seed,
                                     on_text=emit if any(jobs[k].on_text for k in ks) else None)
            except Exception as exc:  # noqa: BLE001 - the jobs of this call fail with a 500, the others go on
                for k in ks:
                    out[k] = exc
                continue
            for k in ks:
                out[k] = []
            for (k, _), g in zip(rows, done):
                out[k].append(g)
        return out

    def _run_shadow(self, model, texts: list[str], probs: np.ndarray) -> None:
        with self._shadow_lock:
            full = self._shadow_pending >= self.settings.shadow_queue
            if not full:
                self._shadow_pending += 1
        if full:
            self.metrics.shadow_skipped.inc(len(texts))
            log.warning("shadow queue full: %d texts not shadowed", len(texts))
            return
        fut = self._shadow.submit(self._shadow_batch, self.holder.shadow, model, texts, probs)
        fut.add_done_callback(self._shadow_done)

    def _shadow_batch(self, shadow, model, texts, probs) -> None:
        cand = self._predict(shadow, texts)
        self.metrics.texts.labels("shadow").inc(len(texts))
        if self.shadow_log is not None:
            self.shadow_log.write(texts, model, probs, shadow, cand)

    def _shadow_done(self, fut) -> None:
        with self._shadow_lock:
            self._shadow_pending -= 1
        if fut.exception() is not None:
            log.error("shadow batch failed: %s", fut.exception())


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def predict_sorted(predict_proba, texts: list[str], step: int) -> np.ndarray:
    """predict_proba(texts) in input order, computed in length-sorted passes of `step` texts."""
    if len(texts) <= step:
        return predict_proba(texts)
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = None
    for i in range(0, len(order), step):
        idx = order[i:i + step]
        part = predict_proba([texts[j] for j in idx])
        if out is None:
            out = np.empty((len(texts), part.shape[1]), dtype=part.dtype)
        out[idx] = part
    return out
