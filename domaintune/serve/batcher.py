"""Dynamic micro-batching: concurrent requests share one model pass.

Each request puts its texts on a queue and awaits a future. One collector task
takes the waiting requests, waits for more until the oldest has waited `max_wait_ms`
(or enough texts wait), and builds a batch by taking texts from the waiting requests in
turn, one text each per round, until the batch holds `max_batch` texts or `max_batch_chars`
characters (at least one text). A request larger than that is answered over several batches,
taking turns with the requests that arrive meanwhile, so five maximum-size requests do
not hold a one-text request behind them: it joins the next batch. The batch runs in a
single worker thread, tokenised there once and sorted by token length into forward passes of at most `infer_batch`
texts within `max_batch_tokens` ((longest text) x (texts); a longer text alone), padded to the longest text of each
pass, not of the whole batch (modeling.encoders.TokenBatches, the predictor's batching); the event loop stays free to
accept and parse requests, and the next batch gathers while one runs. Tokeniser and runtime run one after the
other on that thread, whose runtime pool has as many threads as the process may use
(core.device.inference_threads). A batch uses the model the holder has when it starts; every text of a request is
answered by one model (a request split over a swap starts again on the new one), and it learns which version
answered.

Requests are checked before they join a batch (domaintune/serve/body.py), so a batch should not
fail; if one does, each of its requests is retried alone, so only a request that fails on its own
gets the error.

With a shadow candidate, the same texts then go to the candidate on a second
worker thread, off the response path; when more than `shadow_queue` shadow
batches are waiting, further ones are skipped and counted, never queued without bound.

With a prediction log (domaintune/predict/log.py), each request's answer is logged under its texts' ids once
all its texts are answered (the version that answered all of them), and each shadow batch's answers under the
same ids; the served lines are written on a third thread, off the response path, a batch at a time.

Generation jobs (the /v1 routes on a generation export) have their own queue, gathered
the same way (`max_batch` prompts, `max_wait_ms`; a job is not split) and run on the same worker thread.
Within a batch, jobs that can share a `model.generate` call do: every greedy job, and
unseeded sampled jobs with the same temperature and top-p; a seeded sampled job runs
alone, so its seed alone decides its draws. A shared call that fails is retried job by job (those
that have not streamed text yet). Each job keeps its own token budget and stop
strings, learns when it has started (its prompts fit the context; before that a refusal
is still an HTTP error, not a broken stream), and gets its text as it is generated
through `on_text`, called on the event loop.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from domaintune.predict import log as predlog
from domaintune.predict.generation import PromptTooLong
from domaintune.serve.body import ApiError

log = logging.getLogger("domaintune.serve")


@dataclass(eq=False)
class _Item:
    """One classification request: its texts, answered over one or more batches."""
    texts: list[str]
    future: asyncio.Future
    enqueued: float
    ids: list[str] | None = None          # the texts' ids in the prediction log
    next: int = 0                        # texts [0, next) are answered
    model: object = None                 # the LoadedModel answering it (one for all its texts)
    probs: np.ndarray | None = None      # their probabilities, filled batch by batch
    abstained: np.ndarray | None = None  # where the model abstains (evaluate.abstain), None if it never does


@dataclass
class _Piece:
    """The texts [start, stop) of one request in a batch."""
    item: _Item
    start: int
    stop: int

    @property
    def texts(self) -> list[str]:
        return self.item.texts[self.start:self.stop]

    @property
    def ids(self) -> list[str]:
        ids = self.item.ids
        return ids[self.start:self.stop] if ids is not None else [None] * (self.stop - self.start)


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
              "token_classification": "POST /predict or /v2/models/domaintune/infer",
              "generation": "POST /v1/completions or /v1/chat/completions"}
    return ApiError(404, f"the served model ({model.version}) is a {model.task} export, this route needs a {needs} "
                         f"export; use {routes.get(model.task, 'another route')}")


class MicroBatcher:
    def __init__(self, holder, settings, metrics, shadow_log=None, prediction_log=None):
        self.holder, self.settings, self.metrics, self.shadow_log = holder, settings, metrics, shadow_log
        self.prediction_log = prediction_log
        self._log = ThreadPoolExecutor(1, thread_name_prefix="domaintune-prediction-log")
        self._queue: asyncio.Queue | None = None
        self._gen_queue: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []
        self._infer = ThreadPoolExecutor(1, thread_name_prefix="domaintune-infer")
        self._shadow = ThreadPoolExecutor(1, thread_name_prefix="domaintune-shadow")
        self._shadow_pending = 0
        self._shadow_lock = threading.Lock()

    async def start(self) -> None:
        self._queue, self._gen_queue = asyncio.Queue(), asyncio.Queue()
        self._tasks = [asyncio.create_task(self._collect_texts(), name="domaintune-batcher"),
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
        self._log.shutdown(wait=True)     # and the prediction log every answer already sent

    async def submit(self, texts: list[str], ids: list[str] | None = None):
        """(the LoadedModel that answered, calibrated probabilities [len(texts), labels], abstained [len(texts)] or
        None for a model that never abstains); `ids` name the texts in the prediction log."""
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(texts, fut, time.perf_counter(), ids))
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

    async def _collect_texts(self) -> None:
        """The classifier's collector (module doc): requests wait in `pending` until all their texts are answered."""
        queue, pending = self._queue, deque()
        while True:
            if not pending:
                pending.append(await queue.get())
            deadline = min(it.enqueued for it in pending) + self.settings.max_wait_ms / 1000
            while True:
                while not queue.empty():  # everything already waiting takes its turn (none waits behind a big one)
                    pending.append(queue.get_nowait())
                if self._waiting(pending) or (wait := deadline - time.perf_counter()) <= 0:
                    break
                try:
                    pending.append(await asyncio.wait_for(queue.get(), wait))
                except TimeoutError:
                    break
            model = self.holder.current
            batch = self._take(pending, model)
            if batch:
                await self._run(model, batch)
            for it in [it for it in pending if it.future.done()]:
                pending.remove(it)  # answered, failed, or its client went away

    def _waiting(self, pending) -> bool:
        """Whether the waiting texts fill a batch already."""
        n = chars = 0
        for it in pending:
            for t in it.texts[it.next:]:
                n, chars = n + 1, chars + len(t)
                if n >= self.settings.max_batch or chars >= self.settings.max_batch_chars:
                    return True
        return False

    def _take(self, pending: deque, model) -> list[_Piece]:
        """The next batch, for `model`: one text from each waiting request in turn, until `max_batch` texts or
        `max_batch_chars` characters; the request after the last one served goes first next time."""
        live = [it for it in pending if not it.future.done()]
        for it in live:
            if it.model is not None and it.model is not model:  # swapped since its first texts: start again
                it.next, it.model, it.probs, it.abstained = 0, None, None, None
        taken = [0] * len(live)
        n = chars = 0
        last, full = -1, False
        while not full:
            progress = False
            for i, it in enumerate(live):
                k = it.next + taken[i]
                if k >= len(it.texts):
                    continue
                if n and (n >= self.settings.max_batch or chars + len(it.texts[k]) > self.settings.max_batch_chars):
                    full = True
                    break
                taken[i], n, chars, last, progress = taken[i] + 1, n + 1, chars + len(it.texts[k]), i, True
            full = full or not progress
        if last >= 0:
            pending.rotate(-(pending.index(live[last]) + 1))
        return [_Piece(it, it.next, it.next + k) for it, k in zip(live, taken) if k]

    async def _run(self, model, batch: list[_Piece]) -> None:
        texts = [t for piece in batch for t in piece.texts]
        self.metrics.batch_texts.observe(len(texts))
        self.metrics.batch_requests.observe(len(batch))
        loop = asyncio.get_running_loop()
        try:
            probs, abstained = await loop.run_in_executor(self._infer, self._predict, model, texts)
        except Exception as exc:  # noqa: BLE001 - a failed batch is retried request by request, not the loop
            if len(batch) == 1 or isinstance(exc, ApiError):
                if not isinstance(exc, ApiError):
                    log.error("inference failed on a request of %d texts: %s", len(texts), exc, exc_info=exc)
                for piece in batch:
                    _fail(piece.item, exc)
                return
            log.warning("inference failed on a batch of %d requests (%s); retrying each alone", len(batch), exc)
            for piece in batch:
                await self._run(model, [piece])
            return
        self.metrics.texts.labels("served").inc(len(texts))
        start, answered = 0, []
        for piece in batch:
            it, n = piece.item, piece.stop - piece.start
            if not it.future.done():
                if it.model is None:
                    it.model, it.probs = model, np.empty((len(it.texts), probs.shape[1]), dtype=probs.dtype)
                    it.abstained = None if abstained is None else np.zeros(len(it.texts), dtype=bool)
                it.probs[piece.start:piece.stop] = probs[start:start + n]
                if it.abstained is not None:
                    it.abstained[piece.start:piece.stop] = abstained[start:start + n]
                it.next = piece.stop
                if it.next == len(it.texts):
                    it.future.set_result((model, it.probs, it.abstained))
                    answered.append(it)
            start += n
        if self.prediction_log is not None and answered:
            self._log.submit(self._log_answered, model, answered).add_done_callback(_log_failure)
        if self.holder.shadow is not None:
            self._run_shadow(model, texts, probs, [i for piece in batch for i in piece.ids])

    def _predict(self, model, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        if model.task == "token_classification":  # entity lists ride the same batches, one object cell per text
            out = np.empty((len(texts), 1), dtype=object)
            out[:, 0] = model.predictor.entities(texts)
            return out, None
        if model.task != "classification":  # swapped to another task since the route checked
            raise wrong_task(model, "classification")
        # the predictor sorts the texts by token length and runs them in passes of at most infer_batch texts within
        # max_batch_tokens (ServeSettings -> Predictor), tokenising them here on this worker thread
        return model.predict_with_abstention(texts)

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
            except Exception as exc:  # noqa: BLE001 - this job alone fails (a 500), the others go on
                out[k] = exc
                continue
            loop.call_soon_threadsafe(_resolve, job.started, model)
            t = pred.defaults["temperature"] if job.temperature is None else job.temperature
            p = pred.defaults["top_p"] if job.top_p is None else job.top_p
            key = (0.0, 1.0, None) if t == 0 else (t, p, None) if job.seed is None else (t, p, job.seed, k)
            groups.setdefault(key, []).append(k)
        streamed: set[int] = set()  # jobs that have sent text: a failure of their call cannot be retried
        for (t, p, seed, *_), ks in groups.items():
            try:
                self._generate_group(pred, jobs, ks, out, streamed, loop, t, p, seed)
            except Exception as exc:  # noqa: BLE001 - retried job by job: only a job that fails alone fails
                retry = [k for k in ks if k not in streamed] if len(ks) > 1 else []
                for k in ks:
                    out[k] = exc
                if retry:
                    log.warning("generation failed on %d jobs together (%s); retrying %d alone", len(ks), exc,
                                len(retry))
                for k in retry:
                    try:
                        self._generate_group(pred, jobs, [k], out, streamed, loop, t, p, seed)
                    except Exception as exc1:  # noqa: BLE001 - this job fails with a 500, the others go on
                        out[k] = exc1
        return out

    @staticmethod
    def _generate_group(pred, jobs, ks, out, streamed, loop, t, p, seed) -> None:
        """One model.generate call for the jobs `ks`: out[k] becomes each job's [Generated]."""
        rows = [(k, i) for k in ks for i in range(len(jobs[k].prompts))]

        def emit(r, delta):
            k, i = rows[r]
            if jobs[k].on_text is not None:
                streamed.add(k)
                loop.call_soon_threadsafe(jobs[k].on_text, i, delta)

        done = pred.generate([jobs[k].prompts[i] for k, i in rows],
                             max_new_tokens=[jobs[k].max_new_tokens for k, _ in rows],
                             temperature=t, top_p=p, stop=[jobs[k].stop for k, _ in rows], seed=seed,
                             on_text=emit if any(jobs[k].on_text for k in ks) else None)
        for k in ks:
            out[k] = []
        for (k, _), g in zip(rows, done):
            out[k].append(g)

    def _log_answered(self, model, items: list[_Item]) -> None:
        """On the log thread: the answers of these requests (all by `model`), one write."""
        recs = []
        for it in items:
            if it.ids is not None:
                recs += log_records(model, it.ids, it.texts, it.probs, "served", self.prediction_log.text)
        self.prediction_log.write(recs)

    def _run_shadow(self, model, texts: list[str], probs: np.ndarray, ids: list) -> None:
        with self._shadow_lock:
            full = self._shadow_pending >= self.settings.shadow_queue
            if not full:
                self._shadow_pending += 1
        if full:
            self.metrics.shadow_skipped.inc(len(texts))
            log.warning("shadow queue full: %d texts not shadowed", len(texts))
            return
        fut = self._shadow.submit(self._shadow_batch, self.holder.shadow, model, texts, probs, ids)
        fut.add_done_callback(self._shadow_done)

    def _shadow_batch(self, shadow, model, texts, probs, ids) -> None:
        cand = self._predict(shadow, texts)[0]
        self.metrics.texts.labels("shadow").inc(len(texts))
        if self.shadow_log is not None:
            self.shadow_log.write(texts, model, probs, shadow, cand, ids if None not in ids else None)
        self.holder.shadowed += len(texts)  # after the log line: the guard judges what is logged
        if self.prediction_log is not None and None not in ids:
            self.prediction_log.write(log_records(shadow, ids, texts, cand, "shadow", self.prediction_log.text))

    def _shadow_done(self, fut) -> None:
        with self._shadow_lock:
            self._shadow_pending -= 1
        if fut.exception() is not None:
            log.error("shadow batch failed: %s", fut.exception())


def log_records(model, ids: list[str], texts: list[str], probs: np.ndarray, role: str, text: str) -> list[dict]:
    """The prediction log's lines of one model's answers (domaintune/predict/log.py)."""
    extra = {"problem_type": "multi_label"} \
        if getattr(model.predictor, "problem_type", "single_label") == "multi_label" else {}
    return predlog.records(ids, texts, model.version, model.labels, probs, model.decide(probs), role=role,
                           source="serve", text=text, variant=model.variant, **extra)


def _log_failure(fut) -> None:
    if fut.exception() is not None:
        log.error("could not write the prediction log: %s", fut.exception())


def _fail(item: _Item, exc: Exception) -> None:
    if not item.future.done():
        item.future.set_exception(exc)


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)
