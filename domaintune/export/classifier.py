"""Export of a classifier, the export stage's work: the calibrated model in every variant (float32, int8, ONNX,
ONNX int8, OpenVINO static int8), gated, with a model card.

models/export/ is a classifier folder that domaintune.predict.predictor.Predictor loads on its own
(encoder weights merged, adapter None, no reference to models/dapt), with the evaluate
stage's temperature (or multi-label thresholds) in model.json, so predict/drift/serve all
apply the same calibration. Its variants are written and loaded by domaintune/export/artifacts.py.
Before anything is written for good, the merged model's logits are checked against the
unmerged model's, and every variant is re-scored on the test split (accuracy, macro-F1, ECE
with the fitted temperature, agreement with float32, size, latency): a variant that loses more
than export.max_accuracy_drop points of accuracy (at least one test row) or adds more than
export.max_ece_increase points of ECE (at least one row moving between two bins) fails the stage
(gate_allowances). The model card (README.md) is domaintune/export/modelcard.py's, written from the
same metrics dict as metrics/export.json.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd

from domaintune.core import device as devices
from domaintune.core.device import MAX_BATCH_TOKENS, stage_device
from domaintune.core.errors import DataError, StageError
from domaintune.core.io import atomic_output, read_json, write_json
from domaintune.core.params import as_dict, load_params
from domaintune.core.stage import StageIO
from domaintune.data.dataset import encode_labels, read_dataset
from domaintune.evaluate import calibration as cal
from domaintune.evaluate.abstain import Abstainer
from domaintune.export import artifacts
from domaintune.export.artifacts import TorchRunner, load_variant, thread_count, variant_bytes
from domaintune.export.modelcard import base_model_name, cpu_name, model_card
from domaintune.export.variants import AUTO_MIN_GAIN, fastest_passing
from domaintune.modeling.chunks import LongText
from domaintune.modeling.encoders import load_classifier, set_threads

log = logging.getLogger("domaintune")


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
    labels = list(meta["labels"])
    if meta.get("problem_type", "single_label") == "multi_label":
        thr = np.array([float((calib.get("thresholds") or {}).get(lab, 0.5)) for lab in labels])
        m = cal.multi_label_metrics(cal.sigmoid(logits), encode_labels(test, labels, "multi_label", "test"), thr, bins)
    else:
        y = encode_labels(test, labels, "single_label", "test")
        m = cal.single_label_metrics(cal.softmax(logits, float(calib["temperature"])), y, len(labels), bins)
    return {k: m[k] for k in ("accuracy", "macro_f1", "nll", "ece")}


def time_runner(runner, texts: list[str], batch_size: int, max_length: int, repeats: int,
                single: int, long_text: LongText | None = None) -> tuple[np.ndarray, dict]:
    """The runner's logits on `texts` (one row per document under `long_text`), with batched throughput (best
    of `repeats` passes, after a warm-up) and single-text latency percentiles."""
    runner.logits(texts[: min(len(texts), batch_size)], batch_size, max_length, long_text=long_text)  # warm-up
    passes = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits = runner.logits(texts, batch_size, max_length, long_text=long_text)
        passes.append(time.perf_counter() - t0)
    one = []
    for t in texts[:single]:
        t0 = time.perf_counter()
        runner.logits([t], 1, max_length, long_text=long_text)
        one.append(1000 * (time.perf_counter() - t0))
    return logits, {"batched_ms_per_text": 1000 * min(passes) / max(len(texts), 1),
                    "single_text_p50_ms": statistics.median(one) if one else None,
                    "single_text_p95_ms": float(np.percentile(one, 95)) if one else None}


def gate_allowances(params, test_rows: int) -> dict:
    """The allowances the export gates apply, in points against float32 (what check_gates enforces and the
    model card states).

    Accuracy: export.max_accuracy_drop, but never less than one test row: on a small test split (177 rows on
    the example, one row = 0.56 points) a single flipped prediction is noise, not a broken variant. ECE:
    export.max_ece_increase, but never less than one row moving between two bins (2 rows' worth)."""
    one_row = 100.0 / max(test_rows, 1)
    return {"test_rows": int(test_rows), "one_row_points": one_row,
            "max_accuracy_drop": params.max_accuracy_drop, "max_ece_increase": params.max_ece_increase,
            "accuracy_points": max(params.max_accuracy_drop, one_row),
            "ece_points": max(params.max_ece_increase, 2 * one_row)}


def gate_failures(variants: dict, params, test_rows: int, names=None) -> dict:
    """{variant: why} for each variant (of `names`, default all but float32) that loses more accuracy or
    calibration against float32 than gate_allowances allows; {} when all pass."""
    ref = variants["float32"]
    g = gate_allowances(params, test_rows)
    one_row = g["one_row_points"]
    out = {}
    for name in names if names is not None else variants:
        v = variants[name]
        if name in ("float32", "unmerged"):
            continue
        drop = 100 * (ref["accuracy"] - v["accuracy"])
        # One row whose confidence moves to another bin changes ECE by up to one row in each of the two bins.
        rise = 100 * (v["ece"] - ref["ece"])
        if drop > g["accuracy_points"] * (1 + 1e-9):
            out[name] = (f"accuracy {v['accuracy']:.4f} is {drop:.2f} points below float32's "
                         f"{ref['accuracy']:.4f} (export.max_accuracy_drop {params.max_accuracy_drop:g}; "
                         f"one of the {test_rows} test rows is {one_row:.2f} points)")
        elif rise > g["ece_points"] * (1 + 1e-9):
            out[name] = (f"ECE {v['ece']:.4f} is {rise:.2f} points above float32's "
                         f"{ref['ece']:.4f} (export.max_ece_increase {params.max_ece_increase:g}; "
                         f"one row moving between two bins of the {test_rows} test rows is {2 * one_row:.2f})")
    return out


def check_gates(variants: dict, params, test_rows: int) -> dict:
    """Fail on the first variant that loses too much accuracy or calibration against float32 (the allowances
    of gate_allowances, returned)."""
    for name, why in gate_failures(variants, params, test_rows).items():
        raise StageError(f"variant {name}: {why}")
    return gate_allowances(params, test_rows)


def latency_conditions(params, test_rows: int) -> dict:
    """The load every variant's latency was measured under (the card prints it beside the numbers)."""
    return {"batch_size": params.batch_size, "texts": int(test_rows), "batched_passes": params.latency_repeats,
            "single_texts": min(params.latency_single_texts, test_rows), "threads": thread_count(),
            "cpu": cpu_name(), "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg")
            else None}


