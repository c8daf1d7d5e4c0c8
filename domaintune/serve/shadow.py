"""Shadow deployment: the candidate's predictions logged next to the served ones, and their summary.

The log is JSONL, one line per text:
    {"id": "...", "time": "...", "text_sha256": "...", "agree": true,
     "served": {"version": "v1.0.0", "label": "refund", "confidence": 0.91},
     "shadow": {"version": "v1.1.0", "label": "refund", "confidence": 0.88}}
The id is the text's id in the server's prediction log (domaintune/predict/log.py), where both answers are
logged in full too. The request text is stored as the server's `log_text` setting says (ServeSettings,
`--log-text`, the one setting for every log of request text the server writes): `hash` (default) its SHA-256
as "text_sha256",
`plain` the text itself as "text", `none` neither.
confidence is the model's calibrated probability of its own label (multi-label: its highest
label probability). `domaintune shadow-report LOG` reads it back: agreement, per-class
disagreement, and each model's confidence on the rows where they disagree.
"""
from __future__ import annotations

import json
import statistics
import threading
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from domaintune.core.errors import DataError
from domaintune.core.io import json_lines
from domaintune.predict.log import LOG_TEXT, text_fields


class ShadowLog:
    def __init__(self, path: Path, text: str = "hash"):
        if text not in LOG_TEXT:
            raise ValueError(f"log_text must be one of {', '.join(LOG_TEXT)}, got {text!r}")
        self.text = text
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")
        self._lock = threading.Lock()
        self.rows = 0

    def write(self, texts: list[str], served, served_probs: np.ndarray, shadow, shadow_probs: np.ndarray,
              ids: list[str] | None = None) -> None:
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        a_labels, b_labels = served.decide(served_probs), shadow.decide(shadow_probs)
        lines = []
        for i, text in enumerate(texts):
            a = {"version": served.version, "label": a_labels[i], "confidence": round(float(served_probs[i].max()), 6)}
            b = {"version": shadow.version, "label": b_labels[i], "confidence": round(float(shadow_probs[i].max()), 6)}
            rid = {"id": ids[i]} if ids is not None else {}
            lines.append(json.dumps({**rid, "time": now, **text_fields(text, self.text),
                                     "agree": a["label"] == b["label"], "served": a, "shadow": b},
                                    ensure_ascii=False) + "\n")
        with self._lock:
            self._fh.writelines(lines)
            self._fh.flush()
            self.rows += len(lines)

    def close(self) -> None:
        with self._lock:
            self._fh.close()


def read_log(path: Path) -> list[dict]:
    """The log's rows; a line that is not a complete record raises DataError naming file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "shadow log not found")
    rows = []
    for n, row in json_lines(path):
        for side in ("served", "shadow"):
            part = row.get(side)
            if not isinstance(part, dict):
                raise DataError(path, n, side, "missing or not an object")
            if not isinstance(part.get("label"), str):
                raise DataError(path, n, f"{side}.label", "missing or not a string")
            conf = part.get("confidence")
            if isinstance(conf, bool) or not isinstance(conf, (int, float)) or not 0 <= conf <= 1:
                raise DataError(path, n, f"{side}.confidence", f"must be a number in [0, 1], got {conf!r}")
        rows.append(row)
    if not rows:
        raise DataError(path, None, None, "the shadow log holds no predictions")
    return rows


def _conf(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4), "median": round(statistics.median(values), 4)} \
        if values else {"mean": None, "median": None}


def summarise(path: Path, top_pairs: int = 10) -> dict:
    rows = read_log(path)
    served = [r["served"] for r in rows]
    shadow = [r["shadow"] for r in rows]
    disagree = [i for i, (a, b) in enumerate(zip(served, shadow)) if a["label"] != b["label"]]
    agree = sorted(set(range(len(rows))) - set(disagree))
    labels = sorted({a["label"] for a in served} | {b["label"] for b in shadow})
    per_class = []
    for lab in labels:
        involved = [i for i in range(len(rows)) if served[i]["label"] == lab or shadow[i]["label"] == lab]
        d = sum(1 for i in involved if served[i]["label"] != shadow[i]["label"])
        per_class.append({"label": lab, "served": sum(a["label"] == lab for a in served),
                          "shadow": sum(b["label"] == lab for b in shadow), "disagreements": d,
                          "disagreement_rate": round(d / len(involved), 4)})
    pairs = Counter((served[i]["label"], shadow[i]["label"]) for i in disagree)
    return {
        "log": str(path), "rows": len(rows),
        "served_versions": sorted({a.get("version", "?") for a in served}),
        "shadow_versions": sorted({b.get("version", "?") for b in shadow}),
        "agreement": round(1 - len(disagree) / len(rows), 4), "disagreements": len(disagree),
        "per_class": sorted(per_class, key=lambda c: (-c["disagreements"], c["label"])),
        "top_pairs": [{"served": a, "shadow": b, "count": c} for (a, b), c in pairs.most_common(top_pairs)],
        "confidence_on_disagreements": {"served": _conf([served[i]["confidence"] for i in disagree]),
                                        "shadow": _conf([shadow[i]["confidence"] for i in disagree])},
        "confidence_on_agreements": {"served": _conf([served[i]["confidence"] for i in agree]),
                                     "shadow": _conf([shadow[i]["confidence"] for i in agree])},
    }


def format_report(s: dict) -> str:
    out = [f"shadow log {s['log']}: {s['rows']} texts; served {', '.join(s['served_versions'])}, "
           f"shadow {', '.join(s['shadow_versions'])}",
           f"agreement {s['agreement']:.2%} ({s['disagreements']} disagreements)"]
    for what in ("disagreements", "agreements"):
        c = s[f"confidence_on_{what}"]
        if c["served"]["mean"] is not None:
            out.append(f"confidence on {what}: served mean {c['served']['mean']:.3f} (median "
                       f"{c['served']['median']:.3f}), shadow mean {c['shadow']['mean']:.3f} "
                       f"(median {c['shadow']['median']:.3f})")
    out += ["", "per class (predicted by served / shadow, disagreements, rate):"]
    width = max(len(c["label"]) for c in s["per_class"])
    for c in s["per_class"]:
        out.append(f"  {c['label'].ljust(width)}  {c['served']:6d} / {c['shadow']:<6d} {c['disagreements']:6d}"
                   f"  {c['disagreement_rate']:.2%}")
    if s["top_pairs"]:
        out += ["", "most frequent disagreements (served -> shadow):"]
        out += [f"  {p['served']} -> {p['shadow']}: {p['count']}" for p in s["top_pairs"]]
    return "\n".join(out)
