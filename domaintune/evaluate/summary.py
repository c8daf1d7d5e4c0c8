"""The run summary: a dozen headline numbers from the stages' metrics files, as JSON and as ten lines.

`domaintune summary` (pipelines/cli.py) prints it; `--write` also saves metrics/summary.json, the one file
dvc.yaml lists under `metrics:`, so `dvc metrics show` / `diff` stay one readable row while
the stages' detailed metrics (metrics/<stage>.json) stay in git next to it. The headline file holds quality
and data numbers only: the stage times go to metrics/timings.json (git-ignored: this machine's last run; each
stage's own metrics file keeps its stage_seconds), so `dvc metrics diff` between two versions shows what
changed in the model, not how busy the machine was. Nothing here computes a metric: every number is read
from what a stage wrote.
Only the standard library is imported, so the CLI stays fast.
"""
from __future__ import annotations

import json
from pathlib import Path

STAGES = ("ingest", "dedupe", "audit", "dapt", "finetune", "evaluate", "export", "drift")
SUMMARY_FILE = Path("metrics") / "summary.json"
TIMINGS_FILE = Path("metrics") / "timings.json"
TIMING_KEYS = ("seconds",)  # what build_summary holds that is time, not quality: kept out of SUMMARY_FILE
MODEL_DIR = "models/export"


def load_metrics(root: str | Path) -> dict[str, dict]:
    """Each stage's metrics/<stage>.json that exists, by stage name."""
    out = {}
    for stage in STAGES:
        path = Path(root) / "metrics" / f"{stage}.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise SummaryError(f"{path}: not valid JSON ({exc}); re-run the {stage} stage (dvc repro)") from None
            if not isinstance(data, dict):
                raise SummaryError(f"{path}: expected a JSON object, got {type(data).__name__}")
            out[stage] = data
    return out


class SummaryError(ValueError):
    """A stage's metrics file cannot be read; the message names it."""


def _get(d: dict, *keys):
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _num(v, digits: int = 4):
    return round(float(v), digits) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def build_summary(metrics: dict[str, dict]) -> dict:
    """The headline numbers; a key is absent when the stage that makes it has not run yet."""
    ing, ded, aud = metrics.get("ingest", {}), metrics.get("dedupe", {}), metrics.get("audit", {})
    dapt, ft, ev = metrics.get("dapt", {}), metrics.get("finetune", {}), metrics.get("evaluate", {})
    s: dict = {
        "rows_in": ing.get("rows_read"),
        "rows_out": sum(aud["rows_out"].values()) if isinstance(aud.get("rows_out"), dict) else None,
        "rows_rejected": ing.get("rejected"),
        "rows_deduplicated": ded.get("removed_total"),
        "rows_dropped_by_audit": _get(aud, "rows_acted_on", "dropped"),
        "rows_flagged": aud.get("issues_found"),
        "dapt_perplexity_before": _num(dapt.get("perplexity_before"), 2),
        "dapt_perplexity_after": _num(dapt.get("perplexity_after"), 2),
        "val_accuracy": _num(ft.get("val_accuracy")),
        "val_macro_f1": _num(ft.get("val_macro_f1")),
        "test_accuracy": _num(_get(ev, "after", "accuracy")),
        "test_macro_f1": _num(_get(ev, "after", "macro_f1")),
        "test_ece_before": _num(_get(ev, "before", "ece")),
        "test_ece_after": _num(_get(ev, "after", "ece")),
        "temperature": _num(ev.get("temperature"), 3),
        # base.task token_classification (absent, so dropped, for the other tasks)
        "val_entity_f1": _num(ft.get("val_entity_f1")),
        "test_entity_f1": _num(_get(ev, "entity", "f1")),
        "test_token_accuracy": _num(ev.get("token_accuracy")),
        "test_word_ece_after": _num(_get(ev, "calibration", "ece_after")),
    }
    parts = [s["rows_rejected"], s["rows_deduplicated"], s["rows_dropped_by_audit"]]
    if all(isinstance(p, int) for p in parts):
        s["rows_removed"] = sum(parts)
    variants = _get(metrics.get("export", {}), "variants") or {}
    export = {name: {"size_mb": round(v["size_bytes"] / 1e6, 1), "accuracy": _num(v.get("accuracy")),
                     **({"entity_f1": _num(v["entity_f1"])} if "entity_f1" in v else {})}
              for name, v in variants.items() if isinstance(v, dict) and v.get("size_bytes")}
    if export:
        s["export"] = export
    seconds = {st: _num(m["stage_seconds"], 1) for st, m in metrics.items() if _num(m.get("stage_seconds")) is not None}
    if seconds:
        s["seconds"] = {**seconds, "total": round(sum(seconds.values()), 1)}
    s["stages_missing"] = [st for st in STAGES if st not in metrics] or None
    return {k: v for k, v in s.items() if v is not None}


