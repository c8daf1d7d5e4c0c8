"""The label audit, the audit stage's work for labels that are classes: find likely label errors with cleanlab
and act on them (report, drop or relabel).

How a row gets flagged:
1. Every text is embedded once with the frozen encoder (mean pooling over
   non-padding tokens, length-sorted batches); the vectors are cached (see
   domaintune/modeling/embeddings.py) so re-running with other audit params skips it.
2. K-fold (audit.folds) stratified cross-validation of a logistic regression
   (audit.C) on the train embeddings gives every train row an out-of-sample
   probability vector: the model that scores a row never saw its label.
   Validation/test rows are scored by one model fitted on all of train.
3. The out-of-sample probabilities are temperature-calibrated (one T fitted
   by NLL on the train rows, see calibrate_probs) so that min_score means the
   same on any dataset. score = 1 - p(given label) under those calibrated
   probabilities: one minus cleanlab's self-confidence label quality score
   (cleanlab.rank.get_label_quality_scores, method "self_confidence"), so 1.0
   = the model is sure the label is wrong. Rows are ranked by it (rank 1 =
   most suspicious). suggested_label = argmax of the probabilities.
4. A row is flagged when cleanlab's confident learning finds it
   (cleanlab.filter.find_label_issues, audit.filter_by, default
   prune_by_class) AND its score is at least audit.min_score AND the
   suggestion differs from the given label. Confident learning estimates the
   noise per class from the data and min_score keeps only the rows the model
   is confident about; neither is a fixed count, so the number of flags
   follows the data (BANKING77, 10% flips: 896 flags, 5%: 507; see
   bench/results/audit.json for precision/recall).

Only train rows are ever changed; validation/test rows are reported only.
Human decisions (labels/decisions.csv) override the automatic policy.
A class whose every train row is dropped or relabelled away stops the stage
(audit.on_empty_class: error), or with `drop` loses its validation/test rows too
(changes.csv, reason class_emptied_from_train) and leaves labels.json.

base.task generation: domaintune/evaluate/genaudit.py reports what hurts SFT; with evaluate.label_set declared
(classification as generation) label_set_audit runs all of the above on the response as the label.
"""
from __future__ import annotations

import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from domaintune.core import device as devices
from domaintune.core.device import stage_device
from domaintune.core.errors import DataError, StageError
from domaintune.core.io import atomic_output, write_json
from domaintune.core.params import AuditParams, BaseParams, as_dict, load_params
from domaintune.core.stage import StageIO
from domaintune.data.dataset import (
    SPLITS,
    check_splits_kept,
    json_lines_sha256,
    read_dataset,
    read_hashes,
    write_dataset,
)
from domaintune.evaluate import calibration as cal
from domaintune.modeling import encoders
from domaintune.modeling.embeddings import cached_embeddings, encoder_fingerprint
from domaintune.modeling.encoders import resolve_model

log = logging.getLogger("domaintune")

DECISION_VALUES = ("accept", "reject")
DECISION_COLUMNS = ("id", "decision", "corrected_label")
# Free-text columns a reviewer may add; any other column is rejected so a typo
# such as "corected_label" cannot be silently ignored.
DECISION_NOTE_COLUMNS = ("note", "comment", "reviewer")


# --------------------------------------------------------------------------- decisions

