"""Materialise a published version's model outside the workspace, every file verified.

    from domaintune.registry import release
    rel = release.materialise(root)              # the served version (GTO stage prod)
    rel = release.materialise(root, "v1.2.0")    # any published version
    Predictor.load(rel.path, variant="float32")

A version's `models/export` is rebuilt from the DVC cache (objects fetched from
the DVC remote when missing) into `<repo>/.domaintune/releases/<tag>/models/export`
(git-ignored), reading the out's md5 from the version's dvc.lock at its commit.
As for rollback (the same path: cache.verify_objects), every cache object and
every copied file is checked against the md5 DVC named it by (and, for a
directory, the .dir manifest): a mismatch raises ReleaseError naming the file,
and nothing half-written is left behind. Every path a manifest lists is joined
through cache.inside: a version whose manifest names a path outside its folder
(absolute, `..`, through a symlink) is refused with one line, before anything
is written.
The workspace (params.yaml, dvc.lock, models/, data/) is never read or written,
so a server or `predict --version` can use any version while a rollback or a
retrain runs. A folder materialised earlier is re-verified on every call and
rebuilt if anything in it changed.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from domaintune.registry.cache import cache_dir, cache_path, inside, manifest_files, md5_file, verify_objects
from domaintune.registry.plumbing import SERVED_STAGE, Out, RegistryError, lock_outs
from domaintune.registry.versions import Version, get_version, served_version

EXPORT_OUT = "models/export"
RELEASES_DIR = Path(".domaintune") / "releases"


class ReleaseError(RegistryError):
    """A version cannot be materialised: not published, or a file fails verification."""


@dataclass
class Release:
    version: Version
    path: Path          # the materialised out (a folder for models/export)
    files: int          # files verified

    @property
    def tag(self) -> str:
        return self.version.tag

    @property
    def dataset_hash(self) -> str | None:
        return self.version.record.get("dataset_hash")

    @property
    def metrics(self) -> dict:
        return self.version.record.get("metrics") or {}

    def info(self) -> dict:
        return {"tag": self.tag, "version": self.version.version, "commit": self.version.commit,
                "dataset_hash": self.dataset_hash, "metrics": self.metrics, "path": str(self.path)}


def releases_dir(root: Path) -> Path:
    folder = Path(root) / RELEASES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    ignore = folder.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")  # .domaintune/ never shows up in git status
    return folder


def resolve(root: Path, name: str | None = None) -> Version:
    """The named version (v1.2.0, v1, domaintune@v1.2.0) or, for None, the served one."""
    if name is None:
        served = served_version(root)
        if served is None:
            raise ReleaseError(f"{root}: no version is served (GTO stage {SERVED_STAGE!r} is empty); "
                               "publish one with `domaintune retrain`, or serve a folder with --model models/export")
        name = served
    return get_version(root, name)


def materialise(root: str | os.PathLike, name: str | None = None, out: str = EXPORT_OUT,
                dest: str | os.PathLike | None = None, fetch: bool = True) -> Release:
    """`out` of version `name` (default: the served one) as a verified folder outside the workspace."""
    root = Path(root).resolve()
    version = resolve(root, name)
    entry = _lock_entry(root, version, out)
    cache = cache_dir(root)
    files = _verified_objects(root, version, entry, cache, fetch)
    base = Path(dest) if dest is not None else releases_dir(root)
    target = _inside(base / version.tag, entry.path, version)
    if target.exists() or target.is_symlink():
        problems = ["a symlink"] if target.is_symlink() else \
            _check_folder(target, files) if entry.is_dir else _check_file(target, entry.md5)
        if not problems:
            return Release(version, target, len(files))
        # changed since: rebuild from the cache (a symlink is removed, never followed)
        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    _copy_verified(cache, entry, files, target, version)
    (base / version.tag / "release.json").write_text(json.dumps(
        {"tag": version.tag, "commit": version.commit, "out": entry.path, "md5": entry.md5}, indent=2) + "\n")
    return Release(version, target, len(files))


def _lock_entry(root: Path, version: Version, out: str) -> Out:
    outs = lock_outs(root, version.commit)
    for o in outs:
        if o.path == out:
            if o.in_git:
                raise ReleaseError(f"{version.tag}: {out} is kept in git, not in the DVC cache")
            return o
    known = ", ".join(o.path for o in outs) or "none"
    raise ReleaseError(f"{version.tag}: dvc.lock at {version.commit[:10]} has no out {out!r} (outs: {known})")


def _inside(base: Path, relpath: str, version: Version) -> Path:
    """cache.inside, its refusal named by the version (one line, a ReleaseError)."""
    try:
        return inside(base, relpath, f"{version.tag}")
    except RegistryError as exc:
        raise ReleaseError(f"cannot materialise {exc}") from None


def _verified_objects(root: Path, version: Version, entry: Out, cache: Path, fetch: bool) -> dict[str, str]:
    """relpath -> md5 of every file of `entry`, after checking (and if need be fetching) its cache objects."""
    try:
        problems = verify_objects(root, [entry], version.commit, fetch)
        files = manifest_files(cache, entry) if entry.is_dir and not problems else None
    except RegistryError as exc:  # the version's records name a path outside its folder: one line
        raise ReleaseError(f"cannot materialise {version.tag}: {exc}") from None
    if problems:
        raise ReleaseError(f"cannot materialise {version.tag}:\n  " + "\n  ".join(problems))
    if not entry.is_dir:
        return {"": entry.md5}
    return files


def _check_folder(folder: Path, files: dict[str, str]) -> list[str]:
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    problems = [f"{folder / rel}: not part of this version" for rel in sorted(present - set(files))]
    for rel, md5 in files.items():
        try:
            f = inside(folder, rel, str(folder))
        except RegistryError as exc:  # e.g. a folder in it replaced by a symlink: rebuilt, never followed
            problems.append(str(exc))
            continue
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif md5_file(f) != md5:
            problems.append(f"{f}: md5 differs from dvc.lock ({md5})")
    return problems


def _check_file(path: Path, md5: str) -> list[str]:
    if not path.is_file():
        return [f"{path}: missing"]
    return [] if md5_file(path) == md5 else [f"{path}: md5 differs from dvc.lock ({md5})"]


def _copy_verified(cache: Path, entry: Out, files: dict[str, str], target: Path,
                   version: Version) -> None:
    """Copy the cache objects into a temporary folder next to `target`, verify each copy, rename into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        staged = tmp / "out"
        problems = []
        for rel, md5 in files.items():
            dst = _inside(staged, rel, version) if rel else staged
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cache_path(cache, md5), dst)
            if md5_file(dst) != md5:
                problems.append(f"{entry.path}/{rel}: copy does not match its md5 {md5}")
        if problems:
            raise ReleaseError(f"cannot materialise {version.tag}:\n  " + "\n  ".join(problems))
        try:
            os.rename(staged, target)
        except OSError:
            # Another process materialised the same version meanwhile: keep its copy if it verifies.
            again = _check_folder(target, files) if entry.is_dir else _check_file(target, entry.md5)
            if again:
                raise ReleaseError(f"cannot materialise {version.tag}:\n  " + "\n  ".join(again)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prune(root: str | os.PathLike, keep: list[str] | set[str], previous: int) -> list[Path]:
    """Remove the materialised releases (<repo>/.domaintune/releases/<tag>/) no longer needed; the removed folders.

    Kept: the tags in `keep` (the served and the shadow version; marked as used now) and the `previous`
    most recently used others (materialised, or kept, last). A folder without release.json (being
    materialised, or not one of ours) is left alone. Each folder is renamed aside before it is deleted,
    so a reader finds a release whole or absent (and `materialise` rebuilds an absent one)."""
    folder = Path(root) / RELEASES_DIR
    if not folder.is_dir():
        return []
    for leftover in folder.glob(".*.pruned-*"):  # a prune interrupted while deleting
        shutil.rmtree(leftover, ignore_errors=True)
    keep = set(keep)
    others = []
    for d in folder.iterdir():
        marker = d / "release.json"
        if d.name.startswith(".") or d.is_symlink() or not d.is_dir() or not marker.is_file():
            continue
        if d.name in keep:
            os.utime(marker)
        else:
            others.append((marker.stat().st_mtime, d.name, d))
    others.sort(reverse=True)
    removed = []
    for _, _, d in others[previous:]:
        aside = d.with_name(f".{d.name}.pruned-{os.getpid()}")
        os.rename(d, aside)
        shutil.rmtree(aside)
        removed.append(d)
    return removed
