"""The prediction log: bounded by rotation, whole lines under concurrent writers, read back oldest first."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from domaintune.core.errors import DataError
from domaintune.predict.log import PredictionLog, log_files, read_records, records


def batch(start: int, n: int = 1) -> list[dict]:
    probs = np.tile([0.75, 0.25], (n, 1))
    return records([f"r{start + i}" for i in range(n)], [f"text {start + i}" for i in range(n)], "v1.0.0",
                   ["a", "b"], probs, ["a"] * n, role="served", source="serve")


def test_rotation_keeps_the_bound_and_the_newest_lines(tmp_path):
    path = tmp_path / "serve.jsonl"
    log = PredictionLog(path, max_bytes=2_000, backups=2)
    for k in range(200):
        log.write(batch(k))
    log.close()
    files = log_files(path)
    assert [f.name for f in files] == ["serve.jsonl.2", "serve.jsonl.1", "serve.jsonl"]
    assert not (tmp_path / "serve.jsonl.3").exists()
    assert all(f.stat().st_size <= 2_000 for f in files)
    ids = [rec["id"] for _, _, rec in read_records(files)]
    assert ids == [f"r{k}" for k in range(200 - len(ids), 200)]  # the newest lines, in order, none lost between
    assert 2 * 2_000 // 400 < len(ids) < 3 * 2_000 // 200
    rec = json.loads(path.read_text().splitlines()[-1])
    assert rec["probabilities"] == {"a": 0.75, "b": 0.25} and rec["confidence"] == 0.75
    assert rec["text_sha256"] and "text" not in rec  # hashed by default


def test_concurrent_writers_never_interleave(tmp_path):
    path = tmp_path / "p.jsonl"
    logs = [PredictionLog(path, text="plain"), PredictionLog(path, text="plain")]  # two writers: the flock too

    def work(t):
        for k in range(50):
            logs[t % 2].write(batch(1000 * t + 10 * k, 3))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = [rec["id"] for _, _, rec in read_records([path])]
    assert sorted(got) == sorted(f"r{1000 * t + 10 * k + i}" for t in range(6) for k in range(50) for i in range(3))


def test_a_broken_line_is_named_by_file_line_and_field(tmp_path):
    path = tmp_path / "p.jsonl"
    PredictionLog(path).write(batch(0))
    with path.open("a") as fh:
        fh.write(json.dumps({"id": "x", "version": "v1", "label": "a"}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl: row 2: field 'probabilities': missing"):
        list(read_records([path]))
