"""Champion and challenger on a live server (real uvicorn on 127.0.0.1, a real git + DVC + GTO repo):
`serve --shadow challenger` picks a new challenger up without a restart, `promote --from-shadow` judges it on
the logged requests and their feedback labels, and after a promotion the guard rolls a worse champion back
with no failed request."""
from __future__ import annotations

import csv
import shutil

import httpx
from _fake_pipeline import BIN, make_fake_repo, set_params, sh
from test_serve import Load, settings, wait_for

from domaintune.monitor import guard
from domaintune.registry import promotion, versions
from domaintune.serve.app import build
from domaintune.serve.shadow import read_log
from pipelines.cli import main
from pipelines.serve import ServerThread

WORDS = ["I want my money back for order {n}", "reset my password please {n}", "where is my parcel {n}",
         "refund request for invoice {n}", "package {n} has not arrived yet", "cannot log in, user {n}"]
LABELLED = [(f"g{n}", WORDS[n % len(WORDS)].format(n=n)) for n in range(36)]


def _ask(c: httpx.Client, pairs) -> dict[str, str]:
    """POST the texts under their ids; id -> the label the served model answered."""
    out = {}
    for k in range(0, len(pairs), 6):
        chunk = pairs[k:k + 6]
        r = c.post("/predict", json={"ids": [i for i, _ in chunk], "texts": [t for _, t in chunk]})
        assert r.status_code == 200, r.text
        out.update({p["id"]: p["label"] for p in r.json()["predictions"]})
    return out


def test_challenger_shadowed_live_judged_on_feedback_then_a_forced_promotion_is_rolled_back_by_the_guard(
        models, tmp_path, capsys):
    root = make_fake_repo(tmp_path / "proj", classifier=models[0])
    set_params(root, {"finetune.epochs": 3, "release.shadow_min_requests": 30, "release.guard_requests": 1000})
    sh(root, str(BIN / "dvc"), "repro", "-q")
    versions.publish(root, "first", stage="prod")
    s = settings(repo=root, shadow="challenger", guard_requests=1000, poll_s=0.2,
                 prediction_log=root / "reports" / "predictions" / "serve.jsonl")  # the CLI's default
    built = build(s)
    assert built.holder.current.version == "v1.0.0" and built.holder.shadow is None  # no challenger yet
    log = root / "reports" / "shadow" / "live.jsonl"
    with ServerThread(built.app, s) as url, httpx.Client(base_url=url, timeout=30) as c:
        # A retrain publishes a different model (the noisy head b) as a challenger: shadowed, no restart.
        shutil.rmtree(root / "fake" / "classifier")
        shutil.copytree(models[1], root / "fake" / "classifier")
        set_params(root, {"finetune.epochs": 5})
        sh(root, str(BIN / "dvc"), "repro", "-q")
        v2, _ = versions.publish(root, "noisy head")
        assert promotion.challenger(root) == v2.version == "v1.1.0"
        wait_for(lambda: (c.get("/version").json()["shadow"] or {}).get("version") == "v1.1.0",
                 what="the challenger as shadow")
        served = _ask(c, LABELLED)
        wait_for(lambda: log.exists() and len(guard.pair_rows(read_log(log), "v1.0.0", "v1.1.0")) >= 36,
                 what="the shadow log")
        rows = guard.pair_rows(read_log(log), "v1.0.0", "v1.1.0")
        disagree = sum(not r["agree"] for r in rows)
        assert disagree >= 6, f"the two tiny models must differ for this test to mean anything: {disagree}"
        # Reviewers label those requests: the champion's answers are right.
        labels = tmp_path / "labels.csv"
        with labels.open("w", newline="") as fh:
            csv.writer(fh).writerows([("id", "label"), *served.items()])
        assert main(["feedback", str(labels), "--repo", str(root)]) == 0
        capsys.readouterr()
        assert main(["promote", "--from-shadow", "--repo", str(root)]) == 0
        out = capsys.readouterr().out
        assert out.startswith("rejected v1.1.0: shadow: accuracy -") and "(feedback;" in out, out
        assert versions.served_version(root) == "v1.0.0" and promotion.status(root)["v1.1.0"]["stage"] == "rejected"
        wait_for(lambda: c.get("/version").json()["shadow"] is None, what="the rejected challenger to leave")

        # A person overrules it under load; the server swaps with no failed request, and the replaced champion
        # guards the new one (its window, 1,000 texts, outlasts this first burst).
        with Load(url) as first:
            wait_for(lambda: sum(map(len, first.seen)) >= 10, what="responses before the promotion")
            assert main(["promote", "v1.1.0", "--repo", str(root), "--reason", "looks fine to me"]) == 0
            wait_for(lambda: c.get("/version").json()["version"] == "v1.1.0", what="the promotion")
            n = sum(map(len, first.seen))
            wait_for(lambda: sum(map(len, first.seen)) >= n + 10, what="responses after the promotion")
        assert first.failures == [] and {v for seen in first.seen for v, _, _ in seen} == {"v1.0.0", "v1.1.0"}
        assert built.holder.guard is not None and built.holder.guard["previous"] == "v1.0.0"
        assert not built.holder.guard_due()
        _ask(c, LABELLED)  # the labelled requests again, now answered by v1.1.0 with v1.0.0 beside it
        with Load(url) as load:
            wait_for(lambda: built.holder.guard_result is not None, timeout=120, what="the guard's verdict")
            wait_for(lambda: c.get("/version").json()["version"] == "v1.0.0", what="the swap back")
            n = sum(map(len, load.seen))
            wait_for(lambda: sum(map(len, load.seen)) >= n + 10, what="responses after the rollback")
    assert load.failures == []
    verdict = built.holder.guard_result
    assert verdict["worse"] and verdict["basis"] == "feedback" and verdict["labelled"] >= 36
    assert verdict["action"] == "rolled back to v1.0.0; v1.1.0 rejected"
    assert versions.served_version(root) == "v1.0.0"
    st = promotion.status(root)["v1.1.0"]
    assert st["stage"] == "rejected" and st["reason"].startswith("guard: worse than v1.0.0 on live traffic")
    assert st["evidence"]["guard"]["high"] < -0.005
