"""Fixtures shared by the serving tests: the two tiny classifiers, trained once per session."""
from __future__ import annotations

import pytest
from test_serve import train_tiny_classifier


@pytest.fixture(scope="session")
def models(tiny_bert, tmp_path_factory):
    """Two tiny classifiers: a (temperature 1.5) and b, a different candidate (a noisy head)."""
    root = tmp_path_factory.mktemp("serve_models")
    a = train_tiny_classifier(tiny_bert, root / "a", temperature=1.5)
    b = train_tiny_classifier(tiny_bert, root / "b", temperature=1.0, noise=40.0, seed=1)
    return a, b
