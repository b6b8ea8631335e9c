"""Image folders: discovery, validation, decoding, and the evaluation dataset.

Layouts (``scan_image_folder``):
- class subfolders, like torchvision's ImageFolder: every subdirectory of ``root`` is a class
  (sorted names, labels 0..C-1, images found recursively inside it); a class folder without
  images keeps its label, so train/val splits with the same folders get the same labels;
- a flat folder of images: one class, label 0, named after the folder.
Files are images by extension (torchvision's list: .jpg .jpeg .png .ppm .bmp .pgm .tif .tiff
.webp, any case); hidden files and other extensions are ignored. Links are followed, but never
into a folder already scanned (a link loop, or two names for one folder), so every image is
listed once; such links are skipped, counted and named in one warning.

Bad input policy (shared by the DALI and torchvision pipelines):
- a missing root, a root that is not a directory, or a folder without images: an error that
  names the path (and, for an empty folder, the extensions that count);
- unreadable files are found before training by ``check_images`` and left out of the
  dataset, with one warning listing the first few and the reason for each. The default
  ``"header"`` check reads the file signature and header (size, mode) and, for JPEG and PNG,
  whether the file ends like one (EOI marker / IEND chunk): empty files, text or other
  non-images named .jpg, truncated downloads, and decompression bombs (a header declaring
  more pixels than PIL's ``Image.MAX_IMAGE_PIXELS``) are caught this way for ~50 us per file;
  a file that fails only the end check is fully decoded before it is rejected. ``"full"``
  decodes every file (~2 ms per 500x375 JPEG per thread);
- a file that passes the check but fails to decode during training is replaced by the next
  usable image of the dataset and counted; the loaders log the count once per epoch. Neither
  case stops an epoch or hangs it;
- grayscale, palette, alpha, CMYK and 16-bit images are converted to 8-bit RGB (16-bit values
  are scaled by 1/257, where PIL's own convert("RGB") would saturate them);
- images smaller than a crop are fine: RandomResizedCrop upsamples.
EXIF orientation is ignored, as torchvision's default loader ignores it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dino_fast.data.augment import IMAGENET_MEAN, IMAGENET_STD
from dino_fast.optional import require

logger = logging.getLogger("dino_fast.data")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Leading bytes of the formats the extensions above may hold.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"P1", "PNM"),
    (b"P2", "PNM"),
    (b"P3", "PNM"),
    (b"P4", "PNM"),
    (b"P5", "PNM"),
    (b"P6", "PNM"),
)


@dataclass(frozen=True)
class ImageFolderIndex:
    """The images of a folder: parallel lists of paths and labels, and the class names."""

    root: Path
    paths: list[Path]
    labels: list[int]
    classes: list[str]
    skipped_links: list[Path] = field(default_factory=list)  # folder links not followed (module doc)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, keep: Sequence[int]) -> ImageFolderIndex:
        """The same folder restricted to the given positions (classes unchanged)."""
        return replace(self, paths=[self.paths[i] for i in keep], labels=[self.labels[i] for i in keep])


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _folder_identity(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_dev, info.st_ino


def _images_under(directory: Path, scanned: set[tuple[int, int]], skipped: list[Path]) -> list[Path]:
    """Images below ``directory``, following links but never into a folder already in ``scanned``.

    A link back up the tree (a loop) or to a folder seen elsewhere would list the same images
    again; such links are appended to ``skipped`` instead.
    """
    found: list[Path] = []
    if _folder_identity(directory) in scanned:
        skipped.append(directory)
        return found
    scanned.add(_folder_identity(directory))
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        kept = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            sub = Path(dirpath) / name
            try:
                identity = _folder_identity(sub)
            except OSError:  # gone since os.walk listed it
                skipped.append(sub)
                continue
            if identity in scanned:
                skipped.append(sub)
            else:
                scanned.add(identity)
                kept.append(name)
        dirnames[:] = kept
        found += [Path(dirpath) / f for f in sorted(filenames) if _is_image_file(f)]
    return found


def scan_image_folder(root: str | os.PathLike[str]) -> ImageFolderIndex:
    """Index a class-subfolder root (ImageFolder layout) or a flat folder of images."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist (pass the dataset root, e.g. .../train)")
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {root} is not a directory")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    class_dirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    paths: list[Path] = []
    labels: list[int] = []
    scanned: set[tuple[int, int]] = {_folder_identity(root)}
    skipped_links: list[Path] = []
    if class_dirs:
        empty = []
        for label, name in enumerate(class_dirs):
            found = _images_under(root / name, scanned, skipped_links)
            if not found:
                empty.append(name)
            paths += found
            labels += [label] * len(found)
        if paths and empty:
            logger.warning(
                "%s: %d class folder(s) hold no images (%s); their labels are kept",
                root,
                len(empty),
                ", ".join(empty[:5]),
            )
        loose = [e.name for e in entries if e.is_file() and _is_image_file(e.name)]
        if paths and loose:
            logger.warning("%s: ignoring %d image(s) beside the class folders", root, len(loose))
        classes = class_dirs
    if not paths:
        flat = [root / e.name for e in entries if e.is_file() and _is_image_file(e.name)]
        paths, labels, classes = flat, [0] * len(flat), [root.name]
    if not paths:
        raise ValueError(
            f"no images found under {root}: expected class subfolders or files with one of the "
            f"extensions {', '.join(IMG_EXTENSIONS)}"
        )
    if skipped_links:
        logger.warning(
            "%s: %d linked folder(s) skipped: each leads to a folder already scanned, or nowhere (%s%s)",
            root,
            len(skipped_links),
            ", ".join(str(p) for p in skipped_links[:5]),
            " ..." if len(skipped_links) > 5 else "",
        )
    return ImageFolderIndex(
        root=root, paths=paths, labels=labels, classes=classes, skipped_links=skipped_links
    )


