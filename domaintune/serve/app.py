"""The HTTP API of `domaintune serve` (FastAPI).

On a classifier export:
KServe Open Inference Protocol v2 (model name "domaintune"):
    GET  /v2/health/live, /v2/health/ready (details: version, last load failure, shadow)
    GET  /v2/models/domaintune, /v2/models/domaintune/ready
    POST /v2/models/domaintune/infer   one BYTES input tensor of texts (ids: optional "parameters": {"ids": [...]})
         -> outputs label (BYTES), confidence (FP32), probabilities (FP32 [n, labels]; labels in its parameters),
         and "parameters": {"ids": [...]}; an export that abstains (evaluate.abstain) adds abstained (BOOL [n]),
         and its label is the abstention label ("out_of_scope") on those rows
Plain JSON:
    POST /predict {"texts": [...], "top_k": 3, "ids": [...]} -> per text: id, label, calibrated confidence, top-k
         (and "abstained": true/false, with the abstention label as `label`, for an export that abstains)
Ids: a client may name each text (`ids`, strings or integers, unique in the request); a text without one gets a
uuid4. The response returns them: they are the keys of the prediction log (--prediction-log, every answer and
every shadow answer, domaintune/predict/log.py) that `domaintune feedback` scores delayed labels against.
    GET  /version   tag, commit, dataset hash, variant (auto resolved; variant_choice says why), metrics of the
                    served (and shadow) model
    GET  /metrics   Prometheus
On a token_classification export the same routes, the same limits and batching: /predict answers per text
id and entities (start, end, text, label, calibrated score); /v2/.../infer one BYTES output "entities" holding
each text's entity list as JSON.
On a generation export: the OpenAI-compatible /v1/completions, /v1/chat/completions and /v1/models
(domaintune/serve/openai.py); /predict and /v2/models/domaintune/infer answer 404 there, and the /v1
routes answer 404 on a classifier. Health, /version and /metrics answer for both.
Every response names the model version in the X-Model-Version header (for predictions:
the version that computed them). Bad input is answered with a JSON {"error", "field"}:
413 for a body, text count or text length over the limits, 422 for malformed JSON,
wrong types, empty lists, a lone surrogate, NaN/Infinity or an integer beyond 64 bits
(domaintune/serve/body.py; checked before the request joins a batch), 408 for a body not
received within --body-timeout - never a 5xx. A batch that still fails is retried request by
request, so only the request that fails alone gets its 500 (domaintune/serve/batcher.py).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import Request  # module level: FastAPI resolves the endpoints' (string) annotations here
from starlette.requests import ClientDisconnect

from domaintune import __version__
from domaintune.predict.log import PredictionLog
from domaintune.serve import openai
from domaintune.serve.batcher import MicroBatcher, wrong_task
from domaintune.serve.body import ApiError, check_ids, check_texts, read_json
from domaintune.serve.holder import ModelHolder
from domaintune.serve.metrics import Metrics
from domaintune.serve.settings import MODEL_NAME, VERSION_HEADER, ServeSettings
from domaintune.serve.shadow import ShadowLog

log = logging.getLogger("domaintune.serve")
V2 = f"/v2/models/{MODEL_NAME}"
KNOWN_PATHS = {"/predict", "/version", "/metrics", "/v2", "/v2/health/live", "/v2/health/ready", V2,
               f"{V2}/ready", f"{V2}/infer", *openai.PATHS}
OUTPUT_NAMES = ("label", "confidence", "probabilities", "abstained")  # abstained: an export that abstains
CLIENT_GONE = 499  # the status /metrics counts a client that disconnected before it was answered under (nginx's)


def parse_predict(body, settings) -> tuple[list[str], int, list[str] | None]:
    """(texts, top_k, the client's ids or None) of a /predict request."""
    if not isinstance(body, dict):
        raise ApiError(422, f'expected a JSON object {{"texts": [...]}}, got {type(body).__name__}')
    unknown = sorted(set(body) - {"texts", "top_k", "ids"})
    if unknown:
        raise ApiError(422, "unknown field (known: texts, top_k, ids)", unknown[0])
    if "texts" not in body:
        raise ApiError(422, "missing field", "texts")
    top_k = body.get("top_k", settings.top_k)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ApiError(422, f"expected a positive integer, got {top_k!r}", "top_k")
    texts = check_texts(body["texts"], "texts", settings)
    return texts, top_k, check_ids(body.get("ids"), len(texts), "ids")


def new_ids(ids: list[str] | None, n: int) -> list[str]:
    """The client's ids, else a uuid4 per text."""
    return ids if ids is not None else [uuid.uuid4().hex for _ in range(n)]


def parse_infer(body, settings, names=OUTPUT_NAMES) -> tuple[list[str], list[str], object, list[str] | None]:
    """(texts, requested output names, request id, the client's ids or None) of a v2 inference request."""
    if not isinstance(body, dict):
        raise ApiError(422, f"expected a JSON object, got {type(body).__name__}")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ApiError(422, "expected exactly one input tensor object (BYTES, the texts)", "inputs")
    tensor = inputs[0]
    if tensor.get("datatype") != "BYTES":
        raise ApiError(422, f"datatype must be BYTES, got {tensor.get('datatype')!r}", "inputs[0].datatype")
    data = tensor.get("data")
    if isinstance(data, list) and data and all(isinstance(d, list) and len(d) == 1 for d in data):
        data = [d[0] for d in data]  # shape [n, 1] sent nested
    texts = check_texts(data, "inputs[0].data", settings)
    shape = tensor.get("shape")
    if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
            and shape and math.prod(shape) == len(texts) and all(s == 1 for s in shape[1:])):
        raise ApiError(422, f"shape must be [{len(texts)}] or [{len(texts)}, 1] for {len(texts)} texts, "
                            f"got {shape!r}", "inputs[0].shape")
    wanted = [n for n in names if n != "abstained"]  # abstained: added by infer_outputs for an export that abstains
    if body.get("outputs") is not None:
        outs = body["outputs"]
        if not isinstance(outs, list) or not all(isinstance(o, dict) and o.get("name") in names for o in outs):
            raise ApiError(422, f"each requested output must be an object naming one of {list(names)}", "outputs")
        wanted = [o["name"] for o in outs] or wanted
    params = body.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise ApiError(422, f"expected an object, got {type(params).__name__}", "parameters")
    return texts, wanted, body.get("id"), check_ids((params or {}).get("ids"), len(texts), "parameters.ids")


