"""dino_fast.models against the official DINO architecture (dino_fast.official): parameter names
and shapes, checkpoint loading, outputs, gradients, the packed multi-crop forward, drop path."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from dino_fast import models
from dino_fast.models import attention as A
from dino_fast.official import vision_transformer as official

HAS_CUDA = torch.cuda.is_available()

# A small ViT with the official construction (qkv bias, LayerNorm eps 1e-6): 3 heads of 16 so
# head_dim is not the 64 of the real models, depth 3 so first/middle/last blocks all exist.
SMALL = dict(embed_dim=48, depth=3, num_heads=3, mlp_ratio=4, qkv_bias=True)


def small_pair(patch_size=16, drop_path_rate=0.0, attn_backend="auto", seed=0):
    """(dino_fast ViT, official ViT) with identical weights."""
    torch.manual_seed(seed)
    ref = official.VisionTransformer(
        patch_size=patch_size, drop_path_rate=drop_path_rate, norm_layer=_ln, **SMALL
    )
    ours = models.VisionTransformer(
        patch_size=patch_size,
        drop_path_rate=drop_path_rate,
        norm_layer=_ln,
        attn_backend=attn_backend,
        **SMALL,
    )
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _ln(dim):
    return nn.LayerNorm(dim, eps=1e-6)


def images(n, size, seed, channels=3):
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(n, channels, h, w, generator=torch.Generator().manual_seed(seed))


def official_loop(ref, crops):
    """The official MultiCropWrapper backbone path: one backbone call per resolution."""
    return torch.cat([ref(c) for c in crops])


def official_fp64(ref, crops, grad, seed=None):
    """The official loop in float64 on a copy of ``ref``: (output, {param: grad}, [input grads])."""
    ref64 = copy.deepcopy(ref).double()
    ref64.zero_grad(set_to_none=True)
    crops64 = [c.detach().double().requires_grad_() for c in crops]
    if seed is not None:
        torch.manual_seed(seed)
    out = official_loop(ref64, crops64)
    out.backward(grad.double())
    return out.detach(), {n: p.grad for n, p in ref64.named_parameters()}, [c.grad for c in crops64]


def assert_fp32_accurate(got, want32, want64, name="output"):
    """``got`` (dino_fast, fp32) is as close to the fp64 truth as the official fp32 code is (2x
    slack plus 1e-6 of the scale): tight where fp32 is exact, fair where sums over thousands of
    tokens cancel (bias gradients)."""
    if want64 is None:
        assert got is None or not got.any(), f"{name}: gradient where the official code has none"
        return
    assert got is not None, f"{name}: no gradient"
    err = (got.double() - want64).abs().max().item()
    official_err = (want32.double() - want64).abs().max().item()
    bound = 2 * official_err + 1e-6 * (1 + want64.abs().max().item())
    assert err <= bound, (
        f"{name}: max error {err:.3g} vs fp64; the official fp32 code's is {official_err:.3g}"
    )


def assert_grads_match(ours, ref, ref_grads64):
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert_fp32_accurate(p.grad, ref_params[name].grad, ref_grads64[name], name)


# ---------------------------------------------------------------------------------------------
# parameter names and checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch_size", [8, 14, 16])
@pytest.mark.parametrize("arch", ["vit_tiny", "vit_small", "vit_base", "vit_large"])
def test_state_dict_keys_and_shapes_match_official(arch, patch_size):
    # On the meta device: ViT-L/8 costs no memory or init time there.
    with torch.device("meta"):
        ours = getattr(models, arch)(patch_size=patch_size)
        ref = getattr(official, arch)(patch_size=patch_size)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes
    assert list(ours.state_dict()) == list(ref.state_dict())  # same order too (optimizer states)
    assert (ours.embed_dim, ours.num_heads, ours.patch_size) == (
        ref.embed_dim,
        ref.blocks[0].attn.num_heads,
        patch_size,
    )
    assert isinstance(ours.head, nn.Identity)


@pytest.mark.parametrize("use_bn", [False, True])
@pytest.mark.parametrize("nlayers", [1, 2, 3])
@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_state_dict_matches_official(use_bn, nlayers, norm_last_layer):
    args = dict(
        use_bn=use_bn, norm_last_layer=norm_last_layer, nlayers=nlayers, hidden_dim=24, bottleneck_dim=8
    )
    ours, ref = models.DINOHead(16, 40, **args), official.DINOHead(16, 40, **args)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    assert "last_layer.weight_g" in ours.state_dict() and "last_layer.weight_v" in ours.state_dict()
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in ref.named_parameters() if p.requires_grad}
    assert ("last_layer.weight_g" in trainable) == (not norm_last_layer)
    torch.testing.assert_close(ours.last_layer.weight_g, torch.ones(40, 1))


def _official_student(seed):
    torch.manual_seed(seed)
    backbone = official.vit_tiny(patch_size=16)
    head = official.DINOHead(192, 100, hidden_dim=64, bottleneck_dim=32, norm_last_layer=False)
    with torch.no_grad():  # a trained-looking head: norms not all 1
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    return official.MultiCropWrapper(backbone, head).eval()


def test_official_checkpoint_loads_strictly_and_gives_identical_outputs():
    ref = _official_student(seed=1)
    ours = models.DINOModel(
        models.vit_tiny(patch_size=16),
        models.DINOHead(192, 100, hidden_dim=64, bottleneck_dim=32, norm_last_layer=False),
    ).eval()
    result = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    g, loc = images(2, 224, seed=2), images(3, 96, seed=3)  # B=1: 2 global + 3 local crops
    with torch.no_grad():
        want = ref([g[:1], g[1:], loc[:1], loc[1:2], loc[2:]])
        got = ours(g, loc)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ours.head.last_layer.weight, ref.head.last_layer.weight)


def test_our_checkpoint_loads_strictly_into_the_official_model():
    torch.manual_seed(4)
    ours = models.DINOModel(
        models.vit_tiny(patch_size=16), models.DINOHead(192, 100, hidden_dim=64, bottleneck_dim=32)
    ).eval()
    with torch.no_grad():
        ours.head.last_layer.weight_g.uniform_(0.5, 2.0)
    ref = official.MultiCropWrapper(
        official.vit_tiny(patch_size=16), official.DINOHead(192, 100, hidden_dim=64, bottleneck_dim=32)
    ).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    g = images(2, 224, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(ours(g), ref(g), atol=2e-5, rtol=1e-4)


def test_checkpoint_with_wrong_shapes_fails_loudly():
    with torch.device("meta"):
        ref = official.vit_tiny(patch_size=8).state_dict()
        with pytest.raises(RuntimeError, match=r"size mismatch.*pos_embed"):
            models.vit_tiny(patch_size=16).load_state_dict(ref, strict=True)


def test_factories_and_constructor_arguments():
    with torch.device("meta"):  # construction only: no weights needed
        m = models.vit_small(patch_size=14, drop_path_rate=0.1, attn_backend="explicit")
    assert (m.embed_dim, m.num_heads, m.patch_size, m.attn_backend) == (384, 6, 14, "explicit")
    # Official stochastic-depth rule: linspace(0, rate, depth), the first block never dropped.
    want = [x.item() for x in torch.linspace(0, 0.1, 12)]
    assert [blk.drop_path_prob for blk in m.blocks] == want
    assert isinstance(m.blocks[0].drop_path, nn.Identity)
    assert set(models.ARCHS) == {"vit_tiny", "vit_small", "vit_base", "vit_large"}
    with pytest.raises(TypeError, match=r"unexpected keyword arguments.*'patchsize'"):
        models.vit_tiny(patchsize=16)
    with pytest.raises(ValueError, match="unknown attention backend"):
        models.vit_tiny(attn_backend="flash2")
    with pytest.raises(ValueError, match="divisible"):
        models.VisionTransformer(embed_dim=50, num_heads=3)
    m.set_attn_backend("sdpa")
    assert all(blk.attn.backend == "sdpa" for blk in m.blocks)
    with pytest.raises(ValueError, match="unknown attention backend"):
        m.set_attn_backend("nope")


# ---------------------------------------------------------------------------------------------
# single-resolution forward and the official API
# ---------------------------------------------------------------------------------------------


# 224 (the native grid: no interpolation), 80/112/240 (interpolated; 80 and 240 leave a remainder
# with patch 14, 80 with patch 16 gives a 5x5 grid), and one non-square image.
@pytest.mark.parametrize("size", [224, 80, 112, 240, (96, 128)])
@pytest.mark.parametrize("patch_size", [8, 14, 16])
def test_forward_matches_official(patch_size, size):
    ours, ref = small_pair(patch_size, seed=6)
    ours.eval(), ref.eval()
    x = images(2, size, seed=7)
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.forward_unpacked(x), want, atol=1e-5, rtol=1e-4)
        grid = (x.shape[2] // patch_size, x.shape[3] // patch_size)
        pos = ours.interpolate_pos_encoding(ours.patch_embed(x), x.shape[2], x.shape[3])
        assert pos.shape == (1, 1 + grid[0] * grid[1], 48)
        torch.testing.assert_close(
            pos, ref.interpolate_pos_encoding(ref.patch_embed(x), x.shape[2], x.shape[3])
        )


def test_image_smaller_than_a_patch_is_rejected():
    ours, _ = small_pair(16)
    with pytest.raises(ValueError, match="smaller than one 16-px patch"):
        ours(images(1, 12, seed=0))


@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_get_last_selfattention_and_intermediate_layers_match_official(backend):
    ours, ref = small_pair(16, attn_backend=backend, seed=8)
    ours.eval(), ref.eval()
    x = images(3, 80, seed=9)
    with torch.no_grad():
        attn = ours.get_last_selfattention(x)
        assert attn.shape == (3, 3, 26, 26)
        torch.testing.assert_close(attn, ref.get_last_selfattention(x), atol=1e-6, rtol=1e-5)
        for n in (1, 2, 3):
            got, want = ours.get_intermediate_layers(x, n), ref.get_intermediate_layers(x, n)
            assert len(got) == len(want) == n
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# the packed multi-crop forward
# ---------------------------------------------------------------------------------------------


# B=3 images: 2 global crops of 80 px (5x5 patches) and 4 local crops of 48 px (3x3) per image;
# both odd sizes, so pos-embed interpolation runs for both groups.
@pytest.mark.parametrize("backend", ["sdpa", "explicit", "sdpa:math"])
def test_multicrop_matches_official_loop_outputs_and_grads(backend):
    ours, ref = small_pair(16, attn_backend=backend, seed=10)
    g, loc = images(6, 80, seed=11), images(12, 48, seed=12)
    g_ours, l_ours = g.clone().requires_grad_(), loc.clone().requires_grad_()
    g_ref, l_ref = g.clone().requires_grad_(), loc.clone().requires_grad_()
    out = models.multicrop_forward(ours, g_ours, l_ours)
    want = official_loop(ref, [g_ref, l_ref])
    assert out.shape == (18, 48)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(13))
    out.backward(grad)
    want.backward(grad)
    out64, grads64, (g64, l64) = official_fp64(ref, [g, loc], grad)
    assert_fp32_accurate(out, want, out64)
    assert_grads_match(ours, ref, grads64)
    assert_fp32_accurate(g_ours.grad, g_ref.grad, g64, "d global_crops")
    assert_fp32_accurate(l_ours.grad, l_ref.grad, l64, "d local_crops")


@pytest.mark.parametrize("patch_size", [8, 14])
def test_multicrop_other_patch_sizes(patch_size):
    ours, ref = small_pair(patch_size, seed=14)
    g, loc = images(2, 112, seed=15), images(4, 48, seed=16)  # B=1
    out = models.multicrop_forward(ours, g, loc)
    want = official_loop(ref, [g, loc])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(16))
    out.backward(grad)
    want.backward(grad)
    _, grads64, _ = official_fp64(ref, [g, loc], grad)
    assert_grads_match(ours, ref, grads64)


def test_teacher_path_is_globals_only():
    ours, ref = small_pair(16, seed=17)
    g = images(4, 80, seed=18)
    with torch.no_grad():
        out = models.multicrop_forward(ours, g)
    assert out.shape == (4, 48) and not out.requires_grad
    torch.testing.assert_close(out, official_loop(ref, [g]), atol=1e-5, rtol=1e-4)


def drop_path_fp32_draws(x, drop_prob=0.0, training=False):
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = (keep_prob + torch.rand(shape, dtype=torch.float32)).floor_().to(x.dtype)
    return x.div(keep_prob) * random_tensor


def test_drop_path_training_reproduces_the_official_loop_under_the_same_seed(monkeypatch):
    # drop_path_rate 0.5 on 3 blocks: block probabilities 0, 0.25, 0.5, so some samples' branches
    # are dropped and others kept. The packed forward draws its decisions in the official order.
    ours, ref = small_pair(16, drop_path_rate=0.5, seed=19)
    ours.train(), ref.train()
    g, loc = images(6, 80, seed=20), images(12, 48, seed=21)
    torch.manual_seed(22)
    out = models.multicrop_forward(ours, g, loc)
    torch.manual_seed(22)
    want = official_loop(ref, [g, loc])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    out.backward(torch.ones_like(out))
    want.backward(torch.ones_like(want))
    # The official drop_path draws in the tensor's dtype; the fp64 truth must make the fp32 run's
    # keep/drop decisions, so it draws float32 like the fp32 run does.
    monkeypatch.setattr(official, "drop_path", drop_path_fp32_draws)
    _, grads64, _ = official_fp64(ref, [g, loc], torch.ones_like(want), seed=22)
    assert_grads_match(ours, ref, grads64)
    # Not vacuous: another seed makes other keep/drop decisions for some of the 18 rows.
    with torch.no_grad():
        torch.manual_seed(23)
        other = models.multicrop_forward(ours, g, loc)
    assert ((out.detach() - other).abs().amax(dim=1) > 1e-4).any()


def test_drop_path_eval_mode_matches_official_and_is_deterministic():
    ours, ref = small_pair(16, drop_path_rate=0.3, seed=23)
    ours.eval(), ref.eval()
    g, loc = images(4, 64, seed=24), images(6, 32, seed=25)
    with torch.no_grad():
        first = models.multicrop_forward(ours, g, loc)
        torch.testing.assert_close(first, models.multicrop_forward(ours, g, loc), atol=0, rtol=0)
        torch.testing.assert_close(first, official_loop(ref, [g, loc]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("training", [False, True])
def test_fused_add_norm_path_matches_official(training, monkeypatch):
    # The CUDA default (kernels/add_layer_norm.py), forced on CPU under the Triton interpreter:
    # in training with drop path its per-row factors go through the kernel too.
    from dino_fast.kernels import add_layer_norm as kernel

    launches = []
    real_forward = kernel._forward
    monkeypatch.setattr(kernel, "_forward", lambda *a: launches.append(1) or real_forward(*a))
    ours, ref = small_pair(16, drop_path_rate=0.5 if training else 0.0, seed=38)
    ours.fused_norm = True
    ours.train(training), ref.train(training)
    g, loc = images(4, 64, seed=39), images(8, 32, seed=40)
    torch.manual_seed(41)
    out = models.multicrop_forward(ours, g, loc)
    torch.manual_seed(41)
    want = official_loop(ref, [g, loc])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    assert len(launches) == 5  # norm1 of block 0, then norm2 and the next norm1 of blocks 0 and 1
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(42))
    out.backward(grad)
    want.backward(grad)
    if training:
        monkeypatch.setattr(official, "drop_path", drop_path_fp32_draws)
    _, grads64, _ = official_fp64(ref, [g, loc], grad, seed=41 if training else None)
    assert_grads_match(ours, ref, grads64)


def test_fused_norm_true_where_it_cannot_run_is_an_error(monkeypatch):
    ours, _ = small_pair(16)
    ours.fused_norm = True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="fused_norm=True needs triton and a CUDA device"):
        ours(images(2, 32, seed=0))
    ours.fused_norm = False  # never fused: the plain ops run anywhere
    assert ours(images(2, 32, seed=0)).shape == (2, 48)


def test_cpu_bf16_autocast_stays_close_to_fp32():
    # The training precision on CPU: matmuls in bf16, the residual stream in fp32.
    ours, ref = small_pair(16, seed=26)
    g, loc = images(4, 64, seed=27), images(8, 32, seed=28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = models.multicrop_forward(ours, g, loc)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, official_loop(ref, [g, loc]), atol=5e-2, rtol=5e-2)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters())


def _small_official_dino():
    return official.MultiCropWrapper(
        official.VisionTransformer(patch_size=16, norm_layer=_ln, **SMALL),
        official.DINOHead(48, 64, hidden_dim=32, bottleneck_dim=16),
    )


def test_dino_model_matches_multicrop_wrapper():
    torch.manual_seed(29)
    ref = _small_official_dino()
    ours = models.DINOModel(
        models.VisionTransformer(patch_size=16, norm_layer=_ln, **SMALL),
        models.DINOHead(48, 64, hidden_dim=32, bottleneck_dim=16),
    )
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref64 = _small_official_dino()  # weight_norm modules cannot be deepcopied
    ref64.load_state_dict(ref.state_dict())
    ref64.double()
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert all(k.startswith(("backbone.", "head.")) for k in ours.state_dict())
    g, loc = images(4, 64, seed=30), images(8, 32, seed=31)
    out = ours(g, loc)
    want = ref([g[:2], g[2:], loc[:2], loc[2:4], loc[4:6], loc[6:]])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(32))
    out.backward(grad)
    want.backward(grad)
    ref64([c.double() for c in (g[:2], g[2:], loc[:2], loc[2:4], loc[4:6], loc[6:])]).backward(grad.double())
    assert_grads_match(ours, ref, {n: p.grad for n, p in ref64.named_parameters()})
    with torch.no_grad():
        torch.testing.assert_close(ours(g), ref([g[:2], g[2:]]), atol=1e-5, rtol=1e-4)


class TinyConvNet(nn.Module):
    """A non-ViT backbone with an ``fc`` (like a ResNet): must take the per-resolution path."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_other_backbones_run_per_resolution_like_the_official_wrapper():
    torch.manual_seed(32)
    ref = official.MultiCropWrapper(TinyConvNet(), nn.Identity())
    ours = models.DINOModel(TinyConvNet(), nn.Identity())
    ours.load_state_dict(ref.state_dict(), strict=True)
    g, loc = images(4, 40, seed=33), images(6, 24, seed=34)
    torch.testing.assert_close(ours(g, loc), ref([g[:2], g[2:], loc[:2], loc[2:4], loc[4:]]))


