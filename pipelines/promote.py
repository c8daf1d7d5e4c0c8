"""Champion vs challenger: the fair comparison, the decision by `release.promote`, and `promote` / `reject`.

A retrain's model (the workspace's models/export, the challenger) is compared with the served version
(the champion, materialised and md5-verified from the registry) by the same code on the same rows:
  new_rows        the challenger's test split less every row the champion trained or validated on
                  (matched by id or by the normalised text's hash; the count left out is recorded);
  champion_test   the champion's own test split less the rows the challenger trained or validated on:
                  what the old model was good at, where forgetting shows.
On each, a paired bootstrap (base.seed, release.bootstrap_resamples) of the challenger-minus-champion
difference in accuracy and macro-F1, and the calibrated ECE of each. `gate` promotes when, on every
set with rows, both lower 95% bounds are above -release.max_regression and ECE rises by at most
release.max_ece_increase; otherwise the challenger is rejected. The evidence goes to
metrics/promotion.json (committed with the version), the version record and the decision's tag.

A version with no champion to compare with (the first one) is promoted: it passed evaluate.gate to get
here. A task with no fair comparison yet (generation) is promoted on evaluate.gate alone, and says so.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from domaintune.core.errors import DataError
from domaintune.core.io import write_json
from domaintune.core.params import load_params
from domaintune.registry import plumbing, promotion, release, rollback, versions

PROMOTION_FILE = Path("metrics") / "promotion.json"
EXPORT = "models/export"
DATA = "data/audited"
COMPARE_DIR = Path(".domaintune") / "compare"


class NotComparable(Exception):
    """There is no fair comparison for this pair (the reason is the message)."""


def _splits(folder: Path) -> dict:
    # lazy: pandas and pyarrow
    from domaintune.data.dataset import read_dataset

    splits, _ = read_dataset(folder)
    return splits


def _seen(splits: dict) -> tuple[set[str], set[str]]:
    """Ids and row keys of the rows a model trained or validated on."""
    # lazy: pandas and pyarrow
    from domaintune.data.textnorm import row_keys

    ids, keys = set(), set()
    for name in ("train", "validation"):
        df = splits.get(name)
        if df is not None and len(df):
            ids.update(df["id"].astype(str))
            keys.update(row_keys(df["text"].astype(str).tolist()))
    return ids, keys


def _scores(predictor, texts: list[str]):
    import numpy as np  # lazy: the CLI imports this module for --help

    probs = predictor.predict_proba(texts) if texts else np.zeros((0, len(predictor.labels)))
    return predictor.labels_from_proba(probs), probs.max(axis=1) if len(texts) else np.zeros(0)


def score_pair(truth: list[str], a_labels: list[str], a_conf, b_labels: list[str], b_conf, resamples: int,
               seed: int) -> dict:
    """One set's evidence from both models' predicted labels and calibrated confidences on the same rows:
    the paired bootstrap of accuracy and macro-F1 (b - a; a = champion), each one's ECE, agreement."""
    import numpy as np  # lazy: the CLI imports this module for --help

    # lazy: numpy/sklearn
    from domaintune.evaluate.calibration import ece_mce
    from domaintune.evaluate.compare import paired_bootstrap

    names = sorted(set(truth) | set(a_labels) | set(b_labels))
    index = {n: i for i, n in enumerate(names)}
    y = np.array([index[t] for t in truth])
    a = np.array([index[p] for p in a_labels])
    b = np.array([index[p] for p in b_labels])
    boot = paired_bootstrap(y, a, b, len(names), resamples=resamples, seed=seed)
    ece_a, _ = ece_mce(np.asarray(a_conf, dtype=np.float64), a == y)
    ece_b, _ = ece_mce(np.asarray(b_conf, dtype=np.float64), b == y)
    return {"accuracy": boot["accuracy"], "macro_f1": boot["macro_f1"],
            "ece": {"a": float(ece_a), "b": float(ece_b), "diff": float(ece_b - ece_a)},
            "agreement": float((a == b).mean())}


