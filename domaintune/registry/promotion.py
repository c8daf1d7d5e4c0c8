"""Champion and challenger: which published version is served, which waits, which was turned down, and why.

Publishing is not promoting. `versions.publish` registers a retrain's version and puts it in GTO stage
`challenger`; a decision then moves it to `prod` (promote: the server follows prod) or to `rejected`.
Each decision is a GTO stage assignment (an annotated tag `domaintune#<stage>#N`) whose message carries
a JSON record after DECISION_MARK: the reason in one line and the evidence (the comparison's numbers,
intervals and row counts), so `domaintune versions` and any git clone can say why a version is where it is.

A version's stage, as `versions` shows it:
  prod        the one GTO has in stage prod now (served)
  challenger  the latest challenger, with no decision after it
  rejected    its latest decision was a rejection
  retired     it was in prod once and is not now
  -           published before stages existed, never decided
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from domaintune.registry.plumbing import (
    ARTIFACT,
    CHALLENGER_STAGE,
    REJECTED_STAGE,
    SERVED_STAGE,
    RegistryError,
    fault_point,
    git,
    update_journal,
    write_journal,
)
from domaintune.registry.versions import Version, get_version, list_versions, stage_version

STAGES = (SERVED_STAGE, CHALLENGER_STAGE, REJECTED_STAGE)
DECISION_MARK = "domaintune-decision:"


@dataclass
class Event:
    """One stage assignment of a version, oldest events first when sorted."""
    stage: str
    version: str
    number: int          # GTO's per-stage event number
    date: str            # the tag's creation time (ISO)
    seq: int             # nanoseconds when domaintune wrote it (0 for tags others wrote): orders same-second events
    reason: str = ""
    evidence: dict = field(default_factory=dict)
    op: str = ""         # promote | reject | decide | publish for domaintune's decisions; "" for others (rollback)

    def sort_key(self) -> tuple:
        return (self.date[:19], self.seq, self.number)


def _parse_message(contents: str) -> tuple[str, dict, int, str]:
    """(reason, evidence, seq, op) from a stage tag's message; a message without a record gives its first line."""
    if DECISION_MARK in contents:
        head, _, tail = contents.partition(DECISION_MARK)
        try:
            record = json.loads(tail.strip())
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            return (str(record.get("reason") or ""), dict(record.get("evidence") or {}), int(record.get("seq") or 0),
                    str(record.get("op") or ""))
    return contents.strip().splitlines()[0] if contents.strip() else "", {}, 0, ""


def events(root: Path) -> list[Event]:
    """Every stage assignment (prod, challenger, rejected) of a release version, oldest first."""
    fmt = "%(refname:strip=2)%00%(creatordate:iso-strict)%00%(*objectname)%00%(objectname)%00%(contents)%01"
    by_commit = {}
    for v in list_versions(root):
        by_commit.setdefault(v.commit, v.version)
    out = []
    for chunk in git(root, "for-each-ref", f"--format={fmt}", f"refs/tags/{ARTIFACT}#*").split("\x01"):
        chunk = chunk.strip("\n")
        if not chunk:
            continue
        tag, date, peeled, obj, contents = chunk.split("\x00", 4)
        parts = tag.split("#")
        if len(parts) != 3 or parts[1] not in STAGES or not parts[2].isdigit():
            continue  # unassignments (`stage!`) and other stages are not decisions
        version = by_commit.get(peeled or obj)
        if version is None:
            continue
        reason, evidence, seq, op = _parse_message(contents)
        out.append(Event(parts[1], version, int(parts[2]), date, seq, reason, evidence, op))
    return sorted(out, key=Event.sort_key)


def challenger(root: Path) -> str | None:
    """The undecided challenger: the version GTO last put in stage challenger, unless a later decision
    (prod or rejected) took it."""
    name = stage_version(root, CHALLENGER_STAGE)
    if name is None:
        return None
    evs = [e for e in events(root) if e.version == name]
    last = evs[-1] if evs else None
    return name if last is not None and last.stage == CHALLENGER_STAGE else None


def status(root: Path) -> dict[str, dict]:
    """{version: {"stage", "reason", "evidence", "date"}} for every release version (see the module doc)."""
    served = stage_version(root, SERVED_STAGE)
    waiting = challenger(root)
    latest: dict[str, Event] = {}
    ever_prod: set[str] = set()
    for e in events(root):
        latest[e.version] = e
        if e.stage == SERVED_STAGE:
            ever_prod.add(e.version)
    out = {}
    for v in list_versions(root):
        e = latest.get(v.version)
        if v.version == served:
            stage = SERVED_STAGE
        elif v.version == waiting:
            stage = CHALLENGER_STAGE
        elif e is not None and e.stage == REJECTED_STAGE:
            stage = REJECTED_STAGE
        elif v.version in ever_prod:
            stage = "retired"
        else:
            stage = "-"
        out[v.version] = {"stage": stage, "reason": e.reason if e else "", "evidence": e.evidence if e else {},
                          "date": e.date if e else ""}
    return out


def assign(root: Path, version: Version, stage: str, reason: str, evidence: dict | None = None,
           op: str = "decide") -> None:
    """Put `version` in `stage` with its reason and evidence; journaled, so a kill in between is completed by
    the next command (rollback.recover). The caller holds repo_lock."""
    from gto.api import assign as gto_assign  # lazy: GTO loads only when a stage assignment is due

    if stage not in STAGES:
        raise RegistryError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    record = {"reason": reason, "evidence": evidence or {}, "seq": time.time_ns(), "op": op}
    message = f"{stage} {version.version}: {reason}\n\n{DECISION_MARK} {json.dumps(record, sort_keys=True)}"
    update_journal(root, promote={"op": op, "tag": version.tag, "commit": version.commit, "stage": stage,
                                  "message": message})
    fault_point("decision")
    gto_assign(str(root), ARTIFACT, stage, version=version.version, message=message, force=True)
    write_journal(root, None)


def promote(root: Path, name: str, reason: str, evidence: dict | None = None) -> Version:
    """Serve `name` (GTO stage prod; a server following prod swaps to it). Refuses a version already served."""
    version = get_version(root, name)
    if stage_version(root, SERVED_STAGE) == version.version:
        raise RegistryError(f"{version.version} is already the served version (stage prod)")
    assign(root, version, SERVED_STAGE, reason, evidence, op="promote")
    return version


def reject(root: Path, name: str, reason: str, evidence: dict | None = None) -> Version:
    """Mark `name` rejected. The served version cannot be rejected: roll back to another one first."""
    version = get_version(root, name)
    if stage_version(root, SERVED_STAGE) == version.version:
        raise RegistryError(f"{version.version} is the served version; `domaintune rollback` to another "
                            "version first, then reject it")
    assign(root, version, REJECTED_STAGE, reason, evidence, op="reject")
    return version