def test_multicrop_input_errors_name_the_problem():
    ours, _ = small_pair(16)
    g = images(2, 64, seed=0)
    with pytest.raises(TypeError, match=r"one .* tensor.*torch.cat"):
        models.multicrop_forward(ours, [g, g])
    with pytest.raises(ValueError, match=r"\(num_crops \* B, C, H, W\)"):
        models.multicrop_forward(ours, g[0])
    with pytest.raises(TypeError, match="floating-point"):
        models.multicrop_forward(ours, g.to(torch.uint8))
    with pytest.raises(ValueError, match="empty"):
        models.multicrop_forward(ours, g, g[:0])
    with pytest.raises(ValueError, match="share device and dtype"):
        models.multicrop_forward(ours, g, images(2, 32, seed=1).double())
    with pytest.raises(ValueError, match="4 channels, the backbone expects 3"):
        models.multicrop_forward(ours, images(2, 64, seed=0, channels=4))
    with pytest.raises(ValueError, match="backbone is on"):
        models.multicrop_forward(ours, g.to("meta"))


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~20 s of tracing on a 2-core CPU
def test_multicrop_compiles_without_graph_breaks():
    # fullgraph=True fails on any graph break; aot_eager traces forward and backward without
    # spending minutes in inductor's C++ codegen on this CPU (the GPU test runs inductor).
    ours, _ = small_pair(16, drop_path_rate=0.2, seed=35)
    ours.eval()
    compiled = torch.compile(models.multicrop_forward, fullgraph=True, backend="aot_eager", dynamic=False)
    g, loc = images(4, 64, seed=36), images(8, 32, seed=37)
    out = compiled(ours, g, loc)
    torch.testing.assert_close(out, models.multicrop_forward(ours, g, loc), atol=1e-5, rtol=1e-4)
    # A random cotangent, not out.sum(): the final LayerNorm's output sums to a constant per row
    # (its weight is all ones here), so sum() sends analytically zero gradients into the blocks
    # and the comparison would be of rounding noise (~1e-5), which differs across torch versions.
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(38))
    out.backward(cotangent)
    grads = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    models.multicrop_forward(ours, g, loc).backward(cotangent)
    # Real gradients (largest entries 1 to 30) agree to fp32 summation order: within 1e-5 of each
    # tensor's largest entry (seen: 5e-7), as an elementwise rtol fails on entries near zero.
    for n, p in ours.named_parameters():
        scale = p.grad.abs().max().item()
        error = (grads[n] - p.grad).abs().max().item()
        assert scale > 1e-2, n
        assert error <= 1e-5 * scale, f"{n}: compiled and eager differ by {error:.3g} (largest {scale:.3g})"
    ours.train()  # drop path (rand inside the graph) must trace too
    assert compiled(ours, g, loc).shape == (12, 48)


