"""`domaintune serve` and `domaintune shadow-report`, and uvicorn around the serving app.

The library (domaintune/serve/) loads models (through domaintune.tasks.load_predictor, the one loader
of predict, serve and monitor) and makes the FastAPI app; this module,
on the top floor, starts servers: in the foreground for the CLI (uvicorn finishes
in-flight requests on Ctrl-C/SIGTERM), or on a background thread with `ServerThread`
(tests, benchmarks), on a socket bound before the server starts.

    domaintune serve                       # the registry's prod version, following rollbacks
    domaintune serve --model models/export # a folder (version "workspace"): a classifier or a generation export
    domaintune serve --shadow v1.3.0       # + a candidate on the same requests, both logged
    domaintune serve --prediction-log none # every prediction is logged (reports/predictions/serve.jsonl) unless
    domaintune shadow-report reports/shadow/v1.3.0.jsonl
"""
from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from pathlib import Path

from domaintune.core.errors import DataError
from domaintune.core.params import BaseParams, ReleaseParams, load_params
from domaintune.export.variants import REQUESTS as EXPORT_VARIANTS
from domaintune.export.variants import variant_arg
from domaintune.serve.settings import ServeSettings

PREDICTION_LOG = "reports/predictions/serve.jsonl"  # --prediction-log's default, under --repo


