"""Rollback flow: put a named version back (params, dvc.lock, every DVC out) and serve it.

Two tasks, so the Prefect UI shows where a rollback stopped: `verify` checks every
object the version needs (fetching missing ones from the DVC remote) without
touching the workspace; `restore` writes the files, runs `dvc checkout`, checks
every restored file against dvc.lock, commits and moves GTO's `prod` stage. The
flow holds the repository lock that retrain takes across both, so they never
interleave and what was verified is what gets restored. A rollback that is killed
is put back, or completed once its commit is made, by the next retrain, rollback
or `versions` (domaintune.registry.rollback.recover).

    python -m pipelines.rollback v1.0.0
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from prefect import flow, get_run_logger, task

from domaintune.registry import plumbing, rollback, versions


@task(name="verify-version")
def verify(root: Path, name: str) -> tuple[versions.Version, list[plumbing.Out]]:
    version = versions.get_version(root, name)
    outs = rollback.verify_version(root, version)
    get_run_logger().info("%s: %d outs present and intact", version.tag, len(outs))
    return version, outs


@task(name="restore-version")
def restore(root: Path, version: versions.Version, outs: list[plumbing.Out]) -> dict:
    version, checked = rollback.restore_version(root, version, outs)
    get_run_logger().info("%s restored, %d files verified against dvc.lock, now served", version.tag, checked)
    return {"version": version.tag, "commit": version.commit, "files_verified": checked}


@flow(name="domaintune-rollback")
def rollback_flow(version: str, repo: str = ".") -> dict:
    root = Path(repo).resolve()
    with plumbing.repo_lock(root):
        note = rollback.recover(root)  # `domaintune rollback` recovered already; a flow run on its own does here
        if note:
            get_run_logger().warning(note)
        checked_version, outs = verify(root, version)
        return restore(root, checked_version, outs)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pipelines.rollback ARGS` is `domaintune rollback ARGS` (same checks, messages, exit codes): this
    process becomes the CLI's, so this module never imports the CLI that imports it."""
    args = list(sys.argv[1:] if argv is None else argv)
    os.execv(sys.executable, [sys.executable, "-m", "pipelines.cli", "rollback", *args])


if __name__ == "__main__":
    raise SystemExit(main())