def _compare_rows(df, excluded: int, champ, chall, params, seed: int) -> dict:
    texts, truth = df["text"].tolist(), df["label"].astype(str).tolist()
    out = {"rows": len(texts), "excluded": excluded}
    if texts:
        a_lab, a_conf = _scores(champ, texts)
        b_lab, b_conf = _scores(chall, texts)
        out.update(score_pair(truth, a_lab, a_conf, b_lab, b_conf, params.bootstrap_resamples, seed))
    return out


def compare(root: Path, champion: str, challenger_export: Path, challenger_data: Path) -> dict:
    """The evidence for one champion/challenger pair (see the module doc). Raises NotComparable."""
    # lazy: numpy-heavy evaluate package
    from domaintune.evaluate.compare import fair_rows

    # lazy: torch when a model loads
    from domaintune.tasks import export_task, load_predictor

    params = load_params(root / "params.yaml", "release")
    seed = load_params(root / "params.yaml", "base").seed
    try:
        champ_export = release.materialise(root, champion, out=EXPORT, dest=root / COMPARE_DIR).path
        champ_data = release.materialise(root, champion, out=DATA, dest=root / COMPARE_DIR).path
    except release.ReleaseError as exc:
        if "has no out" in str(exc):
            raise NotComparable(f"{champion} has no {DATA} and {EXPORT} to compare with") from None
        raise
    for folder in (challenger_export, champ_export):
        try:
            task = export_task(folder)
        except DataError as exc:
            raise NotComparable(f"{folder} is not a model export ({exc})") from None
        if task != "classification":
            raise NotComparable(f"no fair comparison for task {task} yet")
    try:
        new, old = _splits(challenger_data), _splits(champ_data)
    except (DataError, OSError) as exc:
        raise NotComparable(f"no dataset with splits to compare on ({exc})") from None
    if "test" not in new or "test" not in old:
        raise NotComparable("a dataset without a test split")
    champ = load_predictor(champ_export, variant="float32")
    chall = load_predictor(challenger_export, variant="float32")
    ids, keys = _seen(old)
    mask, out_new = fair_rows(new["test"], ids, keys)
    ids, keys = _seen(new)
    mask_old, out_old = fair_rows(old["test"], ids, keys)
    sets = {"new_rows": _compare_rows(new["test"][mask], out_new, champ, chall, params, seed),
            "champion_test": _compare_rows(old["test"][mask_old], out_old, champ, chall, params, seed)}
    return {"champion": champion, "sets": sets, "max_regression": params.max_regression,
            "max_ece_increase": params.max_ece_increase, "resamples": params.bootstrap_resamples, "seed": seed,
            "level": 0.95}


def judge(evidence: dict) -> tuple[bool, str]:
    """(promote?, one-line reason) from compare()'s evidence."""
    margin, ece_max = evidence["max_regression"], evidence["max_ece_increase"]
    fails, said = [], []
    used = {k: s for k, s in evidence["sets"].items() if s.get("rows")}
    if not used:
        return False, "no rows that neither model trained on: nothing to compare on"
    for name, s in used.items():
        for metric in ("macro_f1", "accuracy"):
            m = s[metric]
            said.append(f"{metric} {m['diff']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}] on {s['rows']:,} "
                        f"{name.replace('_', ' ')}")
            if m["low"] <= -margin:
                fails.append(f"{metric} {m['diff']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}] vs "
                             f"{evidence['champion']} on {s['rows']:,} {name.replace('_', ' ')} "
                             f"(lower bound under -{margin})")
        if s["ece"]["diff"] > ece_max:
            fails.append(f"ECE {s['ece']['a']:.3f} -> {s['ece']['b']:.3f} on {name.replace('_', ' ')} "
                         f"(rise over {ece_max})")
    if fails:
        return False, "; ".join(fails)
    return True, f"vs {evidence['champion']}: " + "; ".join(said[:2])


