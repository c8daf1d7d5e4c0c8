"""The serving library behind `domaintune serve` (the command and uvicorn live in pipelines/serve.py).

- settings.py  ServeSettings: host, port, variant, limits, batching, polling, shadow
- holder.py    ModelHolder: loads the served version (release.materialise + Predictor.load),
               watches the registry and swaps atomically; the shadow candidate
- batcher.py   MicroBatcher: dynamic batching across concurrent requests, inference in a worker thread
- shadow.py    the shadow log (JSONL) and the summary behind `domaintune shadow-report`
- metrics.py   Prometheus metrics (one registry per app)
- app.py       the FastAPI app (KServe Open Inference Protocol v2, /predict, /version, /metrics)
               and `build(settings)`, which loads the models and makes it

Nothing heavy is imported here: the CLI imports settings.py to answer --help.
"""
