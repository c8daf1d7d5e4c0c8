"""Registry plumbing: git and DVC subprocesses, the repository lock, the DVC remote, and dvc.lock's outs.

Everything else in domaintune.registry is built on these. GTO names the model `ARTIFACT`; the served
version is the one in stage `SERVED_STAGE` (tags `domaintune#prod#N`, the latest assignment wins).
"""
from __future__ import annotations

import contextlib
import contextvars
import fcntl
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

ARTIFACT = "domaintune"
SERVED_STAGE = "prod"
LOCK_PATH = Path(".domaintune") / "retrain.lock"


class RegistryError(RuntimeError):
    """A registry operation refused or failed; the message says what and where."""


class BusyError(RegistryError):
    """Another retrain or rollback holds the repository lock."""


# ----------------------------------------------------------------------------- git and dvc

def git(root: Path, *args: str, check: bool = True, input: bytes | None = None) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, input=input)
    if check and proc.returncode != 0:
        raise RegistryError(f"git {' '.join(args)} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode("utf-8", errors="replace")


def git_bytes(root: Path, rev: str, path: str) -> bytes | None:
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True)
    return proc.stdout if proc.returncode == 0 else None


def git_identity(root: Path) -> list[str]:
    """`-c user.name/email` only where the repo has no identity, so commits never fail for want of one."""
    args = []
    if not git(root, "config", "user.name", check=False).strip():
        args += ["-c", "user.name=domaintune"]
    if not git(root, "config", "user.email", check=False).strip():
        args += ["-c", "user.email=domaintune@localhost"]
    return args


def dvc_exe() -> str:
    """The dvc next to this interpreter (the project venv), else the one on PATH."""
    here = Path(sys.executable).parent / "dvc"
    return str(here) if here.exists() else (shutil.which("dvc") or "dvc")


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([dvc_exe(), *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RegistryError(f"dvc {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}".strip())
    return proc


# ----------------------------------------------------------------------------- repository lock

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
