"""The Fashion-MNIST demo dataset builder, on Debian's dataset-fashion-mnist files."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dino_fast.data import demo, scan_image_folder
from dino_fast.data.demo import CLASSES, DEFAULT_SOURCE, prepare_fashion_mnist, read_idx

needs_source = pytest.mark.skipif(
    not (DEFAULT_SOURCE / "train-images-idx3-ubyte.gz").is_file(),
    reason="apt-get install dataset-fashion-mnist",
)


@needs_source
def test_builds_labelled_train_and_test_folders_once(tmp_path: Path) -> None:
    root = prepare_fashion_mnist(tmp_path, max_per_class=3)
    assert root == tmp_path / "fashion_mnist-3pc"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["train"] == manifest["test"] == 30
    images = read_idx(DEFAULT_SOURCE / "train-images-idx3-ubyte.gz")
    labels = read_idx(DEFAULT_SOURCE / "train-labels-idx1-ubyte.gz")
    assert images.shape == (60000, 28, 28) and labels.shape == (60000,)
    for split in ("train", "test"):
        index = scan_image_folder(root / split)
        # Folder order is label order, so ImageFolder labels are Fashion-MNIST's.
        assert index.classes == list(CLASSES)
        assert sorted(index.labels) == sorted(list(range(10)) * 3)
    # Each JPEG is its source image (JPEG-compressed) under its true label.
    index = scan_image_folder(root / "train")
    for path, label in zip(index.paths, index.labels, strict=True):
        source = int(path.stem)
        assert labels[source] == label
        decoded = np.asarray(Image.open(path), dtype=np.float64)
        assert decoded.shape == (28, 28) and np.abs(decoded - images[source]).mean() < 4
    # A second call reuses the cache: nothing is rewritten.
    stamp = (root / "manifest.json").stat().st_mtime_ns
    assert prepare_fashion_mnist(tmp_path, max_per_class=3) == root
    assert (root / "manifest.json").stat().st_mtime_ns == stamp
    # No temporary build folders are left behind.
    assert [p.name for p in tmp_path.iterdir()] == [root.name]


def test_missing_source_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        prepare_fashion_mnist(tmp_path / "cache", source_dir=tmp_path / "nothing_here")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.fixture
def no_debian_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "DEFAULT_SOURCE", tmp_path / "not_installed")


@needs_source
def test_without_debians_copy_the_files_are_downloaded_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_debian_copy: None
) -> None:
    calls = []

    class FakeFashionMNIST:  # what torchvision's download leaves on disk, from Debian's files
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append(train)
            raw = Path(root) / "FashionMNIST" / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            for name in demo._FILES["train" if train else "test"]:
                shutil.copy(DEFAULT_SOURCE / name, raw / name)

    monkeypatch.setattr("torchvision.datasets.FashionMNIST", FakeFashionMNIST)
    root = prepare_fashion_mnist(tmp_path / "cache", max_per_class=1)
    assert sorted(calls) == [False, True]
    assert json.loads((root / "manifest.json").read_text())["train"] == 10
    assert demo.find_or_fetch_source(cache_dir=tmp_path / "cache") == (
        tmp_path / "cache" / "downloads" / "FashionMNIST" / "raw"
    )
    assert len(calls) == 2  # the second lookup found the download


def test_offline_without_debians_copy_is_one_error_naming_every_way_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_debian_copy: None
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr("torchvision.datasets.FashionMNIST", offline)
    with pytest.raises(FileNotFoundError) as caught:
        prepare_fashion_mnist(tmp_path / "cache", max_per_class=1)
    message = str(caught.value)
    for way_out in ("apt-get install dataset-fashion-mnist", "connect to the internet", "--data_path"):
        assert way_out in message
    assert "name resolution" in message and "\n" not in message


@needs_source
def test_an_interrupted_build_leaves_no_dataset(tmp_path: Path) -> None:
    # A truncated label file makes the build fail after some images were written: the
    # destination must not exist afterwards, and the temporary folder must be gone.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        shutil.copy(DEFAULT_SOURCE / name, source / name)
    # The test split is built after the train split has been written.
    with gzip.open(DEFAULT_SOURCE / "t10k-labels-idx1-ubyte.gz") as f:
        labels = f.read()
    with gzip.open(source / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(labels[:5000])
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="truncated"):
        prepare_fashion_mnist(cache, max_per_class=2, source_dir=source)
    assert list(cache.iterdir()) == []


def test_bad_subset_size_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_per_class"):
        prepare_fashion_mnist(tmp_path, max_per_class=0)
