"""`domaintune`: versions, diff, rollback, retrain, schedule, monitor, remote.

Every heavy import (DVC, GTO, Prefect, torch) happens inside the subcommand
that needs it, so `domaintune --help` answers at once.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


def _root(args) -> Path:
    return Path(args.repo).resolve()


def cmd_versions(args) -> int:
    from domaintune import registry

    versions = registry.list_versions(_root(args))
    if args.json:
        print(json.dumps([{"tag": v.tag, "date": v.date, "commit": v.commit, "served": v.served,
                           "dataset_hash": v.record.get("dataset_hash"), "base_model": v.record.get("base_model"),
                           "method": v.record.get("method"), "metrics": v.key_metrics()} for v in versions], indent=2))
        return 0
    if not versions:
        print("no versions yet: run `domaintune retrain`")
        return 0
    rows = [("", "version", "date", "commit", "dataset", "base model", "method", "metrics")]
    for v in versions:
        metrics = " ".join(f"{k.split('.', 1)[1]}={val:.3f}" for k, val in v.key_metrics().items())
        rows.append(("*" if v.served else "", v.version, v.date[:19].replace("T", " "), v.commit[:8],
                     (v.record.get("dataset_hash") or "-")[:12], str(v.record.get("base_model") or "-"),
                     str(v.record.get("method") or "-"), metrics or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print("* = served (GTO stage prod)")
    return 0


def cmd_diff(args) -> int:
    from domaintune import registry

    d = registry.diff_versions(_root(args), args.a, args.b)
    if args.json:
        print(json.dumps(d, indent=2, default=str))
        return 0
    if "dataset_hash" in d:
        print(f"dataset: {d['dataset_hash'][0]} -> {d['dataset_hash'][1]}")
    for section in ("params", "metrics"):
        print(f"{section}:" + ("" if d[section] else " identical"))
        for k, (x, y) in d[section].items():
            print(f"  {k}: {x} -> {y}")
    return 0


def cmd_rollback(args) -> int:
    from pipelines.rollback import main

    return main([args.version, "--repo", args.repo])


def cmd_retrain(args) -> int:
    from pipelines.retrain import run_from_args

    return run_from_args(args)


def cmd_monitor(args) -> int:
    from pipelines.monitor import run_from_args

    return run_from_args(args)


def cmd_schedule(args) -> int:
    from prefect import serve

    from pipelines.retrain import make_deployment

    dep = make_deployment(args.cron, args.repo, args.overrides, args.publish, args.name)
    print(f"serving deployment 'domaintune-retrain/{args.name}' on cron {args.cron!r}; Ctrl-C to stop")
    serve(dep)  # registers the deployment and runs its scheduled (and manually triggered) runs
    return 0


def cmd_remote(args) -> int:
    from domaintune import registry

    name = registry.ensure_remote(_root(args), args.url)
    print(f"default DVC remote: {name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="domaintune", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name, fn, help_):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--repo", default=".", help="project root (default: .)")
        p.set_defaults(fn=fn)
        return p

    p = add("versions", cmd_versions, "list model versions: tag, date, commit, dataset hash, metrics, served")
    p.add_argument("--json", action="store_true")
    p = add("diff", cmd_diff, "params and metrics differences between two versions")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true")
    p = add("rollback", cmd_rollback, "restore a version (params, dvc.lock, data, models), verify it, serve it")
    p.add_argument("version")
    p = add("retrain", cmd_retrain, "run the DVC stages as a Prefect flow and publish a version")
    p.add_argument("--set", "-S", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--no-publish", dest="publish", action="store_false")
    p.add_argument("--retries", type=int, default=1)
    p.add_argument("--remote", default=None)
    p = add("schedule", cmd_schedule, "serve the retrain flow on a cron schedule (Prefect deployment)")
    p.add_argument("--cron", required=True, help='e.g. "0 3 * * 1" (Mondays 03:00)')
    p.add_argument("--name", default="scheduled-retrain")
    p.add_argument("--set", "-S", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--no-publish", dest="publish", action="store_false")
    p = add("monitor", cmd_monitor, "test a batch of new texts for drift against the baseline")
    p.add_argument("--batch", required=True)
    p.add_argument("--baseline", default="models/drift_baseline")
    p.add_argument("--model", default="models/export")
    p.add_argument("--out", default="reports/monitor")
    p.add_argument("--text-column", default="text")
    p = add("remote", cmd_remote, "set up the default DVC remote (a local folder unless --url)")
    p.add_argument("--url", default=None)
    from pipelines.serve import register as register_serving

    register_serving(add)  # serve, shadow-report
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from domaintune.registry import RegistryError

    try:
        return args.fn(args)
    except RegistryError as exc:
        print(f"domaintune {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
