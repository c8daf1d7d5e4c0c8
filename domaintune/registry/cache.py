"""The DVC cache: object paths, md5 checks of objects and restored files, and the one fetch-and-verify path.

Nothing trusts the cache, the remote or a version's records: every object a version needs is checked
against the md5 DVC named it by (for a directory, its .dir manifest and each file the manifest lists),
and every path read from a manifest or from dvc.lock is joined through `inside`, which refuses one that
would land outside its folder (absolute, `..`, or through a symlink). `verify_objects` is the one way
anything gets a version's objects: rollback, `predict --version`, `serve` and release all call it.
Missing objects are downloaded from the default DVC remote into a temporary file next to their place
in the cache, checked against their md5 and only then renamed into place, so a corrupt copy never
enters the local cache (not even for a moment: a killed run leaves none behind). Each problem is one
line naming the file, the object and, for a fetch, the remote (name and URL) it came from.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

from domaintune.registry.plumbing import Out, RegistryError

# A DVC object id: the md5 of a file, or of a directory's .dir manifest with ".dir" appended.
OBJECT_ID = re.compile(r"[0-9a-f]{32}(\.dir)?")
FETCH_THREADS = 8


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
    """Where object `md5` lives under `cache` (the local cache or a local remote); RegistryError for
    anything that is not a DVC object id (a crafted id could otherwise name any path)."""
    if not isinstance(md5, str) or not OBJECT_ID.fullmatch(md5):
        raise RegistryError(f"{md5!r} is not a DVC object id (32 hex digits, .dir for a directory)")
    return cache / md5[:2] / md5[2:]


def plain_relpath(relpath) -> bool:
    """A relative POSIX path in normal form, with no `..` or `.` part and no NUL: joined to a folder it
    cannot leave it (but for symlinks, which `inside` checks)."""
    if not isinstance(relpath, str) or not relpath or "\0" in relpath:
        return False
    pure = PurePosixPath(relpath)
    return not pure.is_absolute() and str(pure) == relpath and not any(p in ("..", ".") for p in pure.parts)


def inside(base: Path, relpath: str, what: str) -> Path:
    """`base / relpath` for a path read from a manifest or a record, or RegistryError (one line, naming
    `what`) when it could land outside `base`: not a plain_relpath (absolute, `..`, ...) or, where its
    folders exist already, reaching outside `base` through a symlink. The one way a path from a version's
    contents is joined to a folder (the workspace, the staging and materialised folders of a release).
    The last part is not resolved: DVC's symlink cache type links files into the cache, outside `base`."""
    if not plain_relpath(relpath):
        raise RegistryError(f"{what}: path {relpath!r} is not a plain relative path inside {base}; "
                            "refusing this version")
    path = base / relpath
    real_base, real_parent = base.resolve(), path.parent.resolve()
    if real_parent != real_base and real_base not in real_parent.parents:
        raise RegistryError(f"{what}: path {relpath!r} leads outside {base} (to {real_parent}) through a "
                            "symlink; refusing this version")
    return path


def manifest_files(cache: Path, out: Out, what: str = "") -> dict[str, str] | None:
    """relpath -> md5 of every file the .dir manifest of directory `out` lists; None when the manifest is
    missing from the cache or fails its md5. RegistryError (one line) for a manifest that is not a list
    of {relpath, md5} with plain relative paths and file object ids, or that lists a path twice."""
    p = cache_path(cache, out.md5)
    if not p.is_file() or md5_file(p) != out.md5.removesuffix(".dir"):
        return None
    where = f"{what}{out.path}: .dir manifest {out.md5}"
    try:
        entries = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{where}: not JSON ({exc}); refusing this version") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise RegistryError(f"{where}: not a list of {{relpath, md5}} entries; refusing this version")
    files: dict[str, str] = {}
    for e in entries:
        rel, md5 = e.get("relpath"), e.get("md5")
        if not plain_relpath(rel):  # joined through `inside` wherever it is used
            raise RegistryError(f"{where}: entry {rel!r} is not a plain relative path inside {out.path}; "
                                "refusing this version")
        if not isinstance(md5, str) or not re.fullmatch(r"[0-9a-f]{32}", md5):
            raise RegistryError(f"{where}: entry {rel!r} has md5 {md5!r}, not a file's DVC object id; "
                                "refusing this version")
        if rel in files:
            raise RegistryError(f"{where}: entry {rel!r} is listed twice; refusing this version")
        files[rel] = md5
    for rel in files:
        parents = [p.as_posix() for p in PurePosixPath(rel).parents][:-1]
        clash = next((p for p in parents if p in files), None)
        if clash is not None:
            raise RegistryError(f"{where}: {clash!r} is listed both as a file and as the folder of {rel!r}; "
                                "refusing this version")
    return files


