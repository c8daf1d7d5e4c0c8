"""Rollback: verify a version's objects (fetching what is missing), restore its files and outs, serve it;
put files back when a retrain or rollback fails, and recover what a killed one left.

Rollback never trusts the cache: it checks every object that version needs
(the md5 DVC named it by, and for directories each file listed in the .dir
manifest) before touching the workspace, fetches what is missing from the
remote, and after `dvc checkout` checks every restored file against dvc.lock
again. Any mismatch puts the previous state back and raises.

A retrain or rollback journals the files it may change before changing any
(restored_on_failure), and a registered tag whose stage assignment is pending
(publish, restore_version). The next retrain, rollback or `versions` calls
recover(): a pending assignment whose tag exists is completed, anything else
the killed run changed is put back, and one line says which.
"""
from __future__ import annotations

import base64
import contextlib
import contextvars
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Iterator

from domaintune.registry import promotion
from domaintune.registry.cache import cache_dir, check_workspace, verify_objects
from domaintune.registry.plumbing import (
    ARTIFACT,
    CHALLENGER_STAGE,
    SERVED_STAGE,
    BusyError,
    Out,
    RegistryError,
    dvc,
    fault_point,
    git,
    git_bytes,
    git_identity,
    lock_outs,
    read_journal,
    repo_lock,
    update_journal,
    write_journal,
)
from domaintune.registry.versions import VERSION_FILES, Version, get_version, list_versions, stage_version

# Roots whose journal this context (thread, or a Prefect run that copied its context) is writing: the flow
# that `domaintune retrain` runs inside its own journaled block neither journals again nor recovers.
_JOURNALED: contextvars.ContextVar[frozenset] = contextvars.ContextVar("domaintune_journaled", default=frozenset())


def verify_version(root: Path, version: Version, fetch: bool = True) -> list[Out]:
    """Check that everything `version` needs is present and intact, fetching missing objects.

    Touches only the DVC cache (adds fetched objects); raises RegistryError listing
    every missing or corrupted object otherwise.
    """
    outs = lock_outs(root, version.commit)
    problems = check_git_outs(root, outs, version.commit) + verify_objects(root, outs, version.commit, fetch)
    if problems:
        raise RegistryError(f"cannot restore {version.tag}; nothing was changed:\n  " + "\n  ".join(problems))
    return outs


def check_git_outs(root: Path, outs: list[Out], rev: str) -> list[str]:
    """The git-kept outs (metrics) at `rev` whose blob does not match its dvc.lock md5, one line each."""
    bad = []
    for o in outs:
        if o.in_git:
            blob = git_bytes(root, rev, o.path)
            if blob is None or hashlib.md5(blob).hexdigest() != o.md5:  # noqa: S324
                bad.append(f"{o.path}: git copy at {rev[:10]} does not match dvc.lock md5 {o.md5}")
    return bad


@contextlib.contextmanager
def restored_on_failure(root: Path, files: list[str], op: str = "retrain") -> Iterator[None]:
    """If the block fails, put `files` back byte for byte, unstage those that were not staged
    before (with core.autostage DVC `git add`s dvc.lock as it runs) and check the outs out again
    as the restored dvc.lock names them (they are in the cache).

    The same state is journaled (plumbing.JOURNAL_PATH, flushed to disk) before the block runs, so
    when the process is killed instead, the next run's recover() puts them back. The caller holds
    repo_lock. A block that publishes or promotes a version ends the journal there (its changes are the
    version now): a failure after that point puts nothing back. Nested on one root: the outer one acts."""
    key = str(Path(root).resolve())
    if key in _JOURNALED.get():
        yield
        return
    before = {f: ((root / f).read_bytes() if (root / f).is_file() else None) for f in files}
    staged = sorted(set(git(root, "diff", "--cached", "--name-only").splitlines()))
    write_journal(root, {"undo": {"op": op, "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                  "staged": staged,
                                  "files": {f: None if b is None else base64.b64encode(b).decode()
                                            for f, b in before.items()}}})
    token = _JOURNALED.set(_JOURNALED.get() | {key})
    try:
        yield
    except BaseException:
        journal = read_journal(root)
        promote = (journal or {}).get("promote")
        if journal is None or "undo" not in journal:
            raise  # a version was published or promoted: the run's changes are that version
        if promote is not None and _registered(root, promote) is not None:
            raise  # the tag exists, its stage assignment failed: the journal stays for recover() to complete
        _put_back(root, before, set(staged))
        write_journal(root, None)
        raise
    else:
        write_journal(root, None)
    finally:
        _JOURNALED.reset(token)


def _put_back(root: Path, before: dict[str, bytes | None], staged: set[str]) -> None:
    for f, data in before.items():
        if data is None:
            (root / f).unlink(missing_ok=True)
        else:
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            (root / f).write_bytes(data)
    unstage = [f for f in before if f not in staged]
    if unstage:
        git(root, "reset", "-q", "--", *unstage, check=False)
    if (root / "dvc.lock").exists():
        with contextlib.suppress(RegistryError):
            dvc(root, "checkout", "--force")


def _registered(root: Path, promote: dict) -> Version | None:
    """The version a journal's promote entry names, if its tag exists on the commit it names."""
    tag = promote.get("tag")
    for v in list_versions(root):
        if v.tag == tag and promote.get("commit") in (None, v.commit):
            return v
    return None


