"""SIGKILL during a finetune checkpoint write, then a re-run: the same outputs as an uninterrupted run.

The real stage (`python -m stages.finetune`, the dvc.yaml command) runs in a subprocess on the tiny
BERT; a test hook (engine.STALL_ENV) holds it inside its 4th checkpoint write, after the first file
of that checkpoint is on disk, and the test kills it there with SIGKILL: no Python cleanup runs.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _fake_pipeline import REPO
from test_finetune import make_dataset, write_params


def stage(tmp_path: Path, tiny_bert: Path, data: Path, params: Path, out: str, env: dict | None = None):
    cmd = [sys.executable, "-m", "stages.finetune", "--in", str(data), "--encoder", str(tiny_bert),
           "--out", str(tmp_path / out), "--metrics", str(tmp_path / f"{out}.json"),
           "--checkpoints", str(tmp_path / f"{out}-ckpt"), "--live", str(tmp_path / f"{out}-live"),
           "--params", str(params), "--no-progress"]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sigkill_during_checkpoint_write_then_rerun_equals_uninterrupted(tmp_path, tiny_bert):
    import json

    from domaintune.train.engine import STALL_ENV

    data = make_dataset(tmp_path / "audited")
    # 36 train rows / batch 8 = 5 steps per epoch. Checkpoint writes: steps 2 and 4, end of epoch 0
    # (step 5), step 6 <- killed in this one, so the last complete checkpoint is the end of epoch 0.
    params = write_params(tmp_path / "params.yaml", method="full", epochs=2, checkpoint_every=2, head_dropout=0.2)
    straight = stage(tmp_path, tiny_bert, data, params, "straight")
    marker = tmp_path / "in-checkpoint-write"
    run = stage(tmp_path, tiny_bert, data, params, "model", {STALL_ENV: f"4:{marker}"})
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert run.poll() is None, f"finetune ended before the 4th checkpoint write: {run.stderr.read()}"
            assert time.monotonic() < deadline, "finetune never reached its 4th checkpoint write"
            time.sleep(0.05)
        os.kill(run.pid, signal.SIGKILL)
        assert run.wait(60) == -signal.SIGKILL
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert straight.wait(240) == 0, straight.stderr.read()

    # Killed mid-write: no output at all, the half-written checkpoint is a temporary beside the last one.
    for out in ("model", "model.json", "model-live"):
        assert not (tmp_path / out).exists(), out
    (key,) = [p for p in (tmp_path / "model-ckpt").iterdir() if p.is_dir()]
    last = json.loads((key / "last" / "state.json").read_text())
    assert (last["step"], last["epoch"], last["pos"]) == (5, 1, 0)
    partial = [p for p in key.iterdir() if p.name.startswith(".last.tmp-")]
    assert partial and not list(partial[0].rglob("state.json"))  # the write that was killed

    rerun = stage(tmp_path, tiny_bert, data, params, "model")
    assert rerun.wait(240) == 0, rerun.stderr.read()
    a, b = files(tmp_path / "straight"), files(tmp_path / "model")
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []  # weights, head, tokenizer, model.json: byte for byte
    ma, mb = (json.loads((tmp_path / f"{o}.json").read_text()) for o in ("straight", "model"))
    timing = ("seconds", "samples_per_s")
    strip = lambda m: {k: v for k, v in m.items() if not any(t in k for t in timing) and k != "per_seed"}  # noqa: E731
    assert strip(ma) == strip(mb) and mb["per_seed"]["0"]["steps"] == 10
    assert not list(tmp_path.rglob(".*tmp-*"))  # no temporary of the killed run is left (outputs, checkpoint)
    assert [p.name for p in (tmp_path / "model-ckpt").iterdir()] == ["README.txt"]  # finished: state cleared
