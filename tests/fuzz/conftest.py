"""atheris is a test tool: skip the fuzz runs where it is missing, but never in CI."""

from __future__ import annotations

import importlib.util
import os

import pytest


@pytest.fixture(scope="session")
def atheris_available() -> None:
    if importlib.util.find_spec("atheris") is not None:
        return
    reason = "atheris is not installed: .venv/bin/pip install -e '.[test]'"
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"CI must run the fuzz tests, but {reason}")
    pytest.skip(reason)
