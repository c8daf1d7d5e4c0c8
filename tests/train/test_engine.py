"""The training engine and the device rule: resume, accumulation, groups, device choice with and without CUDA."""
from __future__ import annotations

import numpy as np
import pytest

from domaintune.core import device as dev
from domaintune.core.errors import ParamsError
from domaintune.train.engine import CRASH_ENV, Engine, EngineConfig, TrainingCrash, param_groups


class Batches:
    """A seeded endless stream of (x, y) batches with exact-resume state."""

    def __init__(self, seed: int, batch: int = 8):
        self.rng = np.random.default_rng(seed)
        self.batch = batch

    def __iter__(self):
        import torch

        while True:
            x = self.rng.normal(size=(self.batch, 6)).astype(np.float32)
            yield torch.from_numpy(x), torch.from_numpy(x.sum(1, keepdims=True))

    def state_dict(self):
        return self.rng.bit_generator.state

    def load_state_dict(self, state):
        if state is not None:
            self.rng.bit_generator.state = state


def _model(seed=0):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.1), torch.nn.LayerNorm(16),
                               torch.nn.Linear(16, 1))


def _loss(model, batch):
    import torch.nn.functional as F

    x, y = batch
    return F.mse_loss(model(x), y)


def _engine(model, tmp_path=None, steps=12, accum=1):
    cfg = EngineConfig(lr=1e-2, total_steps=steps, warmup_steps=2, grad_accum=accum, bf16="off", device="cpu",
                       checkpoint_every=4)
    groups = param_groups(model.named_parameters(), lr=cfg.lr, weight_decay=0.01)
    return Engine(model, groups, cfg, checkpoint_dir=tmp_path)


def test_groups_exclude_bias_and_layernorm_from_weight_decay():
    groups = param_groups(_model().named_parameters(), lr=1e-3, weight_decay=0.1,
                          lr_scale=lambda n: 0.5 if n.startswith("0.") else 1.0)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["0.weight"]["weight_decay"] == 0.1 and by_name["0.weight"]["lr"] == 0.0005
    assert by_name["0.bias"]["weight_decay"] == 0.0
    assert by_name["3.weight"]["weight_decay"] == 0.1 and by_name["3.weight"]["lr"] == 0.001


def test_fit_learns_and_resume_after_crash_is_exact(tmp_path, monkeypatch):
    import torch

    ref = _engine(_model())
    hist = ref.fit(_loss, Batches(1))
    assert len(hist) == 12 and hist[-1]["loss"] < hist[0]["loss"]

    monkeypatch.setenv(CRASH_ENV, "6")
    crashed = _engine(_model(), tmp_path)
    with pytest.raises(TrainingCrash):
        crashed.fit(_loss, Batches(1))
    monkeypatch.delenv(CRASH_ENV)
    torch.manual_seed(123)  # a resumed process starts with other RNG state: the checkpoint puts it back
    resumed = _engine(_model(7), tmp_path)  # other initial weights: the checkpoint overrides them
    hist2 = resumed.fit(_loss, Batches(1))
    assert [h["loss"] for h in hist2] == [h["loss"] for h in hist]
    for a, b in zip(ref.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_accumulation_equals_the_large_batch():
    import torch

    big, small = _model(), _model()
    big.eval(), small.eval()  # no dropout: the two must match to rounding
    e1, e2 = _engine(big), _engine(small, accum=2)
    x = torch.randn(8, 6)
    y = x.sum(1, keepdim=True)
    e1.step(_loss, [(x, y)])
    e2.step(_loss, [(x[:4], y[:4]), (x[4:], y[4:])])
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_auto_is_cpu_without_cuda_and_explicit_cuda_is_an_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.resolve_device("auto") == "cpu"
    assert dev.resolve_device("cpu") == "cpu"
    with pytest.raises(ParamsError, match=r"base.device: cuda requested but torch sees no CUDA device"):
        dev.resolve_device("cuda")
    with pytest.raises(ParamsError, match="must be auto, cpu, cuda or cuda:N"):
        dev.resolve_device("gpu")


def test_auto_picks_the_local_rank_gpu_with_fake_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dev.resolve_device("auto") == "cuda:0"
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dev.resolve_device("auto") == "cuda:1"
    assert dev.resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(ParamsError, match="cuda:5 requested but torch sees 2"):
        dev.resolve_device("cuda:5")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert dev.inference_dtype("cuda:0") == torch.bfloat16
    assert dev.inference_dtype("cpu") == torch.float32
    assert dev.batch_size_for("cuda:0") > dev.batch_size_for("cpu")


def test_each_process_gets_its_own_rng_stream_back(tmp_path, monkeypatch):
    """Under data parallelism rank 0 writes every process's RNG state; a resumed process R loads state R."""
    import torch

    from domaintune.train import distributed
    from domaintune.train.engine import load_checkpoint, save_checkpoint

    model = _model()
    streams = {f"torch_rng.{r}": torch.Generator().manual_seed(100 + r).get_state() for r in range(2)}
    save_checkpoint(tmp_path / "ck", model, None, None, [], {"x": 1}, None, streams)
    for r in range(2):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        state, _ = load_checkpoint(tmp_path / "ck", model, None, None, [])
        assert state == {"x": 1}
        assert torch.equal(torch.get_rng_state(), streams[f"torch_rng.{r}"])


def test_launch_settings_are_checked():
    from domaintune.core.params import DaptParams, FinetuneParams

    with pytest.raises(ParamsError, match=r"finetune.*batch_size: must be >= grad_accum x processes x nnodes = 8"):
        FinetuneParams(batch_size=4, grad_accum=2, processes=2, nnodes=2, node_rank=1)
    with pytest.raises(ParamsError, match=r"dapt.*node_rank: must be in \[0, nnodes\), got 1"):
        DaptParams(node_rank=1)
    with pytest.raises(ParamsError, match=r"rdzv_endpoint: must be HOST:PORT"):
        DaptParams(rdzv_endpoint="localhost")
    with pytest.raises(ParamsError, match=r"base.*device: must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        from domaintune.core.params import BaseParams

        BaseParams(device="gpu")
