"""Drift stage: the reference profile that `domaintune monitor` compares new batches with.

Text features of train + validation, the served model's outputs (predicted label, calibrated
confidence, PCA of its embeddings) on the validation rows it did not train on, the measured
reference accuracy, and the null of every drift signal calibrated on resamples of that reference
(so an iid batch alarms with probability <= drift.false_alarm_rate at any size). The code lives
in domaintune/monitor/drift.py; this stage only reads, builds and writes. Files: see that module.
"""
from __future__ import annotations

from domaintune.core.io import atomic_output, write_json
from domaintune.core.stage import run_stage, stage_parser
from domaintune.data.dataset import read_dataset, read_hashes


def summary_line(metrics: dict) -> str:
    exp = metrics.get("reference_expected_accuracy")
    return (f"reference: {metrics['text_reference_rows']} texts (train + validation) for text features, "
            f"{metrics['output_reference_rows']} validation rows for model outputs; measured accuracy "
            f"{metrics['reference_accuracy']:.3f}" + ("" if exp is None else f", expected (calibrated) {exp:.3f}")
            + f"; {metrics['signals']} calibrated drift tests")


def main(argv=None) -> int:
    ap = stage_parser("drift", __doc__.splitlines()[0], inp="audited dataset folder", out="baseline folder to write")
    ap.add_argument("--model", required=True, help="exported model folder")

    def run(args) -> str:
        from domaintune.core.device import stage_device
        from domaintune.core.params import load_params
        from domaintune.modeling.encoders import set_threads
        from domaintune.monitor.drift import build_baseline

        base, params = load_params(args.params, "base", "drift")
        device = stage_device(base)
        if base.task == "generation":
            from domaintune.monitor.generation import run_drift

            return run_drift(args, params, device)
        splits, labels = read_dataset(args.in_dir)
        dataset_hash = read_hashes(args.in_dir, splits, labels)["dataset"]
        set_threads()
        with atomic_output(args.out) as tmp, atomic_output(args.metrics) as tmp_metrics:
            metrics = build_baseline(splits, labels, args.model, params, tmp, dataset_hash, device=device)
            write_json(tmp_metrics, metrics)
        return summary_line(metrics)

    return run_stage("drift", run, ap, argv)


if __name__ == "__main__":
    raise SystemExit(main())
