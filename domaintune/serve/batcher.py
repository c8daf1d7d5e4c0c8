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
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("domaintune.serve")


@dataclass
class _Item:
    texts: list[str]
    future: asyncio.Future
    enqueued: float


class MicroBatcher:
    def __init__(self, holder, settings, metrics, shadow_log=None):
        self.holder, self.settings, self.metrics, self.shadow_log = holder, settings, metrics, shadow_log
        self._queue: asyncio.Queue | None = None
        self._carry: _Item | None = None
        self._task: asyncio.Task | None = None
        self._infer = ThreadPoolExecutor(1, thread_name_prefix="domaintune-infer")
        self._shadow = ThreadPoolExecutor(1, thread_name_prefix="domaintune-shadow")
        self._shadow_pending = 0
        self._shadow_lock = threading.Lock()

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._collect(), name="domaintune-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._infer.shutdown(wait=True)
        self._shadow.shutdown(wait=True)  # the shadow log gets every batch already taken

    async def submit(self, texts: list[str]):
        """(the LoadedModel that answered, calibrated probabilities [len(texts), labels])."""
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(texts, fut, time.perf_counter()))
        return await fut

    async def _collect(self) -> None:
        while True:
            first = self._carry or await self._queue.get()
            self._carry = None
            batch, n = [first], len(first.texts)
            deadline = first.enqueued + self.settings.max_wait_ms / 1000
            while n < self.settings.max_batch:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    wait = deadline - time.perf_counter()
                    if wait <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), wait)
                    except TimeoutError:
                        break
                if n + len(item.texts) > self.settings.max_batch:
                    self._carry = item  # starts the next batch
                    break
                batch.append(item)
                n += len(item.texts)
            await self._run(batch)

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
        return predict_sorted(model.predict_proba, texts, self.settings.infer_batch)

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
