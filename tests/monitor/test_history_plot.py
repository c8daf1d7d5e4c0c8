"""The monitor history plot renders: `dvc plots show` turns dvc.yaml's plots and the history CSV into one page
of inline scripts, and every one of them must parse as JavaScript, whatever the titles and batch names hold.

DVC writes a plot's id unescaped into `vegaEmbed('#<id>')` and copies the spec (title and every CSV cell) into a
<script> as JSON without escaping "</". So dvc.yaml gives each plot a plain id and a `title:` without "</", and
the monitor writes its history cells with "</" escaped.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from domaintune.monitor.monitoring import append_history

REPO = Path(__file__).resolve().parents[2]
SAFE_ID = re.compile(r"[A-Za-z0-9_-]+")
HOSTILE = ["it's the reference's batch.csv", 'a "quoted" name.csv', "in/a</script><script>alert(1)</script>.csv"]


def plot_problems(plots: list) -> list[str]:
    """What would break the page DVC renders from these dvc.yaml plot entries."""
    problems = []
    for entry in plots:
        (pid, body), = (entry.items() if isinstance(entry, dict) else [(entry, None)])
        if not SAFE_ID.fullmatch(pid):
            problems.append(f"plot id {pid!r}: DVC writes it unescaped into vegaEmbed('#...'); use [A-Za-z0-9_-]")
        title = (body or {}).get("title") if isinstance(body, dict) else None
        if not title:
            problems.append(f"plot {pid!r}: no title: (the id is what the page would show)")
        elif "</" in title:
            problems.append(f"plot {pid!r}: '</' in the title ends DVC's <script>")
    return problems


def test_every_plot_in_dvc_yaml_has_a_safe_id_and_title():
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    assert plot_problems(plots) == []
    # the check is not vacuous: what dvc.yaml held before, and a title that would end the script
    assert len(plot_problems([{"Monitor history vs the reference's measured accuracy": {"x": "index"}}])) == 2
    assert "ends DVC's <script>" in plot_problems([{"ok_id": {"title": "a </script> b"}}])[0]


def _verdict(i: int) -> dict:
    return {"drift": bool(i % 2), "rows": 100, "p_values": {"n_chars": 0.5 / (i + 1)},
            "signals": {"n_chars": {"drifted": bool(i % 2)}},
            "accuracy": {"estimated": 0.9 - 0.05 * i, "ci_low": 0.85 - 0.05 * i, "ci_high": 0.95 - 0.05 * i,
                         "reference_estimated": 0.92, "reference_measured": 0.93}}


def render(root: Path, extra_plots: list | None = None) -> str:
    """The project's dvc.yaml plots (plus `extra_plots`) rendered by `dvc plots show` in `root`."""
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    (root / "dvc.yaml").write_text(yaml.safe_dump({"plots": dvc_yaml["plots"] + (extra_plots or [])}))
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=root, check=True)
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")
    shutil.copy(REPO / ".dvc" / "offline_plots.html", root / ".dvc" / "offline_plots.html")
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    r = subprocess.run([dvc, "plots", "show", "-o", "page"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return (root / "page" / "index.html").read_text(encoding="utf-8")


def page_scripts(page: str) -> list[str]:
    """Every inline script of the page but the vendored vega libraries."""
    return [body for attrs, body in re.findall(r"<script([^>]*)>(.*?)</script>", page, re.S)
            if "data-vendored" not in attrs]


def test_the_history_plot_page_parses_with_hostile_titles_and_batch_names(tmp_path):
    esprima = pytest.importorskip("esprima")
    history = tmp_path / "reports" / "monitor_history.csv"
    for i, name in enumerate(HOSTILE):
        append_history(history, _verdict(i), name, f"{i:064x}")
    append_history(history, None, "bad.csv", "f" * 64, error="bad.csv row 2 (text): '</script>' is not a text")
    hostile_title = {"hostile_title": {"title": "It's \"quoted\" - the reference's <b>estimate</b>",
                                       "template": "linear", "x": "index",
                                       "y": {"reports/monitor_history.csv": ["estimated_accuracy"]}}}
    page = render(tmp_path, [hostile_title])
    scripts = page_scripts(page)
    assert len(scripts) >= 3 and sum("reports/monitor_history.csv" in s or "estimated_accuracy" in s
                                     for s in scripts) >= 3
    for body in scripts:
        esprima.parseScript(body)  # raises on a script that a browser would refuse
    ids = re.findall(r"vegaEmbed\('#([^']*)'", page)
    assert all(SAFE_ID.fullmatch(i) for i in ids), ids
    assert {"monitor_accuracy", "monitor_drift", "hostile_title"} <= set(ids)
    # the hostile names reached the page as data, inside their scripts
    assert "it's the reference's batch.csv" in page and "alert(1)" in page
    assert "</script><script>alert" not in page


def test_the_monitor_report_keeps_hostile_texts_inside_its_verdict_script():
    """report.html: the verdict is embedded as JSON in a <script>; batch texts with quotes, apostrophes and
    </script> stay inside it (and round-trip), every element id is a plain name, and the texts show escaped."""
    import json as _json

    from domaintune.monitor.report import read_embedded_verdict, verdict_section

    ex = [{"row": i + 1, "text": t, "predicted": "it's", "confidence": 0.5, "atypicality": 0.1}
          for i, t in enumerate(HOSTILE)]
    v = {"drift": True, "rows": 3, "reasons": ["n_chars drifted: it's \"long\" </script>"], "error_rate_note": "x",
         "signals": {"n_chars": {"p_value": 1e-9, "effect": 0.5, "drifted": True, "significant": True,
                                 "explanation": "</script> it's", "reference_mean": 1.0, "batch_mean": 2.0}},
         "per_test_level": 0.001, "min_effect": 0.1, "accuracy": None, "most_atypical": ex, "least_confident": ex,
         "batch": HOSTILE[2]}
    html = verdict_section(v)
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
    assert len(scripts) == 1 and "application/json" in scripts[0][0]
    assert _json.loads(scripts[0][1].replace("<\\/", "</")) == _json.loads(_json.dumps(v))
    assert read_embedded_verdict(f"<html>{html}</html>") == _json.loads(_json.dumps(v))
    assert all(SAFE_ID.fullmatch(i) for i in re.findall(r"\sid='([^']*)'", html))
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in html and "it&#x27;s" in html
