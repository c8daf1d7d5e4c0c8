"""The monitor's HTML report, verdict first, readable offline.

Top to bottom: the verdict and its reasons (with the error rate it holds); the estimated accuracy
against the reference's; every tested signal sorted by drift (smallest p-value first), each with a
one-line explanation; the 10 most atypical and the 10 least confident texts; then evidently's
per-feature details. Everything above the details is rendered from the verdict dict that is also
written as verdict.json, and that dict is embedded in the page (script#domaintune-verdict), so the
two cannot disagree.
"""
from __future__ import annotations

import json
from html import escape
from pathlib import Path

import pandas as pd

ROUND_DECIMALS = 9
STYLE = ("<style>.dt{font-family:sans-serif;margin:1.5em}.dt table{border-collapse:collapse}"
         ".dt td,.dt th{border:1px solid #bbb;padding:3px 8px;text-align:left}.dt .bad{color:#b00020}"
         ".dt .ok{color:#146c2e}</style>")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else escape(str(x))


def _verdict_word(s: dict) -> str:
    if s["drifted"]:
        return "drifted"
    return "significant, effect too small" if s.get("significant") else "no drift"


def verdict_section(v: dict) -> str:
    head = ("<h1 class='bad'>DRIFT detected</h1>" if v["drift"] else "<h1 class='ok'>No drift detected</h1>")
    small = [n for n, s in v["signals"].items() if s.get("significant") and not s["drifted"]]
    quiet = "no signal is both significant and at least drift.min_effect in effect" + (
        f" ({', '.join(small)}: significant, effect too small)" if small else "")
    reasons = "".join(f"<li>{escape(r)}</li>" for r in v["reasons"]) or f"<li>{escape(quiet)}</li>"
    out = [f"<section id='verdict'>{head}<p>{v['rows']} texts. {escape(v['error_rate_note'])}.</p>"
           f"<h2>Reasons</h2><ul>{reasons}</ul></section>"]
    a = v.get("accuracy")
    if a:
        out.append(accuracy_section(a, v))
    ab = v.get("abstention")
    if ab:
        out.append(f"<section id='abstention'><h2>Abstention</h2><p>The model answered "
                   f"<code>{escape(ab['label'])}</code> ({escape(ab['method'])} score under its threshold) for "
                   f"{ab['abstained']} of {v['rows']} texts: {100 * ab['rate']:.1f}%.</p></section>")
    rows = "".join(
        f"<tr class='{'bad' if s['drifted'] else ''}'><td>{escape(name)}</td><td>{_fmt(s['p_value'])}</td>"
        f"<td>{_fmt(s.get('effect'))}</td><td>{_verdict_word(s)}</td><td>{_fmt(s.get('reference_mean'))}</td>"
        f"<td>{_fmt(s.get('batch_mean'))}</td><td>{escape(s['explanation'])}</td></tr>"
        for name, s in v["signals"].items())
    out.append(f"<section id='signals'><h2>Signals, most drifted first</h2><p>Drifted: p-value below "
               f"{v['per_test_level']:.3g} and effect at least {v.get('min_effect', 0):g} (a share of the texts, "
               f"total-variation scale).</p><table><tr><th>signal</th><th>p-value</th><th>effect</th><th>verdict</th>"
               f"<th>reference mean</th><th>batch mean</th><th>what it measures</th></tr>{rows}</table></section>")
    for key, title in (("most_atypical", "10 most atypical texts (farthest from any reference text)"),
                       ("least_confident", "10 least confident texts")):
        ex = "".join(f"<tr><td>{e['row']}</td><td>{escape(e['text'])}</td><td>{escape(e['predicted'])}</td>"
                     f"<td>{e['confidence']:.3f}</td><td>{e['atypicality']:.3f}</td></tr>" for e in v[key])
        out.append(f"<section id='{key}'><h2>{title}</h2><table><tr><th>row</th><th>text</th><th>predicted</th>"
                   f"<th>confidence</th><th>atypicality</th></tr>{ex}</table></section>")
    blob = json.dumps(v, sort_keys=True).replace("</", "<\\/")
    out.append(f"<script type='application/json' id='domaintune-verdict'>{blob}</script>")
    return f"{STYLE}<div class='dt'>{''.join(out)}<h2>Details (evidently)</h2></div>"