def evaluate_challenger(root: Path, policy: str | None = None) -> dict:
    """Before publishing: the workspace's model against the served one -> metrics/promotion.json.

    The result holds "policy", "decision" (promote | reject | wait) and "reason", and "evidence" when a
    comparison ran. Never raises for a pair it cannot compare: the reason says why."""
    root = Path(root)
    policy = policy or load_params(root / "params.yaml", "release").promote
    champion = versions.served_version(root)
    result: dict = {"policy": policy, "champion": champion}
    if champion is None:
        result.update(decision="promote", reason="first version: no champion to compare with; it passed "
                      "evaluate.gate")
    else:
        try:
            evidence = compare(root, champion, root / EXPORT, root / DATA)
        except NotComparable as exc:
            evidence = None
            ok, reason = policy == "gate", f"no fair comparison ({exc}); passed evaluate.gate"
        else:
            ok, reason = judge(evidence)
        result["evidence"] = evidence
        if policy == "gate":
            result.update(decision="promote" if ok else "reject", reason=reason)
        else:
            result.update(decision="wait", reason=f"release.promote is {policy}: a challenger until "
                          + ("`domaintune promote --from-shadow`" if policy == "shadow" else "a person decides")
                          + f" (comparison: {reason})", verdict="pass" if ok else "fail")
    write_json(root / PROMOTION_FILE, result)
    return result


def apply_decision(root: Path, version: str, result: dict) -> str:
    """Carry out evaluate_challenger's decision for the published `version`; one line saying what happened.
    The caller holds repo_lock."""
    evidence = {k: v for k, v in result.items() if k != "reason"}
    if result["decision"] == "promote":
        promotion.promote(root, version, result["reason"], evidence)
        return f"promoted {version}: {result['reason']}"
    if result["decision"] == "reject":
        promotion.reject(root, version, result["reason"], evidence)
        served = versions.served_version(root)
        return f"rejected {version}: {result['reason']}; still serving {served}"
    return f"{version} is the challenger: {result['reason']}"


# ----------------------------------------------------------------------------- CLI: promote, reject


SHADOW_LOG = Path("reports") / "shadow" / "live.jsonl"  # `serve --shadow challenger` (and the guard) log here


def from_shadow(root: Path, log: Path | None = None) -> tuple[bool, str, dict]:
    """Judge the waiting challenger on the requests `serve --shadow challenger` logged beside the champion:
    (promote?, reason, evidence). Raises RegistryError when there is nothing to judge or too few requests."""
    # lazy: numpy
    from domaintune.monitor import guard
    from domaintune.monitor.feedback import feedback_labels

    # lazy: numpy
    from domaintune.serve.shadow import read_log

    params = load_params(root / "params.yaml", "release")
    champion, challenger = versions.served_version(root), promotion.challenger(root)
    if challenger is None:
        raise plumbing.RegistryError("no challenger waiting: nothing to judge from the shadow log")
    log = Path(log) if log else root / SHADOW_LOG
    rows = guard.pair_rows(read_log(log), champion, challenger)
    if len(rows) < params.shadow_min_requests:
        raise plumbing.RegistryError(f"{log}: {len(rows):,} requests logged with {challenger} shadowing {champion}; "
                                     f"release.shadow_min_requests is {params.shadow_min_requests:,}")
    seed = load_params(root / "params.yaml", "base").seed
    verdict = guard.judge(rows, "shadow", params.max_regression, feedback_labels(root), params.bootstrap_resamples,
                          seed)  # feedback labels where `domaintune feedback` recorded them
    line = (f"accuracy {verdict['diff']:+.3f} [{verdict['low']:+.3f}, {verdict['high']:+.3f}] vs {champion} on "
            f"{verdict['rows']:,} live requests ({verdict['basis']}; agreement {verdict['agreement']:.3f})")
    evidence = {"policy": "shadow", "champion": champion, "log": str(log), "shadow": verdict}
    if verdict["not_worse"]:
        return True, f"shadow: {line}", evidence
    return False, f"shadow: {line} (lower bound under -{params.max_regression})", evidence


