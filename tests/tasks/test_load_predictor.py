"""domaintune.tasks.load_predictor, the one loader, on a generation export: checksums.json checked, a missing
part named with the stage that writes it, pickles refused (the classifier's cases: tests/export/test_export.py)."""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from domaintune.core.errors import DataError
from domaintune.tasks import load_predictor

REPO = Path(__file__).resolve().parents[2]
PAIRS = REPO / "examples" / "support_replies" / "pairs.csv"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tiny random Llama saved as the generation export stage saves one, checksums.json last."""
    from domaintune.core.io import write_json
    from domaintune.export.artifacts import write_checksums
    from domaintune.export.generation import save_export
    from domaintune.modeling import tinyllm
    from domaintune.modeling.causal import load_causal_lm

    root = tmp_path_factory.mktemp("gen_export")
    df = pd.read_csv(PAIRS).head(40)
    m, tok = load_causal_lm(str(tinyllm.save(root / "tiny", df["prompt"].tolist() + df["response"].tolist(), seed=0)))
    out = root / "export"
    save_export(m, tok, out, 8)
    write_json(out / "export_info.json", {"task": "generation", "method": "full", "base_model": "tiny",
                                          "max_length": 64})
    write_checksums(out)
    return out


def _copy(export: Path, dest: Path, checksums: bool = True) -> Path:
    shutil.copytree(export, dest, ignore=None if checksums else shutil.ignore_patterns("checksums.json"))
    return dest


def test_a_changed_weights_file_is_refused(export, tmp_path):
    assert load_predictor(export).generate(["hello"], max_new_tokens=2)[0].completion_tokens >= 1
    copy = _copy(export, tmp_path / "e")
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(DataError, match=re.escape(f"{weights}: md5 differs from checksums.json")):
        load_predictor(copy)


@pytest.mark.parametrize("checksums", [True, False])
def test_an_export_missing_a_part_says_to_run_the_export_stage(export, tmp_path, checksums):
    """Before: "params.yaml: base.model: ... is not a causal language model" for a missing config.json."""
    copy = _copy(export, tmp_path / "e", checksums)
    (copy / "config.json").unlink()
    listed = " (listed in checksums.json)" if checksums else ""
    with pytest.raises(DataError, match=re.escape(f"{copy / 'config.json'}: missing{listed}; the export stage writes it")):
        load_predictor(copy)


def test_pickled_weights_in_an_export_are_refused(export, tmp_path):
    """Before: transformers' OSError "no file named model.safetensors", with no word about the pickle."""
    copy = _copy(export, tmp_path / "e", checksums=False)
    (copy / "model.safetensors").rename(copy / "pytorch_model.bin")
    with pytest.raises(DataError, match=re.escape(f"{copy / 'model.safetensors'}: missing (found pytorch_model.bin: "
                                                  "pickle files are never loaded")):
        load_predictor(copy)


def test_an_export_without_checksums_loads_and_says_it_was_not_verified(export, tmp_path, caplog):
    copy = _copy(export, tmp_path / "e", checksums=False)
    with caplog.at_level(logging.WARNING, logger="domaintune"):
        load_predictor(copy)
    assert [r.getMessage() for r in caplog.records] == [
        f"{copy}: no checksums.json (exported before domaintune recorded checksums), so its files are not verified; "
        "re-run the export stage to add one"]


def test_a_finetune_folder_is_not_an_export(export, tmp_path):
    folder = tmp_path / "finetuned"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "run.json"):
        (folder / name).write_text("{}")
    with pytest.raises(DataError, match="not an export .*run the export stage first"):
        load_predictor(folder)
