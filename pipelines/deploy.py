"""`domaintune deploy`: register the retrain flow (and optionally the monitor flow) on a Prefect work pool.

A worker started on that pool (`prefect worker start --pool NAME`) picks up the scheduled or triggered
runs and executes them where it runs: each DVC stage stays one Prefect task, DVC still decides what is
cached, and a successful run publishes a version exactly as `domaintune retrain` does.

Where the code comes from:
- process pool: the worker runs the flow from this checkout (`--code`, default the repo itself), with
  the Python that runs the worker; the repo and its DVC remote credentials are those of the worker's
  machine (environment variables or .dvc/config.local there).
- docker / kubernetes pools: pass `--image` (an image with this project installed); the job template of
  the pool decides the rest (see the README, "Running on workers").
Nothing here stores credentials: the deployment carries only the repo path, overrides and flags.
"""
from __future__ import annotations

import argparse
from pathlib import Path

RETRAIN_ENTRY = "pipelines/retrain.py:retrain_flow"
MONITOR_ENTRY = "pipelines/monitor.py:monitor_flow"
MONITOR_FOLDER_ENTRY = "pipelines/monitor.py:monitor_folder_flow"


class DeployError(RuntimeError):
    """A deployment could not be registered; the message says what to fix."""


def _check_cron(cron: str | None) -> None:
    if cron is None:
        return
    from prefect.schedules import Cron

    try:
        Cron(cron)
    except Exception as exc:  # noqa: BLE001 - Prefect raises ValueError/pydantic errors for bad crons
        raise DeployError(f"--cron {cron!r} is not a valid cron expression ({str(exc).splitlines()[0]})") from None


def _check_pool(pool: str) -> str:
    """The pool's type; a missing pool or an unreachable API is a clear error, not a traceback."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    async def read():
        async with get_client() as client:
            return await client.read_work_pool(pool)

    try:
        return asyncio.run(read()).type
    except ObjectNotFound:
        raise DeployError(f"work pool {pool!r} not found on {PREFECT_API_URL.value() or 'the Prefect API'}; "
                          f"create it first, e.g. `prefect work-pool create {pool} --type process`") from None


def deploy(repo: str | Path, pool: str, cron: str | None = None, name: str = "retrain",
           overrides: list[str] | None = None, publish: bool = True, code: str | Path | None = None,
           image: str | None = None, monitor_batch: str | None = None, monitor_cron: str | None = None,
           monitor_folder: str | None = None) -> list[str]:
    """Register the deployments; returns their full names (flow/deployment)."""
    from prefect import flow as prefect_flow

    repo = Path(repo).resolve()
    if not (repo / "dvc.yaml").exists():
        raise DeployError(f"--repo {repo}: no dvc.yaml there (not a domaintune project)")
    if monitor_batch and monitor_folder:
        raise DeployError("give --monitor-batch or --monitor-folder, not both")
    _check_cron(cron)
    _check_cron(monitor_cron)
    pool_type = _check_pool(pool)
    if pool_type != "process" and not image:
        raise DeployError(f"work pool {pool!r} is of type {pool_type!r}: give --image (an image with this project "
                          "installed); only process pools run from the local checkout")
    source = str(Path(code).resolve() if code else repo)
    specs = [("domaintune-retrain", name, RETRAIN_ENTRY, cron, "domaintune: run the DVC stages, publish a version",
              {"repo": str(repo), "overrides": list(overrides or []), "publish": publish})]
    if monitor_folder:
        specs.append(("domaintune-monitor-folder", f"{name}-monitor", MONITOR_FOLDER_ENTRY, monitor_cron,
                      "domaintune: drift verdict for each new batch file in the folder (history, review queue, "
                      "alarm)", {"folder": monitor_folder, "repo": str(repo)}))
    if monitor_batch:
        specs.append(("domaintune-monitor", f"{name}-monitor", MONITOR_ENTRY, monitor_cron,
                      "domaintune: drift verdict for the named batch", {"batch": monitor_batch, "repo": str(repo)}))
    names = []
    for flow_name, dep_name, entry, schedule, description, parameters in specs:
        # to_deployment + apply rather than flow.deploy: prefect 3.8.8's deploy() asks its own server for the
        # pool's workers with null paging fields, which that server rejects (422).
        dep = prefect_flow.from_source(source=source, entrypoint=entry).to_deployment(
            name=dep_name, cron=schedule, parameters=parameters, description=description, work_pool_name=pool)
        dep.apply(work_pool_name=pool, image=image)
        names.append(f"{flow_name}/{dep_name}")
    return names


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--pool", required=True, help="Prefect work pool the runs go to (must exist)")
    ap.add_argument("--cron", default=None, help='retrain schedule, e.g. "0 3 * * 1" (default: none, trigger by hand)')
    ap.add_argument("--name", default="retrain", help="deployment name (default: retrain)")
    ap.add_argument("--set", "-S", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="params.yaml overrides applied on every run (repeatable; default: none)")
    ap.add_argument("--no-publish", dest="publish", action="store_false",
                    help="runs record no version (default: publish)")
    ap.add_argument("--code", default=None, help="folder the worker loads the flow code from (default: --repo)")
    ap.add_argument("--image", default=None, help="container image for docker/kubernetes pools (default: none)")
    ap.add_argument("--monitor-batch", default=None,
                    help="also deploy the monitor flow on this batch file (default: no monitor deployment)")
    ap.add_argument("--monitor-folder", default=None,
                    help="also deploy the monitor on this folder of incoming batch files (relative to --repo): each "
                         "run judges the files its history does not list yet (default: none)")
    ap.add_argument("--monitor-cron", default=None, help="schedule of the monitor deployment, e.g. \"*/15 * * * *\" "
                    "(default: none)")


def run_from_args(args) -> int:
    import sys

    try:
        names = deploy(args.repo, args.pool, args.cron, args.name, args.overrides, args.publish, args.code,
                       args.image, args.monitor_batch, args.monitor_cron, args.monitor_folder)
    except DeployError as exc:
        print(f"deploy: {exc}", file=sys.stderr)
        return 2
    for n in names:
        print(f"deployed {n} on work pool {args.pool!r}")
    print(f"start a worker: prefect worker start --pool {args.pool}")
    return 0
