"""Atomic outputs and JSON files: a crash leaves the old output or none, never half of one; an output never
replaces a folder domaintune did not write.

Ownership: every folder atomic_output writes holds OUTPUT_MARKER (".domaintune-output", fixed content), and
atomic_output replaces an existing folder only when it holds that marker or is a claimed output
(claimed_outputs: a path the caller knows is domaintune's although it has no marker, e.g. a stage's
DVC-declared out written by an older version). Any other folder (the user's part files, a folder of inputs)
is refused with one DataError line, so `--out` never deletes what domaintune did not write. A file at the
output path is replaced (what an output path means), a symbolic link is replaced, never followed.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from domaintune.core.errors import DataError

TMP_MARK = ".tmp-"  # atomic_output's temporaries: ".<name>.tmp-<pid>-<random>" next to the output
OUTPUT_MARKER = ".domaintune-output"  # in every folder atomic_output writes: "domaintune may replace this folder"
MARKER_TEXT = ("This folder was written by domaintune, which replaces it as a whole when it writes this output "
               "again.\nA folder without this file is never replaced or deleted by domaintune.\n")
_CLAIMED: list[Path] = []  # claimed_outputs' paths (real paths), innermost claim last



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
def claimed_outputs(paths: Iterable[str | os.PathLike]) -> Iterator[None]:
    """Within the block, an unmarked folder that is or sits inside one of `paths` counts as domaintune's own
    (is_owned). For paths the caller knows domaintune owns without a marker: run_stage claims the outs that
    dvc.yaml declares (DVC owns those: `dvc repro` deletes them itself before it runs the stage)."""
    added = [Path(os.path.realpath(p)) for p in paths]
    _CLAIMED.extend(added)
    try:
        yield
    finally:
        del _CLAIMED[len(_CLAIMED) - len(added):]


def is_owned(path: str | os.PathLike) -> bool:
    """True when the folder `path` holds domaintune's OUTPUT_MARKER or is (inside) a claimed output."""
    path = Path(path)
    if (path / OUTPUT_MARKER).is_file():
        return True
    real = Path(os.path.realpath(path))
    return any(real == c or c in real.parents for c in _CLAIMED)


def check_replaceable(path: str | os.PathLike, what: str | None = None) -> None:
    """DataError unless writing an output at `path` may replace what is there: nothing, a file, a link, or a
    folder domaintune owns (is_owned). `what` names the path for the user (e.g. "--out")."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink() and not is_owned(path):
        raise DataError(path, None, None, f"{what + ': ' if what else ''}an existing folder that domaintune did not "
                        f"write (it has no {OUTPUT_MARKER} file); refusing to replace it: move it away or choose "
                        "another output path")


def mark_output_folder(path: str | os.PathLike) -> Path:
    """Create the folder `path` (if missing) as domaintune's own, holding OUTPUT_MARKER: for a folder of
    outputs (e.g. `monitor --watch`'s one report folder per batch). An existing folder must be owned already
    (check_replaceable)."""
    path = Path(path)
    check_replaceable(path)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / OUTPUT_MARKER).is_file():
        (path / OUTPUT_MARKER).write_text(MARKER_TEXT, encoding="utf-8")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds.

    A stage that crashes half-way therefore leaves no partial output behind.
    A file is replaced in one rename; a folder in two (the old one is moved aside
    next to the new one, then the new one moved in), and the old one is deleted
    only after that. Works for files and
    directories (the block decides which it creates at the yielded path).
    A folder output gets OUTPUT_MARKER; an existing folder at `path` is replaced only if domaintune owns it
    (check_replaceable, before the block runs and again before the swap), else a DataError.
    Temporaries a killed run left next to `path` are deleted first (remove_stale_temporaries),
    and the output gets the umask's modes (apply_umask_modes), whatever wrote it.
    """
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_MARK}{os.getpid()}-", dir=path.parent))
    tmp = tmp_root / path.name
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"stage produced no output at {path}")
        if tmp.is_dir() and not tmp.is_symlink():
            (tmp / OUTPUT_MARKER).write_text(MARKER_TEXT, encoding="utf-8")
        apply_umask_modes(tmp)
        check_replaceable(path)  # again: the block may have run for hours
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


def json_lines(path: str | os.PathLike, errors: str = "strict") -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSONL log; a line that is not a JSON object raises
    DataError naming the file and line (the one reader of the logs domaintune writes)."""
    with open(path, encoding="utf-8", errors=errors) as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, n, None, f"not JSON: {exc.msg}") from None
            if not isinstance(rec, dict):
                raise DataError(path, n, None, "not a JSON object")
            yield n, rec
