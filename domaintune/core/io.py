"""Atomic outputs and JSON files: a crash leaves the old output or none, never half of one."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

TMP_MARK = ".tmp-"  # atomic_output's temporaries: ".<name>.tmp-<pid>-<random>" next to the output



def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True



def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the `.NAME.tmp-*` siblings of `path` that a killed run left behind; return them.

    A temporary is stale unless its name carries the pid of a live process other than this
    one (this process's own are in use by an enclosing atomic_output). Names without a pid
    (older versions) are always stale.
    """
    path = Path(path)
    prefix = f".{path.name}{TMP_MARK}"
    removed = []
    if not path.parent.is_dir():
        return removed
    for sib in path.parent.iterdir():
        if not sib.name.startswith(prefix):
            continue
        pid = sib.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and (int(pid) == os.getpid() or _pid_alive(int(pid))):
            continue
        if sib.is_dir() and not sib.is_symlink():
            shutil.rmtree(sib, ignore_errors=True)
        else:
            sib.unlink(missing_ok=True)
        removed.append(sib)
    return removed



def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask can only read by setting)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask



def apply_umask_modes(root: str | os.PathLike) -> None:
    """Give `root` and everything under it the mode a plain open()/mkdir() gets under the umask.

    Libraries write through private temporaries (safetensors: 0600 files; tempfile: 0700
    folders); outputs must be readable by whoever the umask says (e.g. a non-root server).
    A file keeps its executable bits only if its owner had them.
    """
    mask = _umask()
    root = Path(root)
    if root.is_symlink():
        return
    entries = [root] + (list(root.rglob("*")) if root.is_dir() else [])
    for p in entries:
        if p.is_symlink():
            continue
        if p.is_dir():
            mode = 0o777
        else:
            mode = 0o777 if os.stat(p).st_mode & 0o100 else 0o666
        os.chmod(p, mode & ~mask)



@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds.

    A stage that crashes half-way therefore leaves no partial output behind.
    A file is replaced in one rename; a folder in two (the old one is moved aside
    next to the new one, then the new one moved in), and the old one is deleted
    only after that. Works for files and
    directories (the block decides which it creates at the yielded path).
    Temporaries a killed run left next to `path` are deleted first (remove_stale_temporaries),
    and the output gets the umask's modes (apply_umask_modes), whatever wrote it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_MARK}{os.getpid()}-", dir=path.parent))
    tmp = tmp_root / path.name
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"stage produced no output at {path}")
        apply_umask_modes(tmp)
        if path.is_dir() and not path.is_symlink():
            os.replace(path, tmp_root / ".replaced")  # same folder, so a rename; deleted below
        elif tmp.is_dir() and (path.exists() or path.is_symlink()):
            path.unlink()  # a file where a folder goes: os.replace cannot swap the two kinds
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)



def write_json(path: str | os.PathLike, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, ensure_ascii=False)
        fh.write("\n")



def read_json(path: str | os.PathLike):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)

