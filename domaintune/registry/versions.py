"""Model versions: publish, list, diff, verify and roll back (git + DVC + GTO).

A version is a git commit holding params.yaml, dvc.yaml, dvc.lock and the
metrics, tagged by GTO as `domaintune@vX.Y.Z` (an annotated tag whose message
carries a JSON record: dataset content hash, base model, method, params and
metrics), whose DVC-tracked outputs are pushed to the DVC remote. The served
version is the one GTO has in stage `prod` (tags `domaintune#prod#N`, the
latest assignment wins).

Rollback never trusts the cache: it checks every object that version needs
(the md5 DVC named it by, and for directories each file listed in the .dir
manifest) before touching the workspace, fetches what is missing from the
remote, and after `dvc checkout` checks every restored file against dvc.lock
again. Any mismatch puts the previous state back and raises.
"""
from __future__ import annotations

import contextlib
import contextvars
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import yaml

ARTIFACT = "domaintune"
SERVED_STAGE = "prod"
# Files that, with the DVC cache, fully describe a version.
VERSION_FILES = ("params.yaml", "dvc.yaml", "dvc.lock", "metrics/summary.json")
RECORD_MARK = "domaintune-record:"
LOCK_PATH = Path(".domaintune") / "retrain.lock"
# Metrics shown in the versions table when present: name -> (file stem, key path). The evaluate
# stage writes {"before": {...}, "after": {...}}; the headline is after temperature calibration.
KEY_METRICS = {"evaluate.accuracy": ("evaluate", "after", "accuracy"),
               "evaluate.macro_f1": ("evaluate", "after", "macro_f1"),
               "evaluate.ece": ("evaluate", "after", "ece")}


class RegistryError(RuntimeError):
    """A registry operation refused or failed; the message says what and where."""


class BusyError(RegistryError):
    """Another retrain or rollback holds the repository lock."""


# ----------------------------------------------------------------------------- plumbing

def git(root: Path, *args: str, check: bool = True, input: bytes | None = None) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, input=input)
    if check and proc.returncode != 0:
        raise RegistryError(f"git {' '.join(args)} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode("utf-8", errors="replace")


def git_bytes(root: Path, rev: str, path: str) -> bytes | None:
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True)
    return proc.stdout if proc.returncode == 0 else None


