"""Loading causal LMs (domaintune/modeling/causal.py): pickles are never loaded, for the generation task too."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from domaintune.core.errors import DataError
from domaintune.modeling import tinyllm
from domaintune.modeling.causal import load_causal_lm, load_tuned

TEXTS = ["Where is my invoice? It was due on Monday.", "Reset my password please, the link expired.",
         "Thanks for reaching out. I have resent the invoice.", "Sorry about that; here is a new link."]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tinyllm.save(tmp_path_factory.mktemp("tiny") / "base", TEXTS * 5, seed=2)


def _lora_folder(base: Path, out: Path) -> Path:
    """What the generation finetune stage writes for method lora: the adapter, the tokenizer, run.json."""
    from peft import LoraConfig, get_peft_model

    model, tok = load_causal_lm(str(base))
    tuned = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    tuned.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "run.json").write_text(json.dumps({"method": "lora", "base_model": str(base)}))
    return out


def test_a_pickled_generation_adapter_is_refused(base, tmp_path):
    """Before: load_tuned handed adapter_model.bin to peft, which unpickled it (torch's weights-only loader
    was all that stood in the way of a malicious file)."""
    from peft import get_peft_model_state_dict

    folder = _lora_folder(base, tmp_path / "finetuned")
    tuned, _, run = load_tuned(folder)  # the safetensors adapter loads
    assert run["method"] == "lora"
    torch.save(get_peft_model_state_dict(tuned), folder / "adapter_model.bin")  # what an old peft save holds
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(DataError) as exc:
        load_tuned(folder)
    assert str(exc.value) == (f"{folder / 'adapter_model.safetensors'}: missing (found adapter_model.bin: pickle files "
                              "are never loaded; re-save the weights with safetensors)")


@pytest.mark.parametrize("pickle_name", ["pytorch_model.bin", "model.pt", "weights.pkl"])
def test_pickled_full_model_weights_are_refused(base, tmp_path, pickle_name):
    folder = tmp_path / "full"
    shutil.copytree(base, folder)
    torch.save({"x": torch.zeros(1)}, folder / pickle_name)
    (folder / "model.safetensors").unlink()
    (folder / "run.json").write_text(json.dumps({"method": "full", "base_model": str(base)}))
    with pytest.raises(DataError, match=rf"model.safetensors: missing \(found {pickle_name}: pickle files"):
        load_tuned(folder)
    with pytest.raises(DataError, match=rf"model.safetensors: missing \(found {pickle_name}: pickle files"):
        load_causal_lm(str(folder))


def test_a_folder_without_run_json_says_which_stage_writes_it(base, tmp_path):
    with pytest.raises(DataError, match=r"run.json: missing; the finetune stage writes it"):
        load_tuned(tmp_path)
