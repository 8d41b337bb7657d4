"""The shared real data beside the project (../shared/data): a path, or a skip that says what is
missing. A plain module, not conftest: under a full run ``conftest`` may name
tests/hostile/conftest.py."""
from __future__ import annotations

import os

import pytest

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def shared_file(name: str) -> str:
    """``../shared/data/<name>``; skips the test when it is absent."""
    path = os.path.join(SHARED_DATA, name)
    if not os.path.exists(path):
        pytest.skip(f"needs the shared real data file {path} (../shared/data beside the project)")
    return path
