"""What a run tells a person: progress lines when output is not a terminal, one-line epoch results,
the stage runner's "done in" line, and `domaintune summary` before anything ran.

The summary of a real run, the stage logs and the offline plots page are checked on the tiny real
DAG in test_pipeline_e2e.py.
"""
from __future__ import annotations

import json
import logging

import pytest

from domaintune.core.progress import Progress
from domaintune.core.stage import run_stage, stage_parser
from domaintune.train.classifier import epoch_line


def test_progress_prints_plain_lines_when_not_a_terminal(monkeypatch, caplog):
    monkeypatch.setenv("DOMAINTUNE_PROGRESS_SECONDS", "0")
    caplog.set_level(logging.INFO, logger="domaintune")
    with Progress(4, "finetune seed 7", "step", tty=False) as p:
        for k in range(4):
            p.update(1, loss=f"{0.5 - k / 10:.4f}")
    lines = [r.getMessage() for r in caplog.records]
    # every update but the last (the stage's own summary line reports the end)
    assert len(lines) == 3, lines
    assert lines[0].startswith("finetune seed 7: 1/4 steps (25%), ") and lines[0].endswith("loss 0.5000")
    assert "left" in lines[0] and "\r" not in "".join(lines)


def test_progress_is_silent_for_short_work(monkeypatch, caplog):
    monkeypatch.delenv("DOMAINTUNE_PROGRESS_SECONDS", raising=False)  # default: a line every 30 s
    caplog.set_level(logging.INFO, logger="domaintune")
    with Progress(50, "predicting 3200 texts", "batch", tty=False) as p:
        for _ in range(50):
            p.update(1)
    assert caplog.records == []


def test_epoch_results_are_one_readable_line():
    ep = {"epoch": 0, "step": 10, "train_loss": 0.40671, "val_accuracy": 0.9, "val_macro_f1": 0.88512,
          "val_loss": 0.33}
    line = epoch_line(42, 0, 3, ep, best=True)
    assert line == ("seed 42 epoch 1/3: train loss 0.4067 | validation accuracy 0.9000, macro-F1 0.8851, "
                    "loss 0.3300 (best so far)")
    assert "{" not in epoch_line(42, 1, 3, {"epoch": 1, "step": 20, "train_loss": 0.2}, best=False)


def test_stage_runner_times_the_stage_and_records_it(tmp_path, capsys):
    metrics = tmp_path / "m.json"

    def fn(args):
        metrics.write_text(json.dumps({"rows": 3}))
        return "wrote 3 rows"

    ap = stage_parser("demo", "demo stage")
    assert run_stage("demo", fn, ap, ["--metrics", str(metrics)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("demo: done in ") and err.rstrip().endswith(" s; wrote 3 rows"), err
    data = json.loads(metrics.read_text())
    assert data["rows"] == 3 and isinstance(data["stage_seconds"], float)


def test_summary_without_metrics_is_one_line(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["summary", "--repo", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "dvc repro" in err
    assert not (tmp_path / "metrics").exists()


@pytest.mark.parametrize("flag", ["--write", "--json"])
def test_summary_help_names_every_option(flag, capsys):
    from pipelines.cli import main

    with pytest.raises(SystemExit):
        main(["summary", "--help"])
    out = capsys.readouterr().out
    assert flag in out and "default" in out


def test_summary_of_a_corrupt_metrics_file_is_one_line(tmp_path, capsys):
    from pipelines.cli import main

    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "evaluate.json").write_text('{"after": {"accuracy": 0.9')
    assert main(["summary", "--repo", str(tmp_path), "--write"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "metrics/evaluate.json" in err and "not valid JSON" in err
    assert not (tmp_path / "metrics" / "summary.json").exists()  # no partial output


def test_quiet_libraries_reaches_libraries_already_imported(monkeypatch):
    """The env switches are read at import time; a library imported earlier is told directly."""
    import transformers  # noqa: F401  (imported before the runner sets the environment)
    from transformers.utils import logging as hf_logging

    from domaintune.core.stage import QUIET_ENV, quiet_libraries

    for k in QUIET_ENV:
        monkeypatch.delenv(k, raising=False)
    calls = []
    monkeypatch.setattr(hf_logging, "disable_progress_bar", lambda: calls.append("bars off"))
    hf_logging.set_verbosity_warning()
    quiet_libraries()
    assert calls == ["bars off"] and hf_logging.get_verbosity() == logging.ERROR
    assert all(__import__("os").environ[k] == v for k, v in QUIET_ENV.items())
