"""Shared fixtures: tiny random models built from configs, so model tests run in seconds."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# make test runs two pytest-xdist workers on two cores: each worker (and every process a test starts) keeps to one
# BLAS/OpenMP thread, so the workers do not oversubscribe the cores. Set before torch is first imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

from _fake_pipeline import make_tiny_bert  # noqa: E402

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
import logging  # noqa: E402
import sys  # noqa: E402

from prefect.logging.configuration import setup_logging  # noqa: E402
from prefect.logging.handlers import PrefectConsoleHandler  # noqa: E402

setup_logging()


def _prefect_console_to_process_stderr() -> None:
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler) and handler.stream is not sys.__stderr__:
                handler.setStream(sys.__stderr__)
                handler.console.file = sys.__stderr__


# Under pytest-xdist (make test runs two workers) Prefect may set its handlers up again inside a test, bound
# to that test's capture stream, which is closed when the test ends: every later record would then be a
# "--- Logging error ---" traceback. Before each test, Prefect's console handlers write to the process's stderr.
_prefect_console_to_process_stderr()


@pytest.fixture(autouse=True)
def _prefect_console_on_process_stderr():
    _prefect_console_to_process_stderr()
