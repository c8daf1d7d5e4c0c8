"""base.device reaches every stage's model: with a fake CUDA (torch.cuda.is_available patched true) each stage's
own entry point asks for cuda:0; without CUDA `auto` is the CPU and an explicit `cuda` is one line, exit 2.

The fake cannot run kernels, so the placement call (domaintune.core.device.place_for_inference) is recorded and the
model stays where it is; training stages are stopped right where their model would be built on the device.
"""
from __future__ import annotations

import pytest
from driftkit import save_tiny_classifier, tiny_splits

from domaintune.data.dataset import write_dataset


class Stop(Exception):
    """Raised by a spy once the device a training stage chose is recorded."""


@pytest.fixture()
def fake_cuda(monkeypatch, cuda_faked):
    import torch

    from domaintune.core import device

    placed = []

    def spy(model, dev, half=True):
        placed.append((type(model).__name__, dev, device.inference_dtype(dev) if half else torch.float32))
        return model.eval()  # stays on the CPU: the fake has no kernels

    monkeypatch.setattr(device, "place_for_inference", spy)
    return placed


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("devices")
    splits, labels = tiny_splits(n_per_class=24)  # every class in every split
    write_dataset(root / "audited", splits, labels)
    save_tiny_classifier(tiny_bert, root / "model", labels)
    return root, labels


def _params(root, tiny_bert, device="auto", **sections):
    import yaml

    p = root / f"params-{device.replace(':', '')}.yaml"
    doc = {"base": {"seed": 0, "model": str(tiny_bert), "max_length": 32, "device": device},
           "drift": {"batch_size": 16, "pca_components": 2}, "audit": {"batch_size": 16},
           "dapt": {"max_steps": 2, "batch_size": 4, "block_size": 16, "head_warmup_steps": 0},
           "finetune": {"epochs": 1, "batch_size": 8}, "evaluate": {"min_calibration_rows": 5}, **sections}
    p.write_text(yaml.safe_dump(doc))
    return str(p)


def test_inference_stages_place_their_model_on_cuda(project, tiny_bert, fake_cuda, tmp_path):
    import shutil

    import torch

    from pipelines.cli import main as cli
    from stages import audit, drift, evaluate

    root, _ = project
    params = _params(root, tiny_bert)
    ds, model = str(root / "audited"), str(root / "model")
    assert evaluate.main(["--params", params, "--in", ds, "--model", model, "--out", str(tmp_path / "eval"),
                          "--metrics", str(tmp_path / "eval.json")]) == 0
    assert fake_cuda[-1] == ("EncoderClassifier", "cuda:0", torch.bfloat16)
    assert drift.main(["--params", params, "--in", ds, "--model", model, "--out", str(tmp_path / "baseline"),
                       "--metrics", str(tmp_path / "drift.json")]) == 0
    assert fake_cuda[-1] == ("EncoderClassifier", "cuda:0", torch.bfloat16)
    batch = tmp_path / "batch.txt"
    batch.write_text("where is my parcel\nrefund my order please\nreset my password\n")
    shutil.copy(params, tmp_path / "params.yaml")  # `domaintune monitor` reads the repo's params.yaml
    assert cli(["monitor", "--batch", str(batch), "--repo", str(tmp_path), "--baseline", str(tmp_path / "baseline"),
                "--model", model, "--out", str(tmp_path / "monitor")]) in (0, 1)  # 1: drift, still a verdict
    assert (tmp_path / "monitor" / "verdict.json").exists()
    assert fake_cuda[-1] == ("EncoderClassifier", "cuda:0", torch.bfloat16)
    n = len(fake_cuda)
    assert audit.main(["--params", params, "--in", ds, "--out", str(tmp_path / "audited"), "--report",
                       str(tmp_path / "audit"), "--metrics", str(tmp_path / "audit.json"), "--embeddings",
                       str(tmp_path / "emb")]) == 0
    assert fake_cuda[n:] == [("BertModel", "cuda:0", torch.bfloat16)]


def test_export_verifies_the_float_model_on_cuda_in_float32(project, tiny_bert, fake_cuda, tmp_path):
    import torch

    from stages import evaluate, export

    root, _ = project
    params = _params(root, tiny_bert, export={"latency_repeats": 1, "latency_single_texts": 1})
    ds, model = str(root / "audited"), str(root / "model")
    assert evaluate.main(["--params", params, "--in", ds, "--model", model, "--out", str(tmp_path / "eval"),
                          "--metrics", str(tmp_path / "eval.json")]) == 0
    n = len(fake_cuda)
    rc = export.main(["--params", params, "--model", model, "--calibration", str(tmp_path / "eval"), "--in", ds,
                      "--out", str(tmp_path / "export"), "--metrics", str(tmp_path / "export.json")])
    assert rc == 0
    assert fake_cuda[n:] and all(p == ("EncoderClassifier", "cuda:0", torch.float32) for p in fake_cuda[n:])


def test_training_stages_choose_cuda(project, tiny_bert, fake_cuda, tmp_path, monkeypatch):
    from domaintune.train import classifier as training
    from domaintune.train import dapt as dapt_lib
    from domaintune.train import mlm
    from stages import dapt, finetune

    root, _ = project
    chosen = []

    def stop_adapt(corpus, base_path, params, seed, device="cpu", *a, **k):
        chosen.append(("dapt", device))
        raise Stop

    def stop_build(self, encoder_dir):
        chosen.append(("finetune", self.device))
        raise Stop

    monkeypatch.setattr(mlm, "adapt", stop_adapt)
    monkeypatch.setattr(dapt_lib, "adapt", stop_adapt)
    monkeypatch.setattr(training.FinetuneRun, "_build_model", stop_build)
    params = _params(root, tiny_bert, device="cuda:0")
    with pytest.raises(Stop):
        dapt.main(["--params", params, "--in", str(root / "audited"), "--out", str(tmp_path / "dapt"),
                   "--metrics", str(tmp_path / "dapt.json"), "--checkpoints", str(tmp_path / "dck"),
                   "--live", str(tmp_path / "dlive"), "--no-progress"])
    with pytest.raises(Stop):
        finetune.main(["--params", params, "--in", str(root / "audited"), "--encoder", str(tiny_bert),
                       "--out", str(tmp_path / "ft"), "--metrics", str(tmp_path / "ft.json"), "--checkpoints",
                       str(tmp_path / "fck"), "--live", str(tmp_path / "flive"), "--no-progress"])
    assert chosen == [("dapt", "cuda:0"), ("finetune", "cuda:0")]


@pytest.mark.parametrize("stage", ["evaluate", "drift", "dapt", "finetune"])
def test_explicit_cuda_without_cuda_is_one_line_exit_2(project, tiny_bert, tmp_path, capsys, monkeypatch, stage):
    import importlib

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    root, _ = project
    params = _params(root, tiny_bert, device="cuda")
    ds, model = str(root / "audited"), str(root / "model")
    args = {"evaluate": ["--in", ds, "--model", model],
            "drift": ["--in", ds, "--model", model],
            "dapt": ["--in", ds],
            "finetune": ["--in", ds, "--encoder", str(tiny_bert)]}[stage]
    out = tmp_path / "out"
    rc = importlib.import_module(f"stages.{stage}").main(["--params", params, *args, "--out", str(out),
                                                          "--metrics", str(tmp_path / "m.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == [f"{stage}: error: params.yaml: base.device: cuda requested but torch sees no CUDA device "
                   "(use auto or cpu)"]
    assert not out.exists() and not (tmp_path / "m.json").exists()
