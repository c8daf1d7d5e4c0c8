"""--variant auto: the fastest variant that passed its gates, from the speeds the export stage recorded
(domaintune.export.variants.resolve_variant), on hand-written records (the stage's own record is tested in
test_export.py)."""
from __future__ import annotations

import argparse
import logging

import pytest

from domaintune.core.io import write_json
from domaintune.export.variants import (
    AUTO,
    EMBEDDING_VARIANTS,
    REPORT,
    requested_variant,
    resolve_variant,
    variant_arg,
)


def record(folder, **rows):
    """An export_report.json whose speed record has these rows: name=(texts/s, passed its gates)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / REPORT, {"test_rows": 10, "speed": {"variants": {
        k.replace("_", "-"): {"texts_per_s": tps, "passed_gates": ok} for k, (tps, ok) in rows.items()}}})
    return folder


def test_auto_picks_the_recorded_fastest_passing_variant(tmp_path):
    folder = record(tmp_path / "e", float32=(170.0, True), onnx=(250.0, True), onnx_int8=(380.0, True),
                    openvino_int8=(602.0, True))
    choice = resolve_variant(folder)
    assert (choice.variant, choice.requested, choice.texts_per_s) == ("openvino-int8", AUTO, 602.0)
    assert choice.note == "openvino-int8 (auto: fastest passing, 602 texts/s measured at export)"
    # a named variant is loaded as asked, with its recorded speed; 'float' is float32
    assert resolve_variant(folder, "onnx").note == "onnx (asked for, 250 texts/s measured at export)"
    assert resolve_variant(folder, "float").variant == "float32"


def test_a_variant_over_its_gates_is_never_picked_even_when_fastest(tmp_path):
    folder = record(tmp_path / "e", float32=(170.0, True), onnx_int8=(380.0, True), openvino_int8=(900.0, False))
    assert resolve_variant(folder).variant == "onnx-int8"
    # nor a row that is no exported variant (bf16 autocast is measured only), nor one without a verdict
    folder = record(tmp_path / "f", float32=(170.0, True), bf16_autocast=(800.0, True), onnx=(900.0, None))
    assert resolve_variant(folder).variant == "float32"


def test_auto_leaves_float32_only_for_a_clear_gain(tmp_path):
    """Within timing noise of float32 (under 1.10x) a variant buys nothing and costs float32's exactness."""
    folder = record(tmp_path / "e", float32=(170.0, True), int8=(180.0, True))
    choice = resolve_variant(folder)
    assert choice.variant == "float32" and "fastest: int8, 180" in choice.note


def test_an_export_without_speeds_runs_float32_with_a_notice(tmp_path, caplog):
    folder = tmp_path / "old"
    folder.mkdir()
    write_json(folder / REPORT, {"test_rows": 10, "variants": {}})  # an export from before speeds were recorded
    with caplog.at_level(logging.WARNING, logger="domaintune"):
        choice = resolve_variant(folder)
    assert choice.variant == "float32" and choice.texts_per_s is None
    assert choice.note == "float32 (auto: no speeds recorded in the export)"
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1 and "no variant speeds recorded" in notices[0] and "runs float32" in notices[0]
    caplog.clear()
    assert resolve_variant(tmp_path / "no-report").variant == "float32" and len(caplog.records) == 1


def test_auto_among_the_variants_that_return_embeddings(tmp_path):
    """monitor: the drift signals compare text embeddings, which only the PyTorch variants return."""
    folder = record(tmp_path / "e", float32=(170.0, True), int8=(200.0, True), onnx_int8=(380.0, True))
    assert resolve_variant(folder, among=EMBEDDING_VARIANTS).variant == "int8"


def test_variant_options_take_auto_and_every_old_spelling():
    assert variant_arg("auto") == "auto" and variant_arg("float") == "float32"
    assert requested_variant("openvino-int8") == "openvino-int8"
    with pytest.raises(argparse.ArgumentTypeError, match="choose auto or one of"):
        variant_arg("fp16")
