"""`domaintune monitor` end to end on a tiny model: verdict-first report that agrees with verdict.json,
history, review queue, alarm command and webhook (127.0.0.1), folder watching, checks before any
heavy import."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from driftkit import DRIFT_YAML, german, save_tiny_classifier, tiny_splits

from domaintune.data.dataset import write_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("monitor")
    splits, labels = tiny_splits(40)
    write_dataset(root / "audited", splits, labels)
    save_tiny_classifier(tiny_bert, root / "models" / "export", labels)
    (root / "params.yaml").write_text(DRIFT_YAML)
    from stages.drift import main

    assert main(["--params", str(root / "params.yaml"), "--in", str(root / "audited"), "--model",
                 str(root / "models" / "export"), "--out", str(root / "models" / "drift_baseline"),
                 "--metrics", str(root / "metrics" / "drift.json")]) == 0
    (root / "same.txt").write_text("\n".join(splits["test"]["text"]) + "\n", encoding="utf-8")
    (root / "other.txt").write_text("\n".join(german(30)) + "\n", encoding="utf-8")
    # The alarm command: a real process that records the verdict path it was given.
    (root / "alarm.py").write_text("import sys, pathlib\npathlib.Path(sys.argv[1]).with_name('ALARM').write_text("
                                   "sys.argv[-1])\n")
    return root


def cli(*argv) -> int:
    from pipelines.cli import main

    return main(list(argv))


def test_one_shot_report_verdict_history_queue_and_alarm(project, capsys):
    alarm = f"{sys.executable} {project / 'alarm.py'} {project / 'reports' / 'alarm-marker'}"
    assert cli("monitor", "--batch", "same.txt", "--repo", str(project), "--out", "reports/same",
               "--alarm-command", alarm) == 0
    assert not (project / "reports" / "ALARM").exists()          # no drift, no alarm
    assert cli("monitor", "--batch", "other.txt", "--repo", str(project), "--out", "reports/other",
               "--alarm-command", alarm) == 1
    out = capsys.readouterr().out
    assert "other.txt: DRIFT: " in out and "estimated accuracy" in out
    verdict = json.loads((project / "reports" / "other" / "verdict.json").read_text())
    assert (project / "reports" / "ALARM").read_text() == str(project / "reports" / "other" / "verdict.json")
    from domaintune.monitor.report import read_embedded_verdict

    html = (project / "reports" / "other" / "report.html").read_text(encoding="utf-8")
    assert read_embedded_verdict(html) == json.loads(json.dumps(verdict, sort_keys=True))
    # Verdict first: heading and reasons, estimated accuracy, signals, examples, then evidently.
    from html import escape

    marks = ["DRIFT detected", escape(verdict["reasons"][0]), "Estimated accuracy", "Signals, most drifted",
             "10 most atypical", "10 least confident", "Details (evidently)"]
    pos = [html.index(m) for m in marks]
    assert pos == sorted(pos)
    table = html[html.index("Signals, most drifted"):html.index("10 most atypical")]
    order = [table.index(f"<td>{s}</td>") for s in verdict["signals"]]
    assert order == sorted(order)
    calm = (project / "reports" / "same" / "report.html").read_text(encoding="utf-8")
    assert "No drift detected" in calm and "DRIFT detected" not in calm
    with (project / "reports" / "monitor_history.csv").open(newline="") as fh:
        hist = list(csv.DictReader(fh))
    assert [(Path(r["batch"]).name, r["drift"]) for r in hist] == [("same.txt", "0"), ("other.txt", "1")]
    assert float(hist[1]["estimated_accuracy"]) == pytest.approx(verdict["accuracy"]["estimated"])
    assert hist[1]["alarm"] == "command exit 0"
    # The review queue reads with ingest's reader; labels are left empty for a reviewer.
    from domaintune.data.sources import read_file

    queue = read_file(project / "data" / "review_queue.csv").frame
    assert len(queue) == verdict["review_queued"] + json.loads(
        (project / "reports" / "same" / "verdict.json").read_text())["review_queued"] > 0
    assert set(queue.columns) >= {"id", "text", "label"} and queue["id"].is_unique


def test_watch_folder_judges_each_new_batch_once_and_records_bad_files(project, capsys):
    inbox = project / "inbox"
    inbox.mkdir()
    (inbox / "a.txt").write_text((project / "same.txt").read_text())
    (inbox / "b.txt").write_text((project / "other.txt").read_text())
    (inbox / "c.txt").write_bytes(b"fine\n\xff bad\n")
    args = ("monitor", "--watch", "inbox", "--repo", str(project), "--out", "reports/watch",
            "--history", "reports/watch_history.csv")
    assert cli(*args) == 2  # an unreadable batch is an error (exit 2), after the others were judged and reported
    out, err = capsys.readouterr()
    assert "c.txt: row 2: bytes that are not UTF-8 at byte offset 5" in err
    assert "b.txt: DRIFT: " in out  # the drifted batch is still reported
    assert err.splitlines()[-1] == (f"domaintune monitor: error: {project / 'inbox'}: 1 of 3 new batch files could not "
                                    "be judged (each named above)")
    assert (project / "reports" / "watch" / "a" / "report.html").exists()
    assert (project / "reports" / "watch" / "b" / "verdict.json").exists()
    assert cli(*args) == 0                                   # nothing new: nothing judged again
    assert "no new batches" in capsys.readouterr().out
    with (project / "reports" / "watch_history.csv").open(newline="") as fh:
        hist = list(csv.DictReader(fh))
    assert [(Path(r["batch"]).name, r["drift"], bool(r["error"])) for r in hist] == [
        ("a.txt", "0", False), ("b.txt", "1", False), ("c.txt", "", True)]


def test_webhook_alarm_posts_the_verdict_to_loopback(tmp_path):
    from domaintune.monitor.monitoring import raise_alarm

    got = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        assert raise_alarm(tmp_path / "verdict.json", {"drift": True, "reasons": ["x"]}, "", url) == "webhook HTTP 204"
        assert got == [{"drift": True, "reasons": ["x"]}]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_bad_input_is_one_line_before_prefect_or_torch_is_imported(project):
    """The old monitor imported Prefect (and started a server) before noticing a missing file."""
    code = ("import sys\nfrom pipelines.cli import main\nrc = main(sys.argv[1:])\n"
            "print('heavy:', sorted(m for m in ('prefect', 'torch', 'transformers', 'evidently') if m in sys.modules))\n"
            "raise SystemExit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "monitor", "--batch", "nope.txt", "--repo", str(project)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(f"{project / 'nope.txt'}: batch file not found"), lines
    assert "heavy: []" in proc.stdout


@pytest.mark.slow  # 25 s: a Prefect deployment and a flow run (the CLI's folder watch is tested without Prefect)
def test_monitor_folder_deployment_on_a_cron_and_its_flow(project, prefect_harness):
    """`deploy --monitor-folder DIR --monitor-cron` registers the folder-watching flow on the pool with
    that schedule; the flow itself (as the worker would run it) judges the new files in DIR."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from pipelines.deploy import deploy
    from pipelines.monitor import monitor_folder_flow

    (project / "dvc.yaml").write_text("stages: {}\n")
    inbox = project / "incoming"
    inbox.mkdir()
    (inbox / "monday.txt").write_text((project / "other.txt").read_text())

    async def pool_and_read(names=None):
        async with get_client() as client:
            if names is None:
                await client.create_work_pool(WorkPoolCreate(name="mon-pool", type="process"))
                return None
            return [await client.read_deployment_by_name(n) for n in names]

    asyncio.run(pool_and_read())
    names = deploy(project, "mon-pool", monitor_folder="incoming", monitor_cron="*/15 * * * *", code=REPO)
    assert names == ["domaintune-retrain/retrain", "domaintune-monitor-folder/retrain-monitor"]
    dep = asyncio.run(pool_and_read(names[1:]))[0]
    assert dep.entrypoint == "pipelines/monitor.py:monitor_folder_flow"
    assert dep.parameters == {"folder": "incoming", "repo": str(project.resolve())}
    assert [s.schedule.cron for s in dep.schedules] == ["*/15 * * * *"]
    verdicts = monitor_folder_flow("incoming", repo=str(project), out="reports/cron",
                                   history="reports/cron_history.csv")
    assert [(Path(v["batch"]).name, v["drift"]) for v in verdicts] == [("monday.txt", True)]
    assert monitor_folder_flow("incoming", repo=str(project), out="reports/cron",
                               history="reports/cron_history.csv") == []


