"""The model card (README.md) of an export, in the shape a Hugging Face user expects.

Front matter: license, language, base_model, datasets, pipeline_tag, tags and a model-index with
standard metric names. Body: the data (with its hash), the whole training procedure (DAPT,
fine-tuning method and the params that apply to it, calibration, environment), every per-class
result, every exported variant with its verified numbers, and copy-paste usage for each variant,
including plain onnxruntime + tokenizers. Numbers are rounded for people; every number comes
from a stage's output (no claim that no test or bench checks).
"""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import pandas as pd

from domaintune.evaluate.abstain import SCORES as ABSTAIN_SCORES
from domaintune.evaluate.report import md_table
from domaintune.export.artifacts import thread_count
from domaintune.export.variants import AUTO, VariantChoice
from domaintune.modeling.chunks import LongText
from domaintune.modeling.encoders import BUNDLED_ALIASES

BUNDLED_NAME = "sentence-transformers/all-MiniLM-L6-v2"
METHOD_PARAMS = {  # the finetune params that matter for each method
    "full": ("epochs", "lr", "batch_size", "warmup_ratio", "weight_decay", "label_smoothing", "head_init",
             "layerwise_lr_decay", "seeds"),
    "freeze": ("epochs", "lr", "batch_size", "freeze_layers", "label_smoothing", "head_init", "seeds"),
    "head": ("epochs", "lr", "batch_size", "head_init", "seeds"),
    "lora": ("epochs", "lr", "batch_size", "lora_r", "lora_alpha", "lora_dropout", "target_modules",
             "modules_to_save", "label_smoothing", "head_init", "seeds"),
}
METHOD_PARAMS["qlora"] = METHOD_PARAMS["lora"] + ("qlora_compute_dtype",)
METHOD_PARAMS["setfit"] = ("setfit_iterations", "setfit_max_pairs", "setfit_epochs", "setfit_lr", "setfit_batch_size",
                           "epochs", "lr", "head_init", "seeds")
METHOD_TEXT = {"full": "full fine-tuning (every weight trained)",
               "freeze": "fine-tuning with the lower encoder layers frozen",
               "head": "a linear head on the frozen encoder",
               "lora": "LoRA adapters on the encoder (merged into the weights for export)",
               "qlora": "QLoRA: LoRA adapters on a 4-bit NF4 encoder (merged into float weights for export)",
               "setfit": "SetFit: the encoder tuned contrastively on pairs of labelled texts, then a linear head"}
VARIANT_TEXT = {
    "float32": "`./` float32 PyTorch weights (safetensors), loaded by domaintune",
    "int8": "`int8/` weight-only int8 safetensors (per-output-channel scales), dequantised to float32 on load: "
            "smaller on disk, the same float32 computation when run",
    "onnx": "`onnx/` the calibrated classifier as one ONNX graph (onnxruntime; no domaintune needed)",
    "onnx-int8": "`onnx-int8/` onnxruntime dynamic int8 quantisation of `onnx/`",
    "openvino-int8": "`openvino-int8/` OpenVINO IR of `onnx/`'s graph, static int8 (NNCF post-training "
                     "quantisation calibrated on a seeded sample of train texts; OpenVINO, no domaintune needed)",
}


def base_model_name(name: str) -> str:
    return BUNDLED_NAME if name in BUNDLED_ALIASES else name


