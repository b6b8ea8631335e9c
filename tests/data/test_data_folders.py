"""Folder discovery, the image check (bad-input policy), decoding, and the eval dataset."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from dino_fast.data.folders import (
    EvalImageDataset,
    UnusableImageError,
    check_images,
    inspect_image,
    load_rgb,
    scan_image_folder,
)
from tests.helpers.images import write_bad_files
from tests.helpers.photos import photo_paths


def test_class_folders_get_sorted_labels_and_recursive_images(tmp_path: Path) -> None:
    photos = photo_paths()
    for cls, photo in [("b_dog", photos[0]), ("a_cat", photos[1]), ("a_cat", photos[2])]:
        (tmp_path / cls / "nested").mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, tmp_path / cls / "nested" / photo.name.upper())  # extension case ignored
    (tmp_path / "c_empty").mkdir()
    (tmp_path / "a_cat" / ".hidden.jpg").write_bytes(photos[3].read_bytes())
    (tmp_path / "a_cat" / "labels.csv").write_text("not an image")
    index = scan_image_folder(tmp_path)
    # The empty class keeps its label slot, so splits with the same folders agree on labels.
    assert index.classes == ["a_cat", "b_dog", "c_empty"]
    assert index.labels == [0, 0, 1]
    assert all(p.parent.name == "nested" for p in index.paths)
    assert index.root == tmp_path


def test_flat_folder_is_one_class(tmp_path: Path) -> None:
    for photo in photo_paths()[:3]:
        shutil.copy(photo, tmp_path)
    index = scan_image_folder(tmp_path)
    assert len(index) == 3 and set(index.labels) == {0} and index.classes == [tmp_path.name]
    assert index.paths == sorted(index.paths)


def test_missing_and_empty_roots_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        scan_image_folder(missing)
    (tmp_path / "file.jpg").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match=r"file\.jpg"):
        scan_image_folder(tmp_path / "file.jpg")
    empty = tmp_path / "empty"
    (empty / "class_a").mkdir(parents=True)
    (empty / "class_a" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=rf"no images found under {empty}.*\.jpg"):
        scan_image_folder(empty)


def test_check_images_skips_bad_files_and_keeps_awkward_ones(tmp_path: Path, caplog) -> None:
    cases = write_bad_files(tmp_path / "mixed", photo_paths()[0])
    index = scan_image_folder(tmp_path / "mixed")
    assert {p.name for p in index.paths} == set(cases)  # README.txt is not an image
    with caplog.at_level(logging.WARNING, logger="dino_fast.data"):
        checked = check_images(index)
    kept = {p.name for p in checked.index.paths}
    assert kept == {name for name, what in cases.items() if what == "keep"}
    reasons = {p.name: why for p, why in checked.rejected}
    assert reasons["empty.jpeg"] == "empty file"
    assert "not an image" in reasons["notes.jpg"]
    assert "does not decode" in reasons["truncated.jpg"]
    # One warning, naming the count.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "3 of 8 files" in warnings[0].getMessage()
    sizes = dict(zip((p.name for p in checked.index.paths), checked.sizes.tolist(), strict=True))
    assert sizes["tiny.jpg"] == [20, 20]
    assert sizes["cmyk.jpg"] == [512, 512]


def test_full_check_catches_corrupt_data_behind_a_valid_header(tmp_path: Path) -> None:
    # Garbage in the middle of the entropy-coded data, header and end marker intact: the
    # cheap check passes it; decoding does not.
    data = bytearray(next(p for p in photo_paths() if p.name == "puppy.jpg").read_bytes())
    start = len(data) // 3
    data[start : start + 2000] = bytes((b * 7 + 13) & 255 for b in data[start : start + 2000])
    path = tmp_path / "garbage.jpg"
    path.write_bytes(bytes(data))
    assert inspect_image(path, "header") == (512, 640)
    with pytest.raises(UnusableImageError, match="does not decode"):
        inspect_image(path, "full")


def test_jpeg_with_zero_padding_after_the_end_marker_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "padded.jpg"
    path.write_bytes(photo_paths()[0].read_bytes() + b"\x00" * 100)
    assert inspect_image(path) == (512, 512)


def test_everything_bad_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_text("text")
    with pytest.raises(ValueError, match=f"none of the 1 image files under {tmp_path}"):
        check_images(scan_image_folder(tmp_path))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16"])
def test_load_rgb_converts_every_mode_to_8bit_rgb(tmp_path: Path, mode: str) -> None:
    rgb = Image.open(photo_paths()[3]).convert("RGB").resize((64, 48))
    gray = np.asarray(rgb.convert("L"))
    if mode == "I;16":
        image = Image.fromarray(gray.astype(np.uint16) * 257)
        path = tmp_path / "x16.png"
    else:
        image = rgb.convert(mode)
        path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (64, 48)
    if mode == "I;16":
        # 16-bit values are rescaled, not saturated as PIL's convert("RGB") would.
        np.testing.assert_array_equal(np.asarray(out)[..., 0], gray)


def test_eval_dataset_is_the_official_eval_transform(tmp_path: Path) -> None:
    for i, photo in enumerate(photo_paths()[:4]):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        shutil.copy(photo, tmp_path / f"c{i % 2}")
    (tmp_path / "c1" / "broken.jpg").write_text("nope")
    dataset = EvalImageDataset.from_folder(tmp_path, image_size=224)
    assert len(dataset) == 4 and dataset.classes == ["c0", "c1"] and sorted(dataset.targets) == [0, 0, 1, 1]
    official = transforms.Compose(
        [
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    image, label = dataset[0]
    expected = official(Image.open(dataset.index.paths[0]).convert("RGB"))
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32
    torch.testing.assert_close(image, expected)
    assert label == dataset.index.labels[0]
    batch, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch.shape == (4, 3, 224, 224) and labels.tolist() == dataset.targets
    # Other sizes keep the 256/224 ratio.
    small = EvalImageDataset(dataset.index, image_size=112)
    assert small[1][0].shape == (3, 112, 112)


def test_eval_dataset_without_check_names_the_broken_file(tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").write_text("nope")
    dataset = EvalImageDataset(scan_image_folder(tmp_path))
    with pytest.raises(UnusableImageError, match=r"broken\.jpg.*from_folder"):
        dataset[0]


def test_link_loops_and_second_names_for_a_folder_are_scanned_once(tmp_path: Path, caplog) -> None:
    photos = photo_paths()[:8]
    (tmp_path / "cats" / "deeper").mkdir(parents=True)
    for i, photo in enumerate(photos):
        shutil.copy(photo, tmp_path / "cats" / ("deeper" if i % 2 else ".") / photo.name)
    (tmp_path / "cats" / "deeper" / "up").symlink_to(tmp_path)  # a loop back to the root
    (tmp_path / "cats" / "again").symlink_to(tmp_path / "cats")  # a loop onto its own class
    (tmp_path / "dogs").symlink_to(tmp_path / "cats")  # a whole class under a second name
    (tmp_path / "cats" / "gone").symlink_to(tmp_path / "nowhere")  # dangling
    with caplog.at_level(logging.WARNING, logger="dino_fast.data"):
        index = scan_image_folder(tmp_path)
    assert sorted(p.name for p in index.paths) == sorted(p.name for p in photos)
    assert index.classes == ["cats", "dogs"] and set(index.labels) == {0}
    assert sorted(p.name for p in index.skipped_links) == ["again", "dogs", "up"]
    assert "3 linked folder(s) skipped" in caplog.text
    assert not any(p.name == "gone" for p in index.paths)  # a dangling link is no folder to scan


# PIL warns on opening a file over its limit; the check turns that into a rejection.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_header_is_rejected_by_name_not_decoded(tmp_path: Path, caplog) -> None:
    import struct
    import zlib

    def png_declaring(width: int, height: int) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        body = zlib.compress(b"\0" * 64)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")

    for photo in photo_paths()[:2]:
        shutil.copy(photo, tmp_path)
    bombs = {"bomb.png": (50_000, 50_000), "warned_bomb.png": (10_000, 10_000)}  # over 2x / 1x the limit
    for name, (width, height) in bombs.items():
        (tmp_path / name).write_bytes(png_declaring(width, height))
        with pytest.raises(UnusableImageError, match="decompression bomb"):
            inspect_image(tmp_path / name)
    with caplog.at_level(logging.WARNING, logger="dino_fast.data"):
        checked = check_images(scan_image_folder(tmp_path))
    assert len(checked.index) == 2
    assert sorted(p.name for p, _ in checked.rejected) == sorted(bombs)
    assert "bomb.png" in caplog.text and "decompression bomb" in caplog.text
