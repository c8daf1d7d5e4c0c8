"""uvicorn around the app: `build` loads the models, `run` serves in the foreground (the CLI),
`ServerThread` serves in a background thread on a socket it already bound (tests, bench)."""
from __future__ import annotations

import logging
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from domaintune.serving.settings import ServeSettings

log = logging.getLogger("domaintune.serve")


@dataclass
class Built:
    app: object
    holder: object
    metrics: object
    shadow_log: object | None


def default_shadow_log(settings: ServeSettings, shadow_version: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", shadow_version)
    return Path(settings.repo).resolve() / "reports" / "shadow" / f"{name}.jsonl"


def build(settings: ServeSettings) -> Built:
    """Load the served model (and the shadow candidate) and make the app; raises if the first model fails."""
    from domaintune.serving.app import create_app
    from domaintune.serving.holder import ModelHolder
    from domaintune.serving.metrics import Metrics
    from domaintune.serving.shadow import ShadowLog

    metrics = Metrics()
    holder = ModelHolder(settings, metrics)
    holder.load_initial()
    shadow_log = None
    if holder.shadow is not None:
        shadow_log = ShadowLog(settings.shadow_log or default_shadow_log(settings, holder.shadow.version))
        log.info("shadow: %s on every request, both predictions logged to %s", holder.shadow.version,
                 shadow_log.path)
    return Built(create_app(holder, settings, metrics, shadow_log), holder, metrics, shadow_log)


def uvicorn_config(app, settings: ServeSettings):
    import uvicorn

    return uvicorn.Config(app, host=settings.host, port=settings.port, access_log=settings.access_log,
                          log_level="info", lifespan="on", timeout_graceful_shutdown=30)


def run(settings: ServeSettings) -> None:
    """Serve until Ctrl-C / SIGTERM (uvicorn finishes in-flight requests first)."""
    import uvicorn

    built = build(settings)
    uvicorn.Server(uvicorn_config(built.app, settings)).run()


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket (port 0: a free one, known before the server starts)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class ServerThread:
    """uvicorn on a background thread: `with ServerThread(app, settings) as url: ...` stops it on exit."""

    def __init__(self, app, settings: ServeSettings):
        import uvicorn

        self.sock = bind(settings.host, settings.port)
        self.url = f"http://{settings.host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(app, settings))
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
