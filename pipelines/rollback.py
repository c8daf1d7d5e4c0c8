"""Rollback flow: put a named version back (params, dvc.lock, every DVC out) and serve it.

Two tasks, so the Prefect UI shows where a rollback stopped: `verify` checks every
object the version needs (fetching missing ones from the DVC remote) without
touching the workspace; `restore` writes the files, runs `dvc checkout`, checks
every restored file against dvc.lock, commits and moves GTO's `prod` stage. Both
run under the repository lock that retrain takes, so they never interleave.

    python -m pipelines.rollback v1.0.0
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from prefect import flow, get_run_logger, task

from domaintune import registry


@task(name="verify-version")
def verify(root: str, name: str) -> int:
    version = registry.get_version(Path(root), name)
    outs = registry.verify_version(Path(root), version)
    get_run_logger().info("%s: %d outs present and intact", version.tag, len(outs))
    return len(outs)


@task(name="restore-version")
def restore(root: str, name: str) -> dict:
    version, checked = registry.rollback(Path(root), name)
    get_run_logger().info("%s restored, %d files verified against dvc.lock, now served", version.tag, checked)
    return {"version": version.tag, "commit": version.commit, "files_verified": checked}


@flow(name="domaintune-rollback")
def rollback_flow(version: str, repo: str = ".") -> dict:
    root = str(Path(repo).resolve())
    verify(root, version)
    return restore(root, version)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.rollback", description=__doc__.splitlines()[0])
    ap.add_argument("version", help="e.g. v1.0.0, v1 or domaintune@v1.0.0")
    ap.add_argument("--repo", default=".")
    args = ap.parse_args(argv)
    try:
        result = rollback_flow(args.version, args.repo)
    except registry.RegistryError as exc:
        print(f"rollback: {exc}", file=sys.stderr)
        return 1
    print(f"served: {result['version']} ({result['files_verified']} files verified)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
