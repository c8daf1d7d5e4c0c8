"""core.device.inference_threads: the one inference pool size, from the CPU affinity capped by the cgroup quota.

The reader functions are faked (never the OS); torch and onnxruntime both take the number."""
from __future__ import annotations

import pytest

from domaintune.core import device


@pytest.mark.parametrize(("cores", "cpu_max", "threads"), [
    (8, None, 8),                   # no cgroup quota: the affinity
    (8, "max 100000\n", 8),         # cgroup v2, unlimited
    (8, "200000 100000\n", 2),      # a 2-CPU container on an 8-core affinity
    (8, "150000 100000\n", 1),      # 1.5 CPUs: rounded down (a thread past the quota is throttled)
    (8, "50000 100000\n", 1),       # under one CPU: still one thread
    (2, "400000 100000\n", 2),      # taskset to 2 cores inside a 4-CPU quota
    (4, "garbage", 4),              # unreadable: ignored
])
def test_threads_are_the_affinity_capped_by_the_cgroup_quota(monkeypatch, cores, cpu_max, threads):
    monkeypatch.setattr(device, "_affinity_cores", lambda: cores)
    monkeypatch.setattr(device, "_cpu_quota", lambda: cpu_max)
    assert device.inference_threads() == threads


def test_the_quota_is_read_from_cgroup_v2_or_v1(monkeypatch, tmp_path):
    monkeypatch.setattr(device, "CGROUP", tmp_path)
    assert device._cpu_quota() is None
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert device.quota_cores(device._cpu_quota()) == 3  # v1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert device.quota_cores(device._cpu_quota()) is None  # v1 unlimited
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert device.quota_cores(device._cpu_quota()) == 1  # v2 wins


def test_torch_takes_the_same_thread_count(monkeypatch):
    import torch

    from domaintune.export.artifacts import thread_count
    from domaintune.modeling.encoders import set_threads

    before = torch.get_num_threads()
    monkeypatch.setattr(device, "_affinity_cores", lambda: 8)
    monkeypatch.setattr(device, "_cpu_quota", lambda: "100000 100000")
    try:
        set_threads()
        assert torch.get_num_threads() == 1 == thread_count()
    finally:
        torch.set_num_threads(before)
