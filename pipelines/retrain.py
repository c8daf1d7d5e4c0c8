"""Retrain flow: every DVC stage as one Prefect task, in DAG order; a success becomes a version.

DVC alone decides what is cached (it skips a stage whose deps, params and outs
are unchanged); Prefect adds retries, per-stage state, duration and logs in the
UI, and schedules. The DAG runs as ONE `dvc repro` process (DVC reads the DAG,
params and lock once, as a plain `dvc repro` does); its output is cut at DVC's
"Running stage 'X'" / "Stage 'X' didn't change" lines into one segment per stage,
and the task of stage X streams X's segment into its log and fails when X failed.
A retried stage, and any stage that process did not reach, runs as
`dvc repro --single-item X`. On success with publish=True
the run is recorded as a version (domaintune.registry.versions.publish: dvc push, git
commit of params.yaml/dvc.lock/metrics, GTO tag, served marker). On any failure
params.yaml, dvc.lock and the metrics are put back as they were and the
workspace outs re-checked-out from the cache: no tag, no push, nothing half-done.

A kill (SIGKILL included) is survived too: the files are journaled before any
changes (rollback.restored_on_failure), so the next retrain, rollback or
`versions` puts them back, or completes a stage assignment whose tag was
registered (rollback.recover), and says so in one line; the watchdog the
repository lock starts (plumbing.start_watchdog) ends `dvc repro`, the stage it
runs and Prefect's temporary server with this process. A publish refuses a
params.yaml that is not what this run applied (versions.publish expect_params).

    python -m pipelines.retrain [--set finetune.epochs=2 ...] [--no-publish]
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Sequence

from prefect import flow, get_run_logger, task

from domaintune.core.params import apply_overrides, load_all, parse_overrides
from domaintune.evaluate.summary import write_summary
from domaintune.registry import plumbing, rollback, versions
from pipelines import promote

# A stage that exits 2 reported bad data or params (domaintune.stage.run_stage): retrying cannot help.
BAD_INPUT_EXIT = 2
SKIP_MARK = "didn't change, skipping"
_EXITED = re.compile(r"exited with (-?\d+)")
_STAGE_LINE = re.compile(r"^(?:Running stage '(?P<run>[^']+)':|Stage '(?P<skip>[^']+)' didn't change, skipping)")


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, tail: str):
        self.stage, self.returncode = stage, returncode
        super().__init__(f"stage {stage!r} failed with exit code {returncode}:\n{tail}")


def stage_order(root: Path) -> list[str]:
    """Stages of dvc.yaml in dependency order (DVC's own graph; ties keep dvc.yaml order)."""
    import networkx as nx
    from dvc.repo import Repo

    root = Path(root).resolve()

    def address(stage) -> str:
        # Stage.addressing is relative to the process cwd; name stages relative to the repo instead.
        rel = Path(stage.path).resolve().relative_to(root)
        return stage.name if rel == Path("dvc.yaml") else f"{rel.as_posix()}:{stage.name}"

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        stages = [s for s in repo.index.stages if getattr(s, "cmd", None)]
        position = {id(s): i for i, s in enumerate(stages)}
        order = nx.lexicographical_topological_sort(graph.reverse(copy=True),
                                                    key=lambda s: str(position.get(id(s), -1)).zfill(6))
        return [address(s) for s in order if id(s) in position]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # dvc.yaml says `python -m stages.x`: make that the interpreter running this flow.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _retry_if_transient(task, task_run, state) -> bool:
    """Retry crashes and killed processes, not a stage that rejected its input."""
    try:
        state.result()
    except StageFailed as exc:
        return exc.returncode != BAD_INPUT_EXIT
    except Exception:  # noqa: BLE001 - anything else (OSError, dvc lock contention) may pass on retry
        return True
    return False


class _Segment:
    def __init__(self):
        self.lines: list[str] = []
        self.t0, self.t1 = time.perf_counter(), None
        self.taken = False  # a task consumed it; a retry of that stage runs --single-item


class DagRun:
    """One `dvc repro STAGES...` process; a reader thread cuts its output into per-stage segments."""

    _live: dict[str, "DagRun"] = {}  # token -> run: tasks get the token (a string), not the object

    def __init__(self, root: Path, stages: Sequence[str], expected_params: bytes | None = None):
        self.token, self.stages = uuid.uuid4().hex, list(stages)
        self.expected_params = expected_params  # params.yaml as this run set it: what publish may commit
        self.segments: dict[str, _Segment] = {}
        self.current: _Segment | None = None
        self.preamble: list[str] = []
        self.rc: int | None = None
        self.cond = threading.Condition()
        # Its own process group, so close() stops the stage command DVC is running too (and so does the
        # watchdog when this process is killed).
        plumbing.start_watchdog()
        self.proc = subprocess.Popen([plumbing.dvc_exe(), "repro", *stages], cwd=root, env=_child_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     start_new_session=True)
        plumbing.poke_watchdog()
        self.reader = threading.Thread(target=self._read, name="dvc-repro-output", daemon=True)
        self.reader.start()
        DagRun._live[self.token] = self

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            m = _STAGE_LINE.match(line)
            with self.cond:
                if m:
                    if self.current is not None:
                        self.current.t1 = time.perf_counter()
                    self.current = self.segments.setdefault(m.group("run") or m.group("skip"), _Segment())
                    self.current.lines.extend(self.preamble)
                    self.preamble = []
                (self.current.lines if self.current is not None else self.preamble).append(line)
                self.cond.notify_all()
        rc = self.proc.wait()
        with self.cond:
            if self.current is not None and self.current.t1 is None:
                self.current.t1 = time.perf_counter()
            self.rc = rc
            self.cond.notify_all()

    def follow(self, stage: str, emit) -> tuple[list[str], float, int] | None:
        """Emit stage's lines as they come until it ends: (lines, seconds, exit code: 0 unless the process
        failed in it), or None when this process will not run it (not reached, or already taken)."""
        with self.cond:
            seg = self.segments.get(stage)
            if seg is not None and seg.taken:
                return None
            seen = 0
            while True:
                seg = self.segments.get(stage)
                if seg is None and self.rc is not None:
                    return None
                if seg is not None:
                    seg.taken = True
                    for line in seg.lines[seen:]:
                        if line.strip() not in NOT_FOR_RETRAIN:
                            emit(line)
                    seen = len(seg.lines)
                    if seg.t1 is not None and (self.rc is not None or self.current is not seg):
                        failed = self.rc not in (None, 0) and self.current is seg
                        return seg.lines, seg.t1 - seg.t0, (self.rc if failed else 0)
                self.cond.wait(timeout=1.0)

    def close(self) -> None:
        """Stop the process if it is still running (a task failed or the flow was cancelled)."""
        DagRun._live.pop(self.token, None)
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait()
        self.reader.join(timeout=30)

    def _signal_group(self, sig) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


# DVC's hints that do not apply to a retrain (it pushes what it publishes itself): kept in the stage's lines,
# not shown in the log.
NOT_FOR_RETRAIN = frozenset({"Use `dvc push` to send your updates to remote storage."})


def quiet_prefect_shutdown() -> None:
    """Prefect's "EventsWorker - Still processing items" warning while its temporary server shuts down says
    nothing a user can act on: shown only at ERROR."""
    logging.getLogger("EventsWorker").setLevel(logging.ERROR)


def _single_item(root: str, stage: str, emit) -> tuple[list[str], float, int]:
    t0 = time.perf_counter()
    plumbing.start_watchdog()
    proc = subprocess.Popen([plumbing.dvc_exe(), "repro", "--single-item", stage], cwd=root, env=_child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)  # a group of its own: the watchdog ends the stage with it
    plumbing.poke_watchdog()
    lines = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            if line.strip() not in NOT_FOR_RETRAIN:
                emit(line)
    finally:
        if proc.poll() is None:  # the task was cancelled or failed while the stage ran
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    return lines, time.perf_counter() - t0, proc.wait()


@task(name="dvc-stage", task_run_name="{stage}", retries=1, retry_delay_seconds=2,
      retry_condition_fn=_retry_if_transient)
def run_dvc_stage(root: str, stage: str, dag: str | None = None) -> dict:
    """Stage `stage` of the running `dvc repro` (DagRun `dag`), or `dvc repro --single-item <stage>` when that
    process does not run it; its output streamed line by line into the task log."""
    logger = get_run_logger()
    run = DagRun._live.get(dag) if dag else None
    got = run.follow(stage, logger.info) if run is not None else None
    lines, seconds, rc = got if got is not None else _single_item(root, stage, logger.info)
    if rc != 0:
        # dvc itself exits 255; the stage command's own code is in "failed to run: ..., exited with N".
        codes = [m.group(1) for ln in lines for m in [_EXITED.search(ln)] if m]
        raise StageFailed(stage, int(codes[-1]) if codes else rc, "\n".join(lines[-30:]))
    skipped = any(SKIP_MARK in ln for ln in lines)
    return {"stage": stage, "seconds": seconds, "ran": not skipped}


def check_overrides(params_file: Path, overrides: Sequence[str] | dict | None) -> None:
    """Validate `section.key=value` overrides against params.yaml without changing it (ParamsError/ValueError)."""
    load_all(params_file)  # a broken params.yaml is named as such, not blamed on an override
    apply_overrides(Path(params_file), parse_overrides(overrides), dry_run=True)


@flow(name="domaintune-retrain")
def retrain_flow(repo: str = ".", overrides: list[str] | None = None, publish: bool = True, retries: int = 1,
                 remote: str | None = None, dag: str | None = None) -> dict:
    """Run the DAG stage by stage; on success optionally publish a version. `dag`: the token of a DagRun
    the caller started in this process with the overrides already applied (run_from_args does, so DVC
    works while Prefect starts up); otherwise the flow applies them and starts its own."""
    logger = get_run_logger()
    root = Path(repo).resolve()
    wanted = parse_overrides(overrides)
    t0 = time.perf_counter()
    with plumbing.repo_lock(root):
        note = rollback.recover(root)  # None inside `domaintune retrain`, which recovered before the flow
        if note:
            logger.warning(note)
        try:
            with rollback.restored_on_failure(root, versions.version_files(root), "retrain"):
                results, version, created, publish_seconds, decision = _run_and_publish(
                    root, wanted, retries, publish, remote, logger, dag)
        except BaseException:
            logger.error("retrain failed: params.yaml, dvc.lock and outs were put back as they were")
            raise
        served = versions.served_version(root)
    ran = [r["stage"] for r in results if r["ran"]]
    return {"stages": results, "ran": ran, "version": version, "created": created,
            "served": bool(version) and version.split("@", 1)[-1] == served, "served_version": served,
            "decision": decision, "publish_seconds": publish_seconds, "seconds": time.perf_counter() - t0}


def _run_and_publish(root: Path, wanted: dict, retries: int, publish: bool, remote: str | None, logger,
                     token: str | None = None):
    """Apply the overrides, run every stage as a task, compare with the champion, publish as a challenger and
    decide: (stage results, version, created, seconds, decision or None)."""
    dag = DagRun._live.get(token) if token else None
    if dag is None:
        dag = DagRun(root, stage_order(root), apply_overrides(root / "params.yaml", wanted))
    logger.info("stages in DAG order: %s", " -> ".join(dag.stages))
    stage_task = run_dvc_stage.with_options(retries=retries)
    try:
        results = [stage_task(str(root), s, dag.token) for s in dag.stages]
    finally:
        dag.close()
    write_summary(root)  # metrics/summary.json, as `make run` writes it: part of the version below
    version, created, t_pub, decision = None, False, time.perf_counter(), None
    if publish:
        summary = "retrain" + ("".join(f" {k}={v}" for k, v in wanted.items()) if wanted else "")
        if versions.find_published(root) is None:  # an unchanged rerun has nothing to compare or decide
            decision = compare_with_champion(str(root))  # metrics/promotion.json: committed with the version
        v, created = versions.publish(root, summary, remote, expect_params=dag.expected_params)
        version = v.tag
        logger.info("%s %s", "published as a challenger" if created else "unchanged, still", version)
        if created and decision is not None:
            decision = decide_promotion(str(root), v.version, decision)
    return results, version, created, time.perf_counter() - t_pub, decision


@task(name="compare-with-champion")
def compare_with_champion(root: str) -> dict:
    """The workspace's model against the served one on the same rows (pipelines.promote.evaluate_challenger)."""
    result = promote.evaluate_challenger(Path(root))
    get_run_logger().info("comparison: %s (%s)", result["decision"], result["reason"])
    return result


@task(name="promotion-decision")
def decide_promotion(root: str, version: str, result: dict) -> dict:
    """Promote, reject or keep waiting, by release.promote; the evidence as the task's log and a markdown artifact
    (the Prefect UI shows "v7 rejected: macro_f1 -0.031 [-0.045, -0.018] vs v6 on 1,204 new rows")."""
    from prefect.artifacts import create_markdown_artifact  # lazy: only a deciding retrain makes artifacts

    line = promote.apply_decision(Path(root), version, result)
    get_run_logger().info("%s", line)
    create_markdown_artifact(key="promotion-decision", markdown=f"# {version}\n\n" + promote.evidence_table(result),
                             description=line[:250])
    return {**result, "line": line, "version": version}


DEPLOYMENT_NAME = "scheduled-retrain"


def make_deployment(cron: str, repo: str = ".", overrides: list[str] | None = None, publish: bool = True,
                    name: str = DEPLOYMENT_NAME):
    """A Prefect deployment of retrain_flow on `cron` (validated by Prefect), for this repo."""
    from prefect.schedules import Cron

    Cron(cron)  # a bad cron string fails here with Prefect's message, before anything is registered
    return retrain_flow.to_deployment(
        name=name, cron=cron,
        parameters={"repo": str(Path(repo).resolve()), "overrides": list(overrides or []), "publish": publish},
        description="domaintune: run the DVC stages and publish a version when anything changed",
    )


def run_from_args(args) -> int:
    """`domaintune retrain`: the overrides are checked before the flow starts; errors raise (the CLI
    prints one line, exit 2): BusyError, StageFailed, RegistryError, ParamsError."""
    root = Path(args.repo).resolve()
    quiet_prefect_shutdown()
    with plumbing.repo_lock(root):
        note = rollback.recover(root)  # what a killed retrain or rollback left: put back or completed
        if note:
            print(f"domaintune retrain: {note}", file=sys.stderr)
        check_overrides(root / "params.yaml", args.overrides)
        try:
            # DVC starts before the flow, so the stages run while Prefect starts its temporary server.
            # The journal is written before params.yaml changes.
            with rollback.restored_on_failure(root, versions.version_files(root), "retrain"):
                expected = apply_overrides(root / "params.yaml", parse_overrides(args.overrides))
                dag = DagRun(root, stage_order(root), expected)
                try:
                    result = retrain_flow(repo=str(root), overrides=args.overrides, publish=args.publish,
                                          retries=args.retries, remote=args.remote, dag=dag.token)
                finally:
                    dag.close()
        except StageFailed as exc:  # the stage's own output is in the log above; one line here
            raise StageFailed(exc.stage, exc.returncode, "nothing published, params.yaml and outs as they "
                              "were (the stage's log is above)") from None
    ran = ", ".join(result["ran"]) or "none (all cached)"
    print(f"stages run: {ran}")
    if result["created"] and result.get("decision"):
        print(f"new version: {result['version']}")
        print(result["decision"]["line"])
    elif result["version"] and (result["created"] or result["served"]):
        print(f"{'new version' if result['created'] else 'unchanged, current version'}: {result['version']}")
    elif result["version"]:  # the workspace is a published version that is not the served one
        served = result["served_version"] or "none"
        print(f"unchanged: the workspace is {result['version']}, which is not served (served: {served}); "
              f"`domaintune rollback {result['version'].split('@', 1)[-1]}` serves it")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pipelines.retrain ARGS` is `domaintune retrain ARGS` (same checks, messages, exit codes): this
    process becomes the CLI's, so this module never imports the CLI that imports it."""
    args = list(sys.argv[1:] if argv is None else argv)
    os.execv(sys.executable, [sys.executable, "-m", "pipelines.cli", "retrain", *args])


if __name__ == "__main__":
    raise SystemExit(main())