def decided_labels(model, probs: np.ndarray, abstained: np.ndarray | None) -> list[str]:
    """Each row's label: the model's, or evaluate.abstain.label where it abstains."""
    decided = model.decide(probs)
    if abstained is None:
        return decided
    return [model.abstain_label if a else lab for lab, a in zip(decided, abstained)]


def predictions(model, probs: np.ndarray, top_k: int, ids: list[str],
                abstained: np.ndarray | None = None) -> list[dict]:
    labels = model.labels
    decided = decided_labels(model, probs, abstained)
    k = min(top_k, len(labels))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    out = [{"id": ids[i], "label": decided[i], "confidence": float(probs[i].max()),
            "top_k": [{"label": labels[j], "confidence": float(probs[i, j])} for j in order[i]]}
           for i in range(len(probs))]
    if abstained is not None:  # an export that abstains (evaluate.abstain) says so on every prediction
        for p, a in zip(out, abstained):
            p["abstained"] = bool(a)
    return out


def infer_outputs(model, probs: np.ndarray, wanted: list[str], abstained: np.ndarray | None = None) -> list[dict]:
    n, k = probs.shape
    tensors = {
        "label": {"name": "label", "datatype": "BYTES", "shape": [n], "data": decided_labels(model, probs, abstained)},
        "confidence": {"name": "confidence", "datatype": "FP32", "shape": [n],
                       "data": probs.max(axis=1).astype(np.float32).tolist()},
        "probabilities": {"name": "probabilities", "datatype": "FP32", "shape": [n, k],
                          "data": probs.astype(np.float32).ravel().tolist(), "parameters": {"labels": model.labels}},
    }
    if abstained is not None:
        tensors["abstained"] = {"name": "abstained", "datatype": "BOOL", "shape": [n],
                                "data": [bool(a) for a in abstained], "parameters": {"label": model.abstain_label}}
        if "label" in wanted and "abstained" not in wanted:
            wanted = [*wanted, "abstained"]  # a label may be the abstention label: say which rows
    return [tensors[name] for name in wanted if name in tensors]


def entity_outputs(model, cells: np.ndarray) -> list[dict]:
    """A tagger's v2 output: one BYTES tensor "entities", per text the JSON list of its entities."""
    return [{"name": "entities", "datatype": "BYTES", "shape": [len(cells)],
             "data": [json.dumps(c, ensure_ascii=False) for c in cells[:, 0]],
             "parameters": {"content": "JSON list of {start, end, text, label, score} per text",
                            "labels": model.predictor.entity_types}}]