def check_out_paths(root: Path, outs: list[Out], what: str = "") -> None:
    """Every out of a dvc.lock (a record of a version) names a path inside the repository and, when it
    is cached, a DVC object id; else RegistryError, one line. Paths are checked lexically: a folder of
    the workspace may be a symlink the user made (DVC follows it too)."""
    for o in outs:
        if not plain_relpath(o.path):
            raise RegistryError(f"{what}dvc.lock names out {o.path!r}, not a plain relative path inside {root}; "
                                "refusing this version")
        if not o.in_git and not (isinstance(o.md5, str) and OBJECT_ID.fullmatch(o.md5)):
            raise RegistryError(f"{what}dvc.lock: out {o.path} has md5 {o.md5!r}, not a DVC object id; "
                                "refusing this version")


def _cache_status(outs: list[Out], cache: Path, what: str = "",
                  intact: set[str] | None = None) -> list[tuple[str, str, str]]:
    """(object md5, label, 'ok' | 'missing' | 'corrupted') for every cache object the cached outs need
    (for a directory: its .dir manifest and, when that is present and intact, each file it lists).
    Objects found intact are added to `intact` and not hashed again by a later call given the same set."""
    status = []
    intact = set() if intact is None else intact

    def check(obj: str, label: str) -> str:
        p = cache_path(cache, obj)
        if not p.is_file():
            state = "missing"
        elif obj in intact or md5_file(p) == obj.removesuffix(".dir"):
            state = "ok"
            intact.add(obj)
        else:
            state = "corrupted"
        status.append((obj, label, state))
        return state

    for o in outs:
        if o.in_git:
            continue
        if check(o.md5, o.path) == "ok" and o.is_dir:
            for rel, md5 in (manifest_files(cache, o, what) or {}).items():
                check(md5, f"{o.path}/{rel}")
    return status


# ----------------------------------------------------------------------------- the remote