def _duration(sec: float) -> str:
    sec = round(sec)
    return f"{sec // 60} min {sec % 60} s" if sec >= 60 else f"{sec} s"


def _f(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _scores(s: dict, split: str) -> str:
    if f"{split}_accuracy" not in s:
        return "-"
    return f"accuracy {_f(s.get(f'{split}_accuracy'))}, macro-F1 {_f(s.get(f'{split}_macro_f1'))}"


def format_table(s: dict) -> str:
    """Ten lines: data, cleaning, DAPT, validation, test, calibration, export, time, model, missing."""
    g = s.get
    removed = (f"{g('rows_removed')} (ingest rejected {g('rows_rejected')}, dedupe {g('rows_deduplicated')}, "
               f"audit dropped {g('rows_dropped_by_audit')})" if "rows_removed" in s else "-")
    ece = (f"{_f(g('test_ece_before'))} -> {_f(g('test_ece_after'))} after temperature {_f(g('temperature'), '.2f')}"
           if "test_ece_after" in s else "-")
    dapt = (f"{g('dapt_perplexity_before'):.0f} -> {g('dapt_perplexity_after'):.0f} (held-out MLM)"
            if "dapt_perplexity_after" in s else ("off" if "dapt" not in g("stages_missing", []) else "-"))
    export = "; ".join(f"{n} {v['size_mb']:.1f} MB, accuracy {_f(v.get('accuracy'))}"
                       for n, v in (g("export") or {}).items()) or "-"
    secs = g("seconds") or {}
    slow = sorted(((v, k) for k, v in secs.items() if k != "total"), reverse=True)[:3]
    # Each stage's time is from its last real run (a stage DVC skipped keeps its old time).
    time_line = (f"{_duration(secs['total'])} over {len(secs) - 1} stages (slowest: "
                 + ", ".join(f"{k} {_duration(v)}" for v, k in slow) + ")" if secs else "-")
    rows = [
        ("rows", f"{_f(g('rows_in'), 'd')} in -> {_f(g('rows_out'), 'd')} out"),
        ("removed", removed),
        ("flagged by audit", f"{_f(g('rows_flagged'), 'd')} label issues (see reports/audit)"),
        ("DAPT perplexity", dapt),
        ("validation", _scores(s, "val")),
        ("test (calibrated)", _scores(s, "test")),
        ("test ECE", ece),
        ("export", export),
        ("stage times", time_line),
        ("not run yet", ", ".join(g("stages_missing", [])) or "-"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_summary(root: str | Path) -> dict:
    """metrics/summary.json (the headline, no timings) and metrics/timings.json (the stage times); returns the
    whole summary, times included, for the table."""
    s = build_summary(load_metrics(root))
    _write(Path(root) / SUMMARY_FILE, {k: v for k, v in s.items() if k not in TIMING_KEYS})
    timings = {k: s[k] for k in TIMING_KEYS if k in s}
    if timings:
        _write(Path(root) / TIMINGS_FILE, timings)
    else:
        (Path(root) / TIMINGS_FILE).unlink(missing_ok=True)  # no stale times beside a new summary
    return s
