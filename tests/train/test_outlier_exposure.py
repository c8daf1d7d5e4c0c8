"""finetune.outlier_exposure: training on known out-of-scope texts (half of evaluate.abstain.oos_texts) towards
uniform, through the finetune stage's command line on the tiny random BERT."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from test_finetune import make_dataset, run_stage_cli, write_params

from domaintune.core.errors import ParamsError
from domaintune.core.io import read_json
from domaintune.core.params import parse_section
from domaintune.evaluate import abstain
from domaintune.train.classifier import OUTLIER, outlier_exposure_loss

FOREIGN = ["weather rain sunny forecast tomorrow", "play some jazz music please", "recipe for pancakes eggs flour",
           "who won the football match", "translate hello into french", "how tall is mount everest",
           "set an alarm for seven", "tell me a joke about cats", "what is the capital of peru",
           "book a table for two tonight"]


def test_loss_is_the_in_scope_loss_plus_weight_times_cross_entropy_from_uniform():
    torch.manual_seed(0)
    logits = torch.randn(5, 4, requires_grad=True)
    target = torch.tensor([0, OUTLIER, 2, OUTLIER, 3])
    base = torch.nn.functional.cross_entropy
    got = outlier_exposure_loss(base, 0.5)(logits, target)
    keep = target != OUTLIER
    want = base(logits[keep], target[keep]) - 0.5 * torch.log_softmax(logits[~keep], -1).mean()
    assert torch.allclose(got, want)
    # no outlier in the batch: exactly the in-scope loss; only outliers: the exposure term alone, log K at uniform
    assert torch.equal(outlier_exposure_loss(base, 0.5)(logits[keep], target[keep]), base(logits[keep], target[keep]))
    flat = outlier_exposure_loss(base, 2.0)(torch.zeros(3, 4), torch.full((3,), OUTLIER))
    assert math.isclose(float(flat), 2.0 * math.log(4), rel_tol=1e-6)
    # its gradient on an outlier's logits is weight * (softmax - 1/K) / outliers: it pushes towards uniform
    got.backward()
    p = torch.softmax(logits.detach()[1], -1)
    assert torch.allclose(logits.grad[1], 0.5 * (p - 0.25) / 2, atol=1e-6)


def test_params_refuse_exposure_where_it_cannot_apply():
    assert parse_section("finetune", {"outlier_exposure": 0.5}).outlier_exposure == 0.5
    for bad, msg in (({"outlier_exposure": -1}, "must be >= 0"),
                     ({"outlier_exposure": 0.5, "method": "head"}, "trains the encoder"),
                     ({"outlier_exposure": 0.5, "problem_type": "multi_label"}, "single_label")):
        with pytest.raises(ParamsError, match=msg):
            parse_section("finetune", bad)


def with_oos(params_path, tmp_path, texts=FOREIGN):
    (tmp_path / "labels" / "oos").mkdir(parents=True, exist_ok=True)
    (tmp_path / "labels" / "oos" / "known.txt").write_text("\n".join(texts) + "\n")
    p = yaml.safe_load(params_path.read_text())
    p["evaluate"] = {"abstain": {"method": "max_prob", "oos_texts": "labels/oos/known.txt"}}
    params_path.write_text(yaml.safe_dump(p))
    return params_path


def mean_max_prob(folder, texts):
    from domaintune.modeling.encoders import load_classifier, predict_logits

    model, tok, _ = load_classifier(folder)
    logits = predict_logits(model, tok, texts, max_length=32)
    return float(torch.softmax(torch.from_numpy(np.asarray(logits)), -1).max(-1).values.mean())


def test_stage_trains_the_fit_half_towards_uniform_and_records_it(tmp_path, tiny_bert, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_dataset(tmp_path / "audited")
    on = with_oos(write_params(tmp_path / "on.yaml", epochs=4, outlier_exposure=1.0), tmp_path)
    off = with_oos(write_params(tmp_path / "off.yaml", epochs=4), tmp_path)
    assert run_stage_cli(tmp_path, tiny_bert, data, on, out="on") == 0
    assert run_stage_cli(tmp_path, tiny_bert, data, off, out="off") == 0
    fit, held = abstain.split_oos(len(FOREIGN))
    rec = read_json(tmp_path / "on" / "model.json")["outlier_exposure"]
    assert rec["weight"] == 1.0 and rec["texts"] == len(fit) and "labels/oos/known.txt" in rec["source"]
    assert read_json(tmp_path / "on.json")["outlier_exposure"]["sha256"] == rec["sha256"]
    assert read_json(tmp_path / "off" / "model.json")["outlier_exposure"] is None
    # the exposed texts get a flatter answer than without exposure (3 labels: uniform is 1/3)
    exposed = [FOREIGN[i] for i in fit]
    assert mean_max_prob(tmp_path / "on", exposed) < mean_max_prob(tmp_path / "off", exposed) - 0.05
    # in-scope validation accuracy is kept
    assert read_json(tmp_path / "on.json")["val_accuracy"] >= 0.9


def test_exposure_without_oos_texts_is_one_line_and_exit_2(tmp_path, tiny_bert, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = make_dataset(tmp_path / "audited")
    params = write_params(tmp_path / "params.yaml", epochs=1, outlier_exposure=0.5)
    assert run_stage_cli(tmp_path, tiny_bert, data, params) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "evaluate.abstain.oos_texts" in err[0]
    assert not (tmp_path / "model").exists()


def test_exposure_with_a_single_oos_text_is_one_line_and_exit_2(tmp_path, tiny_bert, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = make_dataset(tmp_path / "audited")
    params = with_oos(write_params(tmp_path / "params.yaml", epochs=1, outlier_exposure=0.5), tmp_path,
                      texts=["what is the weather"])
    assert run_stage_cli(tmp_path, tiny_bert, data, params) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "labels/oos/known.txt" in err[0] and "at least 2" in err[0]
    assert not (tmp_path / "model").exists()