# ---------------------------------------------------------------- stage
def read_inputs(io: StageIO) -> dict:
    """Everything the stage reads besides the model, checked before any model is loaded."""
    in_dir, cal_dir = Path(io.in_dir), Path(io.calibration)
    splits, _ = read_dataset(in_dir)
    if len(splits["test"]) == 0:
        raise DataError(in_dir / "test.parquet", None, None, "empty: nothing to verify the export on")
    inputs = {"splits": splits, "hashes": read_json(in_dir / "hashes.json"),
              "calib": read_json(cal_dir / "calibration.json"), "eval_metrics": read_json(cal_dir / "metrics.json"),
              "per_class": pd.read_csv(cal_dir / "per_class.csv") if (cal_dir / "per_class.csv").exists() else None,
              "audit": None, "dapt": None}
    for key, folder, name, stage in (("audit", io.audit, "summary.json", "audit"),
                                     ("dapt", io.dapt, "dapt_info.json", "dapt")):
        if folder:
            path = Path(folder) / name
            if not path.exists():
                raise DataError(path, None, None, f"{stage} summary missing; run the {stage} stage first")
            inputs[key] = read_json(path)
    manifest_path = in_dir / "upstream_manifest.json"
    inputs["manifest"] = read_json(manifest_path) if manifest_path.exists() else None
    Abstainer.from_json(inputs["calib"].get("abstain"), cal_dir, cal_dir / "calibration.json")  # arrays there
    return inputs


