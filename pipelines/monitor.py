"""Monitor flows: `domaintune monitor` as Prefect flows, for the UI and for scheduled deployments.

The work itself is domaintune.monitoring (check, judge, report, history, review queue, alarm);
one-shot CLI calls run it in-process without Prefect. These flows run it when PREFECT_API_URL is
set or --flow is given, and `domaintune deploy --monitor-folder DIR --monitor-cron CRON` deploys
monitor_folder_flow so a worker judges each new batch file dropped in DIR on that schedule.

    python -m pipelines.monitor --batch new_tickets.csv      # same as `domaintune monitor ...`
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from domaintune.monitor.monitoring import check_arguments, run_local, telemetry_off
from domaintune.monitor.settings import DEFAULTS, MonitorSettings
from domaintune.tasks import export_task, load_predictor  # the one loader of predict, serve and monitor

telemetry_off()

from prefect import flow, get_run_logger  # noqa: E402 - telemetry switches first

from pipelines.retrain import DEPLOYMENT_NAME, retrain_flow  # noqa: E402 - telemetry switches first

RETRAIN_FLOW = retrain_flow.name


def run_retrain_deployment(root: Path) -> dict | None:
    """monitor.on_drift retrain: run a Prefect deployment of the retrain flow for this project, if the API
    (PREFECT_API_URL) knows one: `domaintune schedule`'s (DEPLOYMENT_NAME) first, else any whose repo parameter
    is this project (`domaintune deploy`'s). Returns {"kind": "deployment", "deployment", "flow_run_id"}, or None
    when there is none (the caller then starts a local retrain). Never starts a server: callers look only when
    PREFECT_API_URL is set."""
    # lazy: the client and run_deployment load only when a retrain is due and PREFECT_API_URL is set
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.deployments import run_deployment

    root = Path(root).resolve()
    with get_client(sync_client=True) as client:
        found = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[RETRAIN_FLOW])))
    mine = [d for d in found if Path(str((d.parameters or {}).get("repo") or ".")).resolve() == root]
    if not mine:
        return None
    dep = min(mine, key=lambda d: d.name != DEPLOYMENT_NAME)
    run = run_deployment(name=f"{RETRAIN_FLOW}/{dep.name}", timeout=0)
    return {"kind": "deployment", "deployment": f"{RETRAIN_FLOW}/{dep.name}", "flow_run_id": str(run.id)}


def _run(batch: str | None, watch: str | None, repo: str, **kw) -> list[dict]:
    ms = MonitorSettings(batch=batch, watch=watch, repo=repo, **kw)
    texts = check_arguments(ms, export_task)
    verdicts = run_local(ms, texts, load_predictor, run_retrain_deployment)
    log = get_run_logger()
    for v in verdicts:
        (log.warning if v["drift"] else log.info)("%s: %s", v["batch"], "DRIFT: " + "; ".join(v["reasons"])
                                                  if v["drift"] else "no drift")
    return verdicts


@flow(name="domaintune-monitor")
def monitor_flow(batch: str, repo: str = ".", baseline: str = DEFAULTS["baseline"], model: str = DEFAULTS["model"],
                 variant: str = DEFAULTS["variant"], out: str = DEFAULTS["out"],
                 text_column: str = DEFAULTS["text_column"],
                 id_column: str | None = None, history: str = DEFAULTS["history"],
                 review_queue: str = DEFAULTS["review_queue"], alarm_command: str | None = None,
                 alarm_webhook: str | None = None) -> dict:
    """Judge one batch file against the drift baseline."""
    return _run(batch, None, repo, baseline=baseline, model=model, variant=variant, out=out,
                text_column=text_column, id_column=id_column, history=history, review_queue=review_queue,
                alarm_command=alarm_command, alarm_webhook=alarm_webhook)[0]


@flow(name="domaintune-monitor-folder")
def monitor_folder_flow(folder: str, repo: str = ".", baseline: str = DEFAULTS["baseline"],
                        model: str = DEFAULTS["model"], variant: str = DEFAULTS["variant"],
                        out: str = DEFAULTS["out"], text_column: str = "text",
                        id_column: str | None = None, history: str = DEFAULTS["history"],
                        review_queue: str = DEFAULTS["review_queue"],
                        alarm_command: str | None = None, alarm_webhook: str | None = None) -> list[dict]:
    """Judge every batch file in `folder` that the history does not list yet (the scheduled monitor)."""
    return _run(None, folder, repo, baseline=baseline, model=model, variant=variant, out=out,
                text_column=text_column, id_column=id_column, history=history, review_queue=review_queue,
                alarm_command=alarm_command, alarm_webhook=alarm_webhook)


def run_flows(ms: MonitorSettings) -> list[dict]:
    """`domaintune monitor --flow` (or with PREFECT_API_URL set): the same work as Prefect flow runs."""
    kw = {k: v for k, v in vars(ms).items() if k not in ("batch", "watch")}
    return monitor_folder_flow(ms.watch, **kw) if ms.watch else [monitor_flow(ms.batch, **kw)]


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pipelines.monitor ARGS` is `domaintune monitor ARGS` (same checks, messages, exit codes): this
    process becomes the CLI's, so this module never imports the CLI that imports it."""
    args = list(sys.argv[1:] if argv is None else argv)
    os.execv(sys.executable, [sys.executable, "-m", "pipelines.cli", "monitor", *args])


if __name__ == "__main__":
    raise SystemExit(main())
