"""Published versions: the Version record, listing, the served version, and publish (push, commit, GTO tag).

A version is a git commit holding params.yaml, dvc.yaml, dvc.lock and the
metrics, tagged by GTO as `domaintune@vX.Y.Z` (an annotated tag whose message
carries a JSON record: dataset content hash, base model, method, params and
metrics), whose DVC-tracked outputs are pushed to the DVC remote. The served
version is the one GTO has in stage `prod` (tags `domaintune#prod#N`, the
latest assignment wins).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from domaintune.core.params import read_params_file
from domaintune.registry.cache import cache_dir, check_workspace
from domaintune.registry.plumbing import (
    ARTIFACT,
    CHALLENGER_STAGE,
    SERVED_STAGE,
    Out,
    RegistryError,
    dvc,
    ensure_remote,
    fault_point,
    git,
    git_bytes,
    git_identity,
    lock_outs,
    update_journal,
    write_journal,
)

# Files that, with the DVC cache, fully describe a version.
VERSION_FILES = ("params.yaml", "dvc.yaml", "dvc.lock", "metrics/summary.json", "metrics/promotion.json")
RECORD_MARK = "domaintune-record:"
# Metrics shown in the versions table when present: name -> (file stem, key path). The evaluate
# stage writes {"before": {...}, "after": {...}}; the headline is after temperature calibration.
KEY_METRICS = {"evaluate.accuracy": ("evaluate", "after", "accuracy"),
               "evaluate.macro_f1": ("evaluate", "after", "macro_f1"),
               "evaluate.ece": ("evaluate", "after", "ece")}


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
    """The version GTO last put in stage prod (see stage_version)."""
    return stage_version(root, SERVED_STAGE)


def stage_version(root: Path, stage: str) -> str | None:
    """The version GTO last put in `stage`.

    GTO numbers a stage's events (`domaintune#prod#N` assigns, `domaintune#prod!#N`
    unassigns); the highest N is the latest event. (GTO's own `which` ranks by
    SemVer, i.e. the highest version ever in prod, which is not what serving means.)
    """
    fmt = "%(refname:strip=2)%00%(*objectname)%00%(objectname)"
    events = []
    for line in git(root, "for-each-ref", f"--format={fmt}", f"refs/tags/{ARTIFACT}#{stage}*").splitlines():
        tag, peeled, obj = line.split("\x00")
        parts = tag.split("#")  # the glob also matches other stages such as `production`
        if len(parts) == 3 and parts[1] in (stage, stage + "!") and parts[2].isdigit():
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
    params = read_params_file(root / "params.yaml")  # YAML 1.2, as the stages read it (2e-5 is a float)
    hashes_file = root / "data" / "audited" / "hashes.json"
    dataset_hash = json.loads(hashes_file.read_text())["dataset"] if hashes_file.exists() else None
    metrics = {}
    for o in outs:
        p = root / o.path
        if o.in_git and p.suffix == ".json" and p.is_file():
            metrics[p.stem] = json.loads(p.read_text(encoding="utf-8"))
    promotion = root / "metrics" / "promotion.json"  # the retrain's comparison with the champion (not a DVC out)
    if promotion.is_file():
        metrics["promotion"] = json.loads(promotion.read_text(encoding="utf-8"))
    return {
        "dataset_hash": dataset_hash,
        "base_model": (params.get("base") or {}).get("model"),
        "method": (params.get("finetune") or {}).get("method"),
        "params": params,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, dict)},
        "outs": {o.path: o.md5 for o in outs},
        # what finetune started from and added to train (a warm start's version, its regulariser, the hash of the
        # augmented and replayed rows in data/extra_train.parquet, whose md5 is under outs; the out-of-scope texts
        # of finetune.outlier_exposure: count, source, hash)
        **{k: (metrics.get("finetune") or {}).get(k) for k in ("warm_start", "regularize", "extra_rows",
                                                                "outlier_exposure")},
    }


def _tracked_outputs(root: Path, outs: list[Out]) -> list[str]:
    """Version files plus the outs git should hold (those not git-ignored, i.e. metrics)."""
    paths = [f for f in VERSION_FILES if (root / f).exists()]
    return paths + [o.path for o in outs if o.in_git and (root / o.path).exists()]


def find_published(root: Path, known: list[Version] | None = None) -> Version | None:
    """The published version the workspace reproduces exactly (same dvc.lock and params.yaml), if any."""
    lock_now, params_now = (root / "dvc.lock").read_bytes(), (root / "params.yaml").read_bytes()
    for v in reversed(list_versions(root) if known is None else known):
        if git_bytes(root, v.commit, "dvc.lock") == lock_now and git_bytes(root, v.commit, "params.yaml") == params_now:
            return v
    return None


def _check_params(root: Path, found: bytes | None, expected: bytes | None) -> None:
    if expected is not None and found != expected:
        raise RegistryError(f"{root / 'params.yaml'}: changed while this retrain ran, not by it; refusing to "
                            "publish params it did not apply (nothing published)")


def publish(root: Path, summary: str = "retrain", remote: str | None = None,
            expect_params: bytes | None = None, stage: str = CHALLENGER_STAGE) -> tuple[Version, bool]:
    """Push outs, commit the version files, tag with GTO, put it in `stage`. Returns (version, created).

    Publishing is not promoting: the version becomes a challenger (GTO stage challenger) and
    domaintune.registry.promotion decides whether it is served (stage prod). stage=SERVED_STAGE
    publishes and serves at once (what a test or a hand-made history may want).

    A run that reproduces an existing version exactly (same dvc.lock and params)
    creates nothing and returns that version. expect_params: the params.yaml bytes the caller applied;
    anything else in params.yaml, or in what is committed, is refused (RegistryError).

    Between the GTO tag and the prod assignment the journal holds a "promote" entry, so a run killed
    there is completed by the next one (domaintune.registry.rollback.recover); a successful publish
    deletes the journal, undo entry included: from then on the run's changes are the version.
    """
    from gto.api import assign, register  # heavy: GTO loads only when publishing

    root = Path(root)
    outs = lock_outs(root)
    versions = list_versions(root)
    _check_params(root, (root / "params.yaml").read_bytes(), expect_params)
    same = find_published(root, versions)
    if same is not None:
        return same, False
    problems, _ = check_workspace(root, [o for o in outs if not o.in_git], cache_dir(root))
    if problems:
        raise RegistryError("workspace does not match dvc.lock, refusing to publish:\n  " + "\n  ".join(problems))
    record = build_record(root, outs)
    version = next_version(versions, record["dataset_hash"])

    remote = remote or ensure_remote(root)
    dvc(root, "push", "-r", remote)  # first, so a failed push leaves no commit and no tag

    files = _tracked_outputs(root, outs)
    git(root, "add", "--", *files)
    _check_params(root, git_bytes(root, "", "params.yaml"), expect_params)  # what the commit will hold
    msg = f"{ARTIFACT} {version}: {summary}\n\ndataset {record['dataset_hash']}\n"
    git(root, *git_identity(root), "commit", "-q", "--allow-empty", "-m", msg, "--", *files)
    commit = git(root, "rev-parse", "HEAD").strip()
    tag_msg = f"{ARTIFACT} {version}: {summary}\n\n{RECORD_MARK} {json.dumps(record, sort_keys=True)}"
    tag = f"{ARTIFACT}@{version}"
    message = f"{stage} {version}: published by {summary}"
    update_journal(root, promote={"op": "publish", "tag": tag, "commit": commit, "stage": stage, "message": message})
    register(str(root), ARTIFACT, commit, version=version, message=tag_msg)
    fault_point("registered")
    assign(str(root), ARTIFACT, stage, version=version, message=message)
    if stage == CHALLENGER_STAGE:
        # The run's changes are the version now (no undo), but its promotion decision is still due: a kill
        # before it is made is completed by the next command (rollback.recover, from metrics/promotion.json).
        write_journal(root, {"promote": {"op": "decide", "tag": tag, "commit": commit, "stage": stage,
                                         "message": message}})
    else:
        write_journal(root, None)
    return get_version(root, version), True


def version_files(root: Path) -> list[str]:
    """What a version restores from git: VERSION_FILES plus the git-tracked outs dvc.lock names."""
    files = set(VERSION_FILES)
    if (root / "dvc.lock").exists():
        files |= {o.path for o in lock_outs(root) if o.in_git}
    return sorted(files)
