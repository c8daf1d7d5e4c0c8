"""export: a standalone calibrated model (LoRA merged), an int8 variant, and a model card.

models/export/ is a classifier folder that domaintune.modeling.load_classifier
loads on its own (encoder weights merged, adapter None, no reference to
models/dapt), with the evaluate stage's temperature (or multi-label thresholds)
in model.json, so predict/drift/serve all apply the same calibration.
models/export/int8/ holds the weight-only int8 variant (domaintune/quantize.py).
Before writing, the merged model's logits are checked against the unmerged
model's on the test texts; accuracy/ECE/latency/size of each variant go to the
metrics and the model card (README.md, Hugging Face style).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd

from domaintune.data import DataError, atomic_output, encode_labels, read_dataset, read_json, write_json
from domaintune.params import as_dict, load_params
from domaintune.stage import StageError, run_stage, stage_parser

log = logging.getLogger("domaintune")

BUNDLED_NAME = "sentence-transformers/all-MiniLM-L6-v2"


# ---------------------------------------------------------------- checks and scoring
def check_calibration(calib: dict, meta: dict, calib_path: Path) -> None:
    if calib.get("labels") is not None and list(calib["labels"]) != list(meta["labels"]):
        raise DataError(calib_path, None, "labels",
                        f"calibration was fitted for labels {calib['labels']} but the model has {meta['labels']} "
                        "(re-run evaluate on this model)")
    if calib.get("problem_type", "single_label") != meta.get("problem_type", "single_label"):
        raise DataError(calib_path, None, "problem_type",
                        f"{calib.get('problem_type')!r} does not match the model's {meta.get('problem_type')!r}")
    t = calib.get("temperature")
    if not isinstance(t, (int, float)) or not t > 0:
        raise DataError(calib_path, None, "temperature", f"must be a positive number, got {t!r}")


def logit_agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """How far two variants' logits are apart: max abs difference, relative to the logit scale, argmax agreement."""
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    scale = float(max(1.0, np.abs(a).max())) if a.size else 1.0
    return {"max_abs_diff": diff, "max_rel_diff": diff / scale,
            "argmax_agreement": float((a.argmax(1) == b.argmax(1)).mean()) if a.size else 1.0}


def score_variant(logits: np.ndarray, test: pd.DataFrame, meta: dict, calib: dict, bins: int = 15) -> dict:
    """Calibrated test metrics of one variant's logits."""
    from domaintune import calibration as cal

    labels = list(meta["labels"])
    if meta.get("problem_type", "single_label") == "multi_label":
        thr = np.array([float((calib.get("thresholds") or {}).get(lab, 0.5)) for lab in labels])
        m = cal.multi_label_metrics(cal.sigmoid(logits), encode_labels(test, labels, "multi_label", "test"), thr, bins)
    else:
        y = encode_labels(test, labels, "single_label", "test")
        m = cal.single_label_metrics(cal.softmax(logits, float(calib["temperature"])), y, len(labels), bins)
    return {k: m[k] for k in ("accuracy", "macro_f1", "nll", "ece")}


def time_variant(model, tokenizer, texts: list[str], batch_size: int, max_length: int, repeats: int,
                 single: int) -> tuple[np.ndarray, dict]:
    """The variant's logits on `texts`, with batched throughput (best of `repeats` passes, after a
    warm-up) and median single-text latency."""
    from domaintune.modeling import predict_logits

    predict_logits(model, tokenizer, texts[: min(len(texts), batch_size)], batch_size, max_length)  # warm-up
    passes = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits = predict_logits(model, tokenizer, texts, batch_size, max_length)
        passes.append(time.perf_counter() - t0)
    one = []
    for t in texts[:single]:
        t0 = time.perf_counter()
        predict_logits(model, tokenizer, [t], 1, max_length)
        one.append(time.perf_counter() - t0)
    return logits, {"batched_ms_per_text": 1000 * min(passes) / max(len(texts), 1),
                    "single_text_ms_median": 1000 * statistics.median(one) if one else None}


def folder_bytes(path: Path, pattern: str = "*") -> int:
    return int(sum(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file()))


# ---------------------------------------------------------------- model card
def base_model_name(name: str) -> str:
    from domaintune.modeling import BUNDLED_ALIASES

    return BUNDLED_NAME if name in BUNDLED_ALIASES else name