def merged_model(model_dir: str, texts: list[str], params, ml: int, device: str = "cpu"):
    """(merged model, tokenizer, meta, unmerged runner timing, merged logits, merge check)."""
    model, tok, meta = load_classifier(model_dir)
    devices.place_for_inference(model, device, half=False)  # verified on base.device, in float32
    bs, latency = params.batch_size, (params.latency_repeats, params.latency_single_texts)
    had_adapter = bool(meta.get("adapter"))
    long_text = LongText.from_meta(meta)
    unmerged_logits, unmerged_timing = time_runner(TorchRunner(model, tok), texts, bs, ml, *latency, long_text)
    if had_adapter:
        del model
        merged, tok, _ = load_classifier(model_dir, merge=True)
        devices.place_for_inference(merged, device, half=False)
        merged_logits = TorchRunner(merged, tok).logits(texts, bs, ml, long_text=long_text)
    else:  # nothing to merge: the loaded model is the merged one
        merged, merged_logits = model, unmerged_logits
    agree = logit_agreement(unmerged_logits, merged_logits)
    check = {"had_adapter": had_adapter, "texts": len(texts), "tolerance": params.merge_tolerance, **agree}
    if agree["max_rel_diff"] > params.merge_tolerance:
        raise StageError(f"merged model disagrees with the unmerged one: max logit difference "
                         f"{agree['max_abs_diff']:.3g} (relative {agree['max_rel_diff']:.3g}) > "
                         f"export.merge_tolerance {params.merge_tolerance}")
    return merged, tok, meta, (unmerged_logits, unmerged_timing), merged_logits, check


def write_variants(tmp: Path, merged, tok, export_meta: dict, params, calibration: list[str] = (),
                   seed: int = 0, max_length: int = 512, abstain_dir: str | Path | None = None) -> dict:
    """Write every variant in params.variants under tmp; returns what quantisation reported. `calibration`:
    the train texts the static int8 variant (openvino-int8) measures activation ranges on (seeded by `seed`);
    `abstain_dir`: the evaluate report folder whose abstain.safetensors (Mahalanobis abstention) each variant
    carries."""
    artifacts.write_float32(merged, tok, tmp, export_meta)
    if abstain_dir is not None:  # Mahalanobis class means and precision, beside model.json (and in each variant)
        artifacts.copy_abstain_arrays(Path(abstain_dir), tmp)
    fmeta = read_json(tmp / "model.json")
    info = {}
    if "int8" in params.variants:
        info["int8"] = artifacts.write_int8(tmp, merged, fmeta, params.int8_embeddings)
    if {"onnx", "onnx-int8", "openvino-int8"} & set(params.variants):  # all three start from the float graph
        artifacts.write_onnx(tmp, merged, tok, fmeta, params.onnx_opset)
        if "onnx-int8" in params.variants:
            artifacts.write_onnx_int8(tmp, params.onnx_int8_per_channel)
        if "openvino-int8" in params.variants:
            artifacts.write_openvino_int8(tmp, tok, calibration, max_length, seed)
        if "onnx" not in params.variants:
            import shutil

            shutil.rmtree(tmp / artifacts.SUBDIRS["onnx"])
    return info


SPEED_TEXTS = 512  # test texts (a seeded sample when the split has more) each variant's texts/s is measured on