class UnusableImageError(ValueError):
    """A file that is not a decodable image; the message says why."""


# What opening or decoding a bad file raises: PIL's errors (UnidentifiedImageError is an
# OSError), truncated or malformed data, and PIL's guard against decompression bombs.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _decode_check(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            im.load()
            width, height = im.size
    except DECODE_ERRORS as err:
        raise UnusableImageError(f"does not decode ({type(err).__name__}: {err})") from err
    return height, width


def inspect_image(path: str | os.PathLike[str], mode: str = "header") -> tuple[int, int]:
    """``(height, width)`` of a usable image file; ``UnusableImageError`` says why it is not.

    ``mode="header"``: signature, header and end-of-file checks (module doc); ``"full"``: decode.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            raise UnusableImageError("empty file")
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - 64))
            tail = f.read()
    except OSError as err:
        raise UnusableImageError(f"cannot be read ({err.strerror or err})") from err
    kind = next((name for sig, name in _SIGNATURES if head.startswith(sig)), None)
    if kind is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        kind = "WEBP"
    if kind is None:
        raise UnusableImageError(f"not an image (unrecognized signature {head[:8]!r})")
    if mode == "full":
        return _decode_check(path)
    if mode != "header":
        raise ValueError(f"check mode must be 'header' or 'full', got {mode!r}")
    try:
        with Image.open(path) as im:
            width, height = im.size
    except Image.DecompressionBombError as err:
        raise UnusableImageError(f"decompression bomb: {err}") from err
    except DECODE_ERRORS as err:
        raise UnusableImageError(f"unreadable {kind} header ({type(err).__name__}: {err})") from err
    if width < 1 or height < 1:
        raise UnusableImageError(f"{kind} header declares a {width}x{height} image")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        # PIL only warns up to twice its limit, and decoding such a file can take gigabytes.
        raise UnusableImageError(
            f"decompression bomb: the {kind} header declares {width}x{height} = {width * height:,} pixels, "
            f"over PIL's limit of {limit:,} (raise PIL.Image.MAX_IMAGE_PIXELS to accept such images)"
        )
    # Cameras pad JPEGs with zeros after the end marker; a missing marker usually means a
    # truncated file, but since other trailers exist, decode before rejecting.
    ends_well = {"JPEG": b"\xff\xd9" in tail.rstrip(b"\x00"), "PNG": b"IEND" in tail}.get(kind, True)
    if not ends_well:
        return _decode_check(path)
    return height, width


@dataclass(frozen=True)
class CheckedImages:
    """Result of ``check_images``: the usable images, their sizes, and what was left out."""

    index: ImageFolderIndex
    sizes: np.ndarray  # (N, 2) int64 (height, width) as stored, EXIF orientation ignored
    rejected: list[tuple[Path, str]]


def check_images(
    index: ImageFolderIndex, *, mode: str = "header", num_threads: int | None = None
) -> CheckedImages:
    """Find the unusable files of ``index`` (see the module doc) and return the usable rest.

    Logs one warning naming the first rejected files; raises when nothing usable is left.
    """
    if mode not in ("header", "full"):
        raise ValueError(f"check mode must be 'header' or 'full', got {mode!r}")
    num_threads = num_threads or min(32, 4 * (os.cpu_count() or 1))

    def one(path: Path) -> tuple[int, int] | str:
        try:
            return inspect_image(path, mode)
        except UnusableImageError as err:
            return str(err)

    if len(index.paths) < 64 or num_threads == 1:
        results = [one(p) for p in index.paths]
    else:
        with ThreadPoolExecutor(max_workers=num_threads) as pool:
            results = list(pool.map(one, index.paths, chunksize=64))
    keep = [i for i, r in enumerate(results) if not isinstance(r, str)]
    rejected = [(index.paths[i], r) for i, r in enumerate(results) if isinstance(r, str)]
    if rejected:
        shown = "; ".join(f"{p}: {why}" for p, why in rejected[:5])
        logger.warning(
            "%s: %d of %d files are not usable images and are skipped (%s%s)",
            index.root,
            len(rejected),
            len(index.paths),
            shown,
            " ..." if len(rejected) > 5 else "",
        )
    if not keep:
        raise ValueError(f"none of the {len(index.paths)} image files under {index.root} can be decoded")
    sizes = np.array([results[i] for i in keep], dtype=np.int64).reshape(-1, 2)
    return CheckedImages(index=index.subset(keep), sizes=sizes, rejected=rejected)


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image file to an 8-bit RGB PIL image (the module doc lists the conversions)."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            # 16-bit grayscale: PIL's convert("L") clamps at 255 instead of rescaling.
            scale = 257.0 if im.mode.startswith("I;16") or np.asarray(im).max() > 255 else 1.0
            gray = np.clip(np.asarray(im, dtype=np.float64) / scale + 0.5, 0, 255).astype(np.uint8)
            return Image.fromarray(gray, mode="L").convert("RGB")
        return im.convert("RGB")


def eval_transform(
    image_size: int = 224,
    resize_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """The official DINO evaluation transform: Resize(256 for 224, bicubic), CenterCrop, Normalize.

    ``resize_size`` defaults to ``round(image_size * 256 / 224)``: the 256/224 ratio of the
    official k-NN and linear evaluation, kept for other crop sizes.
    """
    transforms = require("torchvision.transforms", "the evaluation transform")
    resize_size = resize_size or round(image_size * 256 / 224)
    return transforms.Compose(
        [
            transforms.Resize(resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


class EvalImageDataset(torch.utils.data.Dataset):
    """``(normalized (3, S, S) float32 tensor, label)`` pairs with the official eval transform.

    Usable with a plain ``torch.utils.data.DataLoader``. Files are decoded as they are read;
    build it with ``from_folder(root)`` (which runs ``check_images`` first) to leave unusable
    files out instead of failing on them.
    """

    def __init__(
        self,
        index: ImageFolderIndex,
        image_size: int = 224,
        resize_size: int | None = None,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
    ) -> None:
        self.index = index
        self.transform = transform or eval_transform(image_size, resize_size)

    @classmethod
    def from_folder(
        cls, root: str | os.PathLike[str], image_size: int = 224, *, check: str = "header", **kwargs: object
    ) -> EvalImageDataset:
        checked = check_images(scan_image_folder(root), mode=check)
        return cls(checked.index, image_size, **kwargs)

    @property
    def classes(self) -> list[str]:
        return self.index.classes

    @property
    def targets(self) -> list[int]:
        return self.index.labels

    def __len__(self) -> int:
        return len(self.index.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.index.paths[i]
        try:
            image = load_rgb(path)
        except DECODE_ERRORS as err:
            raise UnusableImageError(
                f"{path} does not decode ({err}); build the dataset with EvalImageDataset.from_folder "
                "to skip unusable files"
            ) from err
        return self.transform(image), self.index.labels[i]