def model_card(meta: dict, hashes: dict, split_sizes: dict, eval_metrics: dict, calib: dict,
               variants: dict, merge_check: dict, audit: dict | None, manifest: dict | None,
               per_class: pd.DataFrame | None, intended_use: str) -> str:
    import yaml

    ft = (meta.get("params") or {}).get("finetune") or {}
    base_name = meta["base_model"]  # resolved by run(): what the model was trained from
    key_params = {k: ft[k] for k in ("method", "epochs", "lr", "batch_size", "pooling", "lora_r", "lora_alpha",
                                     "target_modules", "seeds") if k in ft}
    after, before = eval_metrics.get("after", {}), eval_metrics.get("before", {})
    front = {
        "library_name": "domaintune",
        "base_model": base_name,
        "pipeline_tag": "text-classification",
        "tags": ["domaintune", "text-classification", str(meta.get("method")), "calibrated"],
        "model-index": [{
            "name": "domaintune-classifier",
            "results": [{
                "task": {"type": "text-classification"},
                "dataset": {"name": f"domaintune dataset {hashes['dataset'][:12]}", "type": "custom",
                            "split": "test"},
                "metrics": [{"type": k, "value": round(float(after[k]), 4), "name": f"{k} (calibrated)"}
                            for k in ("accuracy", "macro_f1", "weighted_f1", "ece", "nll", "brier") if k in after],
            }],
        }],
        "domaintune": {
            "dataset_hash": hashes["dataset"],
            "split_hashes": {s: hashes[s] for s in ("train", "validation", "test") if s in hashes},
            "split_sizes": split_sizes,
            # The deduped dataset (before the label audit) and where it came from.
            "deduped_dataset_hash": manifest.get("dataset_sha256") if manifest else None,
            "source_hashes": (manifest.get("input") or {}).get("sha256") if manifest else None,
            "method": meta.get("method"),
            "problem_type": meta.get("problem_type", "single_label"),
            "labels": list(meta["labels"]),
            "max_length": meta.get("max_length"),
            "pooling": meta.get("pooling"),
            "temperature": float(calib.get("temperature", 1.0)),
            "thresholds": calib.get("thresholds"),
            "finetune_params": key_params,
            "seed": meta.get("seed"),
        },
    }
    out = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    out += ["# domaintune classifier", "",
            f"A {meta.get('problem_type', 'single_label').replace('_', '-')} text classifier over "
            f"{len(meta['labels'])} labels, fine-tuned from `{base_name}` with method "
            f"`{meta.get('method')}`" + (" (LoRA adapter merged into the encoder)" if merge_check["had_adapter"] else "")
            + f", {meta.get('pooling')} pooling, max {meta.get('max_length')} tokens. "
            "Weights are safetensors only; no remote code.", "",
            "## Training data", "",
            f"- Dataset content hash (the dataset version): `{hashes['dataset']}`",
            "- Split sizes: " + ", ".join(f"{k} {v}" for k, v in split_sizes.items()),
            "- Labels: " + ", ".join(f"`{lab}`" for lab in meta["labels"])]
    if manifest:
        removed = {sp: v.get("removed", {}) for sp, v in (manifest.get("splits") or {}).items()}
        out += [f"- Before the label audit (dedupe output): dataset hash `{manifest.get('dataset_sha256')}`, "
                f"{manifest.get('removed_total', 'n/a')} rows removed by dedupe: {removed}"]
    out.append("")
    out += ["## Label audit", ""]
    if audit:
        am = audit.get("metrics", audit)
        out += [f"- Rule: {audit.get('flag_rule', 'n/a')}",
                f"- Issues found: {am.get('issues_found', 'n/a')}; action: `{(audit.get('params') or {}).get('action', 'n/a')}`;"
                f" rows acted on: {am.get('rows_acted_on', 'n/a')}", ""]
    else:
        out += ["No label-audit summary was given to export (`--audit`).", ""]
    rows = [{"metric": k, "before calibration": before.get(k), "after calibration": after[k]}
            for k in ("accuracy", "macro_f1", "weighted_f1", "nll", "brier", "ece", "mce") if k in after]
    from domaintune.report import md_table

    cal_line = (f"Temperature scaling fitted on the validation split: T = {calib['temperature']:.4f}; "
                "`predict_proba` returns softmax(logits / T)." if calib.get("method") == "temperature" else
                "Per-label thresholds tuned on the validation split (in model.json `thresholds`).")
    out += ["## Evaluation (test split)", "", cal_line, "", md_table(pd.DataFrame(rows))]
    if "seeds" in eval_metrics:
        s = eval_metrics["seeds"]
        out += [f"Across {s['n']} seeds (after calibration): accuracy {s['mean']['accuracy']:.4f} ± "
                f"{s['std']['accuracy']:.4f}, macro-F1 {s['mean']['macro_f1']:.4f} ± {s['std']['macro_f1']:.4f}.", ""]
    vrows = [{"variant": k, "accuracy": v["accuracy"], "macro_f1": v["macro_f1"], "ece": v["ece"],
              "ms/text (batched)": v["batched_ms_per_text"], "size MB": v["size_bytes"] / 1e6}
             for k, v in variants.items()]
    out += ["## Variants", "", md_table(pd.DataFrame(vrows)),
            f"Merged vs unmerged logits on {merge_check['texts']} test texts: max abs difference "
            f"{merge_check['max_abs_diff']:.2e} (tolerance {merge_check['tolerance']:g}).", "",
            "`int8/`: weight-only symmetric per-output-channel int8 (safetensors int8 tensors + float32 "
            "scales), dequantised on load.", ""]
    out += ["## Intended use", "", intended_use, "",
            "## Limitations", "",
            f"- Knows only the {len(meta['labels'])} labels above; every input is forced into one of them "
            "(single-label) - out-of-scope texts still get a label. Route low-confidence predictions to a person.",
            f"- Inputs longer than {meta.get('max_length')} tokens are truncated.",
            "- Calibration (temperature/thresholds) was fitted on the validation split; it holds only while "
            "incoming texts look like the training data. Watch the drift report.",
            f"- Test metrics come from {split_sizes.get('test', 0)} rows; small classes have "
            "wide error bars."]
    if per_class is not None and len(per_class):
        worst = per_class.sort_values(["f1", "class"], kind="stable").head(3)
        out.append("- Weakest classes on test (F1): " +
                   ", ".join(f"`{r['class']}` {r['f1']:.3f} (n={int(r['support'])})" for _, r in worst.iterrows()))
    out += ["", "## How to load", "", "```python",
            "from domaintune.predict import Predictor",
            "",
            'p = Predictor.load("models/export")            # variant="int8" for the int8 weights',
            'print(p.predict(["example text"]), p.predict_proba(["example text"]))',
            "",
            "# or the raw model (logits; divide by model.json's temperature before softmax):",
            "from domaintune.modeling import load_classifier, predict_logits",
            'model, tokenizer, meta = load_classifier("models/export")',
            'logits = predict_logits(model, tokenizer, ["example text"], 64, meta["max_length"])',
            "```", ""]
    return "\n".join(out)