def accuracy_section(a: dict, v: dict) -> str:
    """The estimate beside the reference's estimate (the same estimator on the validation rows: like with
    like) and the reference's measured value (measured with measured), then why a drop is or is not
    significant, in one sentence, and whether the estimate can be relied on."""
    unreliable = "" if a.get("reliable", True) else f"<p class='bad'>{escape(a['reliability'])}.</p>"
    return ("<section id='accuracy'><h2>Estimated accuracy (no labels)</h2>" + unreliable +
            "<table><tr><th></th><th>batch (estimated)</th><th>95% CI</th><th>reference (estimated the same way)</th>"
            "<th>reference (measured on validation)</th></tr>"
            f"<tr><td>accuracy</td><td>{_fmt(a['estimated'])}</td><td>{_fmt(a['ci_low'])} - {_fmt(a['ci_high'])}"
            f"</td><td>{_fmt(a.get('reference_estimated'))}</td><td>{_fmt(a['reference_measured'])}</td></tr>"
            f"<tr><td>macro-F1</td><td>{_fmt(a['estimated_macro_f1'])}</td><td>{_fmt(a['macro_f1_ci_low'])} - "
            f"{_fmt(a['macro_f1_ci_high'])}</td><td>{_fmt(a.get('reference_estimated_macro_f1'))}</td>"
            f"<td>{_fmt(a['reference_measured_macro_f1'])}</td></tr></table>"
            f"<p>{escape(_sentence(a.get('significance', '')))}</p>"
            f"<p>{escape(a['method'])}; {escape(a.get('reliability', ''))}. Mean confidence "
            f"{v['mean_confidence_current']:.3f} vs {v['mean_confidence_reference']:.3f} on the reference.</p>"
            "</section>")


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("." if text and not text.endswith(".") else "")


