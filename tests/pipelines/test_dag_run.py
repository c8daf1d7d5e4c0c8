"""Code tests of pipelines.retrain.DagRun: ONE real `dvc repro` process over the fake git + DVC project,
its output cut into one segment per stage (what each Prefect stage task logs and reports)."""
from __future__ import annotations

import pytest
from _fake_pipeline import add_rows, make_fake_repo, set_params, sh


@pytest.fixture()
def proj(tmp_path):
    return make_fake_repo(tmp_path / "proj")


def _follow_all(run, shown=None):
    out = {}
    for stage in run.stages:
        got = run.follow(stage, (shown.append if shown is not None else lambda line: None))
        out[stage] = got
    return out


def test_one_process_runs_every_stage_and_each_gets_its_own_lines(proj):
    from pipelines.retrain import DagRun, stage_order

    order = stage_order(proj)
    assert order == ["audit", "train"]
    run = DagRun(proj, order)
    shown = []
    try:
        got = _follow_all(run, shown)
    finally:
        run.close()
    assert run.rc == 0 and set(run.segments) == {"audit", "train"}
    # DVC's "Use `dvc push`" hint is in the stage's lines but not in the retrain's log (it pushes itself)
    hint = "Use `dvc push` to send your updates to remote storage."
    assert hint in [ln.strip() for lines, _, _ in got.values() for ln in lines] and shown
    assert hint not in [ln.strip() for ln in shown]
    audit, train = got["audit"], got["train"]
    assert audit[2] == 0 and train[2] == 0 and audit[1] > 0 and train[1] > 0
    assert any("Running stage 'audit'" in ln for ln in audit[0]) and not any("'train'" in ln for ln in audit[0])
    assert any("Running stage 'train'" in ln for ln in train[0]) and any("fake/train.py" in ln for ln in train[0])
    assert run.follow("audit", print) is None  # taken: a retry of it runs --single-item
    assert run.token not in DagRun._live

    again = DagRun(proj, order)  # nothing changed: both segments say DVC skipped them
    try:
        got = _follow_all(again)
    finally:
        again.close()
    assert all(any("didn't change, skipping" in ln for ln in lines) for lines, _, _ in got.values())


def test_a_failing_stage_gets_the_exit_and_later_stages_are_not_reached(proj):
    from pipelines.retrain import DagRun

    add_rows(proj, 2)
    set_params(proj, {"finetune.epochs": 13})  # the fake train stage exits 2 on 13
    run = DagRun(proj, ["audit", "train"])
    try:
        audit = run.follow("audit", lambda line: None)
        train = run.follow("train", lambda line: None)
    finally:
        run.close()
    assert audit[2] == 0
    assert train[2] != 0 and any("exited with 2" in ln for ln in train[0])
    sh(proj, "git", "checkout", "--", "params.yaml")


def test_a_stage_the_process_never_reaches_falls_back(proj):
    from pipelines.retrain import DagRun

    run = DagRun(proj, ["audit"])  # the process runs audit only
    try:
        assert run.follow("train", lambda line: None) is None
        assert run.rc == 0 and list(run.segments) == ["audit"]
    finally:
        run.close()


def test_close_stops_dvc_and_the_stage_it_is_running(proj, tmp_path):
    """A flow that fails or is cancelled mid-stage leaves no dvc and no stage command running."""
    import os
    import time

    from pipelines.retrain import DagRun

    (proj / "fake" / "audit.py").write_text("import time\nopen('STARTED', 'w').close()\ntime.sleep(600)\n")
    run = DagRun(proj, ["audit"])
    deadline = time.monotonic() + 120
    while not (proj / "STARTED").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (proj / "STARTED").exists(), "the stage never started"
    pgid = run.proc.pid
    run.close()
    assert run.proc.poll() is not None
    with pytest.raises(ProcessLookupError):  # nothing is left in dvc's process group
        for _ in range(50):
            os.killpg(pgid, 0)
            time.sleep(0.1)
