"""Drift monitoring on BANKING77 with the cached default fine-tune (bench/banking77.py).

    flock /tmp/domaintune-heavy.lock .venv/bin/python bench/drift.py   # -> bench/results/drift.json

Reference: the drift baseline built from BANKING77 train (text features) and the held-out
validation split (model outputs), exactly as the drift stage builds it (domaintune.drift).
Each text pool below is profiled once (one forward pass); batches are seeded draws of rows.
- false alarms: 20 seeded iid draws (without replacement) of the test split at 100, 500 and
  3,000 texts; target: at most 1 alarm in 60. Each size also reports how many draws the p-values
  alone would have alarmed (drift.min_effect 0) and each signal's largest effect size.
- detection: for each shift, the smallest batch size at which >= 9 of 10 seeded draws alarm:
  class prior (test rows of 5 classes only), truncation to the first 6 words, 10% character
  typos, and a different-domain text set written here (DOMAIN_TEXTS: travel, IT, groceries...).
  Draws larger than a pool are taken with replacement.
- estimated accuracy (CBPE, no labels) against the true accuracy on labelled iid draws and on
  the labelled shifts; target: within 2 points on iid batches.
- speed: a child process that imports, loads the model and judges a 1k and a 10k text file
  (report.html with evidently's details included), wall time in all and after model load.
- accuracy_coverage: how often the estimated accuracy's 95% interval holds the measured accuracy
  (bench/drift_coverage.py, which also runs on its own and adds just that section).
Everything in bench/results/drift.json comes from one run ("complete": true); a --*-only run that
adds a section to it marks the file "complete": false and names the section.
The same draws are also judged by a domain classifier (logistic regression on the embeddings,
cross-validated AUC, permutation null) to compare with the MMD test that domaintune uses.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import REPO

OUT = REPO / "bench" / "results" / "drift.json"
DETECTION_SIZES = (10, 20, 50, 100, 200, 500, 1000)
FALSE_ALARM_SIZES = (100, 500, 3000)
_SUBJECTS = ["my flight to Lisbon", "the hotel booking", "my train ticket", "the rental car", "our cruise cabin",
             "the laptop I ordered", "my VPN connection", "the printer on floor 3", "my Outlook calendar",
             "the tomatoes in my order", "the pizza delivery", "my gym membership", "the concert tickets",
             "my dentist appointment", "the kitchen sink", "the wifi router", "my kid's school bus",
             "the library book", "my passport renewal", "the parking permit"]
_PROBLEMS = ["was cancelled without notice", "is two hours late", "keeps crashing after the update",
             "arrived broken", "cannot be rescheduled online", "shows the wrong date", "smells weird",
             "was double booked", "needs a new password", "is making a loud noise"]
_ASKS = ["What are my options?", "Can someone call me back?", "Please fix this today.", "Who do I talk to?",
         "Is there a form for this?", "I want a replacement.", "", "How long will this take?"]


def domain_texts(n: int = 400, seed: int = 0) -> list[str]:
    """A different-domain set (travel, IT support, groceries, appointments): no banking words."""
    rng = random.Random(seed)
    texts = set()
    while len(texts) < n:
        texts.add(f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_PROBLEMS)}. {rng.choice(_ASKS)}".strip())
    return sorted(texts)


def typos(text: str, rng: random.Random, rate: float = 0.1) -> str:
    """Each character, with probability `rate`: deleted, doubled, swapped with the next, or replaced."""
    out, i, chars = [], 0, list(text)
    while i < len(chars):
        c = chars[i]
        if c.isalpha() and rng.random() < rate:
            op = rng.randrange(4)
            if op == 1:
                out += [c, c]
            elif op == 2 and i + 1 < len(chars):
                out += [chars[i + 1], c]
                i += 1
            elif op == 3:
                out.append(rng.choice("abcdefghijklmnopqrstuvwxyz"))
        else:
            out.append(c)
        i += 1
    return "".join(out) or text


def draw(n_pool: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(n_pool, size=size, replace=size > n_pool)


def true_accuracy(prof, gold: list[str], idx: np.ndarray) -> float:
    pred = prof.frame["pred_label"].to_numpy()[idx]
    return float(np.mean(pred == np.asarray(gold, dtype=object)[idx]))


def domain_classifier_p(ref_emb: np.ndarray, emb: np.ndarray, seed: int, perms: int = 20) -> tuple[float, float]:
    """Domain classifier: 2-fold CV AUC of reference-vs-batch logistic regression on embeddings,
    p-value from `perms` label permutations (refit each time). Returns (p, seconds)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict

    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    ref = ref_emb[rng.choice(len(ref_emb), size=min(len(ref_emb), max(len(emb), 50)), replace=False)]
    x = np.vstack([ref, emb])
    y = np.r_[np.zeros(len(ref)), np.ones(len(emb))]

    def auc(labels):
        s = cross_val_predict(LogisticRegression(max_iter=200, C=0.1), x, labels, cv=2, method="predict_proba")
        return roc_auc_score(labels, s[:, 1])

    observed = auc(y)
    null = [auc(rng.permutation(y)) for _ in range(perms)]
    p = (1 + sum(v >= observed for v in null)) / (perms + 1)
    return p, time.perf_counter() - t


