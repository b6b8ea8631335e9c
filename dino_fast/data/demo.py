"""The demo dataset: Fashion-MNIST as an ImageFolder of JPEGs, built once into a cache folder.

Source: the four IDX files (gzip) of 60,000 training and 10,000 test images, 28x28 grayscale,
labels 0-9, found in this order: a ``source_dir`` given by the caller; Debian's
``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``, files under
/usr/share/datasets/fashion-mnist); an earlier download in the cache; a download through
torchvision's ``FashionMNIST`` when online. The result:

    <cache_dir>/fashion_mnist[-<max_per_class>pc]/
        train/0-tshirt_top/00000.jpg ...   test/9-ankle_boot/...   manifest.json

Class folders are prefixed with their label so that the sorted folder order (the label
order of ImageFolder and ``scan_image_folder``) is Fashion-MNIST's. ``max_per_class`` keeps the
first N images of each class of each split (a CPU demo needs a few thousand, not 70,000).
The build is atomic: it writes into a temporary folder beside the destination and renames
it into place, so an interrupted build leaves no half dataset and concurrent builders agree.

    python -m dino_fast.data.demo --max_per_class 300   # prints the dataset root
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "0-tshirt_top",
    "1-trouser",
    "2-pullover",
    "3-dress",
    "4-coat",
    "5-sandal",
    "6-shirt",
    "7-sneaker",
    "8-bag",
    "9-ankle_boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049


def default_cache_dir() -> Path:
    """``$DINO_FAST_CACHE`` or ~/.cache/dino_fast."""
    return Path(os.environ.get("DINO_FAST_CACHE", "~/.cache/dino_fast")).expanduser()


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzip): uint8 images (n, rows, cols) or labels (n,)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic, count = np.frombuffer(data[:8], dtype=">u4")
    if magic == _IMAGE_MAGIC:
        rows, cols = np.frombuffer(data[8:16], dtype=">u4")
        array = np.frombuffer(data, dtype=np.uint8, offset=16)
        shape: tuple[int, ...] = (int(count), int(rows), int(cols))
    elif magic == _LABEL_MAGIC:
        array = np.frombuffer(data, dtype=np.uint8, offset=8)
        shape = (int(count),)
    else:
        raise ValueError(f"{path} is not an IDX image or label file (magic number {magic})")
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, file holds {array.size} values")
    return array.reshape(shape)


def _missing(source_dir: Path) -> list[Path]:
    return [
        source_dir / name for pair in _FILES.values() for name in pair if not (source_dir / name).is_file()
    ]


def _download(cache_dir: Path) -> Path:
    """Fetch the IDX files with torchvision (which checks their MD5 sums); return their folder."""
    raw = cache_dir / "downloads" / "FashionMNIST" / "raw"
    if not _missing(raw):
        return raw
    try:
        from torchvision.datasets import FashionMNIST
    except ImportError as err:
        raise FileNotFoundError(
            f"it cannot be downloaded either: torchvision is not installed ({err})"
        ) from err
    try:
        FashionMNIST(str(cache_dir / "downloads"), train=True, download=True)
        FashionMNIST(str(cache_dir / "downloads"), train=False, download=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a failed checksum a RuntimeError
        raise FileNotFoundError(f"downloading it failed ({err})") from err
    return raw


def find_or_fetch_source(
    source_dir: str | os.PathLike[str] | None = None, cache_dir: Path | None = None
) -> Path:
    """The folder holding the four IDX .gz files, in the order the module doc gives."""
    if source_dir is not None:
        source_dir = Path(source_dir).expanduser()
        if missing := _missing(source_dir):
            raise FileNotFoundError(
                f"Fashion-MNIST files are missing in {source_dir} ({', '.join(p.name for p in missing)}): "
                "pass a folder holding the four IDX .gz files, or install Debian's copy with "
                "`apt-get install dataset-fashion-mnist`"
            )
        return source_dir
    if not _missing(DEFAULT_SOURCE):
        return DEFAULT_SOURCE
    try:
        return _download(cache_dir or default_cache_dir())
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"Fashion-MNIST is not installed in {DEFAULT_SOURCE} and {err}. Install it with "
            "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or connect to the internet "
            "and install torchvision, or train on your own images with --data_path"
        ) from None


def prepare_fashion_mnist(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    max_per_class: int | None = None,
    source_dir: str | os.PathLike[str] | None = None,
    quality: int = 95,
) -> Path:
    """Build (once) and return the root holding ``train/`` and ``test/`` class folders.

    ``source_dir=None`` finds or fetches the IDX files as the module doc says.
    """
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1 or None (all images), got {max_per_class}")
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = "fashion_mnist" if max_per_class is None else f"fashion_mnist-{max_per_class}pc"
    root = cache_dir / name
    if (root / "manifest.json").is_file():
        return root
    source_dir = find_or_fetch_source(source_dir, cache_dir)
    files = {split: (source_dir / img, source_dir / lab) for split, (img, lab) in _FILES.items()}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir))
    try:
        counts: dict[str, int] = {}
        for split, (image_file, label_file) in files.items():
            images, labels = read_idx(image_file), read_idx(label_file)
            if len(images) != len(labels):
                raise ValueError(
                    f"{image_file} holds {len(images)} images but {label_file} {len(labels)} labels"
                )
            counts[split] = 0
            for label, class_name in enumerate(CLASSES):
                folder = tmp / split / class_name
                folder.mkdir(parents=True)
                chosen = np.flatnonzero(labels == label)[:max_per_class]
                for i in chosen.tolist():
                    Image.fromarray(images[i], mode="L").save(folder / f"{i:05d}.jpg", quality=quality)
                counts[split] += len(chosen)
        manifest = {"source": str(source_dir), "max_per_class": max_per_class, "classes": CLASSES, **counts}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            os.rename(tmp, root)
        except OSError:
            # Someone else finished first (the destination exists and is not empty): use theirs.
            if not (root / "manifest.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Build the Fashion-MNIST demo ImageFolder and print its root"
    )
    parser.add_argument("--cache_dir", default=None, help="default: $DINO_FAST_CACHE or ~/.cache/dino_fast")
    parser.add_argument("--max_per_class", type=int, default=None, help="images per class and split")
    parser.add_argument("--source_dir", default=None, help="default: Debian's copy, else a download")
    args = parser.parse_args(argv)
    root = prepare_fashion_mnist(args.cache_dir, max_per_class=args.max_per_class, source_dir=args.source_dir)
    print(root)


if __name__ == "__main__":
    main()