def recover(root: Path) -> str | None:
    """Finish or undo what a killed retrain or rollback left; the caller holds repo_lock.

    A pending stage assignment whose tag exists is completed (the rollback's commit made if it was not);
    otherwise the files the killed run journaled are put back and the outs checked out as they name
    them. Returns one line saying what was found and done, or None when nothing was pending (or the
    journal is this context's own running one)."""
    root = Path(root)
    if str(root.resolve()) in _JOURNALED.get():
        return None
    journal = read_journal(root)
    if journal is None:
        return None
    undo, promote = journal.get("undo") or {}, journal.get("promote") or {}
    run = f"an interrupted {undo.get('op') or promote.get('op') or 'run'}"
    if undo.get("pid"):
        run += f" (pid {undo['pid']}, started {undo.get('started', '?')})"
    if promote:
        version = _registered(root, promote)
        if version is not None:
            said = _complete(root, version, promote, run)
            write_journal(root, None)
            return said
        run += f", whose tag {promote.get('tag')} was never registered,"
    before = {f: None if b is None else base64.b64decode(b) for f, b in (undo.get("files") or {}).items()}
    changed = [f for f, b in before.items() if ((root / f).read_bytes() if (root / f).is_file() else None) != b]
    if before:
        _put_back(root, before, set(undo.get("staged") or []))
    write_journal(root, None)
    if not before:
        return f"found {run.rstrip(',')}: nothing to put back"
    if not changed:
        return f"found {run.rstrip(',')}: its files were unchanged; outs checked out again as dvc.lock names them"
    return f"restored {', '.join(changed)} as they were before {run} and the outs as that dvc.lock names them"


def _complete(root: Path, version: Version, promote: dict, run: str) -> str:
    """Make the commit a killed rollback had not made (workspace = the version), then assign the stage."""
    # lazy: GTO loads only when a stage assignment is due
    from gto.api import assign

    stage = promote.get("stage") or SERVED_STAGE
    done = []
    if promote.get("op") == "rollback":
        files = rollback_files(root, version)
        same = all(((root / f).read_bytes() if (root / f).is_file() else None) == git_bytes(root, version.commit, f)
                   for f in files)
        if same and git(root, "status", "--porcelain", "--", *files).strip():
            _commit_rollback(root, version, files)
            done.append(f"committed the rollback to {version.version}")
    if stage_version(root, stage) != version.version:
        assign(str(root), ARTIFACT, stage, version=version.version, force=True,
               message=promote.get("message") or
               f"{promote.get('op', 'promote')} {version.version} (completed after an interruption)")
        done.append(f"assigned {version.version} to stage {stage}" + (", now served" if stage == SERVED_STAGE else ""))
    if stage == CHALLENGER_STAGE:
        said = _decide_pending(root, version)
        if said:
            done.append(said)
    if not done:
        return f"found {run}: {version.tag} was registered and in stage {stage} already; nothing left to do"
    return f"completed {run} of {version.tag}: it was registered, not in stage {stage}; {' and '.join(done)}"


def _decide_pending(root: Path, version: Version) -> str | None:
    """Carry out the promotion decision a killed retrain recorded with its version (metrics/promotion.json at
    its commit) when the version is still the undecided challenger."""
    raw = git_bytes(root, version.commit, "metrics/promotion.json")
    try:
        decision = json.loads(raw) if raw else {}
    except ValueError:
        return None
    if decision.get("decision") not in ("promote", "reject") or promotion.challenger(root) != version.version:
        return None
    if decision["decision"] == "promote" and stage_version(root, SERVED_STAGE) != version.version:
        promotion.promote(root, version.version, decision.get("reason", ""), decision)
        return f"promoted {version.version} as its retrain decided, now served"
    promotion.reject(root, version.version, decision.get("reason", ""), decision)
    return f"rejected {version.version} as its retrain decided"


def recover_if_idle(root: Path) -> str | None:
    """recover() for a command that otherwise takes no lock (`versions`): None when no journal is
    left, or when a retrain or rollback is running (the journal is its own)."""
    if read_journal(root) is None:
        return None
    try:
        with repo_lock(root):
            return recover(root)
    except BusyError:
        return None


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
    """Restore version `name` (files, outs), verify every file, commit, mark served.

    Returns (version, files checked)."""
    root = Path(root)
    version = get_version(root, name)
    with repo_lock(root):
        check_no_local_edits(root, version)  # before fetching anything
        return restore_version(root, version, verify_version(root, version))


def restore_version(root: Path, version: Version, outs: list[Out]) -> tuple[Version, int]:
    """rollback's second half: the caller holds repo_lock and got `outs` from verify_version."""
    from gto.api import assign  # heavy: GTO loads only when restoring

    check_no_local_edits(root, version)
    cache = cache_dir(root)
    files = rollback_files(root, version)
    with restored_on_failure(root, files, op="rollback"):
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
        fault_point("rollback-restored")
        # From here the workspace is the version: a killed run is completed by recover(), not undone.
        update_journal(root, promote={"op": "rollback", "tag": version.tag, "commit": version.commit,
                                      "stage": SERVED_STAGE})
        if git(root, "status", "--porcelain", "--", *files).strip():
            _commit_rollback(root, version, files)
        fault_point("rollback-committed")
        if stage_version(root, SERVED_STAGE) != version.version:
            assign(str(root), ARTIFACT, SERVED_STAGE, version=version.version,
                   message=f"rollback to {version.version}",
                   force=True)  # force: re-serving a version that was served before needs a new tag
        write_journal(root, None)
    return get_version(root, version.version), checked


def _commit_rollback(root: Path, version: Version, files: list[str]) -> None:
    git(root, "add", "--", *[f for f in files if (root / f).exists()])
    # a version file neither version has (e.g. no run summary yet) is no pathspec git knows
    known = [f for f in files if (root / f).exists() or git_bytes(root, "HEAD", f) is not None]
    git(root, *git_identity(root), "commit", "-q", "-m", f"rollback to {version.tag}", "--", *known)