def fmt(x, digits: int = 3) -> str:
    """A number for people: at most `digits` decimals, thousands separated."""
    if x is None:
        return "n/a"
    if isinstance(x, int) or float(x).is_integer() and abs(x) >= 100:
        return f"{int(x):,}"
    return f"{float(x):,.{digits}f}"


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * float(x):.1f}%"


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("domaintune", "torch", "transformers", "peft", "onnx", "onnxruntime", "openvino", "nncf",
                 "tokenizers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def front_matter(meta: dict, inputs: dict, split_sizes: dict, params) -> dict:
    after = inputs["eval_metrics"].get("after", {})
    hashes = inputs["hashes"]
    names = {"accuracy": ("accuracy", "Accuracy (calibrated)", {}),
             "macro_f1": ("f1", "Macro F1", {"average": "macro"}),
             "ece": ("ece", "Expected calibration error (after temperature scaling)", {}),
             "nll": ("loss", "Negative log-likelihood", {})}
    metrics = [{"type": t, "value": round(float(after[k]), 4), "name": n, **({"args": a} if a else {})}
               for k, (t, n, a) in names.items() if k in after]
    return {
        "license": params.license, "language": [params.language], "library_name": "onnx"
        if "onnx" in params.variants else "domaintune",
        "base_model": meta["base_model"], "datasets": [f"custom-dataset-sha256-{hashes['dataset'][:12]}"],
        "pipeline_tag": "text-classification",
        "tags": ["domaintune", "text-classification", str(meta.get("method")), "calibrated"]
        + (["onnx"] if "onnx" in params.variants else [])
        + (["openvino"] if "openvino-int8" in params.variants else []),
        "metrics": [m["type"] for m in metrics],
        "model-index": [{"name": "domaintune-classifier", "results": [{
            "task": {"type": "text-classification", "name": "Text classification"},
            "dataset": {"name": f"custom dataset {hashes['dataset'][:12]}", "type": "custom", "split": "test"},
            "metrics": metrics}]}],
        "domaintune": {"dataset_hash": hashes["dataset"],
                       "split_hashes": {s: hashes[s] for s in ("train", "validation", "test") if s in hashes},
                       "split_sizes": split_sizes, "method": meta.get("method"),
                       "problem_type": meta.get("problem_type", "single_label"), "labels": list(meta["labels"]),
                       "max_length": meta.get("max_length"), "pooling": meta.get("pooling"),
                       "long_text": LongText.from_meta(meta).as_meta(),
                       "temperature": float(inputs["calib"].get("temperature", 1.0)),
                       "variants": list(params.variants), "seed": meta.get("seed")},
    }


def data_section(meta: dict, inputs: dict, split_sizes: dict) -> list[str]:
    hashes, manifest, audit = inputs["hashes"], inputs["manifest"], inputs["audit"]
    n = sum(split_sizes.values())
    out = ["## Training data", "",
           f"{fmt(n)} labelled texts in {len(meta['labels'])} classes, split into "
           + ", ".join(f"{fmt(v)} {k}" for k, v in split_sizes.items()) + ". "
           "The test split was used only for the numbers below; the validation split chose the best epoch "
           "and fitted the calibration.", "",
           f"- Dataset version (content hash of every split and the label list): `{hashes['dataset']}`",
           "- Labels: " + ", ".join(f"`{lab}`" for lab in meta["labels"])]
    if manifest:
        removed = manifest.get("removed_total")
        out.append(f"- Before the label audit: deduplicated dataset `{manifest.get('dataset_sha256')}`"
                   + (f", {fmt(removed)} duplicate or leaking rows removed by dedupe" if removed is not None else ""))
    if audit:
        am = audit.get("metrics", audit)
        acted = am.get("rows_acted_on")
        acted_text = ", ".join(f"{v} {k}" for k, v in acted.items()) if isinstance(acted, dict) else fmt(acted)
        out.append(f"- Label audit ({audit.get('flag_rule', 'n/a')}): Issues found: {am.get('issues_found', 'n/a')}; "
                   f"action `{(audit.get('params') or {}).get('action', 'n/a')}` ({acted_text})")
    else:
        out.append("- No label-audit summary was given to export (`--audit`).")
    return out + [""]


def dapt_section(dapt: dict | None) -> list[str]:
    out = ["### Domain-adaptive pre-training (DAPT)", ""]
    if dapt is None:
        return out + ["No DAPT summary was given to export (`--dapt`).", ""]
    m = dapt.get("metrics") or {}
    if not m.get("enabled", True) or dapt.get("pass_through"):
        return out + ["DAPT was off: the encoder is the base model, unchanged.", ""]
    corpus, p = dapt.get("corpus") or {}, dapt.get("params") or {}
    files = ", ".join(f"`{f}`" for f in corpus.get("files", [])) or "none"
    out += [f"Before fine-tuning, the encoder continued masked-language-model pre-training on the domain's own "
            f"texts: the training split plus {files} ({fmt(corpus.get('used'))} texts after removing "
            f"{fmt(corpus.get('removed', 0))} blank, duplicate or evaluation-matching lines).", "",
            f"- Steps: {fmt(m.get('steps'))} ({fmt(m.get('epochs'), 2)} epochs of {fmt(m.get('train_blocks'))} "
            f"{p.get('block_size', '?')}-token blocks), batch size {p.get('batch_size', '?')}, "
            f"learning rate {p.get('lr', '?')}, masking rate {p.get('mlm_probability', '?')}",
            f"- Held-out perplexity ({fmt(m.get('heldout_texts'))} texts never trained on): "
            f"{fmt(m.get('perplexity_before'), 1)} before, {fmt(m.get('perplexity_after'), 1)} after",
            f"- Time: {fmt(m.get('seconds'), 0)} s", ""]
    return out


def continual_lines(meta: dict) -> list[str]:
    """Where training started (a warm start), its regulariser, the rows added to train, and outlier exposure."""
    ws, reg, extra = meta.get("warm_start"), meta.get("regularize"), meta.get("extra_rows") or {}
    reg_text = f", regulariser {reg['kind']} (strength {reg['strength']})" if reg else ", no regulariser"
    start = f"version {ws['version']} (its dataset `{str(ws.get('dataset_hash'))[:12]}`)" if ws else "the base encoder"
    out = [f"- Started from {start}{reg_text}"]
    if extra.get("rows"):
        replay = (extra.get("replay") or {}).get("rows", 0)
        out.append(f"- Train had {fmt(extra['rows'])} extra rows ({fmt(extra.get('augmented', 0))} augmented, "
                   f"{fmt(replay)} replayed), hash `{extra.get('sha256', '')[:12]}`")
    if oe := meta.get("outlier_exposure"):
        out.append(f"- Outlier exposure (weight {oe['weight']}): {fmt(oe['texts'])} known out-of-scope texts from "
                   f"{oe.get('source')} trained towards a uniform answer, hash `{str(oe.get('sha256'))[:12]}`; "
                   "abstention on texts like them is better than on unseen kinds")
    return out


def training_section(meta: dict, inputs: dict) -> list[str]:
    ft = (meta.get("params") or {}).get("finetune") or {}
    method = meta.get("method") or ft.get("method")
    keys = METHOD_PARAMS.get(method, ())
    calib = inputs["calib"]
    out = ["## Training procedure", "", *dapt_section(inputs["dapt"]), "### Fine-tuning", "",
           f"Method: {METHOD_TEXT.get(method, method)}, {meta.get('pooling')} pooling, {long_text_line(meta)}.",
           ""]
    out += [f"- {k}: {', '.join(map(str, ft[k])) if isinstance(ft[k], (list, tuple)) else ft[k]}"
            for k in keys if k in ft and ft[k] not in ((), [], None)]
    out += continual_lines(meta)
    best = best_epoch_text(meta)
    if best:
        out.append(f"- Best epoch on validation macro-F1: {best} (seed {meta.get('seed')})")
    out += ["", "### Calibration", ""]
    if calib.get("method") == "temperature":
        out.append(f"Temperature scaling fitted on the validation split: T = {fmt(calib['temperature'])}. Every "
                   "variant returns softmax(logits / T) as its probabilities.")
    else:
        out.append("Per-label decision thresholds tuned on the validation split (model.json `thresholds`).")
    commit = git_commit()
    out += ["", "### Environment", "",
            f"- Hardware (export): {cpu_name()}, {_cores()} cores available",
            "- Frameworks: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
            f"- Code commit at export: `{commit}`" if commit else "- Code commit: not a git checkout",
            "- Version tag: given at release (`domaintune versions` lists the tag of this commit)", ""]
    return out


def best_epoch_text(meta: dict) -> str | None:
    """"2 of 2": counted from 1, as the training log's epoch lines count ("epoch 2/2 ... (best so far)");
    model.json keeps the 0-based index the trainer resumes from."""
    best = meta.get("best_epoch")
    if best is None or best < 0:
        return None
    trained = len(meta.get("history_epochs") or []) or ((meta.get("params") or {}).get("finetune") or {}).get("epochs")
    return f"{best + 1} of {trained}" if trained else str(best + 1)


def _cores() -> int:
    return thread_count()


def evaluation_section(inputs: dict) -> list[str]:
    em = inputs["eval_metrics"]
    after, before = em.get("after", {}), em.get("before", {})
    names = {"accuracy": "accuracy", "macro_f1": "macro-F1", "weighted_f1": "weighted F1", "nll": "log loss",
             "brier": "Brier score", "ece": "ECE"}
    rows = [{"metric": n, "before calibration": fmt(before.get(k), 4), "after calibration": fmt(after[k], 4)}
            for k, n in names.items() if k in after]
    out = ["## Evaluation (test split)", "", md_table(pd.DataFrame(rows))]
    if "seeds" in em:
        s = em["seeds"]
        out += [f"Across {s['n']} seeds (after calibration): accuracy {fmt(s['mean']['accuracy'], 4)} ± "
                f"{fmt(s['std']['accuracy'], 4)}, macro-F1 {fmt(s['mean']['macro_f1'], 4)} ± "
                f"{fmt(s['std']['macro_f1'], 4)}.", ""]
    if ab := em.get("abstain"):
        oos = (f"; out-of-scope test texts: recall {fmt(ab['oos_recall'])}, precision {fmt(ab['oos_precision'])}, "
               f"AUROC {fmt(ab['auroc'])}, FPR at 95% TPR {fmt(ab['fpr_at_95tpr'])}") if "oos_recall" in ab else ""
        out += [f"Abstention ({ab['method']}, threshold {ab['threshold']:.6g} fitted on validation): in-scope "
                f"accuracy {fmt(ab['in_scope_accuracy'], 4)} counting an abstention as an error, abstains on "
                f"{fmt(ab['abstain_rate'], 4)} of the in-scope test rows{oos}.", ""]
    pc = inputs["per_class"]
    if pc is not None and len(pc):
        table = pd.DataFrame({"class": pc["class"], "precision": pc["precision"].map(lambda v: fmt(v)),
                              "recall": pc["recall"].map(lambda v: fmt(v)), "F1": pc["f1"].map(lambda v: fmt(v)),
                              "test examples": pc["support"].astype(int)})
        out += ["### Per class", "", md_table(table)]
    return out


def gates_text(g: dict) -> str:
    """The gates as check_gates applies them (domaintune.export.classifier.gate_allowances), floors included."""
    rows = f"one of the {g['test_rows']} test rows is {g['one_row_points']:.2f} points"
    acc = (f"{g['accuracy_points']:.2f} points of accuracy (export.max_accuracy_drop {g['max_accuracy_drop']:g}, "
           f"but at least one test row)")
    ece = (f"{g['ece_points']:.2f} points of ECE (export.max_ece_increase {g['max_ece_increase']:g}, but at least "
           "one row moving between two confidence bins: two rows' worth)")
    return f"the export fails if one loses more than {acc} or adds more than {ece} against float32 ({rows})"


def latency_text(c: dict) -> str:
    load = "" if c.get("load_average_1min") is None else f", 1-minute load average {c['load_average_1min']:g}"
    return (f"Latency: the best of {c['batched_passes']} passes over the {fmt(c['texts'])} test texts in batches of "
            f"{c['batch_size']}, and the median of {c['single_texts']} texts sent one at a time; {c['threads']} "
            f"threads on {c['cpu']}{load} when measured. Other work on the machine slows it: a guide for yours, "
            "not a promise")


def auto_text(speed: dict | None) -> str:
    """The variant `--variant auto` (the default of serve, predict and monitor) runs, as /version names it."""
    if not speed or not speed.get("auto"):
        return "float32 (auto: no speeds recorded in the export)"
    auto = speed["auto"]
    return VariantChoice(auto["variant"], AUTO, auto["texts_per_s"], auto.get("why", "fastest passing")).note


def speed_text(speed: dict) -> str:
    bf16 = speed["variants"].get("bf16-autocast")
    out = (f"Default variant (`--variant auto`, what serve, predict and monitor run unless told otherwise): "
           f"{auto_text(speed)}; {speed['rule']}. texts/s: the best of {speed['passes']} passes over "
           f"{fmt(speed['texts'])} of the {fmt(speed['of_test_rows'])} test texts as predict runs them (sorted by "
           f"length, batches of at most {speed['batch_size']} texts and {fmt(speed['max_batch_tokens'])} tokens), "
           f"{speed['threads']} threads on {speed['cpu']} ({', '.join(speed['cpu_flags']) or 'no flags read'})")
    if bf16:
        out += (f". PyTorch float32 under bf16 autocast, measured only (not a variant): {fmt(bf16['texts_per_s'], 0)} "
                f"texts/s, accuracy {pct(bf16.get('accuracy'))}, "
                f"{'within' if bf16['passed_gates'] else 'over'} the gates")
    return out


def variants_section(report: dict) -> list[str]:
    variants, merge_check, lat = report["variants"], report["merge_check"], report["latency"]
    speed = report.get("speed")
    ref_ece = variants["float32"]["ece"]
    rows = [{"variant": k, "folder": VARIANT_TEXT[k].split(" ", 1)[0], "accuracy": pct(v["accuracy"]),
             "macro-F1": fmt(v["macro_f1"]), "ECE": fmt(v["ece"], 4),
             "ECE change (points)": "-" if k == "float32" else f"{100 * (v['ece'] - ref_ece):+.2f}",
             "agrees with float32": pct(v.get("agreement_with_float32")), "size (MB)": f"{v['size_bytes'] / 1e6:.1f}",
             f"ms/text, batch {lat['batch_size']}": f"{v['batched_ms_per_text']:.1f}",
             "ms, one text (p50)": "n/a" if v.get("single_text_p50_ms") is None else f"{v['single_text_p50_ms']:.1f}",
             **({"texts/s (token budget)": fmt(v.get("texts_per_s"), 0)} if speed else {})}
            for k, v in variants.items() if k in VARIANT_TEXT]
    out = ["## Variants", "", "Every variant was reloaded from disk and re-scored on the test split; "
           f"{gates_text(report['gates'])}. {latency_text(lat)}.", ""]
    if speed:
        out += [f"variant: {auto_text(speed)}", "", speed_text(speed) + ".", ""]
    out += [md_table(pd.DataFrame(rows))]
    out += [f"- {VARIANT_TEXT[k]}" for k in variants if k in VARIANT_TEXT]
    if merge_check["had_adapter"]:
        out.append(f"- The LoRA adapter was merged into the encoder; merged and unmerged logits differ by at most "
                   f"{merge_check['max_abs_diff']:.1e} on {merge_check['texts']} test texts.")
    return out + [""]


def usage_section(meta: dict, variants, speed: dict | None = None) -> list[str]:
    out = ["## How to use", "",
           "The root folder is not a `transformers` model (`AutoModelForSequenceClassification` refuses it rather "
           "than load a random head): use domaintune, or the ONNX variants with plain onnxruntime"
           + (" (openvino-int8 with plain OpenVINO)" if "openvino-int8" in variants else "") + ".", "",
           "With domaintune (`pip install` this project), from the folder that holds `models/export`:", "",
           "```python", "from domaintune.predict.predictor import Predictor", ""]
    best = (speed or {}).get("auto") and speed["auto"]["variant"] or "float32"
    out.append(f'p = Predictor.load("models/export", variant="auto")   # {best}: {auto_text(speed)}')
    out.append("# or name one: " + ", ".join(f'variant="{v}"' + (" (the library default)" if v == "float32" else "")
                                             for v in variants))
    out += ['probs = p.predict_proba(["example text"])    # calibrated, columns in p.labels order',
            'labels = p.predict(["example text"])']
    if (meta.get("abstain") or {}).get("method") in ABSTAIN_SCORES:
        out += ["# abstention (evaluate.abstain): abstained[i] is True where the answer is "
                f"{meta['abstain'].get('label')!r}",
                'probs, abstained = p.predict_with_abstention(["example text"])',
                "labels = p.labels_with_abstention(probs, abstained)"]
    out += ["```", "",
            "Or on the command line: `domaintune predict texts.csv --out predictions.jsonl` (`--variant auto`, "
            f"here {best}; `--variant NAME` runs another).", ""]
    onnx = [v for v in ("onnx", "onnx-int8") if v in variants]
    if onnx and LongText.from_meta(meta).mode != "truncate":
        out += long_text_snippet(meta, onnx[-1])
    elif onnx:
        out += ["Without domaintune: onnxruntime + tokenizers + numpy only. The graph takes `input_ids` and "
                "`attention_mask` and returns `probabilities` (already calibrated) and `logits`:", "",
                "```python", "import json", "", "import numpy as np", "import onnxruntime as ort",
                "from tokenizers import Tokenizer", "",
                f'folder = "models/export/{onnx[-1]}"',
                'config = json.load(open(f"{folder}/config.json"))',
                'tokenizer = Tokenizer.from_file(f"{folder}/tokenizer.json")',
                'tokenizer.enable_truncation(config["domaintune"]["max_length"])',
                'tokenizer.enable_padding(pad_id=config.get("pad_token_id") or 0)',
                'session = ort.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])',
                'texts = ["example text"]', "batch = tokenizer.encode_batch(texts)",
                'feed = {"input_ids": np.array([e.ids for e in batch], dtype=np.int64),',
                '        "attention_mask": np.array([e.attention_mask for e in batch], dtype=np.int64)}',
                'probs, logits = session.run(["probabilities", "logits"], feed)',
                'print([config["id2label"][str(i)] for i in probs.argmax(axis=1)], probs.max(axis=1))',
                *abstain_lines(meta, '(pooled,) = session.run(["pooled"], feed)  # the mean-pooled text vector'),
                "```", ""]
    if "openvino-int8" in variants:
        out += ["Without domaintune on OpenVINO (static int8): openvino + tokenizers + numpy only. The same inputs "
                "and outputs as the ONNX graph:", "",
                "```python", "import json", "", "import numpy as np", "import openvino as ov",
                "from tokenizers import Tokenizer", "",
                'folder = "models/export/openvino-int8"',
                'config = json.load(open(f"{folder}/config.json"))',
                'tokenizer = Tokenizer.from_file(f"{folder}/tokenizer.json")',
                'tokenizer.enable_truncation(config["domaintune"]["max_length"])',
                'tokenizer.enable_padding(pad_id=config.get("pad_token_id") or 0)',
                'model = ov.Core().compile_model(f"{folder}/model.xml", "CPU")',
                'texts = ["example text"]', "batch = tokenizer.encode_batch(texts)",
                'feed = {"input_ids": np.array([e.ids for e in batch], dtype=np.int64),',
                '        "attention_mask": np.array([e.attention_mask for e in batch], dtype=np.int64)}',
                "result = model(feed)",
                'probs, logits = result["probabilities"], result["logits"]',
                'print([config["id2label"][str(i)] for i in probs.argmax(axis=1)], probs.max(axis=1))',
                *abstain_lines(meta, 'pooled = result["pooled"]  # the mean-pooled text vector'),
                "```", ""]
    return out


def abstain_limitation(meta: dict) -> str:
    ab = meta.get("abstain") or {}
    if ab.get("method") == "trained":
        return (f"- Knows only the {len(meta['labels'])} labels above. It abstains (answers `{ab['label']}`) when a "
                "detector fitted on examples of out-of-scope text (evaluate.abstain.oos_texts) scores a text under "
                f"{ab['threshold']:.6g}: it catches texts like those examples, not arbitrary foreign ones, so a new "
                "kind of out-of-scope question may still get a label. Route low-confidence predictions to a person.")
    if ab.get("method") in ABSTAIN_SCORES:
        return (f"- Knows only the {len(meta['labels'])} labels above. It abstains (answers `{ab['label']}`) when its "
                f"{ab['method']} score is under {ab['threshold']:.6g}, fitted on validation to keep most in-scope "
                "texts; out-of-scope texts that look like a label still get that label. Route low-confidence "
                "predictions to a person.")
    return (f"- Knows only the {len(meta['labels'])} labels above; every input is forced into one of them "
            "(single-label), so out-of-scope texts still get a label. Route low-confidence predictions to a person.")


def abstain_lines(meta: dict, outputs: str) -> list[str]:
    """The abstention step of a no-domaintune snippet (evaluate.abstain), after `probs` and `logits` (and, for
    Mahalanobis and the trained detector, `pooled`) are computed: `score` per text, `abstained` where it is under
    the threshold, and `labels` with the abstention label there. `outputs`: how the snippet got
    `pooled` (a line), if needed."""
    ab = meta.get("abstain") or {}
    method = ab.get("method")
    if method not in ABSTAIN_SCORES:
        return []
    out = [f"# Abstention ({method}): under the threshold the model answers {ab.get('label')!r} (out of scope)",
           'abstain = config["domaintune"]["abstain"]', 'T = abstain["temperature"]']
    if method == "max_prob":
        out += ["z = logits.astype(np.float64) / T", "e = np.exp(z - z.max(axis=1, keepdims=True))",
                "score = (e / e.sum(axis=1, keepdims=True)).max(axis=1)"]
    elif method == "energy":
        out += ["z = logits.astype(np.float64) / T", "m = z.max(axis=1, keepdims=True)",
                "score = T * (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]"]
    elif method == "mahalanobis":
        out += ["from safetensors.numpy import load_file", "",
                'stats = load_file(f"{folder}/abstain.safetensors")  # class means, shared precision matrix',
                outputs,
                'x, mu, P = (a.astype(np.float64) for a in (pooled, stats["means"], stats["precision"]))',
                "xP = x @ P",
                "dist = (xP * x).sum(1)[:, None] - 2 * xP @ mu.T + ((mu @ P) * mu).sum(1)[None, :]",
                "score = -dist.min(axis=1)"]
    elif method == "trained":
        out += ["from safetensors.numpy import load_file", "",
                'det = load_file(f"{folder}/abstain.safetensors")  # out-of-scope detector: coef [d], intercept [1]',
                outputs,
                'score = -(pooled.astype(np.float64) @ det["coef"].astype(np.float64) + float(det["intercept"][0]))']
    out += ['abstained = score < abstain["threshold"]',
            'labels = [abstain["label"] if a else config["id2label"][str(i)]',
            "          for a, i in zip(abstained, probs.argmax(axis=1))]", "print(labels)"]
    return out


def long_text_snippet(meta: dict, variant: str) -> list[str]:
    """The no-domaintune ONNX usage of a model that reads long documents (base.long_text head_tail or chunks):
    the graph runs per model input; cutting a document into inputs and pooling its chunks' logits into the
    document's logits (then softmax(logits / T)) are the steps below, as modeling/chunks.py does them."""
    lt = LongText.from_meta(meta)
    method = (meta.get("abstain") or {}).get("method")
    vectors = method in ("mahalanobis", "trained")  # scores that read the text vector: the graph's `pooled` output
    how = ("the first and the last tokens of a long document form its one input (head_tail)" if lt.mode == "head_tail"
           else f"a long document runs as windows of max_length tokens sharing {lt.overlap} tokens, at most "
                f"{lt.max_chunks} per document, and its logits are the {lt.pooling} of its windows' logits")
    return [f"Without domaintune: onnxruntime + tokenizers + numpy only. The graph takes `input_ids` and "
            f"`attention_mask` of one model input and returns `logits` (and per-input `probabilities`). This model "
            f"reads documents longer than {meta.get('max_length')} tokens whole: {how}; the probabilities are "
            "softmax(document logits / T) (`config.json` `domaintune.long_text` and `temperature`):", "",
            "```python", "import json", "", "import numpy as np", "import onnxruntime as ort",
            "from tokenizers import Tokenizer", "",
            f'folder = "models/export/{variant}"',
            'config = json.load(open(f"{folder}/config.json"))',
            'lt = config["domaintune"]["long_text"]  # mode, chunk_overlap, max_chunks, pooling, special-token ids',
            'tokenizer = Tokenizer.from_file(f"{folder}/tokenizer.json")',
            "tokenizer.no_truncation()  # every token: the windows below decide what the model reads",
            'session = ort.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])',
            'width = config["domaintune"]["max_length"] - len(lt["prefix_ids"]) - len(lt["suffix_ids"])',
            "", "",
            "def model_inputs(ids):  # a document's tokens -> the token ids of its model inputs",
            '    if lt["mode"] == "head_tail":  # the first quarter of the window and the last tokens',
            '        head = len(ids) if len(ids) <= width else round(width * lt["head_share"])',
            "        parts = [ids[:head] + (ids[len(ids) - (width - head):] if len(ids) > width else [])]",
            "    else:  # chunks: windows of `width` tokens, each sharing chunk_overlap tokens with the one before",
            '        step, parts = width - lt["chunk_overlap"], []',
            "        for start in range(0, max(len(ids), 1), step):",
            "            parts.append(ids[start:start + width])",
            '            if start + width >= len(ids) or len(parts) == lt["max_chunks"]:',
            "                break",
            '    return [lt["prefix_ids"] + p + lt["suffix_ids"] for p in parts]', "", "",
            "def pool(z):  # the logits of a document's inputs [inputs, labels] -> the document's logits [labels]",
            '    if lt["pooling"] == "max":', "        return z.max(axis=0)",
            '    if lt["pooling"] == "logsumexp":', "        top = z.max(axis=0)",
            "        return top + np.log(np.exp(z - top).mean(axis=0))",
            "    return z.mean(axis=0)", "", "",
            'texts = ["example text"]', "pad = config.get(\"pad_token_id\") or 0",
            "documents, vectors = [], []" if vectors else "documents = []",
            "for text in texts:",
            "    rows = model_inputs(tokenizer.encode(text, add_special_tokens=False).ids)",
            "    longest = max(len(r) for r in rows)",
            '    feed = {"input_ids": np.array([r + [pad] * (longest - len(r)) for r in rows], dtype=np.int64),',
            '            "attention_mask": np.array([[1] * len(r) + [0] * (longest - len(r)) for r in rows],',
            "                                       dtype=np.int64)}",
            *(['    z, v = session.run(["logits", "pooled"], feed)',
               '    documents.append(pool(z.astype(np.float64)))',
               "    vectors.append(v.astype(np.float64).mean(axis=0))  # a document's vector: its inputs' mean"]
              if vectors else ['    documents.append(pool(session.run(["logits"], feed)[0].astype(np.float64)))']),
            "logits = np.stack(documents)",
            'if config["problem_type"] == "multi_label_classification":',
            "    probs = 1 / (1 + np.exp(-logits))",
            "else:",
            '    z = logits / (config["domaintune"]["temperature"] or 1.0)',
            "    probs = np.exp(z - z.max(axis=1, keepdims=True))",
            "    probs /= probs.sum(axis=1, keepdims=True)",
            'print([config["id2label"][str(i)] for i in probs.argmax(axis=1)], probs.max(axis=1))',
            # abstention on the document's logits (max_prob, energy) or its vector (mahalanobis, trained)
            *abstain_lines(meta, "pooled = np.stack(vectors)  # the documents' mean-pooled vectors"),
            "```", ""]


def long_text_line(meta: dict) -> str:
    """How inputs longer than max_length are read (the card's training section and limitations)."""
    lt, ml = LongText.from_meta(meta), meta.get("max_length")
    if lt.mode == "head_tail":
        return (f"inputs longer than {ml} tokens are read as their first and last tokens (head+tail: a quarter "
                "head, the rest tail); the middle is not read")
    if lt.mode == "chunks":
        return (f"documents longer than {ml} tokens are read whole as windows of {ml} tokens sharing {lt.overlap} "
                f"tokens, at most {lt.max_chunks} per document (tokens past the last window are not read); a "
                f"document's logits are the {lt.pooling} of its windows' logits (pooling chosen on validation)")
    return f"inputs truncated to {ml} tokens"


def model_card(meta: dict, inputs: dict, split_sizes: dict, report: dict, params) -> str:
    """The card of an export. `report` is the export stage's metrics dict (metrics/export.json: variants,
    merge_check, gates, latency), `inputs` the evaluate stage's files (reports/eval/metrics.json is a copy of
    metrics/evaluate.json): every number here is one the logs and metrics files show."""
    import yaml

    front = front_matter(meta, inputs, split_sizes, params)
    problem = meta.get("problem_type", "single_label").replace("_", "-")
    out = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
           "# domaintune classifier", "",
           f"A calibrated {problem} text classifier over {len(meta['labels'])} labels, fine-tuned from "
           f"`{meta['base_model']}`"
           + (" after domain-adaptive pre-training" if (inputs["dapt"] or {}).get("metrics", {}).get("enabled")
              else "") + ". Weights are safetensors and ONNX"
           + (" (and OpenVINO IR)" if "openvino-int8" in params.variants else "") + " only; no pickle, no remote code.",
           ""]
    out += data_section(meta, inputs, split_sizes)
    out += training_section(meta, inputs)
    out += evaluation_section(inputs)
    out += variants_section(report)
    refused = report.get("variants_refused") or {}
    if refused:
        out += ["Not shipped (past their gates; `variants_refused` in export_report.json): "
                + "; ".join(f"{name}: {row['why']}" for name, row in refused.items()) + ".", ""]
    out += usage_section(meta, [v for v in params.variants if v not in refused], report.get("speed"))
    out += ["## Promotion", "",
            "Whether this model is served is decided after it is exported: a retrain compares it with the served "
            "version on rows neither trained on (paired bootstrap, 95% intervals; params.yaml `release`). The "
            "decision, its reason and every number are in `metrics/promotion.json` at this version's commit and "
            "in its registry tag; `domaintune versions` lists each version's stage and why.", ""]
    out += ["## Intended use", "", params.intended_use, "", "## Limitations", "",
            abstain_limitation(meta),
            f"- Long inputs: {long_text_line(meta)}.",
            "- The calibration was fitted on the validation split; it holds only while incoming texts look like "
            "the training data. Watch the drift report.",
            f"- Test metrics come from {fmt(split_sizes.get('test', 0))} rows; small classes have wide error bars."]
    pc = inputs["per_class"]
    if pc is not None and len(pc):
        worst = pc.sort_values(["f1", "class"], kind="stable").head(3)
        out.append("- Weakest classes on test (F1): " +
                   ", ".join(f"`{r['class']}` {fmt(r['f1'])} (n={int(r['support'])})" for _, r in worst.iterrows()))
    return "\n".join(out) + "\n"