def texts_per_s(runner, texts: list[str], batch_size: int, ml: int, max_batch_tokens: int, repeats: int,
                bf16: bool = False, long_text: LongText | None = None) -> float:
    """Texts per second of `runner` on `texts` the way predict and serve run them (sorted by token length, batches
    of at most `batch_size` texts within `max_batch_tokens`): the best of `repeats` passes after a warm-up;
    bf16: under torch's bf16 autocast (a PyTorch runner)."""
    ctx = contextlib.nullcontext()
    if bf16:
        # lazy: torch only for the bf16 row (ONNX/OpenVINO runners do not need it)
        import torch

        ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    with ctx:
        runner.logits(texts[: min(len(texts), batch_size)], batch_size, ml, max_batch_tokens=max_batch_tokens,
                      long_text=long_text)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            runner.logits(texts, batch_size, ml, max_batch_tokens=max_batch_tokens, long_text=long_text)
            best = min(best, time.perf_counter() - t0)
    return len(texts) / best if best > 0 else float("inf")


def cpu_flags() -> list[str]:
    """The CPU's instruction sets that int8/bf16 inference speed depends on (as /proc/cpuinfo names them)."""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return []
    return [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni")
            if f in flags]


def verify_variants(tmp: Path, texts: list[str], test: pd.DataFrame, meta: dict, calib: dict, params,
                    ml: int, speed_texts: list[str] = ()) -> tuple[dict, dict]:
    """Reload each written variant from disk, score and time it on the test split: (metrics, logits). With
    `speed_texts`, each variant's texts/s on them the way predict runs it is rows[name]["texts_per_s"], and on a
    CPU fast at bf16 (AVX512-BF16 or AMX) float32 under bf16 autocast is scored and timed as the row
    "bf16-autocast" (measured only: not a variant the export writes)."""
    latency = (params.latency_repeats, params.latency_single_texts)
    rows, logits, abstained = {}, {}, {}
    abstainer = Abstainer.from_json(calib.get("abstain"), tmp, tmp / "model.json")
    for name in params.variants:
        runner, _ = load_variant(tmp, name)
        long_text = LongText.from_meta(meta)
        logits[name], timing = time_runner(runner, texts, params.batch_size, ml, *latency, long_text)
        if speed_texts:
            timing["texts_per_s"] = texts_per_s(runner, list(speed_texts), params.batch_size, ml, MAX_BATCH_TOKENS,
                                                params.latency_repeats, long_text=long_text)
        if name == "float32" and speed_texts and devices.cpu_has_fast_bf16():
            # lazy: torch, for the autocast context of the measured-only bf16 row
            import torch

            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16_logits = runner.logits(texts, params.batch_size, ml, max_batch_tokens=MAX_BATCH_TOKENS,
                                            long_text=long_text)
            logits[BF16_ROW] = np.asarray(bf16_logits, dtype=np.float32)
            rows[BF16_ROW] = {**score_variant(logits[BF16_ROW], test, meta, calib, params.bins),
                              "texts_per_s": texts_per_s(runner, list(speed_texts), params.batch_size, ml,
                                                         MAX_BATCH_TOKENS, params.latency_repeats, bf16=True,
                                                         long_text=long_text)}
        if abstainer is not None:  # the abstention each variant applies (the Mahalanobis one from its own vectors)
            vectors = runner.logits(texts, params.batch_size, ml, mean_pooled=True, long_text=long_text)[1] \
                if abstainer.needs_features else None
            abstained[name] = abstainer.abstained(logits[name], vectors)
        del runner
        rows[name] = {**score_variant(logits[name], test, meta, calib, params.bins), **timing,
                      "size_bytes": variant_bytes(tmp, name)}
        if abstainer is not None:
            rows[name]["abstain_rate"] = float(abstained[name].mean())
        log.debug("verified %s: accuracy %.4f, ECE %.4f, %.1f ms/text batched", name, rows[name]["accuracy"],
                  rows[name]["ece"], rows[name]["batched_ms_per_text"])
    for name in logits:
        agree = logit_agreement(logits["float32"], logits[name])
        rows[name]["agreement_with_float32"] = agree["argmax_agreement"]
        rows[name]["max_abs_logit_diff_vs_float32"] = agree["max_abs_diff"]
        if abstainer is not None and name in abstained:  # not the measured-only bf16 row
            rows[name]["abstain_agreement_with_float32"] = float((abstained[name] == abstained["float32"]).mean())
    return rows, logits