def test_flow_flag_runs_the_same_work_as_a_prefect_flow(project, prefect_harness, capsys):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    assert cli("monitor", "--batch", "other.txt", "--repo", str(project), "--out", "reports/flow", "--flow",
               "--history", "reports/flow_history.csv") == 1
    assert "other.txt: DRIFT" in capsys.readouterr().out
    assert json.loads((project / "reports" / "flow" / "verdict.json").read_text())["drift"] is True

    async def runs():
        async with get_client() as client:
            return [r.state.type.value for r in await client.read_flow_runs(limit=200, sort=FlowRunSort.START_TIME_DESC) if r.name and
                    (await client.read_flow(r.flow_id)).name == "domaintune-monitor"]

    assert "COMPLETED" in asyncio.run(runs())


def test_drift_params_are_checked():
    from domaintune.core.errors import ParamsError
    from domaintune.core.params import DriftParams

    for bad in ({"false_alarm_rate": 0.0}, {"false_alarm_rate": 1.5}, {"calibration_resamples": 5},
                {"alarm_webhook": "ftp://x"}, {"review_below": 2.0}, {"min_effect": -0.1}, {"min_effect": 1.0},
                {"bf16": "yes"}):
        with pytest.raises(ParamsError, match="drift\\."):
            DriftParams(**bad)


