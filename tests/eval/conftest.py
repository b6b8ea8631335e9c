"""Fixtures the evaluation tests share."""

from __future__ import annotations

import pytest

from tests.helpers.photos import make_image_folder


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """``train/`` and ``val/`` ImageFolders: two classes of two real photos each (read only)."""
    root = tmp_path_factory.mktemp("eval_data")
    make_image_folder(root / "train", per_class=2)
    make_image_folder(root / "val", per_class=2)
    return root