def model_metadata(model) -> dict:
    platform = ("onnxruntime" if model.variant.startswith("onnx")
                else "openvino" if model.variant.startswith("openvino") else "pytorch")
    if model.task == "token_classification":
        return {"name": MODEL_NAME, "versions": [model.version], "platform": platform,
                "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
                "outputs": [{"name": "entities", "datatype": "BYTES", "shape": [-1]}],
                "parameters": {"task": model.task, "labels": model.predictor.entity_types, "variant": model.variant}}
    if model.task != "classification":  # no v2 tensors: its API is /v1 (domaintune/serve/openai.py)
        return {"name": MODEL_NAME, "versions": [model.version], "platform": platform, "inputs": [], "outputs": [],
                "parameters": {"task": model.task, "variant": model.variant, "endpoints": list(openai.PATHS)}}
    return {"name": MODEL_NAME, "versions": [model.version], "platform": platform,
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                        {"name": "confidence", "datatype": "FP32", "shape": [-1]},
                        {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(model.labels)]}]
            + ([{"name": "abstained", "datatype": "BOOL", "shape": [-1]}] if model.abstain_label is not None else []),
            "parameters": {"task": model.task, "labels": model.labels, "variant": model.variant,
                           **({"abstain_label": model.abstain_label} if model.abstain_label is not None else {})}}


