"""Coverage of the monitor's estimated-accuracy interval: how often the 95% interval holds the truth.

    nice -n 19 flock /tmp/heavy.lock .venv/bin/python bench/drift_coverage.py
    # -> the "accuracy_coverage" section of bench/results/drift.json (bench/drift.py runs it too)

The estimator is domaintune.monitor.stats.estimated_accuracy, what `domaintune monitor` reports: each text's
calibrated top probability mapped to P(correct) by a logistic map fitted on the validation rows the
temperature was fitted on, plus its predicted class's offset on those rows (shrunk by empirical Bayes,
stats.class_offsets), with an interval for both the batch's sampling and that calibration (the map
and offsets refitted on bootstrap resamples of the validation rows). Coverage is a property of the estimator given the
model's confidences and its calibration rows, so each model predicts once and batches are drawn from the
cached predictions.

Models (the cheapest honest route, the same for both datasets): a head-only fine-tune of the bundled MiniLM,
i.e. a multinomial logistic-regression head (C=10, the audit's probe) on the frozen encoder's mean-pooled
embeddings of the train split, its temperature fitted on the validation split by the evaluate stage's own
fit (domaintune.evaluate.calibration.fit_temperature).
  example    examples/support_tickets/labelled.csv split by ingest as params.yaml says (before dedupe)
  banking77  ../shared/datasets/banking77 (bench/banking77.py: 10% of train held out as validation;
             DOMAINTUNE_BANKING77 names another folder)
Batches: iid draws of the test split at 100, 500 and 3,000 texts, distinct rows where the split has that
many (else with replacement: the example's 177 test rows); a batch's measured accuracy is that of its rows.
A row drawn twice is one text sent twice: the estimator is told which rows are the same text (`groups`, as
the monitor groups a batch by its texts), since copies are right or wrong together.
  project_split  the split of params.yaml's base.seed, BATCHES batches per size, three intervals:
                   recalibrated       domaintune's (above)
                   recalibrated_one_map  the same without the per-class offsets (domaintune's until the offsets
                                      were added; also in over_splits, not in the calibration-rows study, to
                                      keep the run's length)
                   temperature_refit  mean calibrated confidence, temperature refitted per bootstrap resample
                                      of the validation rows, plus the Poisson-binomial sampling variance
                   mean_confidence    the previous estimator: mean calibrated confidence, Poisson-binomial only
                 With one validation set the coverage is conditional on it (at 3,000 of BANKING77's 3,080 test
                 rows every batch is nearly the whole split, so it is nearly all or nothing).
  over_splits    SPLIT_SEEDS other split seeds (head and temperature redone), SEED_BATCHES batches per size
                 each: the coverage the interval promises, its calibration rows being a random draw too. The
                 example gets more seeds: its batches of 500 and 3,000 are resamples of its 177 test rows,
                 so each split is about one trial there, and 8 trials cannot measure a 90% rate.
  calibration_rows_study  BANKING77's held-out rows (validation + test) pooled; SUBSETS draws of n rows
                 calibrate (temperature and map), SUBSET_BATCHES batches per size come from the rest. The
                 smallest n from which every size reaches TARGET is what the monitor calls reliable
                 (domaintune.monitor.drift.MIN_CALIBRATION_ROWS).
Embeddings are cached in $DOMAINTUNE_BENCH_CACHE (default ~/.cache/domaintune-bench).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from _common import REPO

OUT = REPO / "bench" / "results" / "drift.json"
SIZES = (100, 500, 3000)
BATCHES = 100
CALIBRATION_SIZES = (25, 50, 100, 150, 200, 300, 500, 1000)
SUBSETS = 60
SUBSET_BATCHES = 20
SPLIT_SEEDS = {"example": 24, "banking77": 8}
SEED_BATCHES = 25
TARGET = 0.90


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def example_splits(seed: int) -> dict:
    """The example's splits as ingest makes them (params.yaml's ingest section) with split seed `seed`."""
    from domaintune.core.params import load_params
    from domaintune.data.ingest import ingest
    from domaintune.data.sources import read_source

    p = load_params(REPO / "params.yaml", "ingest")
    return ingest(read_source(str(REPO / p.source)), p, seed).splits


def banking77_splits(seed: int) -> dict:
    from banking77 import load_banking77

    return load_banking77(seed)[0]


SPLITS = {"example": example_splits, "banking77": banking77_splits}


def embeddings(name: str, texts: list[str]) -> dict[str, np.ndarray]:
    """text -> mean-pooled embedding of the bundled MiniLM (computed once per dataset, cached)."""
    from banking77 import cache_root
    from safetensors.numpy import load_file, save_file

    texts = sorted(set(texts))
    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    path = cache_root() / f"drift-coverage-{name}-{key}.safetensors"
    if path.exists():
        emb = load_file(str(path))["embeddings"]
    else:
        from domaintune.modeling.encoders import (
            embed_texts,
            load_encoder,
            load_tokenizer,
            resolve_model,
            set_threads,
        )

        set_threads()
        model = resolve_model("minilm")
        t = time.perf_counter()
        emb = embed_texts(load_encoder(model), load_tokenizer(model), texts, 64, 128)
        log(f"{name}: embedded {len(texts)} texts in {time.perf_counter() - t:.0f} s")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": emb}, str(path))
    return dict(zip(texts, emb))


def predictions(name: str, seed: int) -> dict:
    """Split with `seed`, head-only fine-tune on train (logistic regression on the frozen MiniLM's embeddings);
    logits and label ids of validation and test."""
    from sklearn.linear_model import LogisticRegression

    splits = SPLITS[name](seed)
    emb = embeddings(name, [t for df in splits.values() for t in df["text"]])
    labels = sorted(set(splits["train"]["label"]))
    index = {lab: i for i, lab in enumerate(labels)}
    x = {s: np.stack([emb[t] for t in df["text"]]) for s, df in splits.items()}
    y = {s: np.array([index[v] for v in df["label"]]) for s, df in splits.items()}
    t = time.perf_counter()
    head = LogisticRegression(C=10.0, max_iter=2000).fit(x["train"], y["train"])
    log(f"{name} seed {seed}: head fitted on {len(y['train'])} rows in {time.perf_counter() - t:.0f} s")
    out = {}
    for s in ("validation", "test"):
        out[f"{s}_logits"] = head.decision_function(x[s]).astype(np.float64)
        out[f"{s}_y"] = y[s]
    return out


def confidences(logits: np.ndarray, y: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    return outputs(logits, y, temperature)[:2]


def outputs(logits: np.ndarray, y: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Calibrated top probability, right or wrong, and the predicted class of each row."""
    from domaintune.evaluate.calibration import softmax

    probs = softmax(logits, temperature)
    pred = probs.argmax(axis=1)
    return probs.max(axis=1), (pred == y).astype(np.float64), pred


def temperature_refits(val_logits: np.ndarray, val_y: np.ndarray, boot: int = 100, seed: int = 0) -> np.ndarray:
    from domaintune.evaluate.calibration import fit_temperature

    rng = np.random.default_rng(seed)
    n = len(val_y)
    return np.array([fit_temperature(val_logits[i], val_y[i])["temperature"]
                     for i in (rng.integers(0, n, n) for _ in range(boot))])


def draw(rng, pool: int, size: int) -> np.ndarray:
    """A batch of `size` distinct rows of the pool when it has that many (a batch of fresh texts: its
    measured accuracy varies as the interval's sampling term says), else with replacement."""
    return rng.choice(pool, size, replace=size > pool)


def coverage_table(arr: dict, log_name: str, z: float = 1.96) -> dict:
    """Per batch size: coverage, mean width and mean error of the three intervals over BATCHES iid draws."""
    from domaintune.evaluate.calibration import fit_temperature
    from domaintune.monitor.stats import estimated_accuracy

    val_logits, val_y, test_logits, test_y = (arr[k] for k in ("validation_logits", "validation_y", "test_logits",
                                                               "test_y"))
    temp = fit_temperature(val_logits, val_y)["temperature"]
    val_conf, val_ok, val_pred = outputs(val_logits, val_y, temp)
    test_conf, test_ok, test_pred = outputs(test_logits, test_y, temp)
    t_boot = temperature_refits(val_logits, val_y)
    conf_boot = np.stack([confidences(test_logits, test_y, t)[0] for t in t_boot])  # [B, test rows]
    whole = estimated_accuracy(test_conf, val_conf, val_ok, z=z, predicted=test_pred, ref_predicted=val_pred)
    out = {"validation_rows": int(len(val_y)), "validation_errors": int(len(val_y) - val_ok.sum()),
           "whole_test_estimate": whole["accuracy"], "whole_test_calibration_sd": whole["calibration_sd"],
           # this one validation draw's calibration error, in its own standard deviations: every cell of the
           # project split shares it (coverage here is conditional on it; over_splits averages over draws)
           "calibration_offset_sd": (whole["accuracy"] - float(test_ok.mean())) / whole["calibration_sd"],
           "test_rows": int(len(test_y)), "temperature": temp, "validation_accuracy": float(val_ok.mean()),
           "validation_mean_confidence": float(val_conf.mean()), "test_accuracy": float(test_ok.mean()),
           "test_mean_confidence": float(test_conf.mean()), "sizes": {}}
    for size in SIZES:
        rng = np.random.default_rng(size)
        rows = {k: [] for k in ("recalibrated", "recalibrated_one_map", "temperature_refit", "mean_confidence")}
        t = time.perf_counter()
        for _ in range(BATCHES):
            idx = draw(rng, len(test_y), size)
            truth, conf = float(test_ok[idx].mean()), test_conf[idx]
            e = estimated_accuracy(conf, val_conf, val_ok, z=z, groups=idx, predicted=test_pred[idx],
                                   ref_predicted=val_pred)
            rows["recalibrated"].append((e["accuracy"], e["accuracy_low"], e["accuracy_high"], truth))
            e = estimated_accuracy(conf, val_conf, val_ok, z=z, groups=idx)
            rows["recalibrated_one_map"].append((e["accuracy"], e["accuracy_low"], e["accuracy_high"], truth))
            pb_sd = float(np.sqrt((conf * (1 - conf)).sum())) / size
            est = float(conf.mean())
            rows["mean_confidence"].append((est, est - z * pb_sd, est + z * pb_sd, truth))
            sd = float(np.sqrt(pb_sd ** 2 + np.var(conf_boot[:, idx].mean(axis=1), ddof=1)))
            rows["temperature_refit"].append((est, est - z * sd, est + z * sd, truth))
        out["sizes"][str(size)] = {method: summarise(r) for method, r in rows.items()}
        log(f"{log_name} {size}: " + ", ".join(f"{k} {v['coverage']:.2f}" for k, v in out["sizes"][str(size)].items())
            + f" ({time.perf_counter() - t:.1f} s)")
    return out


def summarise(rows: list[tuple]) -> dict:
    a = np.array(rows)
    est, low, high, truth = a.T
    return {"batches": len(a), "coverage": float(np.mean((low <= truth) & (truth <= high))),
            "mean_width": float(np.mean(high - low)), "mean_error": float(np.mean(est - truth)),
            "mean_abs_error": float(np.mean(np.abs(est - truth))),
            "misses_high": int(np.sum(low > truth)), "misses_low": int(np.sum(high < truth))}


def judge_batches(val, test, sizes, batches: int, rng, rows: dict) -> None:
    """Append (estimate, low, high, truth) of domaintune's and the previous intervals for `batches` iid
    draws per size to rows[size][method]; `val` and `test` are outputs() of the two sets."""
    from domaintune.monitor.stats import estimated_accuracy

    val_conf, val_ok, val_pred = val
    test_conf, test_ok, test_pred = test
    for size in sizes:
        for _ in range(batches):
            idx = draw(rng, len(test_ok), size)
            truth, conf = float(test_ok[idx].mean()), test_conf[idx]
            e = estimated_accuracy(conf, val_conf, val_ok, groups=idx, predicted=test_pred[idx], ref_predicted=val_pred)
            rows[size]["recalibrated"].append((e["accuracy"], e["accuracy_low"], e["accuracy_high"], truth))
            if "recalibrated_one_map" in rows[size]:
                e = estimated_accuracy(conf, val_conf, val_ok, groups=idx)
                rows[size]["recalibrated_one_map"].append((e["accuracy"], e["accuracy_low"], e["accuracy_high"],
                                                           truth))
            est, sd = float(conf.mean()), float(np.sqrt((conf * (1 - conf)).sum())) / size
            rows[size]["mean_confidence"].append((est, est - 1.96 * sd, est + 1.96 * sd, truth))


def over_splits(name: str, seeds) -> dict:
    """Coverage over fresh validation/test splits (split seed, head and temperature redone for each):
    what the interval promises, as its calibration rows are themselves a random draw."""
    from domaintune.evaluate.calibration import fit_temperature

    methods = ("recalibrated", "recalibrated_one_map", "mean_confidence")
    rows = {size: {k: [] for k in methods} for size in SIZES}
    per_seed = {}
    for seed in seeds:
        arr = predictions(name, seed)
        temp = fit_temperature(arr["validation_logits"], arr["validation_y"])["temperature"]
        val = outputs(arr["validation_logits"], arr["validation_y"], temp)
        test = outputs(arr["test_logits"], arr["test_y"], temp)
        mine = {size: {k: [] for k in methods} for size in SIZES}
        judge_batches(val, test, SIZES, SEED_BATCHES, np.random.default_rng(seed), mine)
        per_seed[str(seed)] = {"validation_accuracy": float(val[1].mean()), "test_accuracy": float(test[1].mean()),
                               **{str(s): summarise(mine[s]["recalibrated"])["coverage"] for s in SIZES}}
        for size in SIZES:
            for k in rows[size]:
                rows[size][k] += mine[size][k]
    out = {"seeds": list(seeds), "batches_per_seed_and_size": SEED_BATCHES,
           "sizes": {str(s): {k: summarise(v) for k, v in r.items()} for s, r in rows.items()},
           "per_seed_coverage": per_seed}
    log(f"{name} over {len(seeds)} splits: " + ", ".join(
        f"{s}: {out['sizes'][str(s)]['recalibrated']['coverage']:.2f}" for s in SIZES))
    return out


def calibration_size_study(arr: dict) -> dict:
    """Coverage of domaintune's interval (and the previous one) by the number n of calibration rows. The
    held-out rows (validation + test, neither trained on) are pooled; each of SUBSETS draws takes n of them
    as the validation rows (temperature and map fitted there) and judges SUBSET_BATCHES iid batches per size
    from the rest. Subsets of one fixed validation set would instead share its luck (and BANKING77's
    validation/test difference) as n nears its size."""
    from domaintune.evaluate.calibration import fit_temperature

    logits = np.vstack([arr["validation_logits"], arr["test_logits"]])
    y = np.concatenate([arr["validation_y"], arr["test_y"]])
    out = {}
    for n in CALIBRATION_SIZES:
        rng = np.random.default_rng(7 + n)
        rows = {size: {"recalibrated": [], "mean_confidence": []} for size in SIZES}
        errors = []
        t = time.perf_counter()
        for _ in range(SUBSETS):
            perm = rng.permutation(len(y))
            cal, rest = perm[:n], perm[n:]
            temp = fit_temperature(logits[cal], y[cal])["temperature"]
            val = outputs(logits[cal], y[cal], temp)
            errors.append(n - val[1].sum())
            judge_batches(val, outputs(logits[rest], y[rest], temp), SIZES, SUBSET_BATCHES, rng, rows)
        out[str(n)] = {"validation_errors_mean": float(np.mean(errors)),
                       **{str(size): {k: summarise(v) for k, v in r.items()} for size, r in rows.items()}}
        log(f"calibration rows {n}: " + ", ".join(f"{s}: {out[str(n)][str(s)]['recalibrated']['coverage']:.2f}"
                                                  for s in SIZES) + f" ({time.perf_counter() - t:.0f} s)")
    return out


def below_target(res: dict) -> list[dict]:
    """Every cell where domaintune's interval covered less than TARGET, with whether the monitor flags its
    calibration as unreliable by its number of rows (domaintune.monitor.drift.MIN_CALIBRATION_ROWS; the monitor
    also flags fewer than MIN_CALIBRATION_ERRORS wrong rows, which varies between subsets of one size)."""
    from domaintune.monitor.drift import MIN_CALIBRATION_ROWS

    out = []
    for design in ("project_split", "over_splits"):
        for name, r in res[design].items():
            for size, cell in r["sizes"].items():
                if cell["recalibrated"]["coverage"] < TARGET:
                    out.append({"design": design, "dataset": name, "size": int(size),
                                "coverage": cell["recalibrated"]["coverage"]})
    for n, r in res["calibration_rows_study"]["sizes"].items():
        for size in SIZES:
            cov = r[str(size)]["recalibrated"]["coverage"]
            if cov < TARGET:
                out.append({"design": "calibration_rows_study", "calibration_rows": int(n), "size": size,
                            "coverage": cov, "validation_errors_mean": r["validation_errors_mean"],
                            "flagged_unreliable_by_rows": int(n) < MIN_CALIBRATION_ROWS})
    return out


def smallest_reliable(study: dict) -> int | None:
    """The smallest calibration size from which on every batch size (and every larger calibration size)
    domaintune's interval covers at least TARGET."""
    ok = [int(n) for n, r in study.items() if all(r[str(s)]["recalibrated"]["coverage"] >= TARGET for s in SIZES)]
    sizes = sorted(int(n) for n in study)
    for i, n in enumerate(sizes):
        if all(m in ok for m in sizes[i:]):
            return n
    return None


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")
    return {"cpu_model": model, "cpu_cores": os.cpu_count(), "loadavg_start": list(os.getloadavg()),
            "note": "run under nice -n 19 on cores shared with other jobs: the seconds are not speed measurements"}


def coverage_section() -> dict:
    started = time.perf_counter()
    from domaintune.core.params import load_params

    seed = load_params(REPO / "params.yaml", "base").seed
    mach = machine()
    res = {"machine": mach, "target": TARGET, "interval": "95%",
           "model": "head-only fine-tune of the bundled MiniLM (logistic-regression head, C=10, on frozen mean-pooled "
                    "embeddings of train), temperature fitted on validation (evaluate stage's fit_temperature)",
           "draws": "iid: test rows drawn with replacement; truth = measured accuracy of the drawn rows",
           "project_split": {}, "over_splits": {}}
    for name in SPLITS:
        arr = predictions(name, seed)
        res["project_split"][name] = {"seed": seed, "batches_per_size": BATCHES, **coverage_table(arr, name)}
        res["over_splits"][name] = over_splits(name, [seed + i for i in range(1, SPLIT_SEEDS[name] + 1)])
        if name == "banking77":
            res["calibration_rows_study"] = {"dataset": name, "seed": seed, "subsets_per_size": SUBSETS,
                                             "batches_per_subset_and_size": SUBSET_BATCHES,
                                             "sizes": calibration_size_study(arr)}
    res["smallest_reliable_calibration_rows"] = smallest_reliable(res["calibration_rows_study"]["sizes"])
    res["cells_below_target"] = below_target(res)
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    res["run_seconds"] = round(time.perf_counter() - started, 1)
    return res


def main() -> int:
    from drift import add_section

    result = json.loads(OUT.read_text()) if OUT.exists() else {}
    result.pop("complete", None)
    result["accuracy_coverage"] = coverage_section()
    # the other sections are kept as bench/drift.py last wrote them: say which one this run refreshed
    result["refreshed_by_last_run"] = {"sections": ["accuracy_coverage"], "by": "bench/drift_coverage.py",
                                       "date": time.strftime("%Y-%m-%d", time.gmtime())}
    if "accuracy_coverage" not in result.get("sections_added_later", []):
        add_section(result, "accuracy_coverage")
    OUT.write_text(json.dumps({"complete": False, **result}, indent=2, default=float) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
