"""Diff between two versions (or a version and the workspace): headline metrics and data first.

What `domaintune diff` shows: the headline metrics (accuracy, macro-F1, ECE after calibration), the
dataset hash, then every differing param and metric, timings and hashes last.
"""
from __future__ import annotations

import re
from pathlib import Path

from domaintune.registry.plumbing import ARTIFACT, RegistryError, lock_outs
from domaintune.registry.versions import build_record, get_version, list_versions

WORKSPACE = "workspace"
# What `domaintune diff` leads with: test accuracy, macro-F1 and ECE after calibration. The evaluate
# stage writes them under "after"; the flat keys are what older records hold.
HEADLINE_METRICS = (("accuracy", ("evaluate.after.accuracy", "evaluate.accuracy")),
                    ("macro-F1", ("evaluate.after.macro_f1", "evaluate.macro_f1")),
                    ("ECE after calibration", ("evaluate.after.ece", "evaluate.ece")))
# Metric keys that are timings, speeds, byte sizes or hashes: shown last.
_LAST = re.compile(r"(second|_s$|_per_s|_ms(_|$)|time|latency|duration|throughput|bytes|hash|md5|sha\d*$)", re.I)


def default_diff_pair(root: Path) -> tuple[str, str]:
    """What `domaintune diff` compares with no arguments: the served version with the latest, or with
    the workspace when the served version is the latest (e.g. when only one version exists)."""
    versions = list_versions(root)
    if not versions:
        raise RegistryError(f"no versions of {ARTIFACT} yet: run `domaintune retrain` first")
    latest = versions[-1]
    served = next((v for v in versions if v.served), latest)
    return (served.version, latest.version) if served is not latest else (served.version, WORKSPACE)


def workspace_record(root: Path) -> dict:
    """The record publish would write for the workspace as it is now (params, metrics, dataset hash)."""
    outs = lock_outs(root) if (root / "dvc.lock").exists() else []
    return build_record(root, outs)


def _side(root: Path, name: str) -> tuple[str, dict]:
    if name == WORKSPACE:
        return WORKSPACE, workspace_record(root)
    v = get_version(root, name)
    return v.tag, v.record


def diff_versions(root: Path, a: str, b: str) -> dict:
    """What differs between two versions (either may be "workspace"), most important first:
    {'a', 'b', 'headline': {name: (x, y)}, 'dataset_hash'?: (x, y), 'params': {...}, 'metrics': {...},
    'timings_hashes': {...}}. 'metrics' holds every other differing metric (not headline, timing or hash)."""
    (ta, ra), (tb, rb) = _side(root, a), _side(root, b)
    out: dict = {"a": ta, "b": tb, "headline": {}}
    ma, mb = _flatten_all(ra.get("metrics", {})), _flatten_all(rb.get("metrics", {}))
    for label, keys in HEADLINE_METRICS:
        x = next((ma[k] for k in keys if k in ma), None)
        y = next((mb[k] for k in keys if k in mb), None)
        if x is not None or y is not None:
            out["headline"][label] = (x, y)
    headline_keys = {k for _, keys in HEADLINE_METRICS for k in keys}
    if ra.get("dataset_hash") != rb.get("dataset_hash"):
        out["dataset_hash"] = (ra.get("dataset_hash"), rb.get("dataset_hash"))
    pa, pb = _flatten_all(ra.get("params", {})), _flatten_all(rb.get("params", {}))
    out["params"] = {k: (pa.get(k), pb.get(k)) for k in sorted(set(pa) | set(pb)) if pa.get(k) != pb.get(k)}
    changed = {k: (ma.get(k), mb.get(k)) for k in sorted((set(ma) | set(mb)) - headline_keys)
               if ma.get(k) != mb.get(k)}
    out["metrics"] = {k: v for k, v in changed.items() if not _LAST.search(k)}
    out["timings_hashes"] = {k: v for k, v in changed.items() if _LAST.search(k)}
    return out


def _flatten_all(obj, prefix="") -> dict:
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten_all(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = obj
    return out