def create_app(holder, settings, metrics, shadow_log=None, prediction_log=None):
    """The FastAPI app around a ModelHolder that already has a model (holder.load_initial())."""
    from fastapi import FastAPI

    batcher = MicroBatcher(holder, settings, metrics, shadow_log, prediction_log)

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        holder.start_watching()
        yield
        await asyncio.to_thread(holder.stop)
        await batcher.stop()
        if shadow_log is not None:
            shadow_log.close()
        if prediction_log is not None:
            prediction_log.close()

    app = FastAPI(title="domaintune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.holder, app.state.batcher, app.state.metrics = holder, batcher, metrics
    _add_plumbing(app, holder, metrics)
    _add_v2_routes(app, holder, batcher, settings)
    _add_plain_routes(app, holder, batcher, settings, metrics)
    openai.add_routes(app, holder, batcher, settings)
    return app


def _add_plumbing(app, holder, metrics) -> None:
    """Errors as JSON, and per request: metrics and the version header."""
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        metrics.rejected.labels(str(exc.status)).inc()
        body = exc.openai_body() if request.url.path.startswith("/v1/") else exc.body()
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    app.add_middleware(Observe, holder=holder, metrics=metrics)


class Observe:
    """Pure ASGI middleware (cheaper per request than BaseHTTPMiddleware): counts and times each
    request, adds the version header where the endpoint did not, and turns an unexpected exception
    into a logged JSON 500 so the server lives on. A client that went away before its body was read
    is counted with status 499 (no answer is sent), not as a 500."""

    def __init__(self, app, holder, metrics):
        self.app, self.holder, self.metrics = app, holder, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]

        async def send_observed(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = list(message.get("headers", []))
                cur = self.holder.current
                if cur is not None and not any(k.lower() == b"x-model-version" for k, _ in headers):
                    headers.append((b"x-model-version", cur.version.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        except ClientDisconnect:
            log.debug("%s %s: the client disconnected before its body was read", scope.get("method"),
                      scope.get("path"))
            status[0] = status[0] or CLIENT_GONE
        except Exception as exc:  # noqa: BLE001 - a bug answers 500 in JSON and is logged, the server lives on
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if status[0]:
                raise  # the response had begun: nothing sane can be sent any more
            from fastapi.responses import JSONResponse

            err = ApiError(500, f"internal server error: {type(exc).__name__}: {exc}")
            body = err.openai_body() if scope.get("path", "").startswith("/v1/") else err.body()
            await JSONResponse(body, status_code=500)(scope, receive, send_observed)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in KNOWN_PATHS else "other"
            self.metrics.requests.labels(endpoint, scope.get("method", ""), str(status[0] or 500)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


def _add_v2_routes(app, holder, batcher, settings) -> None:
    from fastapi.responses import JSONResponse

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        cur = holder.current
        body = {"ready": cur is not None, "version": cur.version if cur else None,
                "variant": cur.variant if cur else settings.variant,
                "follows_registry": holder.follows_registry, "swaps": holder.swaps, "last_error": holder.last_error,
                "shadow": holder.shadow.version if holder.shadow else None}
        return JSONResponse(body, status_code=200 if cur is not None else 503)

    @app.get("/v2")
    async def server_metadata():
        return {"name": "domaintune", "version": __version__, "extensions": []}

    @app.get("/v2/models/{name}")
    async def metadata(name: str):
        _check_name(name)
        return model_metadata(holder.current)

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str):
        _check_name(name)
        return {"name": MODEL_NAME, "ready": holder.current is not None}

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request):
        _check_name(name)
        _need_classifier(holder)
        tagger = holder.current.task == "token_classification"
        texts, wanted, req_id, ids = parse_infer(await read_json(request, settings), settings,
                                                 ("entities",) if tagger else OUTPUT_NAMES)
        ids = new_ids(ids, len(texts))
        model, probs, abstained = await batcher.submit(texts, ids)
        if (model.task == "token_classification") != tagger:  # hot-swapped to another task meanwhile
            raise wrong_task(model, holder.current.task)
        body = {"model_name": MODEL_NAME, "model_version": model.version,
                **({"id": req_id} if req_id is not None else {}), "parameters": {"ids": ids},
                "outputs": entity_outputs(model, probs) if tagger else infer_outputs(model, probs, wanted, abstained)}
        return JSONResponse(body, headers={VERSION_HEADER: model.version})


def _check_name(name: str) -> None:
    if name != MODEL_NAME:
        raise ApiError(404, f"no model {name!r}; this server serves {MODEL_NAME!r}", "model")


def _need_classifier(holder) -> None:
    if holder.current.task not in ("classification", "token_classification"):
        raise wrong_task(holder.current, "classification")


def _add_plain_routes(app, holder, batcher, settings, metrics) -> None:
    from fastapi.responses import JSONResponse, Response

    @app.post("/predict")
    async def predict(request: Request):
        _need_classifier(holder)
        texts, top_k, ids = parse_predict(await read_json(request, settings), settings)
        ids = new_ids(ids, len(texts))
        model, probs, abstained = await batcher.submit(texts, ids)
        if model.task == "token_classification":  # entities per text (top_k does not apply)
            rows = [{"id": i, "entities": cell} for i, cell in zip(ids, probs[:, 0])]
            return JSONResponse({"model_version": model.version, "predictions": rows},
                                headers={VERSION_HEADER: model.version})
        return JSONResponse({"model_version": model.version,
                             "predictions": predictions(model, probs, top_k, ids, abstained)},
                            headers={VERSION_HEADER: model.version})

    @app.get("/version")
    async def version(full: int = 0):
        """The served (and shadow) model: headline metrics; ?full=1 for every metric of the version."""
        cur = holder.current
        return {**cur.info(bool(full)), "shadow": holder.shadow.info(bool(full)) if holder.shadow else None,
                "last_error": holder.last_error}

    @app.get("/metrics")
    async def prometheus():
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)


@dataclass
class Built:
    app: object
    holder: object
    metrics: object
    shadow_log: object | None
    prediction_log: object | None = None


LIVE_SHADOW = "live"  # reports/shadow/live.jsonl: every pair of a shadow that follows the registry


def default_shadow_log(settings: ServeSettings, shadow_version: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", shadow_version)
    return Path(settings.repo).resolve() / "reports" / "shadow" / f"{name}.jsonl"


def build(settings: ServeSettings) -> Built:
    """Load the served model (and the shadow candidate) and make the app; raises if the first model fails."""
    metrics = Metrics()
    holder = ModelHolder(settings, metrics)
    holder.load_initial()
    shadow_log = None
    # A shadow that changes while serving (the waiting challenger, the guard's replaced champion) logs to one
    # file whose lines name both versions; a fixed --shadow VERSION to reports/shadow/<VERSION>.jsonl.
    live = holder.shadow_follows_challenger or (holder.follows_registry and settings.guard_requests > 0)
    if holder.shadow is not None or live:
        name = LIVE_SHADOW if live or holder.shadow is None else holder.shadow.version
        shadow_log = ShadowLog(settings.shadow_log or default_shadow_log(settings, name), text=settings.log_text)
        holder.shadow_log_path = shadow_log.path
        log.info("shadow: %s on every request, both predictions logged to %s",
                 holder.shadow.version if holder.shadow else "none yet", shadow_log.path)
    prediction_log = None
    if settings.prediction_log is not None and holder.current.task == "classification":
        prediction_log = PredictionLog(settings.prediction_log, settings.log_text, settings.prediction_log_bytes,
                                       settings.prediction_log_files)
        log.info("every prediction is logged to %s (rotated at %d bytes, %d files kept)", prediction_log.path,
                 settings.prediction_log_bytes, settings.prediction_log_files)
    return Built(create_app(holder, settings, metrics, shadow_log, prediction_log), holder, metrics, shadow_log,
                 prediction_log)