def read_decisions(path: str | Path | None, splits: dict[str, pd.DataFrame], labels: list[str]) -> pd.DataFrame:
    """Read and validate the human-review decisions file.

    Returns a frame with id, decision, corrected_label ("" when not given) and
    line (the row's line number in the file; the header is line 1). Any bad
    row raises DataError naming the file, that line and the field.
    """
    empty = pd.DataFrame({"id": [], "decision": [], "corrected_label": [], "line": []})
    if path is None or str(path) == "":
        return empty
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "decisions file not found (ship an empty file with the header "
                                          "'id,decision,corrected_label' when there are no decisions)")
    if not path.is_file():
        raise DataError(path, None, None, "--decisions names a folder, not a CSV file")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DataError(path, 1, None,
                        "file is empty; it needs at least the header 'id,decision,corrected_label'") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(path, None, None, f"not a readable CSV file: {exc}") from exc
    df.columns = [str(c).strip() for c in df.columns]
    for col in ("id", "decision"):
        if col not in df.columns:
            raise DataError(path, 1, col, f"required column missing; header must include {list(DECISION_COLUMNS)}")
    unknown = [c for c in df.columns if c not in DECISION_COLUMNS + DECISION_NOTE_COLUMNS]
    if unknown:
        raise DataError(path, 1, unknown[0],
                        f"unknown column; allowed {list(DECISION_COLUMNS + DECISION_NOTE_COLUMNS)}")
    if "corrected_label" not in df.columns:
        df["corrected_label"] = ""
    split_of = {str(i): name for name in SPLITS for i in splits[name]["id"].astype(str)}
    known_labels = set(labels)
    seen: dict[str, int] = {}
    rows = []
    for i, rec in enumerate(df.itertuples(index=False)):
        line = i + 2
        rid = str(rec.id).strip()
        decision = str(rec.decision).strip().lower()
        corrected = str(rec.corrected_label).strip()
        if not rid:
            raise DataError(path, line, "id", "empty id")
        if rid not in split_of:
            raise DataError(path, line, "id", f"unknown id {rid!r}: no such row in the audited dataset")
        if split_of[rid] != "train":
            raise DataError(path, line, "id", f"id {rid!r} is a {split_of[rid]} row; only train rows can be "
                                              "changed (validation/test labels are never edited)")
        if rid in seen:
            raise DataError(path, line, "id", f"duplicate decision for id {rid!r} (first on line {seen[rid]})")
        seen[rid] = line
        if decision not in DECISION_VALUES:
            raise DataError(path, line, "decision", f"must be one of {list(DECISION_VALUES)}, got {rec.decision!r}")
        if corrected and corrected not in known_labels:
            raise DataError(path, line, "corrected_label",
                            f"unknown label {corrected!r}; known labels: {sorted(known_labels)}")
        if corrected and decision == "reject":
            raise DataError(path, line, "corrected_label", "a rejected flag keeps the given label; "
                                                           "use decision 'accept' to correct it")
        rows.append({"id": rid, "decision": decision, "corrected_label": corrected, "line": line})
    return pd.DataFrame(rows) if rows else empty


# --------------------------------------------------------------------------- embeddings

def resolve_encoder(params: AuditParams, base: BaseParams) -> str:
    if params.encoder == "base":
        return resolve_model(base.model)
    if not Path(params.encoder).is_dir():
        raise FileNotFoundError(f"params.yaml: audit.encoder: encoder folder {params.encoder!r} does not exist "
                                "(use 'base' or a folder such as models/dapt)")
    return str(Path(params.encoder).resolve())


def embed_splits(splits: dict[str, pd.DataFrame], encoder_path: str, cache_dir: str | Path,
                 max_length: int, batch_size: int, device: str = "cpu") -> tuple[dict[str, np.ndarray], bool, float]:
    """Mean-pooled embeddings of every row of every split, through the cache.

    Returns ({split: array}, reused, seconds spent embedding (0 when reused)).
    """
    texts = [t for name in SPLITS for t in splits[name]["text"].astype(str)]
    ids = [f"{name}/{i}" for name in SPLITS for i in splits[name]["id"].astype(str)]
    # Keyed on the texts (and ids), not the dataset hash: vectors do not depend on labels, so a
    # relabelled upstream dataset (or the benchmark's noisy copies) reuses them.
    key = {
        "format": 1,
        "texts": json_lines_sha256(zip(ids, texts)),
        "encoder_fingerprint": encoder_fingerprint(encoder_path),
        "max_length": max_length,
        "pooling": "mean",
    }
    seconds = {"embed": 0.0}

    def compute() -> np.ndarray:
        t0 = time.perf_counter()
        encoders.set_threads()
        # module attributes, looked up per call: tests replace them there
        tok = encoders.load_tokenizer(encoder_path)
        enc = devices.place_for_inference(encoders.load_encoder(encoder_path), device)
        emb = encoders.embed_texts(enc, tok, texts, max_length=max_length, pooling="mean",
                                   batch_size=devices.batch_size_for(device, batch_size, max(256, batch_size)))
        seconds["embed"] = time.perf_counter() - t0
        log.info("embedded %d texts in %.1fs", len(texts), seconds["embed"])
        return emb

    emb, reused = cached_embeddings(cache_dir, key, ids, compute)
    if reused:
        log.info("reused cached embeddings from %s (key matched)", cache_dir)
    out, start = {}, 0
    for name in SPLITS:
        n = len(splits[name])
        out[name] = emb[start:start + n]
        start += n
    return out, reused, seconds["embed"]