def dvc_exe() -> str:
    """The dvc next to this interpreter (the project venv), else the one on PATH."""
    here = Path(sys.executable).parent / "dvc"
    return str(here) if here.exists() else (shutil.which("dvc") or "dvc")


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([dvc_exe(), *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RegistryError(f"dvc {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}".strip())
    return proc


def md5_file(path: Path) -> str:
    h = hashlib.md5()  # noqa: S324 - DVC names objects by md5; this is integrity, not security
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _git_identity(root: Path) -> list[str]:
    """`-c user.name/email` only where the repo has no identity, so commits never fail for want of one."""
    args = []
    if not git(root, "config", "user.name", check=False).strip():
        args += ["-c", "user.name=domaintune"]
    if not git(root, "config", "user.email", check=False).strip():
        args += ["-c", "user.email=domaintune@localhost"]
    return args


# Lock files this context (thread, or a Prefect task run that copied its context) already holds:
# `domaintune retrain` takes the lock before Prefect starts, and the flow inside takes it again.
_HELD_LOCKS: contextvars.ContextVar[frozenset] = contextvars.ContextVar("domaintune_repo_locks", default=frozenset())


@contextlib.contextmanager
def repo_lock(root: Path) -> Iterator[None]:
    """Exclusive, non-blocking lock: a second retrain/rollback fails at once and touches nothing.

    Re-entrant within one context. The loser of a race only reads the holder's pid; it never
    writes to the lock file."""
    path = Path(root).resolve() / LOCK_PATH
    if str(path) in _HELD_LOCKS.get():
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    ignore = path.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")  # the lock folder never shows up in git status
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise BusyError(f"{path}: a retrain or rollback is already running ({holder}); "
                        "wait for it to finish, nothing was changed") from None
    token = _HELD_LOCKS.set(_HELD_LOCKS.get() | {str(path)})
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        yield
    finally:
        _HELD_LOCKS.reset(token)
        with contextlib.suppress(OSError):
            fh.seek(0)
            fh.truncate()
        fh.close()  # closing releases the flock


# ----------------------------------------------------------------------------- dvc.lock

@dataclass
class Out:
    stage: str
    path: str
    md5: str
    in_git: bool  # cache: false outs (metrics) live in git, the rest in the DVC cache

    @property
    def is_dir(self) -> bool:
        return self.md5.endswith(".dir")


def lock_outs(root: Path, rev: str | None = None) -> list[Out]:
    """Every out dvc.lock records (at `rev`, or in the workspace)."""
    if rev is None:
        lock_file = root / "dvc.lock"
        if not lock_file.exists():
            raise RegistryError(f"{lock_file}: missing; run the pipeline first")
        text = lock_file.read_text(encoding="utf-8")
        tracked = None  # decided below: outs git does not ignore belong in git
    else:
        raw = git_bytes(root, rev, "dvc.lock")
        if raw is None:
            raise RegistryError(f"{rev}: has no dvc.lock")
        text = raw.decode("utf-8")
        tracked = set(git(root, "ls-tree", "-r", "--name-only", rev).splitlines())
    data = yaml.safe_load(text) or {}
    entries = []
    for stage, body in (data.get("stages") or {}).items():
        for o in body.get("outs") or []:
            if "md5" not in o:
                raise RegistryError(f"dvc.lock: stage {stage!r} out {o.get('path')!r} has no md5")
            entries.append((stage, o["path"], o["md5"]))
    if tracked is None:
        paths = "\n".join(p for _, p, _ in entries).encode()
        proc = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=root, input=paths,
                              capture_output=True)
        ignored = set(proc.stdout.decode().splitlines())
        tracked = {p for _, p, _ in entries if p not in ignored}
    # An uncached out that git ignores (finetune's resumable checkpoints) is scratch
    # state: neither git nor the DVC cache holds it, so it is not part of a version.
    scratch = _uncached_outs(root, rev) - tracked
    return [Out(stage, path, md5, path in tracked) for stage, path, md5 in entries if path not in scratch]


def _uncached_outs(root: Path, rev: str | None) -> set[str]:
    """Paths of outs dvc.yaml (at `rev`, or in the workspace) declares with cache: false."""
    if rev is None:
        path = root / "dvc.yaml"
        text = path.read_text(encoding="utf-8") if path.exists() else ""
    else:
        raw = git_bytes(root, rev, "dvc.yaml")
        text = raw.decode("utf-8") if raw else ""
    stages = (yaml.safe_load(text) or {}).get("stages") or {}
    out = set()
    for body in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in body.get(kind) or []:
                if isinstance(entry, dict):
                    for p, opts in entry.items():
                        if isinstance(opts, dict) and opts.get("cache") is False:
                            out.add(p)
    return out


def cache_dir(root: Path) -> Path:
    from dvc.repo import Repo

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


def check_cache(root: Path, outs: list[Out], cache: Path) -> tuple[list[str], list[str]]:
    """(missing, corrupted) cache objects for the cached outs, each as 'path: md5 (what)'."""
    status = _cache_status(outs, cache)
    missing = [f"{label}: {obj} not in cache" for obj, label, state in status if state == "missing"]
    corrupted = [f"{label}: cache object {cache_path(cache, obj)} does not match its md5 {obj}"
                 for obj, label, state in status if state == "corrupted"]
    return missing, corrupted


def check_git_outs(root: Path, outs: list[Out], rev: str) -> list[str]:
    bad = []
    for o in outs:
        if o.in_git:
            blob = git_bytes(root, rev, o.path)
            if blob is None or hashlib.md5(blob).hexdigest() != o.md5:  # noqa: S324
                bad.append(f"{o.path}: git copy at {rev[:10]} does not match dvc.lock md5 {o.md5}")
    return bad


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


# ----------------------------------------------------------------------------- remote

def default_remote(root: Path) -> str | None:
    proc = subprocess.run([dvc_exe(), "remote", "default"], cwd=root, capture_output=True, text=True)
    name = proc.stdout.strip()
    return name if proc.returncode == 0 and name else None


def ensure_remote(root: Path, url: str | None = None) -> str:
    """The default DVC remote; creates a local-folder one (repo-local config) if none is set.

    Default folder: <repo parent>/<repo name>-dvc-remote, outside the repo so it
    survives a fresh clone next to it. Any DVC URL (s3://, gs://, azure://) works
    through `dvc remote add -d`.
    """
    name = default_remote(root)
    if name and url is None:
        return name
    url = url or str(root.resolve().parent / f"{root.resolve().name}-dvc-remote")
    if "://" not in url:
        Path(url).mkdir(parents=True, exist_ok=True)
    # --local: the machine-specific path goes to .dvc/config.local, not into git.
    dvc(root, "remote", "add", "--local", "--force", "-d", "local", url)
    return "local"


# ----------------------------------------------------------------------------- versions

@dataclass
class Version:
    tag: str
    version: str
    commit: str
    date: str
    record: dict = field(default_factory=dict)
    served: bool = False

    def key_metrics(self) -> dict[str, float]:
        """Headline metrics (accuracy, macro-F1, ECE after calibration) the version's metrics hold."""
        out = {}
        for name, path in KEY_METRICS.items():
            value = self.record.get("metrics", {})
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[name] = value
        return out


# What `publish` writes: vMAJOR.MINOR.PATCH. GTO also accepts pre-releases (v2.0.0-rc1) and build
# metadata; those are never domaintune's own versions (see list_versions).
_RELEASE = re.compile(r"^v(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
_SEMVER_EXTRA = re.compile(r"^v(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)[-+][0-9A-Za-z.+-]+$")


def _semver(v: str) -> tuple[int, int, int]:
    m = _RELEASE.match(v)
    if m is None:
        raise RegistryError(f"{v!r} is not a release version vMAJOR.MINOR.PATCH")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


@dataclass
class SkippedTag:
    """A registry tag list_versions leaves out, and why (shown as a note, never fatal)."""
    tag: str
    reason: str


def _parse_record(tag: str, contents: str) -> tuple[dict, str | None]:
    """The JSON record publish put in a tag message: (record, problem or None)."""
    if RECORD_MARK not in contents:
        return {}, "no domaintune record in the tag message (not made by `domaintune retrain`)"
    try:
        record = json.loads(contents.split(RECORD_MARK, 1)[1].strip())
    except json.JSONDecodeError as exc:
        return {}, f"record JSON unreadable ({exc.msg} at line {exc.lineno} column {exc.colno})"
    if not isinstance(record, dict):
        return {}, f"record is a JSON {type(record).__name__}, not an object"
    return record, None


def scan_versions(root: Path) -> tuple[list[Version], list[SkippedTag]]:
    """Registered release versions (oldest first, served one marked) and the tags left out, with why.

    Pre-releases (`gto register ... --version v2.0.0-rc1`) and tags whose version is not
    vMAJOR.MINOR.PATCH are skipped; a release whose record is missing or malformed is listed with an
    empty record and a note. Nothing GTO or a person writes makes listing fail.
    """
    fmt = "%(refname:strip=2)%00%(creatordate:iso-strict)%00%(*objectname)%00%(objectname)%00%(contents)%01"
    out = git(root, "for-each-ref", f"--format={fmt}", f"refs/tags/{ARTIFACT}@*")
    versions, skipped = [], []
    for chunk in out.split("\x01"):
        chunk = chunk.strip("\n")
        if not chunk:
            continue
        tag, date, peeled, obj, contents = chunk.split("\x00", 4)
        name = tag.split("@", 1)[1]
        if not _RELEASE.match(name):
            why = ("pre-release or build version, not a domaintune release" if _SEMVER_EXTRA.match(name)
                   else "not a version vMAJOR.MINOR.PATCH")
            skipped.append(SkippedTag(tag, why))
            continue
        record, problem = _parse_record(tag, contents)
        if problem:
            skipped.append(SkippedTag(tag, f"listed without a record: {problem}"))
        versions.append(Version(tag, name, peeled or obj, date, record))
    versions.sort(key=lambda v: _semver(v.version))
    served = served_version(root)
    for v in versions:
        v.served = v.version == served
    return versions, skipped


def list_versions(root: Path) -> list[Version]:
    """All registered release versions, oldest first, with the served one marked (see scan_versions)."""
    return scan_versions(root)[0]


def served_version(root: Path) -> str | None:
    """The version GTO last put in stage prod.

    GTO numbers a stage's events (`domaintune#prod#N` assigns, `domaintune#prod!#N`
    unassigns); the highest N is the latest event. (GTO's own `which` ranks by
    SemVer, i.e. the highest version ever in prod, which is not what serving means.)
    """
    fmt = "%(refname:strip=2)%00%(*objectname)%00%(objectname)"
    events = []
    for line in git(root, "for-each-ref", f"--format={fmt}", f"refs/tags/{ARTIFACT}#{SERVED_STAGE}*").splitlines():
        tag, peeled, obj = line.split("\x00")
        parts = tag.split("#")  # the glob also matches other stages such as `production`
        if len(parts) == 3 and parts[1] in (SERVED_STAGE, SERVED_STAGE + "!") and parts[2].isdigit():
            events.append((int(parts[2]), not parts[1].endswith("!"), peeled or obj))
    if not events:
        return None
    _, assigned, commit = max(events)
    if not assigned:
        return None
    fmt = "%(refname:strip=2)%00%(*objectname)%00%(objectname)"
    for line in git(root, "for-each-ref", f"--format={fmt}", f"refs/tags/{ARTIFACT}@v*").splitlines():
        tag, peeled, obj = line.split("\x00")
        name = tag.split("@", 1)[1]
        if (peeled or obj) == commit and _RELEASE.match(name):  # a pre-release on that commit is not served
            return name
    return None


def get_version(root: Path, name: str) -> Version:
    # Accept domaintune@v1.2.0, v1.2.0, 1.2.0, and the short forms v1 / v1.2.
    name = name.split("@", 1)[-1].lstrip("v")
    parts = name.split(".")
    if 1 <= len(parts) < 3 and all(p.isdigit() for p in parts):
        parts += ["0"] * (3 - len(parts))
    name = "v" + ".".join(parts)
    versions, skipped = scan_versions(root)
    for v in versions:
        if v.version == name:
            return v
    known = ", ".join(v.version for v in versions) or "none"
    why = next((f" ({s.tag} exists but is skipped: {s.reason})" for s in skipped
                if s.tag == f"{ARTIFACT}@{name}"), "")
    raise RegistryError(f"no version {name!r} of {ARTIFACT}{why}; known: {known}")


def next_version(versions: list[Version], dataset_hash: str | None) -> str:
    """New data -> new major; same data with new params/code -> new minor."""
    if not versions:
        return "v1.0.0"
    latest = max(versions, key=lambda v: _semver(v.version))
    major, minor, _ = _semver(latest.version)
    if dataset_hash != latest.record.get("dataset_hash"):
        return f"v{major + 1}.0.0"
    return f"v{major}.{minor + 1}.0"


def build_record(root: Path, outs: list[Out]) -> dict:
    """What a version answers: data hash, base model, method, params, metrics."""
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) or {}
    hashes_file = root / "data" / "audited" / "hashes.json"
    dataset_hash = json.loads(hashes_file.read_text())["dataset"] if hashes_file.exists() else None
    metrics = {}
    for o in outs:
        p = root / o.path
        if o.in_git and p.suffix == ".json" and p.is_file():
            metrics[p.stem] = json.loads(p.read_text(encoding="utf-8"))
    return {
        "dataset_hash": dataset_hash,
        "base_model": (params.get("base") or {}).get("model"),
        "method": (params.get("finetune") or {}).get("method"),
        "params": params,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, dict)},
        "outs": {o.path: o.md5 for o in outs},
    }


