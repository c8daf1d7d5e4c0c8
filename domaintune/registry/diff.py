"""Diff between two versions (or a version and the workspace): headline metrics and data first.

What `domaintune diff` shows: the headline metrics (accuracy, macro-F1, ECE after calibration), the
dataset hash, the outputs that changed (path, old and new md5, size, from each side's dvc.lock), then
every differing param and metric, timings and hashes last.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from domaintune.registry.plumbing import ARTIFACT, RegistryError, git_bytes, lock_outs
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


def _side(root: Path, name: str) -> tuple[str, dict, dict]:
    """(tag, record, outputs) of a version or of the workspace."""
    if name == WORKSPACE:
        return WORKSPACE, workspace_record(root), version_outputs(root, None)
    v = get_version(root, name)
    return v.tag, v.record, version_outputs(root, v.commit)


def version_outputs(root: Path, rev: str | None) -> dict[str, dict]:
    """The outs that make up a version (plumbing.lock_outs: scratch outs left out) at `rev` or in the
    workspace, with the md5, size and file count dvc.lock records; {} without a dvc.lock."""
    if rev is None:
        lock = root / "dvc.lock"
        text = lock.read_bytes() if lock.exists() else None
    else:
        text = git_bytes(root, rev, "dvc.lock")
    if text is None:
        return {}
    sizes = lock_outputs(text)
    return {o.path: {**sizes.get(o.path, {}), "md5": o.md5} for o in lock_outs(root, rev)}


def lock_outputs(text: bytes | str | None) -> dict[str, dict]:
    """path -> {md5, size, nfiles} of every stage out a dvc.lock records (size in bytes; nfiles for a folder)."""
    data = (yaml.safe_load(text) if text else None) or {}
    out = {}
    for body in (data.get("stages") or {}).values():
        for o in body.get("outs") or []:
            if "path" in o:
                out[o["path"]] = {"md5": o.get("md5"), "size": o.get("size"), "nfiles": o.get("nfiles")}
    return out


def changed_outputs(a: dict[str, dict], b: dict[str, dict]) -> list[dict]:
    """The outputs whose content differs (or that exist on one side only), by path."""
    rows = []
    for path in sorted(set(a) | set(b)):
        x, y = a.get(path) or {}, b.get(path) or {}
        if x.get("md5") != y.get("md5"):
            rows.append({"path": path, "old_md5": x.get("md5"), "new_md5": y.get("md5"), "old_size": x.get("size"),
                         "new_size": y.get("size"), "old_nfiles": x.get("nfiles"), "new_nfiles": y.get("nfiles")})
    return rows


def headline(metrics: dict) -> dict[str, float]:
    """A version's headline metrics ({stage: {...}} as records hold them), keyed by their last key part
    (accuracy, macro_f1, ece): what `domaintune diff` leads with and what serve's /version shows."""
    flat = _flatten_all(metrics or {})
    out = {}
    for _, keys in HEADLINE_METRICS:
        value = next((flat[k] for k in keys if k in flat), None)
        if value is not None:
            out[keys[0].rsplit(".", 1)[-1]] = value
    return out


def diff_versions(root: Path, a: str, b: str) -> dict:
    """What differs between two versions (either may be "workspace"), most important first:
    {'a', 'b', 'headline': {name: (x, y)}, 'dataset_hash'?: (x, y), 'outputs': [{path, old_md5, new_md5,
    old_size, new_size, old_nfiles, new_nfiles}], 'outputs_total': n, 'params': {...}, 'metrics': {...},
    'timings_hashes': {...}}. 'metrics' holds every other differing metric (not headline, timing or hash)."""
    (ta, ra, oa), (tb, rb, ob) = _side(root, a), _side(root, b)
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
    out["outputs"] = changed_outputs(oa, ob)
    out["outputs_total"] = len(set(oa) | set(ob))
    pa, pb = _flatten_all(ra.get("params", {})), _flatten_all(rb.get("params", {}))
    out["params"] = {k: (pa.get(k), pb.get(k)) for k in sorted(set(pa) | set(pb)) if pa.get(k) != pb.get(k)}
    changed = {k: (ma.get(k), mb.get(k)) for k in sorted((set(ma) | set(mb)) - headline_keys)
               if ma.get(k) != mb.get(k)}
    out["metrics"] = {k: v for k, v in changed.items() if not _LAST.search(k)}
    out["timings_hashes"] = {k: v for k, v in changed.items() if _LAST.search(k)}
    return out


def human_size(size: int | None, nfiles: int | None = None) -> str:
    """"90.1 MB" (", 12 files" for a folder); "-" when unknown or absent."""
    if size is None:
        return "-"
    value, unit = float(size), "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            break
        value /= 1000
    text = f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
    return text + (f", {nfiles} files" if nfiles is not None else "")


def output_lines(d: dict) -> list[str]:
    """The changed outputs as `domaintune diff` prints them, one line each."""
    rows = d.get("outputs") or []
    head = f"outputs: {len(rows)} of {d.get('outputs_total', len(rows))} changed" if rows else "outputs: no change"
    return [head] + [f"  {r['path']}: md5 {r['old_md5'] or '-'} -> {r['new_md5'] or '-'}, size "
                     f"{human_size(r['old_size'], r['old_nfiles'])} -> {human_size(r['new_size'], r['new_nfiles'])}"
                     for r in rows]


def _flatten_all(obj, prefix="") -> dict:
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten_all(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = obj
    return out
