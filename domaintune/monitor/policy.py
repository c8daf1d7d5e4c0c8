"""The monitor's response policy (params.yaml monitor.on_drift): what `domaintune monitor` does about a verdict.

  report   the verdict, report and history row only
  review   also the review queue (the batch's low-confidence texts, for labelling): the default
  retrain  also starts the retrain flow, on correlated evidence only: a drift alarm (a drifted signal) AND an
           estimated-accuracy drop (the estimate under monitor.retrain_below, or, when that is null, the drop
           the verdict judged significant beyond drift.max_accuracy_drop). Never on one signal: a shifted
           input that the model still handles is no reason to retrain, nor is a noisy estimate alone.

decide() is the pure decision (verdict in, decision out). start_local_retrain() starts the retrain as a
detached process (`python -m pipelines.cli retrain --repo ROOT` unless monitor.retrain_command names another
command; `--repo ROOT` is always appended), its output in a log file next to the monitor history, its pid and
log recorded in retrain.json there, so a later monitor run does not start a second one while it runs. The
Prefect deployment route lives in pipelines/monitor.py (this library never imports Prefect).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

RETRAIN_STATE = "retrain.json"


def accuracy_drop(verdict: dict, retrain_below: float | None) -> tuple[bool, str]:
    """Whether the verdict shows an estimated-accuracy drop, and why (one sentence)."""
    acc = verdict.get("accuracy")
    if not acc:
        return False, "no accuracy estimate (the model has no label set)"
    if retrain_below is not None:
        below = acc["estimated"] < retrain_below
        return below, (f"estimated accuracy {acc['estimated']:.3f} (95% CI {acc['ci_low']:.3f}-{acc['ci_high']:.3f}) "
                       f"is {'under' if below else 'not under'} monitor.retrain_below {retrain_below:g}")
    return bool(acc["drop_significant"]), acc["significance"]


def decide(verdict: dict, on_drift: str, retrain_below: float | None) -> dict:
    """The action monitor.on_drift asks for on this verdict: {"on_drift", "review", "retrain", "reason",
    "evidence"}. Pure: nothing is read or written."""
    drifted = [name for name, s in verdict.get("signals", {}).items() if s.get("drifted")]
    drop, why_drop = accuracy_drop(verdict, retrain_below)
    acc = verdict.get("accuracy") or {}
    evidence = {"drifted_signals": drifted, "accuracy_drop": drop, "estimated_accuracy": acc.get("estimated"),
                "ci_low": acc.get("ci_low"), "ci_high": acc.get("ci_high"),
                "reference_estimated": acc.get("reference_estimated"), "retrain_below": retrain_below,
                "drop_significant": acc.get("drop_significant"), "reliable": acc.get("reliable")}
    retrain = on_drift == "retrain" and bool(drifted) and drop
    drift_text = f"drift in {', '.join(drifted)}" if drifted else "no drifted signal"
    if on_drift != "retrain":
        reason = f"monitor.on_drift is {on_drift}: no retrain"
    elif retrain:
        reason = f"retrain: {drift_text} and an estimated-accuracy drop ({why_drop})"
    else:
        missing = " and ".join(x for x, gone in (("a drift alarm", not drifted),
                                                 ("an estimated-accuracy drop", not drop)) if gone)
        reason = (f"no retrain: needs a drift alarm and an estimated-accuracy drop, {missing} missing "
                  f"({drift_text}; {why_drop})")
    return {"on_drift": on_drift, "review": on_drift in ("review", "retrain"), "retrain": retrain,
            "reason": reason, "evidence": evidence}


def retrain_command(root: Path, command: str | None) -> list[str]:
    """The retrain command line: monitor.retrain_command (shell-split) or the retrain CLI, then --repo ROOT."""
    base = shlex.split(command) if command else [sys.executable, "-m", "pipelines.cli", "retrain"]
    return [*base, "--repo", str(Path(root).resolve())]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a finished child its parent has not reaped yet is a zombie: not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def running_retrain(log_dir: Path) -> dict | None:
    """The retrain a monitor run started that is still running (retrain.json's pid alive), if any."""
    try:
        state = json.loads((Path(log_dir) / RETRAIN_STATE).read_text(encoding="utf-8"))
        return state if _alive(int(state["pid"])) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def start_local_retrain(root: Path, command: str | None, log_dir: Path) -> dict:
    """Start the retrain detached from this process (its own session: it outlives the monitor), output to
    <log_dir>/retrain-<UTC time>.log; the pid, log and command go to <log_dir>/retrain.json. Returns them."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    argv = retrain_command(root, command)
    log = log_dir / f"retrain-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.log"
    with log.open("ab") as fh:
        proc = subprocess.Popen(argv, cwd=str(root), stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    state = {"kind": "local", "pid": proc.pid, "log": str(log), "command": argv,
             "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (log_dir / RETRAIN_STATE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    return state


def action_text(review_queued: int | None, retrain: dict | None) -> str:
    """The history's `action` cell: none / review queued N / retrain started pid P (log L) / retrain deployment
    run ID / retrain already running pid P."""
    done = []
    if review_queued is not None:
        done.append(f"review queued {review_queued}")
    if retrain:
        if retrain["kind"] == "deployment":
            done.append(f"retrain deployment {retrain['deployment']} run {retrain['flow_run_id']}")
        elif retrain["kind"] == "running":
            done.append(f"retrain already running pid {retrain['pid']} (log {retrain['log']})")
        else:
            done.append(f"retrain started pid {retrain['pid']} (log {retrain['log']})")
    return "; ".join(done) or "none"