def _tracked_outputs(root: Path, outs: list[Out]) -> list[str]:
    """Version files plus the outs git should hold (those not git-ignored, i.e. metrics)."""
    paths = [f for f in VERSION_FILES if (root / f).exists()]
    return paths + [o.path for o in outs if o.in_git and (root / o.path).exists()]


def publish(root: Path, summary: str = "retrain", remote: str | None = None) -> tuple[Version, bool]:
    """Push outs, commit the version files, tag with GTO, mark served. Returns (version, created).

    A run that reproduces an existing version exactly (same dvc.lock and params)
    creates nothing and returns that version.
    """
    from gto.api import assign, register

    root = Path(root)
    outs = lock_outs(root)
    versions = list_versions(root)
    lock_now = (root / "dvc.lock").read_bytes()
    params_now = (root / "params.yaml").read_bytes()
    for v in reversed(versions):
        if git_bytes(root, v.commit, "dvc.lock") == lock_now and git_bytes(root, v.commit, "params.yaml") == params_now:
            return v, False
    problems, _ = check_workspace(root, [o for o in outs if not o.in_git], cache_dir(root))
    if problems:
        raise RegistryError("workspace does not match dvc.lock, refusing to publish:\n  " + "\n  ".join(problems))
    record = build_record(root, outs)
    version = next_version(versions, record["dataset_hash"])

    remote = remote or ensure_remote(root)
    dvc(root, "push", "-r", remote)  # first, so a failed push leaves no commit and no tag

    files = _tracked_outputs(root, outs)
    git(root, "add", "--", *files)
    msg = f"{ARTIFACT} {version}: {summary}\n\ndataset {record['dataset_hash']}\n"
    git(root, *_git_identity(root), "commit", "-q", "--allow-empty", "-m", msg, "--", *files)
    commit = git(root, "rev-parse", "HEAD").strip()
    tag_msg = f"{ARTIFACT} {version}: {summary}\n\n{RECORD_MARK} {json.dumps(record, sort_keys=True)}"
    register(str(root), ARTIFACT, commit, version=version, message=tag_msg)
    assign(str(root), ARTIFACT, SERVED_STAGE, version=version, message=f"serve {version}")
    return get_version(root, version), True


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


