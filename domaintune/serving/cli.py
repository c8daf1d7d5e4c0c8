"""The `domaintune serve` and `domaintune shadow-report` subcommands (registered by domaintune/cli.py)."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def register(add) -> None:
    """Add both subcommands through the CLI's `add(name, fn, help)` (which also gives them --repo)."""
    from domaintune.serving.settings import ServeSettings as S

    p = add("serve", cmd_serve, "serve the released model over HTTP (KServe v2 + /predict), following rollbacks")
    p.add_argument("--host", default=S.host, help="address to bind (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=S.port)
    p.add_argument("--variant", default=S.variant, help="model variant to load (default: float)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="serve this export folder (version 'workspace') instead of the registry's prod version")
    p.add_argument("--shadow", default=None, metavar="VERSION",
                   help="also run this candidate version (or folder) on every request, log both predictions")
    p.add_argument("--shadow-log", default=None, metavar="FILE",
                   help="JSONL of both predictions (default: reports/shadow/<candidate>.jsonl)")
    p.add_argument("--poll", type=float, default=S.poll_s, metavar="SECONDS",
                   help="how often to check the registry for a new served version")
    p.add_argument("--max-batch", type=int, default=S.max_batch, help="texts per inference batch")
    p.add_argument("--max-wait-ms", type=float, default=S.max_wait_ms, help="wait for more requests to batch")
    p.add_argument("--max-texts", type=int, default=S.max_texts, help="texts per request (more: 413)")
    p.add_argument("--max-chars", type=int, default=S.max_chars, help="characters per text (more: 413)")
    p.add_argument("--max-body-bytes", type=int, default=S.max_body_bytes, help="request body size (more: 413)")
    p.add_argument("--top-k", type=int, default=S.top_k, help="default top-k of /predict")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p = add("shadow-report", cmd_shadow_report, "summarise a shadow log: agreement, per-class disagreement, "
                                                "confidence on disagreements")
    p.add_argument("log", help="the JSONL written by `domaintune serve --shadow`")
    p.add_argument("--json", action="store_true")


def settings_from_args(args):
    from domaintune.serving.settings import ServeSettings

    return ServeSettings(host=args.host, port=args.port, variant=args.variant, repo=Path(args.repo),
                         model_dir=Path(args.model) if args.model else None, poll_s=args.poll,
                         max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_texts=args.max_texts,
                         max_chars=args.max_chars, max_body_bytes=args.max_body_bytes, top_k=args.top_k,
                         shadow=args.shadow, shadow_log=Path(args.shadow_log) if args.shadow_log else None,
                         access_log=args.access_log)


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
    import uvicorn

    from domaintune.modeling import set_threads
    from domaintune.registry import RegistryError
    from domaintune.serving.server import build, uvicorn_config

    set_threads()
    try:
        built = build(settings)
    except RegistryError:
        raise  # the CLI prints it (exit 1)
    except (OSError, ValueError, KeyError) as exc:  # a folder that is not a loadable model
        print(f"domaintune serve: cannot load the model: {exc}", file=sys.stderr)
        return 2
    uvicorn.Server(uvicorn_config(built.app, settings)).run()
    return 0


def cmd_shadow_report(args) -> int:
    from domaintune.data import DataError
    from domaintune.serving.shadow import format_report, summarise

    try:
        summary = summarise(Path(args.log))
    except DataError as exc:
        print(f"domaintune shadow-report: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2) if args.json else format_report(summary))
    return 0
