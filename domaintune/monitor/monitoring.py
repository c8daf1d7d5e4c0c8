"""`domaintune monitor`: judge a batch (or a folder of incoming batches) against the drift baseline.

One-shot calls run in-process, with no Prefect server: arguments and the batch file are checked
first (bad input: one line, exit 2, within a second), then the model loads once and the batch is
profiled and judged (domaintune.drift). With PREFECT_API_URL set, or --flow, the same work runs as
the Prefect flow in pipelines/monitor.py and shows in the UI. Prefect and evidently telemetry is
off unless the environment turns it on.

Per batch, written to --out (replaced atomically): verdict.json and report.html (verdict first,
domaintune.monitor_report). Then, outside --out:
  --history       one CSV row per verdict (time, batch, drift, estimated accuracy and its CI, the
                  reference's estimate, smallest p-value, the abstention rate of an export that abstains):
                  `dvc plots show` draws it (dvc.yaml)
  --review-queue  the batch's texts under drift.review_below confidence, as CSV rows ingest reads
                  (id, text, label left empty for a reviewer, predicted label, confidence)
  alarm           on drift: drift.alarm_command (or --alarm-command) is run with the verdict.json
                  path as its last argument; drift.alarm_webhook (or --alarm-webhook) gets the
                  verdict POSTed as JSON
--watch FOLDER judges every batch file there that the history does not list yet (by content
hash), oldest name first: what the scheduled monitor deployment runs on its cron. A batch that cannot be
judged is one line on stderr; the others are still judged and reported, then the run exits 2.
--out (and --history, --review-queue) are checked first, with the stages' check (core.stage.check_apart):
never an input, inside one or holding one, and an existing --out folder only if domaintune wrote it.

The model is opened by the caller's `load(folder, variant=, batch_size=, device=)` (pipelines/ passes
domaintune.tasks.load_predictor, the one loader `predict` and `serve` use too; this library sits below
tasks/ and never imports it), and the folder is checked early by the caller's `check_model(folder)`
(domaintune.tasks.export_task), so a folder that is no export is one line before any model loads.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from domaintune.core.device import stage_device
from domaintune.core.errors import DataError, missing_column
from domaintune.core.io import atomic_output, mark_output_folder, write_json
from domaintune.core.params import load_params, project_id_column
from domaintune.core.stage import check_apart
from domaintune.data.sources import read_file, read_lines
from domaintune.export.variants import AUTO, EMBEDDING_VARIANTS, resolve_variant
from domaintune.modeling.encoders import set_threads
from domaintune.monitor.drift import CONF_COLUMN, PRED_COLUMN, Baseline, judge, validation_frame
from domaintune.monitor.policy import action_text, decide, running_retrain, start_local_retrain
from domaintune.monitor.report import DetailsProcess, write_report
from domaintune.monitor.settings import MonitorSettings

log = logging.getLogger("domaintune")

TELEMETRY_OFF = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
BATCH_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl", ".parquet")
HISTORY_COLUMNS = ("time", "index", "batch", "sha256", "rows", "drift", "estimated_accuracy", "accuracy_low",
                   "accuracy_high", "reference_accuracy", "min_p_value", "drifted", "alarm", "action", "error",
                   "abstain_rate", "tokens_p50", "truncated_share")
REVIEW_COLUMNS = ("id", "text", "label", "predicted_label", "confidence", "batch", "batch_sha256")


def telemetry_off() -> None:
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


def _batch_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "batch file not found" if not path.exists() else "not a file")
    return path


def read_batch(path: str | Path, text_column: str = "text") -> list[str]:
    """The texts of a batch file: .txt (one per line) or anything ingest reads (csv, tsv, jsonl,
    parquet), with ingest's row numbering and undecodable-byte reporting."""
    path = _batch_file(path)
    if path.suffix.lower() == ".txt":
        texts = read_lines(path, "batch file")  # the one line reader: ingest's rules and messages
        rows = list(range(1, len(texts) + 1))
    else:
        table = read_file(path)
        if text_column not in table.frame.columns:
            raise missing_column(path, text_column, table.frame.columns)
        for i, problems in sorted(table.bad.items()):
            for field, _, detail in problems:
                if field in (None, text_column):
                    raise DataError(path, table.rows[i], field or text_column, detail)
        texts, rows = table.frame[text_column].tolist(), table.rows
    for text, row in zip(texts, rows):
        if not isinstance(text, str) or not text.strip():
            raise DataError(path, row, text_column, "empty or missing text")
    if len(texts) < 2:
        raise DataError(path, None, text_column, f"need at least 2 texts to test for drift, got {len(texts)}")
    return texts


