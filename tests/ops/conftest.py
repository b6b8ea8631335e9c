"""Fixtures of the op tests."""

from __future__ import annotations

import pytest

from dino_fast.ops.backends import BACKENDS


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Every backend of an op in turn (without a GPU, triton runs under the interpreter that
    tests/conftest.py switches on). A test that takes only some parametrizes ``backend`` itself."""
    return request.param