def _display_url(url: str) -> str:
    """The remote's URL without any user:password part."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        parts = parts._replace(netloc=parts.netloc.rsplit("@", 1)[1])
    return urlunsplit(parts) if parts.scheme else url


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@dataclass
class Fetched:
    """What a fetch found: a problem per object it could not bring (md5 -> line), or the remote as a whole."""
    objects: dict[str, str]
    remote: str | None = None  # the remote is not configured or not reachable: why, one line


def fetch_objects(root: Path, cache: Path, wanted: dict[str, str]) -> Fetched:
    """Download the objects `wanted` (md5 -> label) from the default DVC remote into the local cache.

    Each is downloaded into a temporary file beside its place in the cache, checked against its md5 and
    renamed into place only when it matches: a corrupt copy is deleted at once and reported with the
    remote it came from. The remote's credentials and settings are DVC's own (its config and environment)."""
    from dvc.repo import Repo  # heavy: DVC loads only when something must be fetched

    try:
        with Repo(str(root)) as repo:
            name = repo.config["core"].get("remote")
            if not name:
                return Fetched({}, "no DVC remote configured to fetch them from (`dvc remote add -d`)")
            url = _display_url(str(repo.config["remote"].get(name, {}).get("url", "?")))
            label = f"remote {name!r} ({url})"
            try:
                odb = repo.cloud.get_remote_odb(name, "fetch")
                reachable = odb.fs.exists(odb.path)
            except Exception as exc:  # any fs or config error of any remote type: reported, not raised
                return Fetched({}, f"{label} unreachable: {_reason(exc)}")
            if not reachable:
                return Fetched({}, f"{label} unreachable: {url} does not exist")

            def one(md5: str) -> tuple[str, str | None]:
                return md5, _download(odb, md5, cache, wanted[md5], label)

            with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, max(1, len(wanted)))) as pool:
                results = dict(pool.map(one, sorted(wanted)))
    except RegistryError:
        raise
    except Exception as exc:  # DVC could not open the repository or its config
        return Fetched({}, f"DVC remote unusable: {_reason(exc)}")
    return Fetched({md5: line for md5, line in results.items() if line})


def _download(odb, md5: str, cache: Path, label: str, remote: str) -> str | None:
    """One object from the remote into the cache, verified first; the problem line, or None."""
    dest = cache_path(cache, md5)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f"{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            odb.fs.get_file(odb.oid_to_path(md5), tmp_name)
        except FileNotFoundError:
            return f"{label}: {md5} not in cache and not on {remote}"
        except Exception as exc:  # a network or permission error of any remote type
            return f"{label}: {md5} not in cache; fetching it from {remote} failed: {_reason(exc)}"
        got = md5_file(tmp)
        if got != md5.removesuffix(".dir"):
            return (f"{label}: the copy of {md5} on {remote} is corrupted (its md5 is {got}); "
                    "not kept in the local cache")
        tmp.chmod(0o444)  # as DVC protects its cache objects
        os.replace(tmp, dest)
        return None
    finally:
        tmp.unlink(missing_ok=True)


def verify_objects(root: Path, outs: list[Out], commit: str, fetch_missing: bool = True) -> list[str]:
    """Check every cache object the cached `outs` (of `commit`) need, fetching missing ones first.

    Returns the problems, one line each (empty: every object present and intact). Missing objects are
    fetched (fetch_objects: verified before they enter the cache) only when nothing in the local cache is
    corrupted; a directory's .dir manifest is fetched and checked before the files it lists. RegistryError
    (one line) for a version whose records name a path outside the repository or its folder. Touches only
    the DVC cache.
    """
    root = Path(root)
    what = f"version at {commit[:10]}: "
    check_out_paths(root, outs, what)
    cache = cache_dir(root)
    intact: set[str] = set()
    status = _cache_status(outs, cache, what, intact)
    failed: dict[str, str] = {}
    remote_problem = None
    if fetch_missing and not any(state == "corrupted" for _, _, state in status):
        for _ in range(2):  # directory manifests first, then the files they list
            wanted = {obj: label for obj, label, state in status if state == "missing" and obj not in failed}
            if not wanted:
                break
            result = fetch_objects(root, cache, wanted)
            failed.update(result.objects)
            status = _cache_status(outs, cache, what, intact)
            if result.remote:
                remote_problem = result.remote
                break
    corrupted = [f"{label}: cache object {cache_path(cache, obj)} does not match its md5 {obj} (the local DVC "
                 "cache was changed outside domaintune; delete that file and it is fetched again)"
                 for obj, label, state in status if state == "corrupted"]
    missing = [(obj, label) for obj, label, state in status if state == "missing"]
    if remote_problem and missing:
        # One line for the remote, naming what it could not bring.
        return corrupted + [f"{remote_problem}; not in the local cache: "
                            + ", ".join(f"{label} ({obj})" for obj, label in missing)]
    return corrupted + [failed.get(obj) or f"{label}: {obj} not in cache" for obj, label in missing]


def check_workspace(root: Path, outs: list[Out], cache: Path) -> tuple[list[str], int]:
    """Every restored file against dvc.lock: (problems, files checked). Extra files count as problems."""
    check_out_paths(root, outs)
    problems, checked = [], 0
    for o in outs:
        target = root / o.path
        if o.is_dir:
            expected = manifest_files(cache, o)
            if expected is None:
                problems.append(f"{o.path}: .dir manifest {o.md5} missing or corrupted")
                continue
            present = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()} \
                if target.is_dir() else set()
            for rel in sorted(present - set(expected)):
                problems.append(f"{o.path}/{rel}: not part of this version")
            for rel, md5 in expected.items():
                f = inside(target, rel, f"{o.path}: .dir manifest {o.md5}")
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