# --------------------------------------------------------------------------- scoring

def _fit_lr(X: np.ndarray, y: np.ndarray, C: float, seed: int):
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    # On small problems multi-threaded BLAS only spins: one L-BFGS step on 60 rows took 6 ms with
    # 2 threads on a busy 2-core machine vs 0.6 ms with 1 (the whole audit: 3.9 s vs 0.5 s).
    limit = 1 if X.shape[0] * X.shape[1] < 1_000_000 else None
    with threadpool_limits(limits=limit):
        return LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(X, y)


def _full_probs(model, X: np.ndarray, n_classes: int) -> np.ndarray:
    """predict_proba mapped onto all n_classes columns (a class missing from training gets 0)."""
    probs = np.zeros((len(X), n_classes))
    probs[:, model.classes_] = model.predict_proba(X)
    return probs


def out_of_sample_probs(X: np.ndarray, y: np.ndarray, n_classes: int, folds: int, C: float,
                        seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Stratified K-fold out-of-sample class probabilities for every row.

    Returns (probs [n, n_classes], scorable [n] bool, folds actually used).

    Small classes: StratifiedKFold spreads a class's rows over the folds, so a
    class with at least 2 rows always has a row in every training portion and
    its rows get an honest probability even when it has fewer rows than folds
    (sklearn only warns). A class with a single train row cannot appear in the
    training portion of its own fold: that row's p(given) would be 0 for lack
    of evidence, not because its label is wrong, so it is marked unscorable
    (never flagged, counted in the metrics) instead. folds is capped at the
    largest class size because StratifiedKFold refuses more folds than that.
    """
    from sklearn.model_selection import StratifiedKFold

    n = len(y)
    counts = np.bincount(y, minlength=n_classes)
    k = int(min(folds, counts.max(), n))
    if k < 2:
        raise StageError(f"audit: cannot cross-validate {n} train rows: no class has 2 or more rows")
    probs = np.zeros((n, n_classes))
    scorable = np.ones(n, dtype=bool)
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        fold_iter = list(skf.split(X, y))
    for train_idx, held_idx in fold_iter:
        present = np.unique(y[train_idx])
        if len(present) < 2:  # logistic regression needs two classes; nothing to learn from
            probs[held_idx] = 1.0 / n_classes
            scorable[held_idx] = False
            continue
        model = _fit_lr(X[train_idx], y[train_idx], C, seed)
        probs[held_idx] = _full_probs(model, X[held_idx], n_classes)
        scorable[held_idx] &= np.isin(y[held_idx], present)
    return probs, scorable, k


def calibrate_probs(y: np.ndarray, probs: np.ndarray, fit_rows: np.ndarray) -> tuple[float, Callable]:
    """Temperature T (calibration.fit_temperature on log-probabilities of the fit rows) and a function
    applying it: softmax(log(probs) / T).

    Why: how sharp a logistic regression's probabilities are depends on C, the
    embedding scale and the dataset size (on BANKING77 with C=10 a clean but
    confusable row often gets p(given) = 0.001). Calibrating the out-of-sample
    probabilities on the data itself gives min_score the same meaning on any
    dataset. Fitted against the noisy labels, T also softens as the noise
    grows. T does not change the argmax, so suggestions are unaffected.
    """
    def log_probs(p: np.ndarray) -> np.ndarray:
        return np.log(np.clip(p, 1e-12, 1.0))

    t = cal.fit_temperature(log_probs(probs[fit_rows]), y[fit_rows])["temperature"] if fit_rows.any() else 1.0
    return t, lambda p: cal.softmax(log_probs(p), t)


def score_rows(y: np.ndarray, probs: np.ndarray, scorable: np.ndarray, min_score: float,
               filter_by: str) -> pd.DataFrame:
    """Per row: score, suggested (class index), rank, cleanlab_issue, flagged. See the module docstring."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    n = len(y)
    score = np.full(n, np.nan)
    suggested = probs.argmax(axis=1)
    cl_issue = np.zeros(n, dtype=bool)
    idx = np.flatnonzero(scorable)
    if len(idx):
        score[idx] = 1.0 - get_label_quality_scores(y[idx], probs[idx], method="self_confidence")
        # cleanlab estimates per-class noise from the labels it sees: it needs at least two
        # classes present; with fewer (a tiny validation split) only the score rule applies.
        if len(np.unique(y[idx])) >= 2:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cl_issue[idx] = find_label_issues(y[idx], probs[idx], filter_by=filter_by, n_jobs=1)
        else:
            cl_issue[idx] = True
    flagged = cl_issue & (np.nan_to_num(score, nan=-1.0) >= min_score) & (suggested != y)
    order = np.argsort(-np.nan_to_num(score, nan=-1.0), kind="stable")
    rank = np.empty(n, dtype=int)
    rank[order] = np.arange(1, n + 1)
    return pd.DataFrame({"score": score, "suggested": suggested, "rank": rank,
                         "cleanlab_issue": cl_issue, "flagged": flagged, "scorable": scorable})


def run_datalab(X: np.ndarray, y: np.ndarray, probs: np.ndarray, ids: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """cleanlab Datalab outliers and near-duplicates among train rows (information only, never acted on)."""
    from cleanlab import Datalab

    if len(y) < 3:
        return pd.DataFrame(), pd.DataFrame()
    lab = Datalab(data={"label": y}, label_name="label", verbosity=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lab.find_issues(features=X, pred_probs=probs, issue_types={"outlier": {}, "near_duplicate": {}})
    out = lab.get_issues("outlier")
    outliers = pd.DataFrame({"id": ids, "outlier_score": out["outlier_score"].to_numpy()})
    outliers = outliers[out["is_outlier_issue"].to_numpy()].sort_values("outlier_score", kind="stable")
    nd = lab.get_issues("near_duplicate")
    sets = [";".join(ids[j] for j in s) for s in nd["near_duplicate_sets"]]
    near = pd.DataFrame({"id": ids, "near_duplicate_score": nd["near_duplicate_score"].to_numpy(),
                         "near_duplicate_ids": sets})
    near = near[nd["is_near_duplicate_issue"].to_numpy()].sort_values("near_duplicate_score", kind="stable")
    return outliers.reset_index(drop=True), near.reset_index(drop=True)


# --------------------------------------------------------------------------- core

@dataclass
class AuditResult:
    splits: dict[str, pd.DataFrame]
    label_issues: pd.DataFrame      # flagged rows of every split, with action_taken
    scores: pd.DataFrame            # every row's score/suggestion (for reviewers looking past the flags)
    changes: pd.DataFrame           # every train row dropped or relabelled, with why
    decisions_applied: pd.DataFrame
    outliers: pd.DataFrame
    near_duplicates: pd.DataFrame
    metrics: dict = field(default_factory=dict)
    labels: list = field(default_factory=list)  # labels.json of the output (less any class dropped)

    def write_reports(self, folder: Path) -> None:
        """The reviewer's CSVs (label_issues, label_scores, changes, decisions_applied, datalab_*)."""
        self.label_issues.to_csv(folder / "label_issues.csv", index=False)
        self.scores.to_csv(folder / "label_scores.csv", index=False)
        self.changes.to_csv(folder / "changes.csv", index=False)
        self.decisions_applied.to_csv(folder / "decisions_applied.csv", index=False)
        self.outliers.to_csv(folder / "datalab_outliers.csv", index=False)
        self.near_duplicates.to_csv(folder / "datalab_near_duplicates.csv", index=False)


def audit(splits: dict[str, pd.DataFrame], labels: list[str], embeddings: dict[str, np.ndarray],
          params: AuditParams, seed: int, decisions: pd.DataFrame | None = None) -> AuditResult:
    """The pure core: score every row, decide what happens to each train row, return new splits + reports."""
    if decisions is None:
        decisions = pd.DataFrame({"id": [], "decision": [], "corrected_label": [], "line": []})
    splits = {k: v.reset_index(drop=True).copy() for k, v in splits.items()}
    rows_in = {s: int(len(splits[s])) for s in SPLITS}
    train = splits["train"]
    y_train = _train_targets(train, labels)
    scored, probs_train, scorable, k, temperature, timings = score_splits(splits, labels, embeddings, y_train,
                                                                          params, seed)
    st = scored["train"]
    new_label, drop, reason, applied = decide_train(st, decisions, params)
    for s in scored:
        if s != "train":
            scored[s]["action_taken"] = f"none ({s} rows are never changed)"

    relabelled = (~drop) & (new_label != train["label"].astype(str).to_numpy())
    changes = pd.DataFrame({
        "id": st["id"], "text": st["text"], "given_label": st["given_label"],
        "new_label": np.where(drop, "", new_label), "change": np.where(drop, "dropped", "relabelled"),
        "reason": reason, "score": st["score"],
    })[drop | relabelled].reset_index(drop=True)
    out_train = train.copy()
    out_train["label"] = new_label
    splits["train"] = out_train[~drop].reset_index(drop=True)
    splits, labels_out, changes, gone = _empty_classes(splits, labels, train, changes, params, rows_in)
    label_issues, scores = _issue_tables(scored)

    t0 = time.perf_counter()
    outliers, near = run_datalab(embeddings["train"], y_train, probs_train, st["id"].tolist())
    # Reviewers read these files: show the text and label next to each id.
    lookup = st.set_index("id")[["given_label", "text"]]
    outliers = outliers.join(lookup, on="id") if len(outliers) else outliers
    near = near.join(lookup, on="id") if len(near) else near
    timings["datalab_seconds"] = round(time.perf_counter() - t0, 3)

    decisions_applied = pd.DataFrame(applied, columns=["id", "line", "decision", "corrected_label", "given_label",
                                                       "suggested_label", "flagged", "score", "effect",
                                                       "final_label"])
    metrics = _audit_metrics(scored, splits, rows_in, gone, scorable, k, temperature, params, drop, relabelled,
                             decisions, decisions_applied, outliers, near) | timings
    return AuditResult(splits=splits, label_issues=label_issues, scores=scores, changes=changes,
                       decisions_applied=decisions_applied, outliers=outliers, near_duplicates=near, metrics=metrics,
                       labels=labels_out)


def _train_targets(train: pd.DataFrame, labels: list[str]) -> np.ndarray:
    y_train = train["label"].map({lab: i for i, lab in enumerate(labels)}).to_numpy()
    if np.isnan(y_train.astype(float)).any():  # labels.json is the train label set, so this is corruption
        bad = int(np.flatnonzero(pd.isna(train["label"].map({lab: i for i, lab in enumerate(labels)})))[0])
        raise DataError("train.parquet", bad, "label", f"label {train['label'][bad]!r} not in labels.json")
    return y_train.astype(int)


def score_splits(splits: dict[str, pd.DataFrame], labels: list[str], embeddings: dict[str, np.ndarray],
                 y_train: np.ndarray, params: AuditParams, seed: int):
    """Every row's calibrated out-of-sample score (steps 2-4 of the module docstring).
    Returns (scored frames per split, calibrated train probabilities, scorable train mask, folds used,
    temperature, timings)."""
    label_index = {lab: i for i, lab in enumerate(labels)}
    n_classes = len(labels)
    t0 = time.perf_counter()
    probs_train, scorable, k = out_of_sample_probs(embeddings["train"], y_train, n_classes, params.folds,
                                                   params.C, seed)
    per_split_probs = {"train": (y_train, probs_train, scorable)}
    holdout = [s for s in ("validation", "test") if len(splits[s])]
    if holdout:
        full = _fit_lr(embeddings["train"], y_train, params.C, seed)
        for s in holdout:
            ys = splits[s]["label"].map(label_index)
            known = ys.notna().to_numpy()  # a label unseen in train cannot be scored (ingest forbids it anyway)
            per_split_probs[s] = (ys.fillna(0).astype(int).to_numpy(),
                                  _full_probs(full, embeddings[s], n_classes), known)
    # Calibrate on the train rows' out-of-sample probabilities; apply the same T to every split.
    temperature, calibrated = calibrate_probs(y_train, probs_train, scorable)
    per_split_probs = {s: (ys, calibrated(pr), ok) for s, (ys, pr, ok) in per_split_probs.items()}
    timings = {"cv_seconds": round(time.perf_counter() - t0, 3)}

    t0 = time.perf_counter()
    scored = {}
    for s, (ys, pr, ok) in per_split_probs.items():
        sc = score_rows(ys, pr, ok, params.min_score, params.filter_by)
        df = splits[s]
        sc.insert(0, "id", df["id"].astype(str).to_numpy())
        sc.insert(1, "text", df["text"].to_numpy())
        sc.insert(2, "given_label", df["label"].to_numpy())
        sc["suggested_label"] = [labels[j] for j in sc["suggested"]]
        sc["split"] = s
        sc["p_given"] = 1.0 - sc["score"]
        scored[s] = sc
    timings["cleanlab_seconds"] = round(time.perf_counter() - t0, 3)
    return scored, per_split_probs["train"][1], scorable, k, temperature, timings


def decide_train(st: pd.DataFrame, decisions: pd.DataFrame, params: AuditParams):
    """Each train row's fate: human decisions first (they override), then audit.action for flagged rows.
    Sets st["action_taken"]; returns (new labels, drop mask, reason per row, decisions applied)."""
    dec = decisions.set_index("id") if len(decisions) else None
    new_label = st["given_label"].astype(str).to_numpy().copy()
    drop = np.zeros(len(st), dtype=bool)
    action_taken = np.array(["none"] * len(st), dtype=object)
    reason = np.array([""] * len(st), dtype=object)
    applied = []
    for i, rid in enumerate(st["id"]):
        given, sugg = st.at[i, "given_label"], st.at[i, "suggested_label"]
        if dec is not None and rid in dec.index:
            d = dec.loc[rid]
            if d["decision"] == "reject":
                act, effect = "kept (decision: reject)", "kept"
            elif d["corrected_label"]:
                target = d["corrected_label"]
                act, effect = ("relabelled (decision: accept, corrected)", "relabelled") if target != given \
                    else ("kept (decision: accept, corrected label equals given)", "kept")
                new_label[i] = target
            elif params.action == "drop":
                act, effect = "dropped (decision: accept)", "dropped"
                drop[i] = True
            else:
                act, effect = ("relabelled (decision: accept, suggestion)", "relabelled") if sugg != given \
                    else ("kept (decision: accept, suggestion equals given)", "kept")
                new_label[i] = sugg
            action_taken[i], reason[i] = act, "decision"
            applied.append({"id": rid, "line": int(d["line"]), "decision": d["decision"],
                            "corrected_label": d["corrected_label"], "given_label": given,
                            "suggested_label": sugg, "flagged": bool(st.at[i, "flagged"]),
                            "score": st.at[i, "score"], "effect": effect,
                            "final_label": "" if drop[i] else new_label[i]})
        elif st.at[i, "flagged"]:
            reason[i] = "policy"
            if params.action == "drop":
                drop[i], action_taken[i] = True, "dropped"
            elif params.action == "relabel":
                new_label[i], action_taken[i] = sugg, "relabelled"
            else:
                action_taken[i] = "none (action: report)"
    st["action_taken"] = action_taken
    return new_label, drop, reason, applied


def _issue_tables(scored: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(label_issues: the flagged rows of every split, train first, by rank; scores: every row)."""
    issue_cols = ["id", "text", "given_label", "suggested_label", "score", "rank", "split", "action_taken"]
    label_issues = pd.concat([scored[s][scored[s]["flagged"]] for s in scored], ignore_index=True)
    label_issues = label_issues.sort_values(["split", "rank"], key=lambda c: c.map(
        {"train": 0, "validation": 1, "test": 2}) if c.name == "split" else c, kind="stable")[issue_cols]
    scores = pd.concat([scored[s] for s in scored], ignore_index=True)[
        ["id", "split", "given_label", "suggested_label", "p_given", "score", "rank", "cleanlab_issue", "flagged",
         "scorable", "text"]]
    return label_issues.reset_index(drop=True), scores


def _audit_metrics(scored, splits, rows_in, gone, scorable, k, temperature, params, drop, relabelled, decisions,
                   decisions_applied, outliers, near) -> dict:
    st = scored["train"]
    flagged_train = st[st["flagged"]]
    n_train = rows_in["train"]
    return {
        "classes_dropped": gone,
        "rows_in": rows_in,
        "rows_out": {s: int(len(splits[s])) for s in SPLITS},
        "issues_found": int(len(flagged_train)),
        "issues_found_rate": round(len(flagged_train) / max(n_train, 1), 4),
        "issues_per_class": {lab: int(c)
                             for lab, c in flagged_train["given_label"].value_counts().sort_index().items()},
        "issues_found_by_split": {s: int(scored[s]["flagged"].sum()) for s in scored},
        "cleanlab_candidates": int(st["cleanlab_issue"].sum()),
        "unscorable_rows": int((~scorable).sum()),
        "folds_used": k,
        "temperature": round(temperature, 4),
        "action": params.action,
        "min_score": params.min_score,
        "rows_acted_on": {"dropped": int(drop.sum()), "relabelled": int(relabelled.sum())},
        "decisions": {
            "rows": int(len(decisions)),
            "accept": int((decisions["decision"] == "accept").sum()) if len(decisions) else 0,
            "reject": int((decisions["decision"] == "reject").sum()) if len(decisions) else 0,
            "applied": int(len(decisions_applied)),
            "changed_rows": int((decisions_applied["effect"] != "kept").sum()),
        },
        "datalab": {"outliers": int(len(outliers)), "near_duplicates": int(len(near))},
    }


def _empty_classes(splits: dict[str, pd.DataFrame], labels: list[str], train_in: pd.DataFrame,
                   changes: pd.DataFrame, params: AuditParams, rows_in: dict[str, int]):
    """A class whose every train row was dropped or relabelled away: stop (audit.on_empty_class: error),
    or drop its validation/test rows too (listed in changes.csv, reason class_emptied_from_train).
    Returns (splits, labels, changes, dropped classes)."""
    gone = sorted(set(train_in["label"].astype(str)) - set(splits["train"]["label"].astype(str)))
    if gone and params.on_empty_class == "error":
        lab = gone[0]
        mine = changes[changes["given_label"] == lab]
        by = {f"{c} ({r})": int(n) for (c, r), n in mine.groupby(["change", "reason"]).size().items()}
        held = {s: int((splits[s]["label"] == lab).sum()) for s in ("validation", "test")}
        raise StageError(f"audit would leave class {lab!r} with no train rows (train rows in: "
                         f"{int((train_in['label'] == lab).sum())}; {by}; validation/test rows: {held}); review "
                         "the decisions, or set audit.on_empty_class: drop to drop the class from every split")
    if not gone:
        return splits, labels, changes, gone
    extra = []
    for s in ("validation", "test"):
        df = splits[s]
        hit = df["label"].isin(gone).to_numpy()
        extra.append(pd.DataFrame({"id": df["id"][hit], "text": df["text"][hit], "given_label": df["label"][hit],
                                   "new_label": "", "change": "dropped", "reason": "class_emptied_from_train",
                                   "score": np.nan}))
        splits[s] = df[~hit].reset_index(drop=True)
    changes = pd.concat([changes] + extra, ignore_index=True)
    kept = [lab for lab in labels if lab not in gone]
    why = {s: f"class(es) {gone} emptied from train" for s in SPLITS}
    check_splits_kept("audit", rows_in, {s: len(splits[s]) for s in SPLITS}, why,
                      {s: f"{s}.parquet" for s in SPLITS})
    if len(kept) < 2:
        raise StageError(f"audit would leave {len(kept)} class(es) {kept} with train rows; a classifier needs two")
    return splits, kept, changes, gone


# --------------------------------------------------------------------------- I/O edge

def audit_stage(io: StageIO) -> None:
    """The audit stage of a classifier: embed, score, act on the decisions and audit.action, write."""
    base, params = load_params(io.params, "base", "audit")
    decisions_path = io.decisions if io.decisions is not None else params.decisions
    in_dir = Path(io.in_dir)
    splits, labels = read_dataset(in_dir)
    # Validate the decisions before the slow embedding, so a typo fails in seconds and writes nothing.
    decisions = read_decisions(decisions_path, splits, labels)

    encoder_path = resolve_encoder(params, base)

    embeddings, reused, embed_s = embed_splits(splits, encoder_path, io.embeddings, base.max_length,
                                               params.batch_size, stage_device(base))
    result = audit(splits, labels, embeddings, params, base.seed, decisions)

    m = result.metrics
    m["embeddings_reused"] = reused
    m["embed_seconds"] = round(embed_s, 3)
    m["encoder"] = params.encoder if params.encoder != "base" else f"base:{base.model}"
    m["dataset_hash_in"] = read_hashes(in_dir, splits, labels)["dataset"]
    out_labels = sorted(set(result.labels))  # relabelling only moves rows between known labels

    with atomic_output(io.out) as out_tmp, atomic_output(io.report) as rep_tmp:
        hashes = write_dataset(out_tmp, result.splits, out_labels)
        m["dataset_hash_out"] = hashes["dataset"]
        manifest = in_dir / "manifest.json"
        if manifest.exists():  # downstream stages want the dedupe provenance; audited data carries it on
            shutil.copyfile(manifest, out_tmp / "upstream_manifest.json")
        rep_tmp.mkdir()
        result.write_reports(rep_tmp)
        write_json(rep_tmp / "summary.json", {
            "params": as_dict(params), "seed": base.seed, "max_length": base.max_length,
            "encoder_path": encoder_path, "decisions_file": str(decisions_path or ""),
            "score": "1 - p(given label) under temperature-calibrated out-of-sample probabilities "
                     "(1 - cleanlab self-confidence)",
            "flag_rule": f"cleanlab find_label_issues(filter_by={params.filter_by!r}) and score >= "
                         f"{params.min_score} and suggested label != given label",
            "metrics": m,
        })
        # Metrics last, inside both blocks: any failure above leaves no metrics either.
        with atomic_output(io.metrics) as met_tmp:
            write_json(met_tmp, m)
    log.info("flagged %d train rows; action %s: dropped %d, relabelled %d; decisions applied %d",
             m["issues_found"], params.action, m["rows_acted_on"]["dropped"], m["rows_acted_on"]["relabelled"],
             m["decisions"]["applied"])


def label_set_audit(splits: dict[str, pd.DataFrame], label_set: list[str], decisions_path: str | Path | None,
                    embeddings_dir: str | Path, base: BaseParams, params: AuditParams) -> AuditResult:
    """base.task generation with evaluate.label_set: every response must be one label; the prompts are embedded
    (audit.encoder; 'base' = the causal LM's mean last hidden state) and audited like a classifier's texts,
    with the same decisions file, action and reports."""
    for s in SPLITS:
        unknown = ~splits[s]["label"].isin(label_set)
        if unknown.any():
            row = int(np.flatnonzero(unknown.to_numpy())[0])
            raise DataError(f"{s}.parquet", row + 1, "label", f"response {splits[s]['label'].iloc[row]!r} is not in "
                            f"evaluate.label_set {label_set}")
    labels = [lab for lab in label_set if lab in set(splits["train"]["label"])]  # the classes train can score
    decisions = read_decisions(decisions_path, splits, labels)

    embeddings, reused, embed_s = embed_splits(splits, resolve_encoder(params, base), embeddings_dir,
                                               base.max_length, params.batch_size, stage_device(base))
    result = audit(splits, labels, embeddings, params, base.seed, decisions)
    result.metrics.update(embeddings_reused=reused, embed_seconds=round(embed_s, 3), label_set=label_set,
                          encoder=params.encoder if params.encoder != "base" else f"base:{base.model}")
    return result
