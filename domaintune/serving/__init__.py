"""`domaintune serve`: the released model over HTTP (FastAPI on uvicorn).

- settings.py  ServeSettings: host, port, variant, limits, batching, polling, shadow
- holder.py    ModelHolder: loads the served version (release.materialise + Predictor.load),
               watches the registry and swaps atomically; the shadow candidate
- batcher.py   MicroBatcher: dynamic batching across concurrent requests, inference in a worker thread
- shadow.py    the shadow log (JSONL) and `domaintune shadow-report`
- metrics.py   Prometheus metrics (one registry per app)
- app.py       the FastAPI app: KServe Open Inference Protocol v2, /predict, /version, /metrics
- server.py    uvicorn around it: in the foreground (the CLI) or in a thread (tests, bench)
- cli.py       the `serve` and `shadow-report` subcommands

Nothing heavy is imported here: the CLI imports this package to answer --help.
"""