def register(add) -> None:
    """Add both subcommands through the CLI's `add(name, fn, help)` (which also gives them --repo)."""
    S = ServeSettings  # noqa: N806 - the defaults

    p = add("serve", cmd_serve, "serve the released model over HTTP (classifier: KServe v2 + /predict; generation: "
                                "OpenAI /v1), following rollbacks",
            "domaintune serve                          # the GTO prod version on 127.0.0.1:8080",
            "domaintune serve --model models/export --variant onnx-int8 --port 9000",
            "domaintune serve --shadow v1.3.0          # also run v1.3.0 on every request, log both",
            "curl -s localhost:8080/predict -d '{\"texts\": [\"my card was charged twice\"]}'",
            "curl -s localhost:8080/v1/chat/completions -d '{\"messages\": [{\"role\": \"user\", "
            "\"content\": \"where is my parcel?\"}], \"max_tokens\": 64}'   # a generation export")
    p.add_argument("--host", default=S.host, help="address to bind (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=S.port, help="port to listen on")
    p.add_argument("--variant", default=S.variant, type=variant_arg, choices=EXPORT_VARIANTS,
                   help=f"model variant to load: {', '.join(EXPORT_VARIANTS)} (default: {S.variant}, the fastest "
                        "that passed its gates as the export stage measured them, float32 for an export without "
                        "that record; /version names the one loaded; 'float' is "
                        "accepted for float32)")
    p.add_argument("--device", default=S.device, help="where a PyTorch model runs, e.g. cuda (default: cpu)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="serve this export folder (version 'workspace') instead of the registry's prod version")
    p.add_argument("--shadow", default=None, metavar="VERSION",
                   help="also run this candidate version (or folder) on every request, log both predictions; "
                        "'challenger': the registry's waiting challenger, followed without a restart "
                        "(`domaintune promote --from-shadow` judges it)")
    p.add_argument("--guard-requests", type=int, default=None, metavar="N",
                   help="after a promotion the replaced champion shadows the new one for N texts, then a worse "
                        "champion is rolled back (default: params.yaml release.guard_requests; 0: off)")
    p.add_argument("--shadow-log", default=None, metavar="FILE",
                   help="JSONL of both predictions (default: reports/shadow/<candidate>.jsonl)")
    p.add_argument("--log-text", default=S.log_text, choices=("hash", "plain", "none"),
                   help="how logs of requests (prediction and shadow logs) store each text: its SHA-256, the text, "
                        "or neither")
    p.add_argument("--prediction-log", default=PREDICTION_LOG, metavar="FILE",
                   help="JSONL of every prediction (id, version, calibrated probabilities), the log `domaintune "
                        f"feedback` scores labels against; relative to --repo; 'none': off (default: {PREDICTION_LOG})")
    p.add_argument("--prediction-log-mb", type=float, default=S.prediction_log_bytes / (1 << 20), metavar="MB",
                   help="the prediction log is rotated (FILE.1 ... FILE.N) before it passes this size "
                        f"(default: {S.prediction_log_bytes >> 20})")
    p.add_argument("--prediction-log-files", type=int, default=S.prediction_log_files, metavar="N",
                   help=f"rotated prediction log files kept (default: {S.prediction_log_files})")
    p.add_argument("--poll", type=float, default=S.poll_s, metavar="SECONDS",
                   help="how often to check the registry for a new served version")
    p.add_argument("--max-batch", type=int, default=S.max_batch, help="texts gathered into one batch")
    p.add_argument("--infer-batch", type=int, default=S.infer_batch,
                   help="the most texts per forward pass (a batch runs sorted by token length in passes of at most "
                        "this many texts, within --max-batch-tokens)")
    p.add_argument("--max-batch-tokens", type=int, default=S.max_batch_tokens, metavar="TOKENS",
                   help="token budget of one forward pass: (longest text in tokens) x (texts) <= it; a longer text "
                        f"runs alone (default: {S.max_batch_tokens})")
    p.add_argument("--max-wait-ms", type=float, default=S.max_wait_ms, help="wait for more requests to batch")
    p.add_argument("--max-batch-chars", type=int, default=S.max_batch_chars,
                   help="characters per batch: a larger request is answered over several batches, taking turns "
                        "with the others")
    p.add_argument("--max-texts", type=int, default=S.max_texts, help="texts per request (more: 413)")
    p.add_argument("--max-chars", type=int, default=S.max_chars, help="characters per text (more: 413)")
    p.add_argument("--max-body-bytes", type=int, default=S.max_body_bytes, help="request body size (more: 413)")
    p.add_argument("--body-timeout", type=float, default=S.body_timeout_s, metavar="SECONDS",
                   help="a request body not received within this is answered 408 and its connection closed")
    p.add_argument("--retry-max", type=float, default=S.retry_max_s, metavar="SECONDS",
                   help=f"a served version that failed to load is tried again after {S.retry_s:g} s, then twice as "
                        "long each time, up to this")
    p.add_argument("--keep-releases", type=int, default=S.keep_releases, metavar="N",
                   help="materialised releases kept after a swap besides the served and the shadow one")
    p.add_argument("--top-k", type=int, default=S.top_k, help="default top-k of /predict")
    p.add_argument("--max-new-tokens", type=int, default=S.max_new_tokens,
                   help="generation: the most tokens a /v1 request may ask for (more: 413)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p = add("shadow-report", cmd_shadow_report, "summarise a shadow log: agreement, per-class disagreement, "
                                                "confidence on disagreements",
            "domaintune shadow-report reports/shadow/v1.3.0.jsonl", "domaintune shadow-report log.jsonl --json")
    p.add_argument("log", help="the JSONL written by `domaintune serve --shadow`")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def release_settings(repo: Path, following_registry: bool, guard_requests: int | None) -> dict:
    """The guard's settings from params.yaml's release section (none for a plain --model folder)."""
    if not following_registry:
        return {"guard_requests": 0}
    params = repo / "params.yaml"
    rel, base = load_params(params, "release", "base") if params.is_file() else (ReleaseParams(), BaseParams())
    out = {"guard_requests": rel.guard_requests, "max_regression": rel.max_regression,
           "resamples": rel.bootstrap_resamples, "seed": base.seed}
    if guard_requests is not None:
        out["guard_requests"] = guard_requests
    return out


def settings_from_args(args) -> ServeSettings:
    return ServeSettings(**release_settings(Path(args.repo), args.model is None, args.guard_requests),
                         host=args.host, port=args.port, variant=args.variant, device=args.device,
                         repo=Path(args.repo),
                         model_dir=Path(args.model) if args.model else None, poll_s=args.poll,
                         max_batch=args.max_batch, infer_batch=args.infer_batch, max_wait_ms=args.max_wait_ms,
                         max_batch_tokens=args.max_batch_tokens,
                         max_batch_chars=args.max_batch_chars, body_timeout_s=args.body_timeout,
                         retry_max_s=args.retry_max, keep_releases=args.keep_releases,
                         max_texts=args.max_texts, max_chars=args.max_chars, max_body_bytes=args.max_body_bytes,
                         top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                         shadow=args.shadow, shadow_log=Path(args.shadow_log) if args.shadow_log else None,
                         log_text=args.log_text, access_log=args.access_log,
                         prediction_log=prediction_log_path(args.prediction_log, Path(args.repo)),
                         prediction_log_bytes=max(1, int(args.prediction_log_mb * (1 << 20))),
                         prediction_log_files=args.prediction_log_files)


def prediction_log_path(value: str, repo: Path) -> Path | None:
    """--prediction-log: 'none' (off), else the file, relative to --repo."""
    return None if value.strip().lower() == "none" else repo / value


def cmd_serve(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"domaintune serve: {exc}", file=sys.stderr)
        return 2
    if settings.model_dir is not None and not settings.model_dir.is_dir():
        print(f"domaintune serve: --model {settings.model_dir}: no such folder", file=sys.stderr)
        return 2
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("domaintune.serve").warning("binding %s: reachable from other machines", settings.host)
    # lazy: loads numpy
    from domaintune.modeling.encoders import set_threads

    # lazy: loads fastapi, numpy
    from domaintune.serve.app import build

    try:  # the port first: a busy one is refused at once, not after the model has loaded
        sock = bind(settings.host, settings.port)
    except OSError as exc:
        print(f"domaintune serve: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    with sock:
        set_threads()
        try:
            built = build(settings)  # a RegistryError (nothing served, a version failing verification): exit 1
        except (OSError, ValueError, KeyError) as exc:  # a folder that is not a loadable model
            print(f"domaintune serve: cannot load the model: {exc}", file=sys.stderr)
            return 2
        uvicorn_server(built.app, settings).run(sockets=[sock])
    return 0


def cmd_shadow_report(args) -> int:
    # lazy: loads numpy
    from domaintune.serve.shadow import format_report, summarise

    try:
        summary = summarise(Path(args.log))
    except DataError as exc:
        print(f"domaintune shadow-report: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2) if args.json else format_report(summary))
    return 0


# ---------------------------------------------------------------- uvicorn
def uvicorn_config(app, settings: ServeSettings):
    import uvicorn

    return uvicorn.Config(app, host=settings.host, port=settings.port, access_log=settings.access_log,
                          log_level="info", lifespan="on", timeout_graceful_shutdown=30)


def uvicorn_server(app, settings: ServeSettings):
    """A uvicorn.Server that says where it listens also when it is given its socket (uvicorn says so only
    when it binds one itself)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if sockets and self.started:
                host, port = sockets[0].getsockname()[:2]
                logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)",
                                                        host, port)

    return Server(uvicorn_config(app, settings))


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A bound socket for uvicorn to listen on (port 0: a free one, known before the server starts)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class ServerThread:
    """uvicorn on a background thread: `with ServerThread(app, settings) as url: ...` stops it on exit."""

    def __init__(self, app, settings: ServeSettings):
        self.sock = bind(settings.host, settings.port)
        self.url = f"http://{settings.host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn_server(app, settings)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="domaintune-uvicorn", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()

    def __exit__(self, *exc) -> None:
        self.stop()