# ----------------------------------------------------------------------------- rollback

def verify_version(root: Path, version: Version, fetch: bool = True) -> list[Out]:
    """Check that everything `version` needs is present and intact, fetching missing objects.

    Touches only the DVC cache (adds fetched objects); raises RegistryError listing
    every missing or corrupted object otherwise.
    """
    outs = lock_outs(root, version.commit)
    bad_git = check_git_outs(root, outs, version.commit)
    cache = cache_dir(root)
    before = _cache_status(outs, cache)
    missing, corrupted = check_cache(root, outs, cache)
    fetch_note = []
    if missing and fetch and not corrupted:
        note = _fetch(root, version.commit)
        had = {obj for obj, _, state in before if state == "ok"}
        for obj, label, state in _cache_status(outs, cache):
            if state == "corrupted" and obj not in had:
                # Fetched just now and wrong: the remote's copy is bad. Never leave it in the local cache.
                cache_path(cache, obj).unlink(missing_ok=True)
                fetch_note.append(f"{label}: the DVC remote's copy of {obj} does not match its md5 "
                                  "(not kept in the local cache)")
        missing, corrupted = check_cache(root, outs, cache)
        if missing and note:
            fetch_note.append(f"fetch from the DVC remote: {note}")
    problems = bad_git + corrupted + missing + fetch_note
    if problems:
        raise RegistryError(f"cannot restore {version.tag}; nothing was changed:\n  " + "\n  ".join(problems))
    return outs


