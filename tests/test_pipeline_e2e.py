"""End to end: the real dvc.yaml, run by real DVC on a copy of the repo, tiny model and data.

Checks what a user relies on: every stage's outs appear, a second `dvc repro`
runs nothing, and touching one finetune param re-runs finetune and only the
stages downstream of it.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from _fake_pipeline import env, make_tiny_dag, set_params, sh, tiny_rows

DOWNSTREAM_OF_FINETUNE = {"finetune", "evaluate", "export", "drift"}


def stages_run(output: str) -> set[str]:
    """Stages DVC ran, from `dvc repro`'s stdout (its "Running stage" lines go to stdout, warnings to stderr)."""
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_bert):
    """The tiny DAG after what `make run` does: `dvc repro`, then `domaintune summary --write`."""
    rows = tiny_rows(36) + [("T99999", "where is my parcel 100", "shipping")]  # an exact duplicate for dedupe
    root = make_tiny_dag(tmp_path_factory.mktemp("e2e") / "domaintune", tiny_bert, rows)
    # no periodic progress lines on a slow machine: the log is checked line by line below
    proc = subprocess.run(["dvc", "repro"], cwd=root, env={**env(), "DOMAINTUNE_PROGRESS_SECONDS": "3600"},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # cwd first on sys.path: the project's own copy of the code answers, as in a clone
    summary = sh(root, sys.executable, "-m", "pipelines.cli", "summary", "--write")
    return root, proc.stdout, proc.stderr, summary


def test_first_repro_runs_every_stage_and_writes_all_outs(project):
    root, first, _, _ = project
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())
    assert stages_run(first) == set(dvc["stages"])
    for name, stage in dvc["stages"].items():
        for entry in stage.get("outs", []) + stage.get("metrics", []):
            path = entry if isinstance(entry, str) else next(iter(entry))
            assert (root / path).exists(), f"stage {name} did not write {path}"
    ingested = json.loads((root / "metrics/ingest.json").read_text())
    assert ingested["rows_read"] == 3 * 36 + 1 and ingested["rejected"] == 0
    # The one duplicated text is removed once: within its split or as a leak out of validation/test.
    removed = pd.read_csv(root / "data/deduped/removed.csv")
    copies = removed[removed["text"] == "where is my parcel 100"]
    assert len(copies) == 1 and copies["reason"].iloc[0] in {"exact_duplicate", "cross_split_leak"}
    deduped = json.loads((root / "metrics/dedupe.json").read_text())
    assert deduped["removed_total"] == len(removed)
    hashes = json.loads((root / "data/audited/hashes.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{64}", hashes["dataset"])


def test_stage_logs_are_quiet_and_timed(project):
    """Every line the stages print is their own ([stage] ... or "stage: done in X s"): no library
    bars, load reports, warnings or tracebacks; each stage says what it did in a few lines."""
    root, out, log, _ = project
    stages = list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
    # stdout is DVC's own progress alone (a library printing to stdout would show up here)
    dvc_own = r"(Running stage '\w+':|> python -m stages\.\w+ .*|(Generating|Updating) lock file 'dvc\.lock'|" \
              r"Use `dvc push` to send your updates to remote storage\.|)"
    assert [ln for ln in out.splitlines() if not re.fullmatch(dvc_own, ln)] == [], out
    lines = log.splitlines()
    theirs = [ln for ln in lines if not re.match(rf"(\[({'|'.join(stages)})\] |({'|'.join(stages)}): done in )", ln)]
    assert theirs == [], "\n".join(theirs)
    assert not re.search(r"warn|traceback|error|\r", log, re.IGNORECASE), log
    for stage in stages:
        own = [ln for ln in lines if ln.startswith((f"[{stage}] ", f"{stage}: "))]
        assert re.fullmatch(rf"{stage}: done in \d+\.\d s(; .+)?", own[-1]), own
        assert len(own) <= 3, own  # what it did (counts) and its duration, in one to three lines


def test_run_summary(project):
    root, _, _, table = project
    lines = table.splitlines()
    values = [re.split(r"\s{2,}", ln, maxsplit=1)[1] for ln in lines]
    assert len(lines) == 10 and not [v for v in values[:-1] if re.search(r"(^|\s)-([\s,;]|$)", v)], table
    assert lines[-1].split() == ["not", "run", "yet", "-"]  # every stage ran
    summary = json.loads((root / "metrics/summary.json").read_text())
    m = {p.stem: json.loads(p.read_text()) for p in (root / "metrics").glob("*.json")
         if p.stem not in ("summary", "timings")}
    assert summary["rows_in"] == m["ingest"]["rows_read"] == 109
    assert summary["rows_out"] == sum(m["audit"]["rows_out"].values())
    assert summary["rows_removed"] == m["ingest"]["rejected"] + m["dedupe"]["removed_total"] \
        + m["audit"]["rows_acted_on"]["dropped"] == 109 - summary["rows_out"]
    assert summary["dapt_perplexity_after"] == round(m["dapt"]["perplexity_after"], 2)
    for key, (stage, *path) in {"test_accuracy": ("evaluate", "after", "accuracy"),
                                "test_macro_f1": ("evaluate", "after", "macro_f1"),
                                "test_ece_before": ("evaluate", "before", "ece"),
                                "test_ece_after": ("evaluate", "after", "ece"),
                                "val_macro_f1": ("finetune", "val_macro_f1")}.items():
        value = m[stage]
        for k in path:
            value = value[k]
        assert summary[key] == round(value, 4), key
    assert set(summary["export"]) == {"float32", "onnx", "onnx-int8"}  # export.variants' default
    assert summary["export"]["onnx-int8"]["size_mb"] == round(
        m["export"]["variants"]["onnx-int8"]["size_bytes"] / 1e6, 1)
    assert "seconds" not in summary  # the headline file is quality, not time
    timings = json.loads((root / "metrics/timings.json").read_text())
    assert set(timings["seconds"]) == set(m) | {"total"} and timings["seconds"]["total"] > 0
    # `dvc metrics show` is the headline file alone: one row, not one per stage
    shown = json.loads(sh(root, "dvc", "metrics", "show", "--json"))
    files = {f for rev in shown.values() for f in rev.get("data", {})}
    assert files == {"metrics/summary.json"}, files


def test_versions_of_real_stages_show_headline_metrics(project):
    """A version recorded from the real stages' metrics carries accuracy, macro-F1 and ECE after calibration."""
    from domaintune.registry import plumbing, versions

    root = project[0]
    record = versions.build_record(root, plumbing.lock_outs(root))
    after = json.loads((root / "metrics/evaluate.json").read_text())["after"]
    v = versions.Version("domaintune@v1.0.0", "v1.0.0", "0" * 40, "2026-01-01", record)
    assert v.key_metrics() == {f"evaluate.{k}": after[k] for k in ("accuracy", "macro_f1", "ece")}


def test_metrics_and_plots_render_offline(project):
    root = project[0]
    sh(root, "dvc", "plots", "show", "-o", "plots_html")
    page = (root / "plots_html" / "index.html").read_text()
    # The repo's page (.dvc/config plots.html_template) with vega, vega-lite and vega-embed inline.
    assert [m for m in re.findall(r'<script data-vendored="([^"@]+)@', page)] == ["vega", "vega-lite", "vega-embed"]
    assert "vegaEmbed('#eval_reliability'" in page
    # Nothing is fetched: no src/href/import/url() pointing anywhere, and outside the vendored
    # libraries (whose code holds XML namespace and doc strings) no http(s) URL but the specs' $schema.
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:|@import|url\(\s*["']?https?:""", page, re.I)
    own = re.sub(r'<script data-vendored="[^"]+">.*?</script>', "", page, flags=re.S)
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", own))
    assert urls == {"https://vega.github.io/schema/vega-lite/v5.json"}, urls


def test_second_repro_runs_nothing(project):
    root = project[0]
    out = sh(root, "dvc", "repro")
    assert stages_run(out) == set(), out
    assert "didn't change, skipping" in out, out  # stage log lines are on stdout: the check above is not vacuous


@pytest.mark.slow  # 31 s of DVC's own caching (a params change re-runs what reads it: tests/pipelines/test_flows.py)
def test_finetune_param_change_reruns_only_downstream(project):
    root = project[0]
    lr = yaml.safe_load((root / "params.yaml").read_text())["finetune"]["lr"]
    set_params(root, {"finetune.lr": lr * 2})
    out = sh(root, "dvc", "repro")
    assert stages_run(out) == DOWNSTREAM_OF_FINETUNE, out


# Paths the README names that `make run` does not write, each with the command that writes it.
WRITTEN_LATER = {
    "reports/monitor_history.csv": "monitor", "data/review_queue.csv": "monitor",
    "reports/monitor/": "monitor", "reports/audit/generation_issues.csv": "generation audit",
    "models/tiny-llama": "python -m domaintune.modeling.tinyllm", "models/checkpoints": "finetune (while it runs)",
    "models/dapt_checkpoints": "dapt (while it runs)", "dvc_plots/index.html": "dvc plots show",
    "reports/shadow/v1.3.0.jsonl": "serve --shadow v1.3.0", "metrics/promotion.json": "retrain",
    "reports/retrain.json": "monitor with monitor.on_drift: retrain, when it starts a local retrain",
    "reports/shadow/live.jsonl": "serve --shadow challenger, or the guard after a promotion",
    "reports/predictions/": "serve, predict", "reports/predictions/serve.jsonl": "serve",
    "reports/predictions/predict.jsonl": "predict", "metrics/feedback.json": "feedback",
    "reports/feedback_history.csv": "feedback",
    "models/export/openvino-int8/": "export with openvino-int8 in export.variants (not a default variant)",
    "reports/eval/risk_coverage.png": "evaluate with evaluate.abstain.method other than none",
    "reports/audit/token_issues.csv": "audit with base.task: token_classification",
    "reports/eval/errors/": "evaluate with base.task: token_classification",
}


def _named_paths(text: str) -> set[str]:
    return {m.rstrip(".,;:)") for m in re.findall(r"(?<![\w/.-])((?:models|reports|metrics|data|labels|dvc_plots)/"
                                                  r"[\w./*<>-]*)", text)}


def test_every_path_and_command_the_readme_and_make_run_name_exists_or_runs(project):
    """Pointers that lead somewhere: each output path the README and `make run`'s epilogue name exists after
    the run (or is listed with the command that writes it), and each `domaintune CMD` they name is a command."""
    from pipelines.cli import build_parser

    root = project[0]
    repo = Path(__file__).resolve().parents[1]
    readme, makefile = (repo / "README.md").read_text(), (repo / "Makefile").read_text()
    epilogue = "\n".join(ln for ln in makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0].splitlines() if "echo" in ln)
    missing = []
    for path in sorted(_named_paths(readme) | _named_paths(epilogue)):
        if "*" in path or "<" in path or path in WRITTEN_LATER or path.rstrip("/") + "/" in WRITTEN_LATER:
            continue
        if not (root / path).exists():
            missing.append(path)
    assert not [p for p in _named_paths(epilogue) if p in missing], missing  # make run's own pointers: all there
    assert missing == [], f"named in the README but not written by the run: {missing}"
    assert all(p in readme for p in WRITTEN_LATER), [p for p in WRITTEN_LATER if p not in readme]
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    named = set(re.findall(r"(?:^|`|\$ )domaintune ([a-z][a-z-]+)", readme + "\n" + epilogue, re.M))
    assert named and named - commands == set(), named - commands


def _retrain(root, values: dict, summary: str) -> tuple[str, dict]:
    """What `domaintune retrain` does after the stages, without Prefect: compare with the champion, publish as a
    challenger, decide (pipelines.retrain's compare-with-champion and promotion-decision tasks)."""
    from domaintune.registry import versions
    from pipelines import promote

    set_params(root, {"export.variants": ["float32"], "drift.calibration_resamples": 20, **values})  # cheap stages
    sh(root, "dvc", "repro", "-q")
    result = promote.evaluate_challenger(root)
    v, created = versions.publish(root, summary)
    assert created
    promote.apply_decision(root, v.version, result)
    return v.version, result


def test_a_sabotaged_retrain_passes_the_gate_but_is_rejected(project, capsys):
    """Publishing is not promoting, on the real stages: a random head with lr 1e-12 passes the (open) absolute gate
    but loses the fair comparison with the served version and is rejected; prod stays. The numbers are in
    metrics/promotion.json, the version record and `domaintune versions`. (After the README test: it changes the
    workspace.)"""
    from domaintune.registry import promotion, versions
    from pipelines.cli import main

    root = project[0]
    v1, _ = versions.publish(root, "make run", stage="prod")
    bad, result = _retrain(root, {"finetune.head_init": "random", "finetune.lr": 1.0e-12}, "sabotaged")  # lr 0: refused
    assert result["decision"] == "reject" and result["champion"] == v1.version
    new_rows = result["evidence"]["sets"]["new_rows"]
    assert new_rows["rows"] > 0 and new_rows["excluded"] == 0  # same data: no test row was ever trained on
    assert new_rows["accuracy"]["high"] < 0 and "lower bound under -0.005" in result["reason"]
    assert versions.served_version(root) == v1.version
    recorded = json.loads(sh(root, "git", "show", f"{versions.get_version(root, bad).commit}:metrics/promotion.json"))
    assert recorded == result and versions.get_version(root, bad).record["metrics"]["promotion"] == result
    assert promotion.status(root)[bad]["stage"] == "rejected"
    assert main(["versions", "--repo", str(root)]) == 0
    assert f"  {bad} rejected: macro_f1" in capsys.readouterr().out


@pytest.mark.slow  # another 30 s of stages; the decision rule itself is tested in tests/evaluate/test_compare.py
def test_an_equal_retrain_is_promoted(project, capsys):
    """The served params again (exported as float32 only: the same predictions, an interval of [0, 0]) pass the
    comparison and are promoted."""
    from domaintune.registry import versions
    from pipelines.cli import main

    root = project[0]
    v1 = versions.served_version(root)
    good = yaml.safe_load(sh(root, "git", "show", f"{versions.get_version(root, v1).commit}:params.yaml"))["finetune"]
    same, result = _retrain(root, {"finetune.head_init": good["head_init"], "finetune.lr": good["lr"]}, "again")
    assert result["decision"] == "promote", result["reason"]
    assert versions.served_version(root) == same
    assert main(["versions", "--repo", str(root)]) == 0
    assert f"  {same} prod: vs {v1}: macro_f1" in capsys.readouterr().out
