"""Rollback: verify a version's objects (fetching what is missing), restore its files and outs, serve it.

Rollback never trusts the cache: it checks every object that version needs
(the md5 DVC named it by, and for directories each file listed in the .dir
manifest) before touching the workspace, fetches what is missing from the
remote, and after `dvc checkout` checks every restored file against dvc.lock
again. Any mismatch puts the previous state back and raises.
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Iterator

from domaintune.registry.cache import cache_dir, check_workspace, verify_objects
from domaintune.registry.plumbing import (
    ARTIFACT,
    SERVED_STAGE,
    Out,
    RegistryError,
    dvc,
    git,
    git_bytes,
    git_identity,
    lock_outs,
    repo_lock,
)
from domaintune.registry.versions import VERSION_FILES, Version, get_version, served_version


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
        git(root, *git_identity(root), "commit", "-q", "-m", f"rollback to {version.tag}", "--", *known)
    if served_version(root) != version.version:
        assign(str(root), ARTIFACT, SERVED_STAGE, version=version.version, message=f"rollback to {version.version}",
               force=True)  # force: re-serving a version that was served before needs a new tag
    return get_version(root, version.version), checked