# ---------------------------------------------------------------- stage
def run(args: argparse.Namespace) -> str | None:
    from domaintune.modeling import load_classifier, predict_logits, save_classifier, set_threads
    from domaintune.predict import INT8_DIR, load_int8_classifier
    from domaintune.quantize import QUANT_SCHEME, save_int8_encoder

    from domaintune.device import place_for_inference, stage_device

    base, params = load_params(args.params, "base", "export")
    if base.task == "generation":
        from domaintune.genexport import run_export

        return run_export(args, base, params)
    device = stage_device(base)  # the float model's verification and latency run there, in float32
    set_threads()
    in_dir, cal_dir = Path(args.in_dir), Path(args.calibration)
    splits, _ = read_dataset(in_dir)
    hashes = read_json(in_dir / "hashes.json")
    test = splits["test"]
    if len(test) == 0:
        raise DataError(in_dir / "test.parquet", None, None, "empty: nothing to verify the export on")
    calib = read_json(cal_dir / "calibration.json")
    eval_metrics = read_json(cal_dir / "metrics.json")
    per_class = pd.read_csv(cal_dir / "per_class.csv") if (cal_dir / "per_class.csv").exists() else None
    audit = None
    if args.audit:
        audit_path = Path(args.audit) / "summary.json"
        if not audit_path.exists():
            raise DataError(audit_path, None, None, "label-audit summary missing; run the audit stage first")
        audit = read_json(audit_path)
    manifest_path = in_dir / "upstream_manifest.json"
    manifest = read_json(manifest_path) if manifest_path.exists() else None

    texts = test["text"].tolist()
    model, tok, meta = load_classifier(args.model)
    place_for_inference(model, device, half=False)
    check_calibration(calib, meta, cal_dir / "calibration.json")
    ml = int(meta.get("max_length", base.max_length))
    bs = params.batch_size
    latency = (params.latency_repeats, params.latency_single_texts)
    timing = {}
    had_adapter = bool(meta.get("adapter"))
    if had_adapter:
        unmerged_logits, timing["unmerged"] = time_variant(model, tok, texts, bs, ml, *latency)
        del model
        merged, tok, _ = load_classifier(args.model, merge=True)
        place_for_inference(merged, device, half=False)
        merged_logits = predict_logits(merged, tok, texts, bs, ml)
    else:  # nothing to merge: the loaded model is the merged one
        merged = model
        merged_logits = unmerged_logits = predict_logits(model, tok, texts, bs, ml)
    agree = logit_agreement(unmerged_logits, merged_logits)
    merge_check = {"had_adapter": had_adapter, "texts": len(texts), "tolerance": params.merge_tolerance, **agree}
    if agree["max_rel_diff"] > params.merge_tolerance:
        raise StageError(f"merged model disagrees with the unmerged one: max logit difference "
                         f"{agree['max_abs_diff']:.3g} (relative {agree['max_rel_diff']:.3g}) > "
                         f"export.merge_tolerance {params.merge_tolerance}")

    export_meta = {k: v for k, v in meta.items() if k not in ("adapter", "num_labels", "hidden_size")}
    export_meta.update({
        "source_model": str(args.model), "source_encoder": meta.get("base_encoder"),
        "base_encoder": None,  # self-contained: the merged encoder is in encoder/
        # The base the model was actually trained from (finetune records it) wins over today's params.
        "base_model": base_model_name(((meta.get("params") or {}).get("base") or {}).get("model") or base.model),
        "merged_adapter": had_adapter, "temperature": float(calib["temperature"]),
        "thresholds": calib.get("thresholds"), "calibration": calib,
        "dataset_hash": hashes["dataset"], "export_params": as_dict(params),
    })
    split_sizes = {s: int(len(df)) for s, df in splits.items()}
    with atomic_output(args.out) as tmp, atomic_output(args.metrics) as tmp_metrics:
        save_classifier(merged.to("cpu"), tok, tmp, export_meta)
        # Reload what was written: the artefact itself must reproduce the merged logits.
        fmodel, ftok, fmeta = load_classifier(tmp)
        place_for_inference(fmodel, device, half=False)
        float_logits, timing["float32"] = time_variant(fmodel, ftok, texts, bs, ml, *latency)
        timing.setdefault("unmerged", timing["float32"])  # no adapter: the same weights and graph
        roundtrip = logit_agreement(merged_logits, float_logits)
        if roundtrip["max_rel_diff"] > params.merge_tolerance:
            raise StageError(f"saved export does not reproduce the merged model's logits ({roundtrip})")
        del merged

        qdir = tmp / INT8_DIR
        fmodel.to("cpu")  # int8 and ONNX are CPU deployment artefacts: quantised and timed on the CPU
        qinfo = save_int8_encoder(fmodel.encoder, qdir / "encoder", params.int8_embeddings)
        shutil.copy2(tmp / "head.safetensors", qdir / "head.safetensors")
        shutil.copytree(tmp / "tokenizer", qdir / "tokenizer")
        write_json(qdir / "model.json", {**fmeta, "quantization": {"scheme": QUANT_SCHEME,
                                                                   "embeddings": params.int8_embeddings, **qinfo}})
        qmodel, qtok, _ = load_int8_classifier(qdir)
        int8_logits, timing["int8"] = time_variant(qmodel, qtok, texts, bs, ml, *latency)

        weights = {"unmerged": None, "float32": folder_bytes(tmp, "*.safetensors") - folder_bytes(qdir, "*.safetensors"),
                   "int8": folder_bytes(qdir, "*.safetensors")}
        variants = {}
        for name, lg in (("unmerged", unmerged_logits), ("float32", float_logits), ("int8", int8_logits)):
            # unmerged size: base encoder + adapter live elsewhere, not an artefact here
            variants[name] = {**score_variant(lg, test, meta, calib, params.bins), **timing[name],
                              "size_bytes": weights[name]}
        metrics = {"test_rows": len(texts), "merge_check": merge_check,
                   "int8_vs_float32": logit_agreement(float_logits, int8_logits),
                   "int8_size_ratio": weights["int8"] / weights["float32"],
                   "variants": {k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in variants.items()}}
        card_variants = {k: v for k, v in variants.items() if k != "unmerged"}
        (tmp / "README.md").write_text(
            model_card(fmeta, hashes, split_sizes, eval_metrics, calib, card_variants, merge_check, audit,
                       manifest, per_class, params.intended_use), encoding="utf-8")
        write_json(tmp / "export_report.json", metrics)
        write_json(tmp_metrics, metrics)
    log.info("merged max |dlogit| %.2e; float32 acc %.4f ECE %.4f; int8 acc %.4f ECE %.4f, %.1f%% of the float size",
             merge_check["max_abs_diff"], variants["float32"]["accuracy"], variants["float32"]["ece"],
             variants["int8"]["accuracy"], variants["int8"]["ece"], 100 * metrics["int8_size_ratio"])


def main(argv=None) -> int:
    ap = stage_parser("export", __doc__.splitlines()[0], inp="audited dataset folder (test split, hashes)",
                      out="export folder")
    ap.add_argument("--model", required=True, help="fine-tuned classifier folder")
    ap.add_argument("--calibration", required=True, help="evaluate's report folder (calibration.json, metrics.json)")
    ap.add_argument("--audit", default=None, help="audit report folder (summary.json) for the model card")
    return run_stage("export", run, ap, argv)


if __name__ == "__main__":
    raise SystemExit(main())