def cmd_promote(args, root: Path) -> int:
    if args.from_shadow:
        with plumbing.repo_lock(root):
            note = rollback.recover(root)
            if note:
                print(f"domaintune promote: {note}", file=sys.stderr)
            name = promotion.challenger(root)
            ok, reason, evidence = from_shadow(root, args.log)
            (promotion.promote if ok else promotion.reject)(root, name, reason, evidence)
        print(f"{'promoted' if ok else 'rejected'} {name}: {reason}; served: {versions.served_version(root)}")
        return 0
    version, reason = _by_hand(args, root, "promote", "promoted", promotion.promote)
    print(f"promoted {version}: now served (GTO stage prod); {reason}")
    return 0


def cmd_reject(args, root: Path) -> int:
    version, reason = _by_hand(args, root, "reject", "rejected", promotion.reject)
    print(f"rejected {version}: {reason}; served: {versions.served_version(root) or 'none'}")
    return 0


def _by_hand(args, root: Path, verb: str, done: str, act) -> tuple[str, str]:
    """A person's decision on the named version (else the waiting challenger): (version, reason)."""
    with plumbing.repo_lock(root):
        note = rollback.recover(root)
        if note:
            print(f"domaintune {verb}: {note}", file=sys.stderr)
        name = args.version or promotion.challenger(root)
        if name is None:
            raise plumbing.RegistryError(f"no challenger waiting; name a version: domaintune {verb} vX.Y.Z")
        version = versions.get_version(root, name).version
        reason = args.reason or f"{done} by hand"
        act(root, version, reason, {"by": "hand"})
    return version, reason


def add_parsers(add, root_of) -> None:
    """`promote` and `reject`; root_of(args) is the CLI's checked --repo."""
    p = add("promote", lambda args: cmd_promote(args, root_of(args)),
            "serve a challenger (or any published version): GTO stage prod",
            "domaintune promote                 # the waiting challenger",
            "domaintune promote v1.3.0 --reason 'reviewed the error table'",
            "domaintune promote --from-shadow      # judge the challenger on the requests it shadowed")
    p.add_argument("version", nargs="?", default=None, help="version to promote (none: the waiting challenger)")
    p.add_argument("--reason", default=None, help="why, recorded with the decision")
    p.add_argument("--from-shadow", action="store_true", help="judge the waiting challenger on the live requests "
                   "`serve --shadow challenger` logged (feedback labels where they exist): promote or reject it")
    p.add_argument("--log", default=None, help=f"the shadow log (default: {SHADOW_LOG})")
    p = add("reject", lambda args: cmd_reject(args, root_of(args)),
            "turn a challenger down (GTO stage rejected), with the reason recorded",
            "domaintune reject                  # the waiting challenger",
            "domaintune reject v1.3.0 --reason 'labels of week 3 were shuffled'")
    p.add_argument("version", nargs="?", default=None, help="version to reject (none: the waiting challenger)")
    p.add_argument("--reason", default=None, help="why, recorded with the decision")


def evidence_table(result: dict) -> str:
    """A markdown table of the comparison (the Prefect artifact and the log)."""
    lines = [f"**{result.get('decision', '?')}**: {result.get('reason', '')}", ""]
    ev = result.get("evidence") or {}
    if ev.get("sets"):
        lines += ["| rows | set | metric | champion | challenger | diff [95% CI] |", "|---|---|---|---|---|---|"]
        for name, s in ev["sets"].items():
            for metric in ("accuracy", "macro_f1"):
                if metric in s:
                    m = s[metric]
                    lines.append(f"| {s['rows']:,} (left out {s['excluded']:,}) | {name} | {metric} | {m['a']:.4f} | "
                                 f"{m['b']:.4f} | {m['diff']:+.4f} [{m['low']:+.4f}, {m['high']:+.4f}] |")
            if "ece" in s:
                e = s["ece"]
                lines.append(f"| {s['rows']:,} | {name} | ece | {e['a']:.4f} | {e['b']:.4f} | {e['diff']:+.4f} |")
    return "\n".join(lines)


def dumps(result: dict) -> str:
    return json.dumps(result, indent=2, sort_keys=True)
