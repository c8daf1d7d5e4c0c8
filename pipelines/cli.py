"""`domaintune`: the commands below (the list in --help is made from the commands themselves).

Every heavy import (DVC, GTO, Prefect, torch) happens inside the subcommand
that needs it, so `domaintune --help` answers at once. Exit codes: 0 success;
1 drift found (`monitor` only); 2 any error (bad argument or input, a refused
or failed operation, another retrain or rollback running), reported as one
line on stderr, never a traceback (set DOMAINTUNE_TRACEBACK=1 to see one).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from domaintune import __version__
from domaintune.evaluate.summary import (
    SUMMARY_FILE,
    SummaryError,
    build_summary,
    format_table,
    load_metrics,
    write_summary,
)
from domaintune.export.variants import REQUESTS as VARIANT_REQUESTS
from domaintune.export.variants import variant_arg
from domaintune.monitor.settings import DEFAULTS, MonitorSettings
from domaintune.registry import diff, plumbing, promotion, rollback, versions
from domaintune.tasks import export_task, load_predictor  # the one loader of predict, serve and monitor
from pipelines import predict as predict_command  # its own module; the import is light
from pipelines import promote as promote_command
from pipelines.deploy import add_arguments as add_deploy_arguments
from pipelines.deploy import run_from_args
from pipelines.feedback import register as register_feedback
from pipelines.serve import register as register_serving

ERROR_EXIT = 2
TRACEBACK_ENV = "DOMAINTUNE_TRACEBACK"


class CliError(Exception):
    """A bad argument found by a subcommand: reported as one line, exit 2."""


def _root(args, need_git: bool = True) -> Path:
    root = Path(args.repo).resolve()
    if not root.is_dir():
        raise CliError(f"--repo {args.repo}: no such folder")
    if need_git and not (root / ".git").exists():
        raise CliError(f"--repo {args.repo}: not the root of a git repository (a domaintune project)")
    return root


def _expected_errors() -> tuple[type, ...]:
    """Errors that are a clear message for the user (bad input, refused operation), not a bug. Only from
    modules already imported (an exception cannot come from one that is not): reporting an error never
    imports pandas or Prefect."""
    found = [CliError]
    for module, name in (("domaintune.core.errors", "DataError"), ("domaintune.core.errors", "ParamsError"),
                         ("domaintune.core.errors", "StageError"),
                         ("domaintune.registry.plumbing", "RegistryError"), ("pipelines.retrain", "StageFailed")):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


class _NoTraceback(logging.Filter):
    """Drops the traceback from log records (Prefect's "Encountered exception during execution"): the
    message stays, main() prints the error as one line, and DOMAINTUNE_TRACEBACK=1 brings them back."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and not os.environ.get(TRACEBACK_ENV):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_prefect() -> None:
    """Call once Prefect is imported (its logging is set up then)."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for handler in {h for lg in loggers for h in lg.handlers}:
        if not any(isinstance(f, _NoTraceback) for f in handler.filters):
            handler.addFilter(_NoTraceback())


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-" if value is None else str(value)


def cmd_versions(args) -> int:
    root = _root(args)
    note = rollback.recover_if_idle(root)  # a killed retrain or rollback: completed or put back first
    if note:
        print(f"domaintune versions: {note}", file=sys.stderr)
    found, skipped = versions.scan_versions(root)
    for s in skipped:
        print(f"note: {s.tag}: {s.reason}", file=sys.stderr)
    stages = promotion.status(root) if found else {}
    if args.json:
        print(json.dumps([{"tag": v.tag, "date": v.date, "commit": v.commit, "served": v.served,
                           "stage": stages[v.version]["stage"], "reason": stages[v.version]["reason"],
                           "dataset_hash": v.record.get("dataset_hash"), "base_model": v.record.get("base_model"),
                           "method": v.record.get("method"), "metrics": v.key_metrics()} for v in found], indent=2))
        return 0
    if not found:
        print("no versions yet: run `domaintune retrain`")
        return 0
    rows = [("", "version", "stage", "date", "commit", "dataset", "base model", "method", "metrics")]
    for v in found:
        metrics = " ".join(f"{k.split('.', 1)[-1]}={val:.3f}" for k, val in v.key_metrics().items())
        rows.append(("*" if v.served else "", v.version, stages[v.version]["stage"], v.date[:19].replace("T", " "),
                     v.commit[:8], (v.record.get("dataset_hash") or "-")[:12], str(v.record.get("base_model") or "-"),
                     str(v.record.get("method") or "-"), metrics or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print("* = served (GTO stage prod); stages: prod, challenger (waiting for a decision), rejected, retired")
    decided = [(v.version, stages[v.version]) for v in found if stages[v.version]["reason"]]
    if decided:
        print("decisions (latest per version):")
        for name, st in decided:
            print(f"  {name} {st['stage']}: {st['reason']}")
    return 0


def _diff_names(args, root: Path) -> tuple[str, str]:
    if args.a is None:
        return diff.default_diff_pair(root)
    return args.a, args.b or diff.WORKSPACE


def cmd_diff(args) -> int:
    root = _root(args)
    a, b = _diff_names(args, root)
    d = diff.diff_versions(root, a, b)
    if args.json:
        print(json.dumps(d, indent=2, default=str))
        return 0
    print(f"{d['a']} -> {d['b']}")
    print("headline (test split):" + ("" if d["headline"] else " no evaluate metrics recorded"))
    for name, (x, y) in d["headline"].items():
        delta = f"  ({y - x:+.4f})" if isinstance(x, (int, float)) and isinstance(y, (int, float)) else ""
        print(f"  {name}: {_fmt(x)} -> {_fmt(y)}{delta}")
    if "dataset_hash" in d:
        x, y = d["dataset_hash"]
        print(f"dataset: changed {(x or '-')[:12]} -> {(y or '-')[:12]}")
    else:
        print("dataset: same")
    print("\n".join(diff.output_lines(d)))
    for key, title in (("params", "params"), ("metrics", "other metrics"), ("timings_hashes", "timings and hashes")):
        print(f"{title}:" + ("" if d[key] else " no change"))
        for k, (x, y) in d[key].items():
            print(f"  {k}: {_fmt(x)} -> {_fmt(y)}")
    return 0


def cmd_rollback(args) -> int:
    root = _root(args)
    # The lock first, before Prefect is imported or a server starts: contention is reported at once.
    with plumbing.repo_lock(root):
        note = rollback.recover(root)  # a killed retrain or rollback: completed or put back first
        if note:
            print(f"domaintune rollback: {note}", file=sys.stderr)
        version = versions.get_version(root, args.version)
        rollback.check_no_local_edits(root, version)
        # lazy: loads prefect
        from pipelines.rollback import rollback_flow

        _quiet_prefect()
        result = rollback_flow(version.version, str(root))
    print(f"served: {result['version']} ({result['files_verified']} files verified)")
    return 0


def cmd_retrain(args) -> int:
    root = _root(args)
    with plumbing.repo_lock(root):  # before Prefect: a second retrain fails at once, touching nothing
        # lazy: loads prefect
        from pipelines.retrain import run_from_args

        _quiet_prefect()
        args.repo = str(root)
        return run_from_args(args)


def cmd_monitor(args) -> int:
    _root(args, need_git=False)
    # lazy: loads numpy, pandas
    from domaintune.monitor.monitoring import run_monitor  # checks before Prefect or a model loads

    def as_flows(ms):
        # lazy: loads prefect
        from pipelines.monitor import run_flows

        _quiet_prefect()
        return run_flows(ms)

    def retrain_deployment(root):
        # lazy: loads prefect (only called when PREFECT_API_URL is set: no temporary server is started)
        from pipelines.monitor import run_retrain_deployment

        return run_retrain_deployment(root)

    return run_monitor(MonitorSettings.of(vars(args)), load_predictor, flow=args.flow, flow_runner=as_flows,
                       check_model=export_task, deployment_runner=retrain_deployment)


def cmd_schedule(args) -> int:
    root = _root(args)
    from prefect.schedules import Cron

    try:
        Cron(args.cron)
    except ValueError:
        raise CliError(f"--cron {args.cron!r}: not a cron expression; five fields: minute hour day-of-month "
                       'month day-of-week, e.g. "0 3 * * 1" (Mondays 03:00)') from None
    from prefect import serve

    # lazy: loads prefect
    from pipelines.retrain import check_overrides, make_deployment

    check_overrides(root / "params.yaml", args.overrides)
    dep = make_deployment(args.cron, str(root), args.overrides, args.publish, args.name)
    print(f"serving deployment 'domaintune-retrain/{args.name}' on cron {args.cron!r}; Ctrl-C to stop")
    serve(dep)  # registers the deployment and runs its scheduled (and manually triggered) runs
    return 0


def cmd_deploy(args) -> int:
    return run_from_args(args)


def cmd_summary(args) -> int:
    root = Path(args.repo).resolve()
    try:
        metrics = load_metrics(root)
    except SummaryError as exc:
        print(f"domaintune summary: {exc}", file=sys.stderr)
        return 2
    if not metrics:
        print(f"domaintune summary: no metrics/<stage>.json under {root}: run `dvc repro` (or `make run`) first",
              file=sys.stderr)
        return 1
    s = write_summary(root) if args.write else build_summary(metrics)
    print(json.dumps(s, indent=2) if args.json else format_table(s))
    return 0


def cmd_remote(args) -> int:
    name = plumbing.ensure_remote(_root(args), args.url)
    print(f"default DVC remote: {name}")
    return 0


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Examples keep their lines; every option with a value shows its default (a None default is
    explained in the help text itself)."""

    def _get_help_string(self, action):
        if action.default is None or action.default == [] or "default:" in (action.help or "") or action.nargs == 0:
            return action.help  # none/empty: the text explains it; some texts state it; a flag's is its absence
        return super()._get_help_string(action)


def _count(text: str) -> int:
    """argparse type: a whole number >= 0 (a bad one is argparse's one-line error, exit 2)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {ln}" for ln in lines)


def _add_retrain_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", "-S", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="set a params.yaml value before running (repeatable; the value is parsed as YAML)")
    p.add_argument("--no-publish", dest="publish", action="store_false",
                   help="run the stages but record no version (publish is on by default)")


def add_monitor_options(p: argparse.ArgumentParser) -> None:
    """The `domaintune monitor` options; defaults from MonitorSettings (the flows' parameters use the same)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--batch", help="file of new texts: csv, tsv, jsonl or parquet with a text column, or txt with "
                     "one text per line (UTF-8)")
    src.add_argument("--watch", help="folder of incoming batch files: judge each one the history does not list yet")
    p.add_argument("--baseline", default=DEFAULTS["baseline"], help="drift baseline folder (the drift stage's out)")
    p.add_argument("--model", default=DEFAULTS["model"], help="exported model folder whose predictions are compared")
    p.add_argument("--variant", default=DEFAULTS["variant"], type=variant_arg, choices=list(VARIANT_REQUESTS),
                   help="exported variant to run (default: auto, the fastest variant that passed its gates among "
                        "those that return text embeddings, float32 or int8: the drift signals compare them)")
    p.add_argument("--out", default=DEFAULTS["out"], help="folder for report.html and verdict.json (replaced); "
                   "with --watch, one subfolder per batch file")
    p.add_argument("--text-column", default=DEFAULTS["text_column"],
                   help="column holding the texts (not used for .txt)")
    p.add_argument("--id-column", default=None, help="column holding the row ids, carried into the review queue "
                   "(default: params.yaml's ingest.id_column, else id; without it, <batch hash>:<row>)")
    p.add_argument("--history", default=DEFAULTS["history"],
                   help="CSV every verdict is appended to (`dvc plots show` draws it)")
    p.add_argument("--review-queue", default=DEFAULTS["review_queue"],
                   help="CSV (ingest's format) the low-confidence texts are appended to")
    p.add_argument("--alarm-command", default=None, help="run on drift with verdict.json's path appended "
                   "(default: params.yaml drift.alarm_command)")
    p.add_argument("--alarm-webhook", default=None, help="URL the verdict is POSTed to on drift "
                   "(default: params.yaml drift.alarm_webhook)")
    p.add_argument("--flow", action="store_true", help="run as a Prefect flow (also when PREFECT_API_URL is set); "
                   "default: in-process, no Prefect server")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="domaintune", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=_Formatter)
    ap.add_argument("--version", action="version", version=f"domaintune {__version__}",
                    help="print the domaintune version and exit")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, fn, help_, *examples):
        p = sub.add_parser(name, help=help_, description=help_, epilog=_examples(*examples),
                           formatter_class=_Formatter)
        p.add_argument("--repo", default=".", help="project root (a git + DVC repository)")
        p.set_defaults(fn=fn)
        return p

    p = add("versions", cmd_versions, "list model versions: tag, date, commit, dataset hash, metrics, served",
            "domaintune versions", "domaintune versions --json | jq '.[-1].metrics'")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = add("diff", cmd_diff, "what changed between two versions: headline metrics and data first, "
            "then the changed outputs (path, md5, size), params, other metrics, timings and hashes",
            "domaintune diff                    # served version vs the latest (or vs the workspace)",
            "domaintune diff v1.0.0 v2.0.0", "domaintune diff v1.0.0            # v1.0.0 vs the workspace")
    p.add_argument("a", nargs="?", default=None,
                   help="a version (v1.0.0, v1 or domaintune@v1.0.0); none: the served version")
    p.add_argument("b", nargs="?", default=None,
                   help="the version to compare with, or 'workspace'; none: the latest version, or the "
                        "workspace when A is given or the served version is the latest")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p = add("rollback", cmd_rollback, "restore a version (params, dvc.lock, data, models), verify it, serve it",
            "domaintune rollback v1.0.0", "domaintune rollback v1   # the same: short forms v1, v1.2")
    p.add_argument("version", help="version to restore: v1.0.0, v1, v1.2 or domaintune@v1.0.0")
    promote_command.add_parsers(add, _root)
    p = add("retrain", cmd_retrain, "run the DVC stages as a Prefect flow and publish a version",
            "domaintune retrain", "domaintune retrain -S finetune.epochs=4 -S finetune.lr=5e-5 --no-publish")
    _add_retrain_options(p)
    p.add_argument("--retries", type=_count, default=1, help="retries per stage for transient failures "
                   "(a stage that rejects its input is never retried)")
    p.add_argument("--remote", default=None, help="DVC remote to push to (none: the repo's default remote, "
                   "created by `domaintune remote` if missing)")
    p = add("schedule", cmd_schedule, "serve the retrain flow on a cron schedule (Prefect deployment; keeps running)",
            'domaintune schedule --cron "0 3 * * 1"', 'domaintune schedule --cron "30 2 * * *" -S finetune.epochs=3')
    p.add_argument("--cron", required=True, help='cron expression (required), e.g. "0 3 * * 1" (Mondays 03:00)')
    p.add_argument("--name", default="scheduled-retrain", help="Prefect deployment name")
    _add_retrain_options(p)
    p = add("monitor", cmd_monitor, "test a batch of new texts (or each new file in a folder) for drift against "
            "the baseline, with the estimated accuracy (exit 0: no drift, 1: drift, 2: error)",
            "domaintune monitor --batch new_tickets.csv", "domaintune monitor --batch texts.txt --out reports/monday",
            "domaintune monitor --watch incoming/ --alarm-command ./page-oncall.sh")
    add_monitor_options(p)
    p = add("deploy", cmd_deploy, "register the retrain (and monitor) flow as deployments on a Prefect work pool",
            "domaintune deploy --pool nightly --cron \"0 3 * * 1\"",
            "domaintune deploy --pool gpu --image registry.example.com/domaintune:1 --monitor-batch new.csv")

    add_deploy_arguments(p)
    p = add("summary", cmd_summary, "the run in ten lines: rows, cleaning, DAPT, accuracy, calibration, export, time")
    p.add_argument("--write", action="store_true", help=f"also save it as {SUMMARY_FILE} (default: print only)")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table (default: table)")
    p.epilog = "example: domaintune summary --write   (what `make run` does after `dvc repro`)"
    p = add("remote", cmd_remote, "set up the default DVC remote (a local folder unless --url)",
            "domaintune remote", "domaintune remote --url s3://bucket/domaintune")
    p.add_argument("--url", default=None, help="any DVC remote URL (none: the folder ../<repo>-dvc-remote)")

    predict_command.add_parser(sub)

    register_serving(add)  # serve, shadow-report
    register_feedback(add)
    ap.description = f"`domaintune`: {', '.join(sub.choices)}."  # every command, from the parser itself
    return ap


def _one_line(exc: BaseException) -> str:
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    if not isinstance(exc, (*_expected_errors(), OSError)):
        text = f"{type(exc).__name__}: {text} (set {TRACEBACK_ENV}=1 for the traceback)"
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # a bad argument: argparse's one line, exit 2
    # A temporary Prefect server's telemetry heartbeat races its own SQLite writes and logs tracebacks.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print(f"domaintune {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error is one line and exit 2, never a traceback
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(f"domaintune {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return ERROR_EXIT


if __name__ == "__main__":
    raise SystemExit(main())