def pd_codes(values: list[str], splits) -> np.ndarray:
    labels = sorted(set(splits["train"]["label"]))
    index = {lab: i for i, lab in enumerate(labels)}
    return np.array([index[v] for v in values])


def setup(params, log):
    from banking77 import cached_finetune, load_banking77

    from domaintune.core.params import load_params
    from domaintune.modeling.encoders import set_threads
    from domaintune.monitor.drift import Baseline, build_baseline
    from domaintune.predict.predictor import Predictor

    base = load_params(REPO / "params.yaml", "base")
    root, _ = cached_finetune(REPO / "params.yaml", log=log)
    splits, labels = load_banking77(base.seed)
    set_threads()
    predictor = Predictor.load(root / "model", calibration=root / "calibration.json", batch_size=params.batch_size)
    folder = Path(tempfile.mkdtemp(prefix="drift-bench-"))
    t = time.perf_counter()
    metrics = build_baseline(splits, labels, predictor, params, folder / "baseline")
    metrics["build_seconds"] = round(time.perf_counter() - t, 1)
    log(f"baseline: {metrics}")
    return root, splits, predictor, Baseline(folder / "baseline"), metrics, folder


def pools(splits, predictor, baseline, log) -> dict:
    """name -> (profile, gold labels or None): each pool profiled once."""
    test = splits["test"]
    texts, gold = test["text"].tolist(), test["label"].tolist()
    rng = random.Random(0)
    five = sorted(rng.sample(sorted(set(gold)), min(5, len(set(gold)) - 1)))
    keep = [i for i, g in enumerate(gold) if g in five]
    out = {}
    for name, (tx, gl) in {
        "iid_test": (texts, gold),
        "class_prior_5_classes": ([texts[i] for i in keep], [gold[i] for i in keep]),
        "truncated_6_words": ([" ".join(t.split()[:6]) for t in texts], gold),
        "typos_10pct": ([typos(t, random.Random(i)) for i, t in enumerate(texts)], gold),
        "other_domain": (domain_texts(), None),
    }.items():
        t = time.perf_counter()
        out[name] = (baseline.profile_batch(predictor, tx), gl)
        log(f"profiled {name}: {len(tx)} texts in {time.perf_counter() - t:.1f} s")
    out["_five_classes"] = five
    return out


def train_prior_weights(gold: list[str], train_labels: list[str]) -> np.ndarray:
    """Row weights that make a draw of test rows follow train's class prior (BANKING77's test split is
    class-balanced, 40 per class; train is not), so the draw is iid with the reference."""
    from collections import Counter

    tr, te = Counter(train_labels), Counter(gold)
    w = np.array([tr[g] / len(train_labels) / te[g] for g in gold])
    return w / w.sum()


def false_alarms(baseline, params, pool, weights: np.ndarray | None = None) -> dict:
    """20 seeded draws per size: without replacement as is, or with replacement by `weights`."""
    from domaintune.monitor.drift import judge

    prof, gold = pool
    res = {}
    for size in FALSE_ALARM_SIZES:
        alarms, p_only, errs, signals, effects = 0, 0, [], {}, {}
        for seed in range(20):
            rng = np.random.default_rng(1000 + seed)
            idx = rng.choice(len(prof.texts), size=size, replace=False) if weights is None else \
                rng.choice(len(prof.texts), size=size, replace=True, p=weights)
            v = judge(baseline, prof.take(idx), params)
            alarms += v["drift"]
            p_only += p_value_alarm(v)
            for s, info in v["signals"].items():
                signals[s] = min(signals.get(s, 1.0), info["p_value"])
                effects[s] = max(effects.get(s, 0.0), info["effect"])
            errs.append(v["accuracy"]["estimated"] - true_accuracy(prof, gold, idx))
        res[str(size)] = {"alarms": int(alarms), "draws": 20, "alarms_p_values_only": int(p_only),
                          "largest_effect_per_signal": dict(sorted(effects.items(), key=lambda kv: -kv[1])),
                          "estimated_minus_true_accuracy_mean": float(np.mean(errs)),
                          "estimated_minus_true_accuracy_mean_abs": float(np.mean(np.abs(errs))),
                          "smallest_p_per_signal": signals}
    res["total_alarms"] = sum(res[str(s)]["alarms"] for s in FALSE_ALARM_SIZES)
    res["total_draws"] = 20 * len(FALSE_ALARM_SIZES)
    return res


