"""A missing optional package is one error naming what needs it and the install command."""

from __future__ import annotations

import sys

import pytest

from dino_fast.data.augment import MultiCropAugmentation
from dino_fast.optional import MissingDependencyError, require


def _hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    for name in modules:  # a None entry makes `import name` raise ImportError
        monkeypatch.setitem(sys.modules, name, None)


def test_missing_torchvision_names_the_pipeline_and_the_install_command(monkeypatch) -> None:
    from dino_fast.data.torchvision_pipeline import DINOTransform

    _hide(monkeypatch, "torchvision", "torchvision.transforms")
    with pytest.raises(MissingDependencyError, match=r"torchvision data pipeline .*pip install torchvision"):
        DINOTransform(MultiCropAugmentation())


def test_missing_dali_names_the_pipeline_and_the_install_command(monkeypatch) -> None:
    from dino_fast.data import dali

    _hide(monkeypatch, "nvidia", "nvidia.dali", "nvidia.dali.fn")
    with pytest.raises(MissingDependencyError, match=r"--data dali\) needs nvidia.*pip install nvidia-dali"):
        dali._import_dali()


def test_unknown_packages_get_the_plain_pip_command(monkeypatch) -> None:
    _hide(monkeypatch, "no_such_package_here")
    with pytest.raises(
        MissingDependencyError, match=r"^the demo needs no_such_package_here, .*: pip install no_such_pa"
    ):
        require("no_such_package_here.sub", "the demo")
    assert issubclass(MissingDependencyError, ImportError)  # callers catching ImportError still do