# ---------------------------------------------------------------------------------------------
# GPU (bf16 autocast), run by benchmarks/gpu_check.sh on a lent device
# ---------------------------------------------------------------------------------------------


def _gpu_pair(backend="auto", drop_path_rate=0.0):
    torch.manual_seed(40)
    ref = official.vit_small(patch_size=16).cuda()
    ours = models.vit_small(patch_size=16, attn_backend=backend, drop_path_rate=drop_path_rate).cuda()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _gpu_crops(batch):
    gen = torch.Generator(device="cuda").manual_seed(41)
    g = torch.randn(2 * batch, 3, 224, 224, device="cuda", generator=gen)
    loc = torch.randn(10 * batch, 3, 96, 96, device="cuda", generator=gen)
    return g, loc


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "sdpa", "sdpa:flash", "explicit"])
def test_gpu_bf16_multicrop_matches_fp32_official(backend, monkeypatch):
    # ViT-S/16 at the real crop sizes (B=4). The fp32 official loop is the truth (no TF32 in the
    # patch-embedding conv); dino_fast under bf16 autocast must be about as close to it as the
    # official loop under bf16 autocast is.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    A.prepare("cuda", torch.bfloat16)
    ours, ref = _gpu_pair(backend, drop_path_rate=0.0)
    g, loc = _gpu_crops(4)
    grad = torch.randn(48, 384, device="cuda", generator=torch.Generator(device="cuda").manual_seed(42))

    def run(model, fn, amp):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = fn()
        out.float().backward(grad)
        return out.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}

    truth, truth_grads = run(ref, lambda: official_loop(ref, [g, loc]), amp=False)
    got, got_grads = run(ours, lambda: models.multicrop_forward(ours, g, loc), amp=True)
    base, base_grads = run(ref, lambda: official_loop(ref, [g, loc]), amp=True)

    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()

    assert rel(got, truth) <= 1.5 * rel(base, truth) + 1e-3, (rel(got, truth), rel(base, truth))
    for name, want in truth_grads.items():
        ours_err, official_err = rel(got_grads[name], want), rel(base_grads[name], want)
        assert ours_err <= 1.5 * official_err + 1e-3, (
            f"{name}: {ours_err:.3g} vs official bf16 {official_err:.3g}"
        )