def p_value_alarm(v: dict) -> bool:
    """Whether the verdict would alarm on p-values alone (drift.min_effect 0)."""
    return any(s["significant"] for s in v["signals"].values()) or bool((v["accuracy"] or {}).get("drop_significant"))


def detection(baseline, params, pool) -> dict:
    from domaintune.monitor.drift import MMD_SIGNAL, judge

    prof, gold = pool
    per_size, smallest = {}, None
    for size in DETECTION_SIZES:
        alarms, p_only, mmd, est, true = 0, 0, 0, [], []
        for seed in range(10):
            idx = draw(len(prof.texts), size, 2000 + seed)
            v = judge(baseline, prof.take(idx), params)
            alarms += v["drift"]
            p_only += p_value_alarm(v)
            mmd += v["signals"][MMD_SIGNAL]["drifted"]
            est.append(v["accuracy"]["estimated"])
            if gold is not None:
                true.append(true_accuracy(prof, gold, idx))
        per_size[str(size)] = {"alarms": alarms, "alarms_p_values_only": p_only, "mmd_alone": mmd, "estimated_accuracy": float(np.mean(est)),
                               "true_accuracy": float(np.mean(true)) if true else None}
        if smallest is None and alarms >= 9:
            smallest = size
    return {"smallest_size_9_of_10": smallest, "per_size": per_size, "pool_rows": len(prof.texts),
            "whole_pool": whole(baseline, params, pool)}


def whole(baseline, params, pool) -> dict:
    """The whole pool as one batch: estimated vs true accuracy and macro-F1, the first reasons."""
    from sklearn.metrics import f1_score

    from domaintune.monitor.drift import judge

    prof, gold = pool
    v = judge(baseline, prof, params)
    pred = prof.frame["pred_label"].tolist()
    return {"rows": len(pred), "drift": v["drift"], "estimated_accuracy": v["accuracy"]["estimated"],
            "ci": [v["accuracy"]["ci_low"], v["accuracy"]["ci_high"]],
            "true_accuracy": None if gold is None else true_accuracy(prof, gold, np.arange(len(pred))),
            "estimated_macro_f1": v["accuracy"]["estimated_macro_f1"],
            "true_macro_f1": None if gold is None else float(f1_score(gold, pred, average="macro")),
            "reasons": v["reasons"][:4],
            "effects": {name: round(s["effect"], 4) for name, s in v["signals"].items()}}


def classifier_comparison(baseline, params, pools_: dict) -> dict:
    """Domain classifier vs MMD on the same draws (5 per size): alarms at the same per-test level."""
    from domaintune.monitor.drift import MMD_SIGNAL, judge

    ref_emb = baseline.arrays["ref_embeddings"]
    level = None
    out = {}
    for name, pool in pools_.items():
        if name.startswith("_"):
            continue
        prof = pool[0]
        row = {}
        for size in (50, 200):
            clf, mmd, mmd_p, secs, mmd_secs = 0, 0, 0, [], []
            for seed in range(5):
                sub = prof.take(draw(len(prof.texts), size, 3000 + seed))
                t = time.perf_counter()
                v = judge(baseline, sub, params)
                mmd_secs.append(time.perf_counter() - t)
                level = v["per_test_level"]
                mmd += v["signals"][MMD_SIGNAL]["drifted"]
                mmd_p += v["signals"][MMD_SIGNAL]["significant"]
                p, s = domain_classifier_p(ref_emb, sub.emb / np.linalg.norm(sub.emb, axis=1, keepdims=True), seed)
                clf += p < 0.05
                secs.append(s)
            row[str(size)] = {"mmd_alarms_of_5": mmd, "mmd_significant_of_5": mmd_p,
                              "classifier_alarms_of_5_at_p_0.05": int(clf),
                              "classifier_seconds": float(np.mean(secs)), "judge_seconds": float(np.mean(mmd_secs))}
        out[name] = row
    out["note"] = (f"MMD tested at the Bonferroni level {level:.2g} (mmd_significant: p-value alone; mmd_alarms: "
                   f"also an effect of at least drift.min_effect {params.min_effect}); the classifier's permutation null has only 20 "
                   "permutations (p >= 1/21), so it is judged at p < 0.05, far looser, and still needs a model "
                   "fit per permutation")
    return out


