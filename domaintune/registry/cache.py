"""The DVC cache: object paths, md5 checks of objects and restored files, and the one fetch-and-verify path.

Nothing trusts the cache: every object a version needs is checked against the md5 DVC named it by
(for a directory, its .dir manifest and each file the manifest lists). `verify_objects` is the one
way anything gets a version's objects: rollback, `predict --version`, `serve` and release all call it.
It fetches what is missing from the default DVC remote and never keeps a fetched object that fails
its md5 in the local cache.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from domaintune.registry.plumbing import Out, default_remote


def md5_file(path: Path) -> str:
    h = hashlib.md5()  # noqa: S324 - DVC names objects by md5; this is integrity, not security
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir(root: Path) -> Path:
    from dvc.repo import Repo  # heavy: DVC loads only when the cache is needed

    with Repo(str(root)) as repo:
        return Path(repo.cache.local.path)


def cache_path(cache: Path, md5: str) -> Path:
    return cache / md5[:2] / md5[2:]


def _manifest(cache: Path, md5: str) -> list[dict] | None:
    p = cache_path(cache, md5)
    if not p.exists() or md5_file(p) != md5.removesuffix(".dir"):
        return None
    return json.loads(p.read_text(encoding="utf-8"))


def _cache_status(outs: list[Out], cache: Path) -> list[tuple[str, str, str]]:
    """(object md5, label, 'ok' | 'missing' | 'corrupted') for every cache object the cached outs need
    (for a directory: its .dir manifest and, when that is readable, each file it lists)."""
    status = []

    def check(obj: str, label: str) -> str:
        p = cache_path(cache, obj)
        state = "missing" if not p.exists() else "ok" if md5_file(p) == obj.removesuffix(".dir") else "corrupted"
        status.append((obj, label, state))
        return state

    for o in outs:
        if o.in_git:
            continue
        if check(o.md5, o.path) == "ok" and o.is_dir:
            for e in _manifest(cache, o.md5) or []:
                check(e["md5"], f"{o.path}/{e['relpath']}")
    return status


def _missing_corrupted(status: list[tuple[str, str, str]], cache: Path) -> tuple[list[str], list[str]]:
    """(missing, corrupted) objects of a _cache_status, each as 'path: md5 (what)'."""
    missing = [f"{label}: {obj} not in cache" for obj, label, state in status if state == "missing"]
    corrupted = [f"{label}: cache object {cache_path(cache, obj)} does not match its md5 {obj}"
                 for obj, label, state in status if state == "corrupted"]
    return missing, corrupted


def fetch(root: Path, commit: str, targets: list[str] | None = None) -> str | None:
    """Fetch from the default remote the objects of `commit` (of the outs at `targets` only, when given);
    returns what went wrong, if anything."""
    from dvc.exceptions import DvcException  # heavy: DVC loads only when something must be fetched
    from dvc.repo import Repo

    remote = default_remote(root)
    if remote is None:
        return "no DVC remote configured"
    try:
        with Repo(str(root)) as repo:
            # The objects of that commit only; workspace=False: the current outs are not needed.
            repo.fetch(targets=targets, revs=[commit], workspace=False, remote=remote)
    except DvcException as exc:  # some objects are not on the remote either: reported by the caller
        return f"{remote}: {exc}"
    return None


def verify_objects(root: Path, outs: list[Out], commit: str, fetch_missing: bool = True,
                   targets: list[str] | None = None) -> list[str]:
    """Check every cache object the cached `outs` (of `commit`) need, fetching missing ones first.

    Returns the problems, one line each (empty: every object present and intact). Missing objects are
    fetched (the outs at `targets`, or all of `commit`) only when nothing is corrupted; a fetched object
    that fails its md5 is the remote's bad copy and is removed from the local cache again. Touches
    only the DVC cache.
    """
    cache = cache_dir(root)
    before = _cache_status(outs, cache)
    missing, corrupted = _missing_corrupted(before, cache)
    notes = []
    if missing and fetch_missing and not corrupted:
        note = fetch(root, commit, targets)
        had = {obj for obj, _, state in before if state == "ok"}
        after = _cache_status(outs, cache)
        for obj, label, state in after:
            if state == "corrupted" and obj not in had:
                # Fetched just now and wrong: the remote's copy is bad. Never leave it in the local cache.
                cache_path(cache, obj).unlink(missing_ok=True)
                notes.append(f"{label}: the DVC remote's copy of {obj} does not match its md5 "
                             "(not kept in the local cache)")
        missing, corrupted = _missing_corrupted(_cache_status(outs, cache) if notes else after, cache)
        if missing and note:
            notes.append(f"fetch from the DVC remote: {note}")
    return corrupted + missing + notes


def check_workspace(root: Path, outs: list[Out], cache: Path) -> tuple[list[str], int]:
    """Every restored file against dvc.lock: (problems, files checked). Extra files count as problems."""
    problems, checked = [], 0
    for o in outs:
        target = root / o.path
        if o.is_dir:
            entries = _manifest(cache, o.md5)
            if entries is None:
                problems.append(f"{o.path}: .dir manifest {o.md5} missing or corrupted")
                continue
            expected = {e["relpath"]: e["md5"] for e in entries}
            present = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()} \
                if target.is_dir() else set()
            for rel in sorted(present - set(expected)):
                problems.append(f"{o.path}/{rel}: not part of this version")
            for rel, md5 in expected.items():
                f = target / rel
                checked += 1
                if not f.is_file():
                    problems.append(f"{o.path}/{rel}: missing")
                elif md5_file(f) != md5:
                    problems.append(f"{o.path}/{rel}: md5 differs from dvc.lock ({md5})")
        else:
            checked += 1
            if not target.is_file():
                problems.append(f"{o.path}: missing")
            elif md5_file(target) != o.md5:
                problems.append(f"{o.path}: md5 differs from dvc.lock ({o.md5})")
    return problems, checked
