"""Shared fixtures: tiny random models built from configs, so model tests run in seconds."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from _fake_pipeline import make_tiny_bert

# Tests never touch a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")  # no network: every dvc a test runs sends no analytics
# Progress lines come every 30 s when output is not a terminal: on a loaded CI box a slow step would add
# one to stderr that tests compare line by line. Tests of the progress lines set their own interval.
os.environ.setdefault("DOMAINTUNE_PROGRESS_SECONDS", "3600")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture()
def cuda_faked(monkeypatch):
    """torch reports one bf16-capable CUDA device (no kernels: tests only check the choices made)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


# Prefect: one temporary API server for the whole session (each start costs ~20 s),
# with its home in a temp folder so tests never touch ~/.prefect.
if "PREFECT_HOME" not in os.environ:
    import tempfile

    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# Prefect puts a console handler on the root logger the first time its logging is set up, bound to
# whatever sys.stderr is at that moment. Done inside a test that captures output, that stream is closed
# after the test and every later log record becomes a "--- Logging error ---" traceback on stderr. Set it
# up now, while sys.stderr is the session's own stream.
from prefect.logging.configuration import setup_logging  # noqa: E402

setup_logging()