def speed_child(file: str, model_root: str, baseline_dir: str, out: str) -> None:
    t0 = time.perf_counter()
    from domaintune.core.params import load_params
    from domaintune.modeling.encoders import set_threads
    from domaintune.monitor.monitoring import judge_texts, read_batch
    from domaintune.monitor.report import DetailsProcess
    from domaintune.predict.predictor import Predictor

    params = load_params(REPO / "params.yaml", "drift")
    details = DetailsProcess()  # as `domaintune monitor` does (domaintune.monitoring.run_local)
    set_threads()
    texts = read_batch(file)
    predictor = Predictor.load(Path(model_root) / "model", calibration=Path(model_root) / "calibration.json",
                               batch_size=params.batch_size)
    t1 = time.perf_counter()
    phases: dict = {}
    verdict, _ = judge_texts(texts, baseline_dir, predictor, params, out, file, timings=phases, renderer=details)
    t2 = time.perf_counter()
    details.close()
    print(json.dumps({"texts": len(texts), "after_model_load_s": t2 - t1, "model_load_s": t1 - t0,
                      "in_process_total_s": t2 - t0, "phases_after_load_s": phases, "drift": verdict["drift"]}))


def speed(root, splits, folder: Path, sizes=(1000, 10000), res: dict | None = None, repeats: int = 3) -> dict:
    """Fresh-process timings; the 1,000-text batch is run `repeats` times (this box is shared, so single
    timings wander) and its median run is reported with all runs listed."""
    texts = splits["test"]["text"].tolist()
    res = {} if res is None else res
    for n in sizes:
        rng = np.random.default_rng(n)
        f = folder / f"batch_{n}.txt"
        # one text per line: whitespace runs (a few BANKING77 texts hold a line break) become one space
        f.write_text("\n".join(" ".join(texts[i].split()) for i in rng.choice(len(texts), n, replace=n > len(texts)))
                     + "\n")
        runs = []
        for _ in range(repeats if n <= 1000 else 1):
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--speed-child", str(f), str(root),
                                   str(folder / "baseline"), str(folder / f"out_{n}")], capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "2"})
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                runs.append({"error": proc.stderr.strip().splitlines()[-3:]})
                break
            runs.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "process_wall_s": wall})
        ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["after_model_load_s"])
        res[str(n)] = {**(ok[len(ok) // 2] if ok else runs[-1]), "runs": runs,
                       "after_model_load_s_all": [r.get("after_model_load_s") for r in runs],
                       "process_wall_s_all": [r.get("process_wall_s") for r in runs]}
    return res


def speed_cli(root: Path, folder: Path, n: int = 1000, repeats: int = 3) -> dict:
    """`domaintune monitor --batch` on n test texts, the real command in a fresh process, against a repo
    folder whose models/export is the cached export of this fine-tune (bench/inference.py writes it) and
    whose models/drift_baseline is this run's baseline. Wall time in all, from process start: the median of
    `repeats` runs, all listed."""
    from banking77 import cache_root

    exports = sorted(p for p in cache_root().glob(f"banking77-export-{root.name}-*") if (p / "done").exists())
    if not exports:
        return {"skipped": f"no cached export of {root.name} (bench/inference.py writes one)"}
    repo = folder / "cli_repo"
    (repo / "models").mkdir(parents=True, exist_ok=True)
    (repo / "params.yaml").write_text((REPO / "params.yaml").read_text())
    for name, target in (("export", exports[-1]), ("drift_baseline", folder / "baseline")):
        if not (repo / "models" / name).exists():
            (repo / "models" / name).symlink_to(target, target_is_directory=True)
    (repo / "batch.txt").write_text((folder / f"batch_{n}.txt").read_text())
    walls = []
    for _ in range(repeats):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "monitor", "--batch", "batch.txt", "--repo",
                               str(repo)], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "2"})
        walls.append(time.perf_counter() - t)
    return {"texts": n, "command": "domaintune monitor --batch batch.txt", "exit_code": proc.returncode,
            "wall_s": sorted(walls)[len(walls) // 2], "wall_s_all": walls, "export": exports[-1].name,
            "stdout_first_line": (proc.stdout.splitlines() or [""])[0][:300],
            "stderr_tail": proc.stderr.strip().splitlines()[-3:]}


def holdout_false_alarms(params, log, holdout: int = 3000, sizes=(100, 500, 1000)) -> dict:
    """False alarms on truly iid batches: `holdout` train rows (stratified, seeded) are left out of a
    second baseline and batches are drawn from them (BANKING77's test split is not drawn like train:
    its texts are shorter within every class)."""
    from banking77 import cached_finetune, load_banking77
    from sklearn.model_selection import train_test_split

    from domaintune.core.params import load_params
    from domaintune.monitor.drift import Baseline, build_baseline
    from domaintune.predict.predictor import Predictor

    global FALSE_ALARM_SIZES
    base = load_params(REPO / "params.yaml", "base")
    root, _ = cached_finetune(REPO / "params.yaml", log=log)
    splits, labels = load_banking77(base.seed)
    keep, held = train_test_split(splits["train"], test_size=holdout, stratify=splits["train"]["label"],
                                  random_state=7)
    predictor = Predictor.load(root / "model", calibration=root / "calibration.json", batch_size=params.batch_size)
    folder = Path(tempfile.mkdtemp(prefix="drift-bench-holdout-"))
    build_baseline({**splits, "train": keep.reset_index(drop=True)}, labels, predictor, params, folder / "b")
    baseline = Baseline(folder / "b")
    prof = baseline.profile_batch(predictor, held["text"].tolist())
    FALSE_ALARM_SIZES = sizes
    res = false_alarms(baseline, params, (prof, held["label"].tolist()))
    res["whole_pool"] = whole(baseline, params, (prof, held["label"].tolist()))
    res["note"] = (f"{holdout} train rows held out of the baseline (train minus them + validation); draws "
                   "without replacement at each size. Caveat: the cached fine-tune was trained on all of "
                   "BANKING77's train split, these rows included, so its outputs on them are optimistic "
                   "(confidence above validation's): the model-output signals see a real difference here, and "
                   "only the text-feature signals are checked for false alarms by this run")
    return res


def save(result: dict) -> None:
    """Written after each section (complete: false until the last), so a cut-short run keeps its numbers."""
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"complete": False, **result}, indent=2, default=float) + "\n")


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")
    return {"cpu_model": model, "cpu_cores": os.cpu_count(), "loadavg_start": list(os.getloadavg())}