class DetailsProcess:
    """evidently's details rendered by a child process. evidently takes seconds to import (plotly, its
    metric registry); the child imports it on the second core while the monitor loads its model and runs
    the forward pass, then renders each report it is sent. One request per line on stdin (JSON: parquet
    paths of both frames, the columns, the output path); one 'DETAILS ok' or 'DETAILS error: ...' line
    back on stdout. A failure is raised here, with the child's own message."""

    def __init__(self):
        import os
        import subprocess
        import sys
        import tempfile

        import domaintune

        package_root = str(Path(domaintune.__file__).resolve().parents[1])  # the same domaintune in the child
        env = {**os.environ, "EVIDENTLY_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
        self.stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
        self.proc = subprocess.Popen([sys.executable, "-m", "domaintune.monitor.report", "--serve-details"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     env=env)

    def render(self, reference: pd.DataFrame, current: pd.DataFrame, numeric: list[str], categorical: str | None,
               path: Path) -> None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="domaintune-details-") as tmp:
            ref, cur = Path(tmp) / "reference.parquet", Path(tmp) / "current.parquet"
            reference.to_parquet(ref, index=False)
            current.to_parquet(cur, index=False)
            request = {"reference": str(ref), "current": str(cur), "numeric": list(numeric),
                       "categorical": categorical, "out": str(path)}
            try:
                self.proc.stdin.write(json.dumps(request) + "\n")
                self.proc.stdin.flush()
            except OSError:
                pass  # the child is gone: its reason is read below
            line = ""
            while not line.startswith("DETAILS "):
                line = self.proc.stdout.readline()
                if not line:
                    break
        if line.strip() != "DETAILS ok":
            raise RuntimeError("evidently details: " + (line.strip().removeprefix("DETAILS error: ") if line else
                                                        "the details process ended: " + self._stderr_tail()))

    def _stderr_tail(self) -> str:
        self.stderr.seek(0)
        lines = [x for x in self.stderr.read().splitlines() if x.strip()]
        return lines[-1] if lines else f"exit code {self.proc.poll()}"

    def close(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def serve_details() -> int:
    """The child of DetailsProcess: import evidently first, then render each request from stdin."""
    import sys

    import evidently.presets  # noqa: F401 - the slow import, done before the first request arrives

    for line in sys.stdin:
        req = json.loads(line)
        try:
            evidently_details(pd.read_parquet(req["reference"]), pd.read_parquet(req["current"]), req["numeric"],
                              req["categorical"], Path(req["out"]))
            print("DETAILS ok", flush=True)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
            print(f"DETAILS error: {type(exc).__name__}: {exc}".replace("\n", " "), flush=True)
    return 0


def evidently_details(reference: pd.DataFrame, current: pd.DataFrame, numeric: list[str], categorical: str | None,
                      path: Path) -> None:
    """Evidently's DataDriftPreset per feature (its own tests, shown as details; the verdict is ours).
    Values rounded at ROUND_DECIMALS (float noise is not drift); columns constant in either frame are
    left out (evidently's correlation view divides by their zero deviation) - they are in the table above."""
    import os
    import warnings

    os.environ.setdefault("EVIDENTLY_DISABLE_TELEMETRY", "1")
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    ref = reference[numeric].astype(float).round(ROUND_DECIMALS)
    cur = current[numeric].astype(float).round(ROUND_DECIMALS)
    cols = [c for c in numeric if ref[c].nunique() > 1 and cur[c].nunique() > 1]
    cats = [categorical] if categorical else []  # None: a model without labels (base.task generation)
    ref, cur = ref[cols].assign(**{c: reference[c].astype(str).to_numpy() for c in cats}), \
        cur[cols].assign(**{c: current[c].astype(str).to_numpy() for c in cats})
    definition = DataDefinition(numerical_columns=cols, categorical_columns=cats)
    report = Report([DataDriftPreset(columns=cols + cats)])
    with warnings.catch_warnings():  # scipy's chi-square divides by a label the reference never predicted
        warnings.simplefilter("ignore", RuntimeWarning)
        snap = report.run(Dataset.from_pandas(cur, data_definition=definition),
                          Dataset.from_pandas(ref, data_definition=definition))
    snap.save_html(str(path))


def write_report(v: dict, path: Path, reference: pd.DataFrame | None = None, current: pd.DataFrame | None = None,
                 numeric: list[str] | None = None, categorical: str | None = "pred_label",
                 details: DetailsProcess | None = None) -> None:
    """report.html: our verdict sections, then (when frames are given) evidently's details, rendered by
    `details` (a DetailsProcess) when given, else in this process."""
    path = Path(path)
    ours = verdict_section(v)
    if reference is None or current is None:
        path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>domaintune monitor</title>"
                        f"</head><body>{ours}</body></html>", encoding="utf-8")
        return
    if details is not None:
        details.render(reference, current, numeric or [], categorical, path)
    else:
        evidently_details(reference, current, numeric or [], categorical, path)
    text = path.read_text(encoding="utf-8")
    at = text.find("<body")
    at = text.find(">", at) + 1 if at >= 0 else 0
    path.write_text(text[:at] + ours + text[at:], encoding="utf-8")


def read_embedded_verdict(html: str) -> dict:
    """The verdict dict embedded in a report (for checks that page and verdict.json agree)."""
    start = html.index("id='domaintune-verdict'>") + len("id='domaintune-verdict'>")
    return json.loads(html[start:html.index("</script>", start)].replace("<\\/", "</"))


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--serve-details"]:
        raise SystemExit("usage: python -m domaintune.monitor.report --serve-details (started by DetailsProcess)")
    raise SystemExit(serve_details())
