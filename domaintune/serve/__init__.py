"""The serving library behind `domaintune serve` (the command and uvicorn live in pipelines/serve.py).

- settings.py  ServeSettings: host, port, variant, device, limits, batching, polling and retries, shadow,
               releases kept
- holder.py    ModelHolder: loads the served version (release.materialise + domaintune.tasks.load_predictor,
               so a classifier or a generation export), watches the registry and swaps atomically
               (retrying a version that failed, pruning old releases after a swap); the shadow candidate
- batcher.py   MicroBatcher: dynamic batching across concurrent requests (texts to classify, taken in
               turns under a character cap; generation jobs), inference in a worker thread, a failed
               batch retried request by request
- body.py      request bodies and refusals: ApiError, JSON under the size limit and the body timeout,
               values no route can answer (lone surrogates, NaN/Infinity, huge integers), the texts check
- shadow.py    the shadow log (JSONL) and the summary behind `domaintune shadow-report`
- metrics.py   Prometheus metrics (one registry per app)
- app.py       the FastAPI app (KServe Open Inference Protocol v2, /predict, /version, /metrics)
               and `build(settings)`, which loads the models and makes it
- openai.py    the OpenAI-compatible /v1/completions and /v1/chat/completions of a generation export

Nothing heavy is imported here: the CLI imports settings.py to answer --help.
"""
