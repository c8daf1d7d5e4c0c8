"""Champion and challenger on a real git + DVC + GTO project: publishing is not promoting; promote, reject,
each version's stage and the reason of each decision; a kill between decision and tag is completed."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from _fake_pipeline import BIN, REPO, add_rows, env, make_fake_repo, set_params, sh

from domaintune.registry import plumbing, promotion, versions
from pipelines.cli import main


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """v1.0.0 served; v2.0.0 (more data) published as a challenger."""
    root = make_fake_repo(tmp_path_factory.mktemp("promo") / "proj")
    sh(root, str(BIN / "dvc"), "repro", "-q")
    versions.publish(root, "first", stage="prod")
    add_rows(root, 5)
    sh(root, str(BIN / "dvc"), "repro", "-q")
    v2, created = versions.publish(root, "more data")
    assert created and v2.version == "v2.0.0"
    return root


def _versions_json(capsys, root) -> dict:
    assert main(["versions", "--repo", str(root), "--json"]) == 0
    return {v["tag"].split("@")[1]: v for v in json.loads(capsys.readouterr().out)}


def test_publishing_is_not_promoting_and_a_challenger_waits(repo, capsys):
    assert versions.served_version(repo) == "v1.0.0"
    assert promotion.challenger(repo) == "v2.0.0"
    listed = _versions_json(capsys, repo)
    assert listed["v1.0.0"]["stage"] == "prod" and listed["v1.0.0"]["served"]
    assert listed["v2.0.0"]["stage"] == "challenger" and not listed["v2.0.0"]["served"]
    assert listed["v2.0.0"]["reason"] == "challenger v2.0.0: published by more data"


def test_reject_then_promote_by_hand_with_reasons(repo, capsys):
    assert main(["reject", "--repo", str(repo), "--reason", "week 3 labels were shuffled"]) == 0
    assert "rejected v2.0.0: week 3 labels were shuffled; served: v1.0.0" in capsys.readouterr().out
    assert promotion.challenger(repo) is None and versions.served_version(repo) == "v1.0.0"
    assert main(["versions", "--repo", str(repo)]) == 0
    out = capsys.readouterr().out
    assert "  v2.0.0 rejected: week 3 labels were shuffled" in out
    # nothing waits now: promote without a version says so in one line, exit 2
    assert main(["promote", "--repo", str(repo)]) == 2
    assert capsys.readouterr().err.strip() == ("domaintune promote: error: no challenger waiting; name a version: "
                                               "domaintune promote vX.Y.Z")
    # a person overrules: promote a named version, v1.0.0 becomes retired
    assert main(["promote", "v2", "--repo", str(repo), "--reason", "relabelled and checked"]) == 0
    capsys.readouterr()
    listed = _versions_json(capsys, repo)
    assert (listed["v2.0.0"]["stage"], listed["v2.0.0"]["reason"]) == ("prod", "relabelled and checked")
    assert listed["v1.0.0"]["stage"] == "retired" and versions.served_version(repo) == "v2.0.0"
    # the served version cannot be rejected; promoting it again is refused too
    assert main(["reject", "v2.0.0", "--repo", str(repo)]) == 2
    assert "is the served version" in capsys.readouterr().err
    assert main(["promote", "v2.0.0", "--repo", str(repo)]) == 2
    assert "already the served version" in capsys.readouterr().err


def test_a_decision_killed_before_its_tag_is_completed_with_its_reason(tmp_path, capsys):
    root = make_fake_repo(tmp_path / "proj")
    sh(root, str(BIN / "dvc"), "repro", "-q")
    versions.publish(root, "first", stage="prod")
    set_params(root, {"finetune.epochs": 5})
    sh(root, str(BIN / "dvc"), "repro", "-q")
    versions.publish(root, "epochs 5")
    code = ("import sys; from domaintune.registry import promotion; "
            "promotion.promote(sys.argv[1], 'v1.1.0', 'better on 1,204 new rows', {'n': 1204})")
    proc = subprocess.run([sys.executable, "-c", code, str(root)], cwd=REPO, capture_output=True, text=True,
                          env={**env(), plumbing.KILL_AT_ENV: "decision"}, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
    assert versions.served_version(root) == "v1.0.0"
    assert main(["versions", "--repo", str(root)]) == 0
    out, err = capsys.readouterr()
    assert "completed an interrupted promote of domaintune@v1.1.0" in err
    assert versions.served_version(root) == "v1.1.0"
    status = promotion.status(root)["v1.1.0"]
    assert status["reason"] == "better on 1,204 new rows" and status["evidence"] == {"n": 1204}
