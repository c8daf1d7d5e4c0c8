"""Registry plumbing: git and DVC subprocesses, the repository lock and its journal, the watchdog that ends
a retrain's children with it, the DVC remote, and dvc.lock's outs.

Everything else in domaintune.registry is built on these. GTO names the model `ARTIFACT`; the served
version is the one in stage `SERVED_STAGE` (tags `domaintune#prod#N`, the latest assignment wins).
"""
from __future__ import annotations

import contextlib
import contextvars
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import yaml

ARTIFACT = "domaintune"
SERVED_STAGE = "prod"
CHALLENGER_STAGE = "challenger"  # published, not yet decided (domaintune.registry.promotion)
REJECTED_STAGE = "rejected"
LOCK_PATH = Path(".domaintune") / "retrain.lock"
# Beside the lock: what the running retrain or rollback must undo if it dies ("undo": the files as they were
# before it changed any), and the stage assignment a registered tag still waits for ("promote").
JOURNAL_PATH = Path(".domaintune") / "journal.json"
# Tests only (see fault_point): the phase at which the process SIGKILLs itself.
KILL_AT_ENV = "DOMAINTUNE_TEST_KILL_AT"


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
    _state_dir(root)
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise BusyError(f"{path}: a retrain or rollback is already running ({holder}); "
                        "wait for it to finish, nothing was changed") from None
    start_watchdog()  # whatever this process starts from here on ends with it, even on SIGKILL
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


def _state_dir(root: Path) -> Path:
    folder = Path(root).resolve() / LOCK_PATH.parent
    folder.mkdir(parents=True, exist_ok=True)
    ignore = folder / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")  # the lock folder never shows up in git status
    return folder


# ----------------------------------------------------------------------------- journal

def read_journal(root: Path) -> dict | None:
    """The journal an unfinished retrain or rollback left (None: there is none)."""
    path = Path(root).resolve() / JOURNAL_PATH
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # it is only ever replaced whole, so this is a person's edit
        raise RegistryError(f"{path}: unreadable ({exc}); delete it to go on without recovering "
                            "what an interrupted retrain or rollback left") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: not a JSON object; delete it to go on without recovering "
                            "what an interrupted retrain or rollback left")
    return data


def write_journal(root: Path, data: dict | None) -> None:
    """Replace the journal in one rename (flushed to disk first), or delete it (data None)."""
    folder = _state_dir(root)
    path = folder / JOURNAL_PATH.name
    if data is None:
        path.unlink(missing_ok=True)
    else:
        tmp = folder / f"{JOURNAL_PATH.name}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename (or the unlink) itself survives a crash
    finally:
        os.close(fd)


def update_journal(root: Path, **entries) -> None:
    """Set (value) or drop (None) top-level entries of the journal; the last one dropped deletes it."""
    data = {**(read_journal(root) or {}), **entries}
    data = {k: v for k, v in data.items() if v is not None}
    write_journal(root, data or None)


def fault_point(name: str) -> None:
    """SIGKILL this process here when DOMAINTUNE_TEST_KILL_AT names this phase: how tests kill a real
    retrain or rollback at an exact point. Honoured only under pytest (PYTEST_CURRENT_TEST is set)."""
    if os.environ.get(KILL_AT_ENV) == name and "PYTEST_CURRENT_TEST" in os.environ:
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- watchdog

# A process that takes the repository lock starts one watchdog (start_watchdog): a small child in its own
# session that reads a pipe only this process writes to, and every WATCH_SECONDS lists this process's
# descendants (dvc repro and the stage it runs, Prefect's temporary server, git, GTO). When the pipe
# closes (this process exited, however: SIGKILL included), it sends SIGTERM to each descendant still
# alive and to the process group each one leads (`dvc repro` leads its own, so a stage command started
# since the last look is in it), and to a child started since the last look (see _orphans), then SIGKILL
# after GRACE_SECONDS. A process is identified by pid and start time, so a reused pid is never hit.
# Linux (/proc); elsewhere the watchdog does nothing.
WATCH_SECONDS = 0.25
GRACE_SECONDS = 5.0
_watchdog: subprocess.Popen | None = None
_watchdog_owner = 0
_watchdog_lock = threading.Lock()