BF16_ROW = "bf16-autocast"  # float32 under torch's bf16 autocast: measured at export, not served (speed_record)


def speed_record(variants: dict, params, test_rows: int, sample: int, gates_failed: dict) -> dict:
    """What --variant auto chooses by (export.variants.resolve_variant), in export_report.json: each measured
    row's texts/s and whether it passed its gates, the pick, and the conditions of the measurement."""
    rows = {}
    for name, v in variants.items():
        if "texts_per_s" not in v:
            continue
        servable = name in params.variants
        rows[name] = {"texts_per_s": round(v["texts_per_s"], 1), "passed_gates": name not in gates_failed,
                      "servable": servable}  # fastest_passing takes exported variants (VARIANTS) only
        if name in gates_failed:
            rows[name]["gate_failure"] = gates_failed[name]
        if not servable:
            rows[name]["why_not_servable"] = (
                "measured only: PyTorch float32 weights run under bf16 autocast, not an exported variant; "
                "auto serves only exported variants that passed their gates")
    best = fastest_passing({"variants": rows})
    return {"variants": rows, "auto": {"variant": best[0], "texts_per_s": best[1], "why": best[2]} if best else None,
            "rule": "auto = the fastest exported variant that passed its gates (accuracy drop, ECE increase), float32 "
                    f"unless that one measured at least {AUTO_MIN_GAIN:.2f}x float32's texts/s",
            "texts": sample, "of_test_rows": test_rows, "batch_size": params.batch_size,
            "max_batch_tokens": MAX_BATCH_TOKENS, "passes": params.latency_repeats,
            "threads": thread_count(), "cpu": cpu_name(), "cpu_flags": cpu_flags()}


def export_metadata(meta: dict, inputs: dict, model_dir: str, base, params, had_adapter: bool) -> dict:
    calib = inputs["calib"]
    out = {k: v for k, v in meta.items() if k not in ("adapter", "num_labels", "hidden_size")}
    out.update({
        "source_model": str(model_dir), "source_encoder": meta.get("base_encoder"),
        "base_encoder": None,  # self-contained: the merged encoder is in encoder/
        # The base the model was actually trained from (finetune records it) wins over today's params.
        "base_model": base_model_name(((meta.get("params") or {}).get("base") or {}).get("model") or base.model),
        "merged_adapter": had_adapter, "temperature": float(calib["temperature"]),
        "thresholds": calib.get("thresholds"), "calibration": calib,
        **({"abstain": calib["abstain"]} if calib.get("abstain") else {}),  # evaluate.abstain, applied by Predictor
        "dataset_hash": inputs["hashes"]["dataset"], "export_params": as_dict(params),
        "variants": list(params.variants),
    })
    return out