def _fetch(root: Path, commit: str) -> str | None:
    """Fetch the objects of `commit` from the default remote; returns what went wrong, if anything."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    remote = default_remote(root)
    if remote is None:
        return "no DVC remote configured"
    try:
        with Repo(str(root)) as repo:
            # The objects of that commit only; workspace=False: the current outs are not needed.
            repo.fetch(revs=[commit], workspace=False, remote=remote)
    except DvcException as exc:  # some objects are not on the remote either: reported by the caller
        return f"{remote}: {exc}"
    return None


def version_files(root: Path) -> list[str]:
    """What a version restores from git: VERSION_FILES plus the git-tracked outs dvc.lock names."""
    files = set(VERSION_FILES)
    if (root / "dvc.lock").exists():
        files |= {o.path for o in lock_outs(root) if o.in_git}
    return sorted(files)


@contextlib.contextmanager
def restored_on_failure(root: Path, files: list[str]) -> Iterator[None]:
    """If the block fails, put `files` back byte for byte, unstage those that were not staged
    before (with core.autostage DVC `git add`s dvc.lock as it runs) and check the outs out again
    as the restored dvc.lock names them (they are in the cache)."""
    before = {f: ((root / f).read_bytes() if (root / f).is_file() else None) for f in files}
    staged = set(git(root, "diff", "--cached", "--name-only").splitlines())
    try:
        yield
    except BaseException:
        for f, data in before.items():
            if data is None:
                (root / f).unlink(missing_ok=True)
            else:
                (root / f).write_bytes(data)
        unstage = [f for f in files if f not in staged]
        if unstage:
            git(root, "reset", "-q", "--", *unstage, check=False)
        if (root / "dvc.lock").exists():
            with contextlib.suppress(RegistryError):
                dvc(root, "checkout", "--force")
        raise


def rollback_files(root: Path, version: Version) -> list[str]:
    """The files rollback writes from git: VERSION_FILES (deleted where the version lacks one) and the
    git-kept outs (metrics) of the target version."""
    return sorted(set(VERSION_FILES) | {o.path for o in lock_outs(root, version.commit) if o.in_git})


def check_no_local_edits(root: Path, version: Version) -> None:
    """Refuse (RegistryError naming the files) if rollback to `version` would overwrite or delete a file
    that differs from HEAD (an uncommitted edit, or an untracked file in its place)."""
    files = rollback_files(root, version)
    status = git(root, "status", "--porcelain", "--untracked-files=all", "--", *files)
    lost = []
    for line in status.splitlines():
        path = line[3:].split(" -> ")[-1].strip('"')
        here = root / path
        now = here.read_bytes() if here.is_file() else None
        if now != git_bytes(root, version.commit, path):  # rollback would change it: the edit would be lost
            lost.append(path)
    if lost:
        raise RegistryError(f"rollback to {version.tag} would overwrite uncommitted changes to "
                            f"{', '.join(sorted(lost))}; commit or discard them first (nothing was changed)")


def rollback(root: Path, name: str) -> tuple[Version, int]:
    """Restore version `name` (files, outs), verify every file, commit, mark served. Returns (version, files checked)."""
    root = Path(root)
    version = get_version(root, name)
    with repo_lock(root):
        check_no_local_edits(root, version)  # before fetching anything
        return restore_version(root, version, verify_version(root, version))


def restore_version(root: Path, version: Version, outs: list[Out]) -> tuple[Version, int]:
    """rollback's second half: the caller holds repo_lock and got `outs` from verify_version."""
    from gto.api import assign

    check_no_local_edits(root, version)
    cache = cache_dir(root)
    files = rollback_files(root, version)
    with restored_on_failure(root, files):
        for f in files:
            blob = git_bytes(root, version.commit, f)
            if blob is None:
                if (root / f).exists():
                    (root / f).unlink()
                continue
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            (root / f).write_bytes(blob)
        dvc(root, "checkout", "--force")
        problems, checked = check_workspace(root, outs, cache)
        if problems:
            raise RegistryError(f"restored files of {version.tag} fail verification:\n  " + "\n  ".join(problems))
    changed = git(root, "status", "--porcelain", "--", *files).strip()
    if changed:
        git(root, "add", "--", *[f for f in files if (root / f).exists()])
        # a version file neither version has (e.g. no run summary yet) is no pathspec git knows
        known = [f for f in files if (root / f).exists() or git_bytes(root, "HEAD", f) is not None]
        git(root, *_git_identity(root), "commit", "-q", "-m", f"rollback to {version.tag}", "--", *known)
    if served_version(root) != version.version:
        assign(str(root), ARTIFACT, SERVED_STAGE, version=version.version, message=f"rollback to {version.version}",
               force=True)  # force: re-serving a version that was served before needs a new tag
    return get_version(root, version.version), checked