def start_watchdog() -> None:
    """Start this process's watchdog if it has none (once per process; it lives as long as the process)."""
    global _watchdog, _watchdog_owner
    if not Path("/proc/self/stat").exists():
        return
    with _watchdog_lock:
        if _watchdog is not None and _watchdog_owner == os.getpid() and _watchdog.poll() is None:
            return
        package_root = str(Path(__file__).resolve().parents[2])
        code = (f"import sys; sys.path.insert(0, {package_root!r}); "
                "from domaintune.registry.plumbing import watch_parent; watch_parent(int(sys.argv[1]))")
        _watchdog = subprocess.Popen([sys.executable, "-c", code, str(os.getpid())], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        _watchdog_owner = os.getpid()


def poke_watchdog() -> None:
    """Make the watchdog look at this process's children now (call right after starting one)."""
    with _watchdog_lock:
        if _watchdog is not None and _watchdog_owner == os.getpid() and _watchdog.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                _watchdog.stdin.write(b"\n")
                _watchdog.stdin.flush()


class _Proc(NamedTuple):
    ppid: int
    pgid: int
    sid: int
    start: int  # clock ticks after boot: with the pid, names one process for good


def _stat(pid: int) -> _Proc | None:
    """A live process's parent, group, session and start time; None if it is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return _Proc(int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]))


def _descendants(pid: int) -> dict[int, tuple[int, int]]:
    """Every live descendant of `pid`: pid -> (start time, pgid)."""
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                kids = Path(f"/proc/{parent}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            for kid in map(int, kids):
                st = _stat(kid)
                if st is not None and kid not in found:
                    found[kid] = (st.start, st.pgid)
                    todo.append(kid)
    return found


def _orphans(parent: int, was: _Proc) -> dict[int, tuple[int, int]]:
    """Children the parent started too recently for the last look, found after it died: handed to the
    watchdog's own new parent (the reaper), in the dead parent's session and process group (Prefect's
    server, say), started after it. pid -> (start time, pgid)."""
    deadline = time.monotonic() + 2
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.01)  # the kernel closes a dying process's files (our EOF) before it re-parents
    reaper, found = os.getppid(), {}
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            st = _stat(int(name))
            if st is not None and st.ppid == reaper and st.sid == was.sid and st.pgid == was.pgid \
                    and st.start >= was.start:
                found[int(name)] = (st.start, st.pgid)
    return found


def _same(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st.start == start


def _signal_all(known: dict[int, tuple[int, int]], sig: int) -> None:
    for pid, (start, pgid) in known.items():
        if pgid == pid:
            st = _stat(pid)
            # The group is this one while its leader lives (same start time) or, leader gone, while any
            # member does: Linux reuses no pid that is still some group's id.
            if st is None or st.start == start:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, sig)
        if _same(pid, start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def _any_left(known: dict[int, tuple[int, int]]) -> bool:
    for pid, (start, pgid) in known.items():
        if _same(pid, start):
            return True
        if pgid == pid and _stat(pid) is None:
            try:
                os.killpg(pid, 0)
                return True
            except (ProcessLookupError, PermissionError):
                pass
    return False


def watch_parent(parent: int) -> None:
    """The watchdog's body (see start_watchdog): returns once the parent's descendants are ended."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # a Ctrl-C or hang-up meant for the parent must not stop this
    was = _stat(parent)
    if was is None:
        return
    me, known = os.getpid(), {}
    while True:
        ready, _, _ = select.select([0], [], [], WATCH_SECONDS)
        if ready and not os.read(0, 4096):
            break  # the parent closed the pipe: it has exited
        st = _stat(parent)
        if st is None or st.start != was.start:
            break
        # Keep the ones seen before that still live: a child orphaned a moment ago is no descendant now.
        known = {p: v for p, v in known.items() if _same(p, v[0])} | _descendants(parent)
        known.pop(me, None)
    known |= _orphans(parent, was)
    _signal_all(known, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    while _any_left(known) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal_all(known, signal.SIGKILL)


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
