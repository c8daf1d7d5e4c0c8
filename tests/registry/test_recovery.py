"""A publish killed between its GTO tag and the prod assignment (a real process, SIGKILLed at that point by
plumbing.fault_point) is completed by the next `domaintune versions`, which says so in one line; while a
retrain or rollback holds the lock, `versions` leaves its journal alone. (Kills of the whole `domaintune
retrain` and `rollback` commands: tests/pipelines/test_retrain_kill.py.)"""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from _fake_pipeline import BIN, REPO, env, held_lock, make_fake_repo, set_params, sh

from domaintune.registry import plumbing, versions
from pipelines.cli import main


@pytest.fixture()
def killed_publish(tmp_path):
    """v1.0.0 served; v1.1.0 registered by a publish SIGKILLed before its prod assignment. (A fixture, so
    DVC, which publish imports, sets its logging up before capsys swaps stderr for a stream it closes.)"""
    root = make_fake_repo(tmp_path / "proj")
    sh(root, str(BIN / "dvc"), "repro", "-q")
    versions.publish(root, "first", stage="prod")
    set_params(root, {"finetune.epochs": 5})
    sh(root, str(BIN / "dvc"), "repro", "-q")
    code = "import sys; from domaintune.registry import versions; versions.publish(sys.argv[1], 'epochs 5', stage='prod')"
    proc = subprocess.run([sys.executable, "-c", code, str(root)], cwd=REPO, capture_output=True, text=True,
                          env={**env(), plumbing.KILL_AT_ENV: "registered"}, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
    assert "domaintune@v1.1.0" in sh(root, "git", "tag").split() and versions.served_version(root) == "v1.0.0"
    return root


def test_publish_killed_after_the_tag_is_completed_by_versions(killed_publish, capsys):
    root = killed_publish

    with held_lock(root):  # a running retrain's journal is its own: listed as it is, nothing assigned
        assert main(["versions", "--repo", str(root)]) == 0
        out, err = capsys.readouterr()
        assert "domaintune versions:" not in err and versions.served_version(root) == "v1.0.0"

    assert main(["versions", "--repo", str(root)]) == 0
    out, err = capsys.readouterr()
    served = [ln.split()[1] for ln in out.splitlines() if ln.startswith("*") and ln.split()[1] != "="]
    assert served == ["v1.1.0"] and versions.served_version(root) == "v1.1.0"
    assert err.splitlines() == ["domaintune versions: completed an interrupted publish of domaintune@v1.1.0: it was "
                                "registered, not in stage prod; assigned v1.1.0 to stage prod, now served"]
    assert not (root / plumbing.JOURNAL_PATH).exists()
    assert main(["versions", "--repo", str(root)]) == 0  # done: the next run has nothing to say
    assert capsys.readouterr().err == ""
