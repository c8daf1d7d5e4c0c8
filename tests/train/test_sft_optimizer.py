"""finetune.optimizer for base.task generation: auto = bitsandbytes' paged 8-bit AdamW for QLoRA on CUDA, torch
AdamW elsewhere; paged_adamw_8bit without CUDA is one line, exit 2. CUDA is faked as in
tests/tasks/test_device_stages.py (torch.cuda.is_available patched): the choice is recorded, no kernel runs."""
from __future__ import annotations

import pandas as pd
import pytest
import yaml

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")

from domaintune.core.errors import ParamsError
from domaintune.core.params import BaseParams, FinetuneParams
from domaintune.train import engine, sft


class Stop(Exception):
    """Raised by a spy once the optimizer a stage chose is recorded."""


@pytest.fixture()
def fake_cuda(cuda_faked):
    """One fake CUDA device (tests/conftest.py)."""


@pytest.fixture()
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _choice(method: str, optimizer: str = "auto") -> str:
    from domaintune.train.classifier import finetune_device

    ft = FinetuneParams(method=method, optimizer=optimizer)
    return sft.optimizer_for(ft, finetune_device(BaseParams(device="auto"), ft))


def test_auto_is_paged_8bit_for_qlora_on_cuda_and_adamw_elsewhere(fake_cuda):
    assert _choice("qlora") == "paged_adamw_8bit"
    assert _choice("lora") == _choice("full") == "adamw"
    assert _choice("qlora", "adamw") == "adamw"
    assert _choice("lora", "paged_adamw_8bit") == "paged_adamw_8bit"


def test_auto_is_adamw_without_cuda_and_paged_8bit_is_refused_in_one_line(no_cuda):
    assert _choice("qlora") == "adamw"
    with pytest.raises(ParamsError, match=r"^params.yaml: finetune.optimizer: paged_adamw_8bit needs a CUDA "
                                          r"device .* trains on cpu; use auto or adamw$"):
        _choice("qlora", "paged_adamw_8bit")
    with pytest.raises(ParamsError, match="finetune.optimizer: must be one of"):
        FinetuneParams(optimizer="sgd")


def test_the_engine_builds_bitsandbytes_paged_adamw_8bit():
    lin = torch.nn.Linear(64, 64)
    groups = engine.param_groups(lin.named_parameters(), 2e-4, 0.01)
    cfg = engine.EngineConfig(lr=2e-4, total_steps=4, optimizer="paged_adamw_8bit")
    opt = engine.make_adamw(groups, cfg, "cuda:0")  # built on CPU tensors: no CUDA call until a step
    assert isinstance(opt, bnb.optim.PagedAdamW8bit) and opt.is_paged
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(2e-4, 0.0), (2e-4, 0.01)]
    with pytest.raises(ValueError, match="needs a CUDA device"):
        engine.make_adamw(groups, cfg, "cpu")
    assert type(engine.make_adamw(groups, engine.EngineConfig(lr=2e-4, total_steps=4), "cpu")) is torch.optim.AdamW
    # Its checkpoint: 8-bit state tensors to safetensors, the int `step` it keeps to JSON, and back.
    params = [p for g in opt.param_groups for p in g["params"]]
    opt.state[params[0]] = {"step": 3, "state1": torch.randint(0, 255, (64, 64), dtype=torch.uint8),
                            "absmax1": torch.rand(16)}
    tensors, scalars = engine._optimizer_to_tensors(opt, params)
    assert set(tensors) == {"0.state1", "0.absmax1"} and scalars["state_values"] == {"0.step": 3}
    fresh = engine.make_adamw(groups, cfg, "cuda:0")
    engine._optimizer_from_tensors(fresh, [p for g in fresh.param_groups for p in g["params"]], tensors, scalars)
    st = fresh.state[params[0]]
    assert st["step"] == 3 and torch.equal(st["state1"], opt.state[params[0]]["state1"])


def _stage_params(tmp_path, task: str, method: str, optimizer: str) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"base": {"task": task, "model": str(tmp_path / "model"), "device": "auto"},
                                    "finetune": {"method": method, "optimizer": optimizer}}))
    return str(path)


def _finetune(tmp_path, params: str) -> int:
    from stages import finetune

    (tmp_path / "model").mkdir(exist_ok=True)
    return finetune.main(["--params", params, "--in", str(tmp_path / "audited"), "--encoder", str(tmp_path / "model"),
                          "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json"), "--checkpoints",
                          str(tmp_path / "ck"), "--live", str(tmp_path / "live"), "--no-progress"])


@pytest.mark.parametrize("task,fragment", [
    ("generation", "finetune.optimizer: paged_adamw_8bit needs a CUDA device"),
    ("classification", "finetune.optimizer: paged_adamw_8bit is for base.task generation")])
def test_the_stage_refuses_paged_8bit_in_one_line_before_reading_data(tmp_path, capsys, no_cuda, task, fragment):
    rc = _finetune(tmp_path, _stage_params(tmp_path, task, "lora", "paged_adamw_8bit"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and fragment in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()


def test_the_stage_trains_qlora_with_paged_8bit_on_cuda(tmp_path, fake_cuda, monkeypatch):
    """The finetune stage under a fake CUDA: QLoRA SFT reaches the engine with paged_adamw_8bit."""
    from domaintune.data.dataset import write_dataset
    from domaintune.modeling import tinyllm

    rows = [(f"r{i}", f"question {i}", f"answer number {i}", "x") for i in range(8)]
    df = pd.DataFrame(rows, columns=["id", "text", "label", "split"])
    write_dataset(tmp_path / "audited", {"train": df, "validation": df.iloc[:2], "test": df.iloc[:2]}, [])
    tinyllm.save(tmp_path / "model", df["text"].tolist() + df["label"].tolist())
    chosen = []
    monkeypatch.setattr(sft, "apply_method", lambda model, ft, device, seed: model)  # no NF4 kernels on the fake

    def spy(model, batches, steps, *a, **k):
        chosen.append((a[6], a[-1]))  # device, optimizer
        raise Stop

    monkeypatch.setattr(sft, "train", spy)
    with pytest.raises(Stop):
        _finetune(tmp_path, _stage_params(tmp_path, "generation", "qlora", "auto"))
    assert chosen == [("cuda:0", "paged_adamw_8bit")]