@pytest.mark.gpu
def test_gpu_varlen_and_per_group_paths_agree_bf16():
    A.prepare("cuda", torch.bfloat16)
    reason = A.varlen_unavailable_reason("cuda", torch.bfloat16)
    assert reason is None or "torch.nn.attention.varlen" in reason, reason
    ours, _ = _gpu_pair("sdpa")
    g, loc = _gpu_crops(4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        packed = models.multicrop_forward(ours, g, loc)  # varlen where available
        ours.set_attn_backend("sdpa:flash")  # per resolution group
        grouped = models.multicrop_forward(ours, g, loc)
    torch.testing.assert_close(packed.float(), grouped.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_multicrop_peak_memory_not_above_per_resolution_sdpa():
    # The bound: peak memory of student forward+backward no higher than SDPA alone.
    A.prepare("cuda", torch.bfloat16)
    ours, _ = _gpu_pair("auto", drop_path_rate=0.1)
    ours.train()
    g, loc = _gpu_crops(32)

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn()
        out.float().sum().backward()
        ours.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    def per_resolution_sdpa():
        ours.set_attn_backend("sdpa")
        return torch.cat([ours.forward_unpacked(g), ours.forward_unpacked(loc)])

    def packed():
        ours.set_attn_backend("auto")
        return models.multicrop_forward(ours, g, loc)

    peak(packed)  # warm-up: cuBLAS workspaces, probes
    baseline, ours_peak = peak(per_resolution_sdpa), peak(packed)
    assert ours_peak <= baseline * 1.02, (
        f"packed {ours_peak / 2**20:.0f} MiB vs SDPA loop {baseline / 2**20:.0f} MiB"
    )


@pytest.mark.gpu
def test_gpu_inductor_compile_matches_eager_bf16():
    A.prepare("cuda", torch.bfloat16)
    ours, _ = _gpu_pair("auto")
    g, loc = _gpu_crops(2)
    compiled = torch.compile(models.multicrop_forward, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = models.multicrop_forward(ours, g, loc)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = compiled(ours, g, loc)
    torch.testing.assert_close(out.float(), eager.float(), atol=3e-2, rtol=3e-2)