def export_stage(io: StageIO) -> None:
    """The export stage of a classifier: merge, write every variant, verify each against the gates, card."""
    base, params = load_params(io.params, "base", "export")
    device = stage_device(base)  # the source model's merge check runs there; variants are CPU artefacts
    set_threads()
    t0 = time.perf_counter()
    inputs = read_inputs(io)
    test, calib = inputs["splits"]["test"], inputs["calib"]
    texts = test["text"].tolist()
    calibration = artifacts.calibration_texts(inputs["splits"]["train"]["text"].tolist(), params.calibration_rows,
                                              base.seed)
    if "openvino-int8" in params.variants and not calibration:  # checked before any model is loaded
        raise DataError(Path(io.in_dir) / "train.parquet", None, None,
                        "empty: openvino-int8 is calibrated on train texts (export.calibration_rows)")
    source_meta = read_json(Path(io.model) / "model.json")
    check_calibration(calib, source_meta, Path(io.calibration) / "calibration.json")
    ml = int(source_meta.get("max_length", base.max_length))
    merged, tok, meta, (unmerged_logits, unmerged_timing), merged_logits, merge_check = merged_model(
        io.model, texts, params, ml, device)
    export_meta = export_metadata(meta, inputs, io.model, base, params, merge_check["had_adapter"])
    with atomic_output(io.out) as tmp, atomic_output(io.metrics) as tmp_metrics:
        quant = write_variants(tmp, merged.to("cpu"), tok, export_meta, params, calibration, base.seed, ml,
                               io.calibration)
        del merged
        speed_texts = artifacts.calibration_texts(texts, SPEED_TEXTS, base.seed)  # a seeded sample, <= 512
        variants, logits = verify_variants(tmp, texts, test, meta, calib, params, ml, speed_texts)
        roundtrip = logit_agreement(merged_logits, logits["float32"])
        if roundtrip["max_rel_diff"] > params.merge_tolerance:
            raise StageError(f"saved export does not reproduce the merged model's logits ({roundtrip})")
        latency = latency_conditions(params, len(texts))  # right after the timed passes
        measured = dict(variants)  # the exported variants and the measured-only bf16 autocast row
        bf16 = variants.pop(BF16_ROW, None)
        # A variant past its gates is not shipped: its folder is removed and the refusal recorded (with its
        # numbers) in metrics and export_report.json, and `--variant auto` never picks it; float32 (the
        # reference) and the variants within the gates still ship, so one noisy int8 graph does not stop the DAG.
        refused = gate_failures(variants, params, len(texts))
        for name, why in refused.items():
            log.warning("export: variant %s refused, not shipped: %s", name, why)
            if artifacts.SUBDIRS.get(name):
                shutil.rmtree(tmp / artifacts.SUBDIRS[name], ignore_errors=True)
        refused_rows = {name: {"why": why, **variants.pop(name)} for name, why in refused.items()}
        gates = gate_allowances(params, len(texts))
        speed = speed_record(measured, params, len(texts), len(speed_texts),
                             gate_failures(measured, params, len(texts)))
        if bf16 is not None:
            speed["variants"][BF16_ROW].update({k: bf16[k] for k in ("accuracy", "macro_f1", "ece",
                                                                      "agreement_with_float32")})
        variants["unmerged"] = {**score_variant(unmerged_logits, test, meta, calib, params.bins), **unmerged_timing}
        metrics = {"test_rows": len(texts), "merge_check": merge_check, "variants": variants, "gates": gates,
                   "latency": latency, "speed": speed, "seconds": round(time.perf_counter() - t0, 1)}
        if refused_rows:
            metrics["variants_refused"] = refused_rows
        if "int8" in variants:
            metrics["int8_vs_float32"] = logit_agreement(logits["float32"], logits["int8"])
            metrics["int8_size_ratio"] = variants["int8"]["size_bytes"] / variants["float32"]["size_bytes"]
            metrics["int8_quantization"] = quant["int8"]
        split_sizes = {s: int(len(df)) for s, df in inputs["splits"].items()}
        # the card's numbers are this metrics dict's (metrics/export.json), the same the log line below prints
        card = model_card(read_json(tmp / "model.json"), inputs, split_sizes, metrics, params)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        write_json(tmp / "export_report.json", metrics)
        artifacts.write_checksums(tmp)  # last: the md5 of every file above, checked when the export is loaded
        write_json(tmp_metrics, metrics)
    log.info("export: %s written in %.0f s, every shipped variant within the gates (%s)",
             ", ".join(v for v in params.variants if v not in refused_rows),
             metrics["seconds"], "; ".join(f"{k} acc {v['accuracy']:.4f} ECE {v['ece']:.4f} "
                                            f"{v['size_bytes'] / 1e6:.1f} MB" for k, v in variants.items()
                                            if k in params.variants))