def add_section(result: dict, name: str) -> None:
    """A --*-only run changed `name`: the file is no longer one run's."""
    result["complete"] = False
    result.setdefault("sections_added_later", []).append(name)


def partial_run(args, params, log) -> int:
    """One section added to an existing results file (--speed-only, --classifier-only, --holdout-only)."""
    from domaintune.core.params import load_params

    if args.speed_only:
        from banking77 import cached_finetune, load_banking77

        base = load_params(REPO / "params.yaml", "base")
        root, _ = cached_finetune(REPO / "params.yaml", log=log)
        result = json.loads(OUT.read_text())
        result["speed"] = speed(root, load_banking77(base.seed)[0], Path(args.speed_only),
                                [int(n) for n in args.speed_sizes.split(",")], result.get("speed"))
        add_section(result, "speed")
        OUT.write_text(json.dumps(result, indent=2, default=float) + "\n")
        log(f"speed: {result['speed']}")
        return 0
    if args.classifier_only:
        from banking77 import cached_finetune, load_banking77

        from domaintune.monitor.drift import Baseline
        from domaintune.predict.predictor import Predictor

        base = load_params(REPO / "params.yaml", "base")
        root, _ = cached_finetune(REPO / "params.yaml", log=log)
        splits = load_banking77(base.seed)[0]
        splits["test"] = splits["test"].sample(n=500, random_state=0).reset_index(drop=True)
        predictor = Predictor.load(root / "model", calibration=root / "calibration.json",
                                   batch_size=params.batch_size)
        p = pools(splits, predictor, Baseline(Path(args.classifier_only) / "baseline"), log)
        result = json.loads(OUT.read_text())
        result["mmd_vs_domain_classifier"] = classifier_comparison(Baseline(Path(args.classifier_only) / "baseline"),
                                                                   params, p)
        add_section(result, "mmd_vs_domain_classifier")
        OUT.write_text(json.dumps(result, indent=2, default=float) + "\n")
        log(f"classifier: {result['mmd_vs_domain_classifier']}")
        return 0
    if args.holdout_only:
        result = json.loads(OUT.read_text())
        result.setdefault("false_alarms", {})["train_holdout"] = holdout_false_alarms(params, log)
        add_section(result, "false_alarms.train_holdout")
        OUT.write_text(json.dumps(result, indent=2, default=float) + "\n")
        log(f"held-out train false alarms: {result['false_alarms']['train_holdout']['total_alarms']} / 60")
        return 0
    return 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speed-child", nargs=4, metavar=("FILE", "MODEL_ROOT", "BASELINE", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--skip-classifier", action="store_true", help="leave out the domain-classifier comparison")
    ap.add_argument("--speed-only", metavar="FOLDER", help="only the speed runs, with FOLDER/baseline from an "
                    "earlier run, added to an existing results file")
    ap.add_argument("--speed-sizes", default="1000,10000", help="batch sizes of --speed-only (comma-separated)")
    ap.add_argument("--classifier-only", metavar="FOLDER", help="only the MMD vs domain-classifier comparison, "
                    "with FOLDER/baseline from an earlier run and 500 texts per pool, added to the results file")
    ap.add_argument("--holdout-only", action="store_true",
                    help="only the held-out-train false-alarm run, added to an existing results file")
    args = ap.parse_args(argv)
    if args.speed_child:
        speed_child(*args.speed_child)
        return 0
    from domaintune.core.params import load_params

    params = load_params(REPO / "params.yaml", "drift")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.speed_only or args.classifier_only or args.holdout_only:
        return partial_run(args, params, log)
    mach, started = machine(), time.perf_counter()
    root, splits, predictor, baseline, metrics, folder = setup(params, log)
    p = pools(splits, predictor, baseline, log)
    result = {"machine": mach, "params": {"false_alarm_rate": params.false_alarm_rate,
              "min_effect": params.min_effect, "calibration_resamples": params.calibration_resamples,
              "max_accuracy_drop": params.max_accuracy_drop, "bf16": params.bf16,
              "bf16_used": bool(baseline.profile.get("bf16"))},
              "baseline": metrics, "five_classes": p["_five_classes"]}
    t = time.perf_counter()
    gold = p["iid_test"][1]
    w = train_prior_weights(gold, splits["train"]["label"].tolist())
    tv = 0.5 * float(np.abs(np.bincount(pd_codes(gold, splits), minlength=77) / len(gold)
                            - np.bincount(pd_codes(splits["train"]["label"].tolist(), splits), minlength=77)
                            / len(splits["train"])).sum())
    result["false_alarms"] = {
        "note": ("BANKING77's test split is class-balanced (40 per class) while train/validation are not "
                 f"(total-variation distance of the label priors {tv:.3f}): plain test draws carry a real "
                 "class-prior shift. 'train_prior' draws test rows with replacement, weighted to train's prior, "
                 "which is iid with the reference; 'as_is' draws without replacement."),
        "as_is": false_alarms(baseline, params, p["iid_test"]),
        "train_prior": false_alarms(baseline, params, p["iid_test"], w)}
    save(result)
    log(f"false alarms: as is {result['false_alarms']['as_is']['total_alarms']} / 60, train prior "
        f"{result['false_alarms']['train_prior']['total_alarms']} / 60 ({time.perf_counter() - t:.0f} s)")
    result["detection"] = {name: detection(baseline, params, p[name]) for name in p
                           if not name.startswith("_") and name != "iid_test"}
    save(result)
    log("detection: " + json.dumps({k: v["smallest_size_9_of_10"] for k, v in result["detection"].items()}))
    result["iid_whole_test"] = whole(baseline, params, p["iid_test"])
    result["speed"] = speed(root, splits, folder)
    result["speed"]["cli_1000"] = speed_cli(root, folder)
    save(result)
    log(f"speed: {result['speed']}")
    if not args.skip_classifier:
        result["mmd_vs_domain_classifier"] = classifier_comparison(baseline, params, p)
    from drift_coverage import coverage_section  # bench/drift_coverage.py: the accuracy interval's coverage

    result["accuracy_coverage"] = coverage_section()
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    result["run_seconds"] = round(time.perf_counter() - started, 1)
    OUT.write_text(json.dumps({"complete": True, **result}, indent=2, default=float) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