def test_one_shot_runs_without_prefect_and_with_telemetry_off(project):
    """A one-shot call judges in-process: Prefect is never imported (so no temporary server starts),
    and DO_NOT_TRACK is set for evidently. The monitor pipeline imports no stage module."""
    import ast

    code = ("import os, sys\nfrom pipelines.cli import main\nrc = main(sys.argv[1:])\n"
            "print('prefect imported:', 'prefect' in sys.modules, 'DO_NOT_TRACK:', os.environ.get('DO_NOT_TRACK'))\n"
            "raise SystemExit(rc)")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("PREFECT_API_URL", "DO_NOT_TRACK")}
    proc = subprocess.run([sys.executable, "-c", code, "monitor", "--batch", "same.txt", "--repo", str(project),
                           "--out", "reports/plain", "--history", "reports/plain_history.csv"],
                          capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "prefect imported: False DO_NOT_TRACK: 1" in proc.stdout
    for module in ("pipelines/monitor.py", "domaintune/monitor/monitoring.py", "domaintune/monitor/drift.py"):
        tree = ast.parse((REPO / module).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
            {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not any(m and m.startswith("stages") for m in imported), module


def test_quiet_verdict_names_significant_signals_whose_effect_is_too_small():
    """A batch whose length differs significantly but by a tiny effect: no drift, and both the summary
    line and the report say which signal was significant and why it does not alarm."""
    from domaintune.monitor.monitoring import summary_line
    from domaintune.monitor.report import verdict_section

    sig = {"statistic": 40.0, "p_value": 1e-9, "effect": 0.04, "significant": True, "drifted": False,
           "explanation": "length of the text in words", "reference_mean": 12.0, "batch_mean": 11.4}
    calm = {"statistic": 0.5, "p_value": 0.6, "effect": 0.0, "significant": False, "drifted": False,
            "explanation": "x"}
    v = {"batch": "b.txt", "drift": False, "reasons": [], "rows": 20000, "false_alarm_rate": 0.01,
         "min_effect": 0.1, "per_test_level": 0.01 / 16, "error_rate_note": "16 tests",
         "signals": {"n_words": sig, "pc1": calm}, "accuracy": None, "most_atypical": [], "least_confident": []}
    line = summary_line(v)
    assert line.startswith("b.txt: no drift") and "n_words significant, effect too small" in line
    html = verdict_section(v)
    assert "n_words: significant, effect too small" in html and "significant, effect too small</td>" in html


def test_details_process_renders_evidently_out_of_process_and_reports_its_errors(tmp_path):
    """evidently's details come from a child process (it imports evidently while the monitor loads its
    model): the page it writes is evidently's, a failure inside it is raised here with its message, and
    closing it ends the child."""
    import numpy as np
    import pandas as pd

    from domaintune.monitor.report import DetailsProcess, write_report

    rng = np.random.default_rng(0)
    ref = pd.DataFrame({"n_words": rng.poisson(10, 200).astype(float), "pred_label": rng.choice(["a", "b"], 200)})
    cur = pd.DataFrame({"n_words": rng.poisson(4, 80).astype(float), "pred_label": rng.choice(["a", "b"], 80)})
    v = {"drift": True, "reasons": ["n_words drifted"], "rows": 80, "error_rate_note": "1 test", "signals": {},
         "per_test_level": 0.01, "min_effect": 0.1, "most_atypical": [], "least_confident": []}
    details = DetailsProcess()
    try:
        write_report(v, tmp_path / "report.html", ref, cur, ["n_words"], "pred_label", details)
        html = (tmp_path / "report.html").read_text(encoding="utf-8")
        assert html.index("DRIFT detected") < html.index("Details (evidently)")
        assert "root_metric_" in html[html.index("Details (evidently)"):] and len(html) > 100_000  # evidently's page
        with pytest.raises(RuntimeError, match="evidently details: KeyError"):
            details.render(ref, cur, ["no_such_column"], "pred_label", tmp_path / "bad.html")
    finally:
        details.close()
    assert details.proc.poll() == 0


def test_review_queue_carries_the_batchs_own_ids_and_hash(project, capsys):
    """The batch's ids (the project's ingest.id_column, else --id-column) go into the review queue as they are,
    with the batch's sha256 in its own column; a batch without ids gets <hash>:<row>, said on stderr."""
    import hashlib

    import pandas as pd

    texts = german(30)
    batch = project / "ids_batch.csv"
    pd.DataFrame({"ticket_id": [f"TK-{i}" for i in range(30)], "text": texts}).to_csv(batch, index=False)
    queue = project / "reports" / "ids_queue.csv"
    assert cli("monitor", "--batch", "ids_batch.csv", "--repo", str(project), "--out", "reports/ids",
               "--review-queue", "reports/ids_queue.csv", "--id-column", "ticket_id") in (0, 1)
    with queue.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(r["id"].startswith("TK-") for r in rows)
    assert {r["batch_sha256"] for r in rows} == {hashlib.sha256(batch.read_bytes()).hexdigest()}
    capsys.readouterr()
    plain = project / "plain_batch.csv"
    pd.DataFrame({"text": texts[::-1]}).to_csv(plain, index=False)
    assert cli("monitor", "--batch", "plain_batch.csv", "--repo", str(project), "--out", "reports/plain",
               "--review-queue", "reports/ids_queue.csv", "--id-column", "ticket_id") in (0, 1)
    assert "has no id column 'ticket_id'" in capsys.readouterr().err
    with queue.open(newline="") as fh:
        later = list(csv.DictReader(fh))[len(rows):]
    sha = hashlib.sha256(plain.read_bytes()).hexdigest()
    assert later and all(r["id"].startswith(sha[:12] + ":") and r["batch_sha256"] == sha for r in later)


def _wait_for_lines(path: Path, n: int, seconds: float = 30.0) -> list[str]:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= n:
            return lines
        time.sleep(0.1)
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slow  # 18 s: three monitor runs; the decision itself is tests/monitor/test_policy.py (2 s, in make test)
def test_on_drift_retrain_starts_the_retrain_once_on_drift_and_a_drop_and_never_on_drift_alone(
        project, tmp_path, capsys, monkeypatch):
    """monitor.on_drift: retrain with monitor.retrain_command pointed at a real script that records its argv: a
    drifted batch whose estimate is under retrain_below starts it exactly once, with --repo ROOT, detached, its
    pid and log in verdict.json, the history's action column and reports/retrain.json; the same drift with an
    estimate over retrain_below (drift alone) starts nothing; on_drift: report queues no texts for review."""
    import shutil

    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # no Prefect API: the local retrain, no server started
    root = tmp_path / "p"
    shutil.copytree(project, root, ignore=shutil.ignore_patterns("reports", "*.csv"))
    record = tmp_path / "retrain_argv.jsonl"
    (tmp_path / "fake_retrain.py").write_text(
        "import json, sys\nwith open(sys.argv[1], 'a') as fh:\n    fh.write(json.dumps(sys.argv[2:]) + '\\n')\n")

    def policy(on_drift: str, below: float) -> None:
        (root / "params.yaml").write_text(
            DRIFT_YAML + f"monitor:\n  on_drift: {on_drift}\n  retrain_below: {below}\n"
            f"  retrain_command: \"{sys.executable} {tmp_path / 'fake_retrain.py'} {record}\"\n")

    policy("retrain", 1.0)  # every estimate is under 1.0: the drop is there whenever drift is
    assert cli("monitor", "--batch", "other.txt", "--repo", str(root), "--out", "reports/other") == 1
    lines = _wait_for_lines(record, 1)
    assert [json.loads(x) for x in lines] == [["--repo", str(root.resolve())]]
    verdict = json.loads((root / "reports" / "other" / "verdict.json").read_text())
    act = verdict["action"]
    assert act["retrain"] and act["evidence"]["drifted_signals"] and act["evidence"]["accuracy_drop"]
    assert act["reason"].startswith("retrain: drift in ")
    run = act["retrain_run"]
    assert run["kind"] == "local" and Path(run["log"]).parent == root / "reports"
    assert json.loads((root / "reports" / "retrain.json").read_text())["pid"] == run["pid"]
    with (root / "reports" / "monitor_history.csv").open(newline="") as fh:
        hist = list(csv.DictReader(fh))
    assert hist[0]["action"] == f"review queued {act['review_queued']}; retrain started pid {run['pid']} (log " \
                                f"{run['log']})"
    assert "action: review queued" in capsys.readouterr().out

    policy("retrain", 0.0)  # the same drift, no estimate is under 0: drift alone
    assert cli("monitor", "--batch", "other.txt", "--repo", str(root), "--out", "reports/alone") == 1
    alone = json.loads((root / "reports" / "alone" / "verdict.json").read_text())["action"]
    assert alone["evidence"]["drifted_signals"] and not alone["retrain"] and alone["retrain_run"] is None
    assert "an estimated-accuracy drop missing" in alone["reason"]

    policy("report", 1.0)  # drift and drop, but report: no review queue, no retrain
    assert cli("monitor", "--batch", "other.txt", "--repo", str(root), "--out", "reports/report",
               "--review-queue", "reports/report_queue.csv") == 1
    assert not (root / "reports" / "report_queue.csv").exists()
    with (root / "reports" / "monitor_history.csv").open(newline="") as fh:
        assert [r["action"] for r in csv.DictReader(fh)][-1] == "none"
    assert len(_wait_for_lines(record, 2, seconds=2.0)) == 1  # still the one retrain


def test_abstention_rate_in_the_verdict_report_and_history(project, tmp_path, capsys):
    """An export that abstains (evaluate.abstain): the verdict, its report, the summary line and the history
    carry the share of the batch answered with the abstention label, computed by Predictor's own step."""
    import shutil

    import numpy as np
    from evalkit import add_abstention

    from domaintune.predict.predictor import Predictor

    root = tmp_path / "p"
    for part in ("models", "audited", "params.yaml", "other.txt"):
        (shutil.copytree if (project / part).is_dir() else shutil.copy)(project / part, root / part)
    splits, _ = tiny_splits(40)
    add_abstention(root / "models/export", splits["train"]["text"].tolist(), splits["train"]["label"].tolist(),
                   splits["validation"]["text"].tolist(), method="max_prob", recall=0.9)
    assert cli("monitor", "--batch", "other.txt", "--repo", str(root), "--out", "reports/other") in (0, 1)
    verdict = json.loads((root / "reports/other/verdict.json").read_text())
    texts = (root / "other.txt").read_text().splitlines()
    _, abstained = Predictor.load(root / "models/export").predict_with_abstention(texts)
    ab = verdict["abstention"]
    assert ab["abstained"] == int(np.sum(abstained)) and ab["rate"] == pytest.approx(np.mean(abstained))
    assert ab["label"] == "out_of_scope" and ab["method"] == "max_prob"
    assert "<section id='abstention'>" in (root / "reports/other/report.html").read_text(encoding="utf-8")
    assert f"abstained on {ab['abstained']} of {verdict['rows']}" in capsys.readouterr().out
    with (root / "reports/monitor_history.csv").open(newline="") as fh:
        hist = list(csv.DictReader(fh))
    assert float(hist[-1]["abstain_rate"]) == pytest.approx(ab["rate"])