def batch_ids(path: str | Path, id_column: str) -> list[str] | None:
    """The batch's own ids (its `id_column`, read by the same reader as its texts), or None when it has none
    (a .txt file, or no such column). A missing id cell is None in the list."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        return None
    frame = read_file(path).frame
    if id_column not in frame.columns:
        return None
    return [None if v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip())
            else (str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)) for v in frame[id_column]]


class UnjudgedBatches(DataError):
    """`--watch`: some new batch files could not be judged (each was named on stderr and recorded in the
    history); `verdicts` holds those of the files that were."""

    def __init__(self, folder: Path, failed: int, total: int, verdicts: list[dict]):
        super().__init__(folder, None, None, f"{failed} of {total} new batch files could not be judged (each named "
                         "above)")
        self.verdicts = verdicts
        self._args = (folder, failed, total, verdicts)

    def __reduce__(self):  # Prefect may copy a flow's exception: rebuild it from its own arguments
        return type(self), self._args


def check_arguments(ms: MonitorSettings, check_model: Callable[[Path], object] | None = None) -> list[str]:
    """Everything that can be checked before Prefect or a model loads: the output paths (core.stage.check_apart,
    first: --out, --history and --review-queue are not, do not contain and do not sit inside an input or each
    other, and an existing --out folder is domaintune's own), the folders exist, --out is not a file, params.yaml's
    drift section is valid, the batch reads, and the model folder passes `check_model`. Returns the texts ([] for
    --watch)."""
    root, batch, watch, out, model = Path(ms.repo), ms.batch, ms.watch, ms.out, ms.model
    if batch is not None:
        _batch_file(root / batch)  # a batch that is no file is named as such, before the paths are compared
    named = {"--batch": batch, "--watch": watch, "--baseline": ms.baseline, "--model": model, "--out": out,
             "--history": ms.history, "--review-queue": ms.review_queue}
    check_apart({k: str(root / v) for k, v in named.items() if v}, ["--out", "--history", "--review-queue"],
                ["--out"], how="an output must not be, contain or sit inside another path monitor uses (writing it "
                "would replace or alter that path)")
    for flag, value in (("--baseline", ms.baseline), ("--model", model)):
        if not (root / value).is_dir():
            raise DataError(root / value, None, None, f"{flag}: no such folder; run the pipeline (dvc repro) first")
    if (root / out).exists() and not (root / out).is_dir():
        raise DataError(root / out, None, None, "--out: exists and is not a folder")
    load_params(root / "params.yaml", "drift", "monitor")  # a bad params.yaml fails here, naming file and key
    if watch is not None:
        if not (root / watch).is_dir():
            raise DataError(root / watch, None, None, "--watch: no such folder")
        texts = []
    else:
        texts = read_batch(root / batch, ms.text_column)
    if check_model is not None:  # last: the batch is judged bad before the model folder is looked into
        check_model(root / model)
    return texts


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def judge_texts(texts: Sequence[str], baseline_dir: str | Path, predictor, params, out: str | Path,
                batch_name: str, details: bool = True, timings: dict | None = None, renderer=None,
                act: Callable[[dict, object], dict] | None = None):
    """Profile + judge one batch, write verdict.json and report.html into `out` (atomically).
    Returns (verdict, profile). `timings`, when given, receives the seconds of each phase; `renderer`
    (a monitor_report.DetailsProcess) renders evidently's details out of process; `act(verdict, profile)`,
    when given, acts on the verdict before it is written (monitor.on_drift) and returns what it did, which the
    verdict keeps under "action"."""
    clock = [time.perf_counter()]
    timings = {} if timings is None else timings

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = now - clock[0]
        clock[0] = now

    baseline = Baseline(baseline_dir)
    if list(predictor.labels) != baseline.labels:
        raise DataError(Path(baseline_dir) / "profile.json", None, "labels",
                        "served model's labels differ from the baseline's; rebuild the baseline (drift stage)")
    lap("load_baseline_s")
    prof = baseline.profile_batch(predictor, texts)
    lap("profile_s")
    verdict = judge(baseline, prof, params)
    verdict["batch"] = str(batch_name)
    verdict["review_below"] = params.review_below
    # no label set (base.task generation): the confidence column is prompt familiarity, not a probability of
    # being right, so nothing is queued for review
    verdict["review_queued"] = int((prof.frame["confidence"] < params.review_below).sum()) if baseline.labels else 0
    if prof.abstained is not None:  # evaluate.abstain: the share of the batch answered with the abstention label
        verdict["abstention"] = {"rate": float(prof.abstained.mean()), "abstained": int(prof.abstained.sum()),
                                 "label": predictor.abstainer.label, "method": predictor.abstainer.method}
    if act is not None:
        verdict["action"] = act(verdict, prof)
    lap("judge_s")
    numeric = [c for c in baseline.profile["numeric_features"] if c in prof.frame.columns]
    with atomic_output(out) as tmp:
        tmp.mkdir(parents=True)
        write_json(tmp / "verdict.json", verdict)
        ref = validation_frame(baseline) if details else None
        write_report(verdict, tmp / "report.html", ref, prof.frame if details else None, numeric,
                     PRED_COLUMN if baseline.labels else None, renderer)
    lap("report_s")
    return verdict, prof


def upgrade_history(path: Path) -> None:
    """A history an older domaintune wrote (fewer columns, e.g. no `action`) is rewritten with today's header,
    its rows kept and the new cells empty, so every row of the file has the same columns."""
    with path.open(encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh), None)
    if header is None or tuple(header) == HISTORY_COLUMNS:
        return
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with atomic_output(path) as tmp:
        with tmp.open("w", encoding="utf-8", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=[*HISTORY_COLUMNS, *(c for c in header if c not in HISTORY_COLUMNS)],
                               restval="")
            w.writeheader()
            w.writerows(rows)


def append_history(path: Path, verdict: dict | None, batch: str, sha: str, alarm: str = "", error: str = "",
                   action: str = "") -> None:
    """One CSV row per judged batch (header written with the first; an older header is upgraded first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        upgrade_history(path)
    index = 0 if new else sum(1 for _ in path.open(encoding="utf-8")) - 1
    acc = (verdict or {}).get("accuracy") or {}
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "index": index, "batch": batch,
           "sha256": sha, "rows": (verdict or {}).get("rows", ""),
           "drift": "" if verdict is None else int(verdict["drift"]),
           "estimated_accuracy": acc.get("estimated", ""), "accuracy_low": acc.get("ci_low", ""),
           # like with like: the reference's estimate by the same estimator (not its measured accuracy)
           "accuracy_high": acc.get("ci_high", ""), "reference_accuracy": acc.get("reference_estimated", ""),
           "min_p_value": min(verdict["p_values"].values()) if verdict else "",
           "drifted": " ".join(s for s, v in (verdict or {}).get("signals", {}).items() if v["drifted"]),
           "alarm": alarm, "action": action, "error": error,
           "abstain_rate": ((verdict or {}).get("abstention") or {}).get("rate", ""),
           # document length in tokens and the share not read whole (monitor.drift._lengths): longer inputs show
           "tokens_p50": ((verdict or {}).get("length_tokens") or {}).get("p50", ""),
           "truncated_share": ((verdict or {}).get("length_tokens") or {}).get("truncated_share", "")}
    # `dvc plots show` copies every cell into a <script> unescaped: "</" would end it and blank the page
    row = {k: v.replace("</", "<\\/") if isinstance(v, str) else v for k, v in row.items()}
    if not new:
        with path.open(encoding="utf-8", newline="") as fh:
            header = next(csv.reader(fh))
    fields = HISTORY_COLUMNS if new else header
    with path.open("a", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, restval="")
        if new:
            w.writeheader()
        w.writerow(row)


def seen_hashes(path: Path) -> set[str]:
    if not path.exists():
        return set()
    with path.open(encoding="utf-8", newline="") as fh:
        return {row["sha256"] for row in csv.DictReader(fh)}


def append_review_queue(path: Path, prof, below: float, batch: str, sha: str, ids: list | None = None) -> int:
    """The batch's texts under `below` confidence, in ingest's CSV format (label empty until reviewed),
    with the batch file and its sha256 in their own columns. Ids are the batch's own (`ids`); a row without
    one (or a batch without an id column) gets <batch sha256 prefix>:<row>, which no other batch can reuse."""
    conf = prof.frame[CONF_COLUMN].to_numpy()
    rows = [i for i in range(len(prof.texts)) if conf[i] < below]
    if not rows:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    width = len(REVIEW_COLUMNS)
    if not new:  # a queue an older domaintune started has no batch_sha256 column: its rows keep its width
        with path.open(encoding="utf-8", newline="") as fh:
            width = len(next(csv.reader(fh), REVIEW_COLUMNS))
    with path.open("a", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(REVIEW_COLUMNS)
        for i in rows:
            rid = ids[i] if ids is not None and ids[i] is not None else f"{sha[:12]}:{i + 1}"
            w.writerow([rid, prof.texts[i], "", prof.frame[PRED_COLUMN].iat[i], f"{conf[i]:.4f}", batch,
                        sha][:width])
    return len(rows)


def raise_alarm(verdict_path: Path, verdict: dict, command: str, webhook: str) -> str:
    """Run the alarm command (verdict.json path appended) and/or POST the verdict; returns what happened.
    A failing alarm is reported, never fatal: the verdict is already written."""
    import shlex
    import subprocess

    done = []
    if command:
        try:
            proc = subprocess.run([*shlex.split(command), str(verdict_path)], capture_output=True, text=True,
                                  timeout=120)
            done.append(f"command exit {proc.returncode}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            done.append(f"command failed: {exc}")
    if webhook:
        import urllib.request

        req = urllib.request.Request(webhook, data=json.dumps(verdict).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:  # noqa: S310 - URL from the user's params
                done.append(f"webhook HTTP {resp.status}")
        except OSError as exc:
            done.append(f"webhook failed: {exc}")
    for line in done:
        if "failed" in line or ("exit" in line and not line.endswith(" 0")):
            print(f"monitor: alarm {line}", file=sys.stderr)
    return "; ".join(done)


def _settings(ms: MonitorSettings, root: Path, params) -> dict:
    return {"root": root, "policy": load_params(root / "params.yaml", "monitor"), "baseline": root / ms.baseline,
            "model": root / ms.model, "out": root / ms.out,
            "history": root / ms.history, "review_queue": root / ms.review_queue,
            "alarm_command": ms.alarm_command if ms.alarm_command is not None else params.alarm_command,
            "alarm_webhook": ms.alarm_webhook if ms.alarm_webhook is not None else params.alarm_webhook,
            "text_column": ms.text_column, "id_column": ms.id_column or project_id_column(root / "params.yaml")}


def trigger_retrain(s: dict) -> dict:
    """Start the retrain flow: the Prefect deployment of the retrain flow when PREFECT_API_URL is set and one
    exists (s["deployment_runner"](root) runs it and returns {"kind": "deployment", ...}, or None when there is
    none; pipelines/ passes it, this library never imports Prefect), else a detached local retrain
    (policy.start_local_retrain). A local retrain a monitor run started that is still running is not started
    twice; neither is one per batch of a --watch pass."""
    log_dir = s["history"].parent
    running = s.get("retrain_started") or running_retrain(log_dir)
    if running:
        return {**running, "kind": "running"} if running["kind"] == "local" else running
    found = None
    runner = s.get("deployment_runner")
    if runner is not None and os.environ.get("PREFECT_API_URL"):
        try:
            found = runner(s["root"])
        except Exception as exc:  # noqa: BLE001 - API down, auth, ...: the local retrain still runs, and says why
            print(f"monitor: could not run the retrain deployment ({type(exc).__name__}: {exc}); starting a local "
                  "retrain", file=sys.stderr)
    started = found or start_local_retrain(s["root"], s["policy"].retrain_command, log_dir)
    s["retrain_started"] = started
    return started


def act_on(verdict: dict, prof, path: Path, sha: str, predictor, params, s: dict) -> dict:
    """monitor.on_drift on one verdict: the review queue (review, retrain), the retrain flow (retrain, on a drift
    alarm AND an estimated-accuracy drop: policy.decide). Returns the decision with what was done."""
    policy = s["policy"]
    decision = decide(verdict, policy.on_drift, policy.retrain_below)
    queued = None
    if decision["review"] and predictor.labels:
        ids = batch_ids(path, s["id_column"])
        if ids is None and path.suffix.lower() != ".txt":
            print(f"monitor: {path} has no id column {s['id_column']!r}; review queue ids are <batch hash>:<row>",
                  file=sys.stderr)
        queued = append_review_queue(s["review_queue"], prof, params.review_below, str(path), sha, ids)
    retrain = trigger_retrain(s) if decision["retrain"] else None
    return {**decision, "review_queued": queued, "retrain_run": retrain, "taken": action_text(queued, retrain)}


def monitor_file(path: Path, texts: Sequence[str] | None, predictor, params, s: dict, out: Path) -> dict:
    """Judge one batch file end to end: verdict + report in `out`, the action monitor.on_drift asks for (review
    queue, retrain), history row, alarm."""
    sha = file_sha256(path)
    texts = read_batch(path, s["text_column"]) if texts is None else texts

    def act(verdict: dict, prof) -> dict:
        return act_on(verdict, prof, path, sha, predictor, params, s)

    verdict, prof = judge_texts(texts, s["baseline"], predictor, params, out, str(path), renderer=s.get("details"),
                                act=act)
    alarm = raise_alarm(out / "verdict.json", verdict, s["alarm_command"], s["alarm_webhook"]) if verdict["drift"] \
        else ""
    append_history(s["history"], verdict, str(path), sha, alarm, action=verdict["action"]["taken"])
    return verdict


def monitor_folder(folder: Path, predictor, params, s: dict) -> list[dict]:
    """Judge every batch file in `folder` the history does not list yet (by content hash), oldest name
    first; each gets its own report folder <out>/<file stem>. A bad file is a history row with its
    error (and a line on stderr), so it is neither retried forever nor silently dropped; a file that cannot
    be read at all (permissions) is a line on stderr only, so it is judged once it can be. After every file
    was tried, any that failed raise UnjudgedBatches (exit 2), which carries the other verdicts."""
    seen = seen_hashes(s["history"])
    mark_output_folder(s["out"])  # the folder of report folders is domaintune's, so later runs may write in it
    verdicts, failed, total = [], 0, 0
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in BATCH_SUFFIXES):
        try:
            sha = file_sha256(path)
        except OSError as exc:  # unreadable (permissions): not recorded, so it is judged once it can be read
            print(f"monitor: {path}: {exc.strerror or exc}", file=sys.stderr)
            failed, total = failed + 1, total + 1
            continue
        if sha in seen:
            continue
        seen.add(sha)
        total += 1
        try:
            verdicts.append(monitor_file(path, None, predictor, params, s, s["out"] / path.stem))
        except DataError as exc:
            print(f"monitor: {exc}", file=sys.stderr)
            append_history(s["history"], None, str(path), sha, error=str(exc))
            failed += 1
    if failed:
        raise UnjudgedBatches(Path(folder), failed, total, verdicts)
    return verdicts


def monitor_variant(folder: Path, requested: str) -> str:
    """The variant monitor runs: a named one as asked; for auto on a classifier export, the fastest passing variant
    that returns text embeddings (float32 or int8: the drift signals compare embeddings, which the ONNX and
    OpenVINO graphs do not output); a causal-LM export has one variant (its loader takes auto)."""
    if requested != AUTO or not (Path(folder) / "model.json").is_file():
        return requested
    choice = resolve_variant(folder, AUTO, among=EMBEDDING_VARIANTS)
    log.info("monitor: variant %s", choice.note)
    return choice.variant


def run_local(ms: MonitorSettings, texts: list[str], load: Callable,
              deployment_runner: Callable[[Path], dict | None] | None = None) -> list[dict]:
    """The one-shot (or one watch pass) in this process: load the model once (`load(folder, variant=,
    batch_size=, device=)`, the caller's loader; the variant from monitor_variant), judge. `deployment_runner(root)`
    runs the retrain flow's Prefect deployment when one exists (trigger_retrain)."""
    root = Path(ms.repo)
    base, params = load_params(root / "params.yaml", "base", "drift")
    s = _settings(ms, root, params)
    s["deployment_runner"] = deployment_runner
    s["details"] = DetailsProcess()  # imports evidently on the other core while the model loads
    try:
        set_threads()
        predictor = load(s["model"], variant=monitor_variant(s["model"], ms.variant), batch_size=params.batch_size,
                         device=stage_device(base))
        if ms.watch:
            return monitor_folder(root / ms.watch, predictor, params, s)
        return [monitor_file(root / ms.batch, texts, predictor, params, s, s["out"])]
    finally:
        s["details"].close()


def run_monitor(ms: MonitorSettings, load: Callable, flow: bool = False,
                flow_runner: Callable[[MonitorSettings], list[dict]] | None = None,
                check_model: Callable[[Path], object] | None = None,
                deployment_runner: Callable[[Path], dict | None] | None = None) -> int:
    """`domaintune monitor`: check, then judge in-process, or (flow, or PREFECT_API_URL set) through
    `flow_runner(ms) -> verdicts` (pipelines/cli.py passes the Prefect flows of pipelines/monitor.py;
    domaintune/ never imports pipelines/). `load` opens the model, `check_model` vets its folder first
    (module docstring). Bad input raises DataError/ParamsError (one line, exit 2). Returns 1 on drift."""
    telemetry_off()
    root = Path(ms.repo)
    texts = check_arguments(ms, check_model)
    unjudged = None
    try:
        if (flow or os.environ.get("PREFECT_API_URL")) and flow_runner is not None:
            verdicts = flow_runner(ms)
        else:
            verdicts = run_local(ms, texts, load, deployment_runner)
    except UnjudgedBatches as exc:  # the judged ones are still reported; then exit 2 with the count
        verdicts, unjudged = exc.verdicts, exc
    for v in verdicts:
        print(summary_line(v))
    if unjudged is not None:
        raise unjudged
    if not ms.watch:
        print(f"report: {root / ms.out / 'report.html'}")
    elif not verdicts:
        print(f"no new batches in {root / ms.watch}")
    return 1 if any(v["drift"] for v in verdicts) else 0


def summary_line(v: dict) -> str:
    acc = v.get("accuracy")
    est = "" if not acc else (f"; estimated accuracy {acc['estimated']:.3f} ({acc['ci_low']:.3f}-{acc['ci_high']:.3f})"
                              f" vs {acc['reference_estimated']:.3f} estimated the same way on the reference "
                              f"(measured there: {acc['reference_measured']:.3f})"
                              + ("" if acc.get("reliable", True) else f"; {acc['reliability']}"))
    if ab := v.get("abstention"):
        est += f"; abstained on {ab['abstained']} of {v['rows']} ({100 * ab['rate']:.1f}%, answered {ab['label']})"
    act = v.get("action") or {}
    if act.get("on_drift") == "retrain":  # the retrain policy says what it did and why, on every batch
        est += f"; action: {act['taken']} ({act['reason']})"
    small = [name for name, s in v.get("signals", {}).items() if s.get("significant") and not s["drifted"]]
    head = ("DRIFT: " + "; ".join(v["reasons"])) if v["drift"] else \
        (f"no drift: {v['rows']} texts, no signal both significant at {v['false_alarm_rate']} overall and "
         f"at least drift.min_effect {v.get('min_effect', 0):g} in effect"
         + (f" ({', '.join(small)} significant, effect too small)" if small else ""))
    return f"{v['batch']}: {head}{est}"
