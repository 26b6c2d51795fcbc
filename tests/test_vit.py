"""ViT backbone and DINO head: shapes, position-embedding interpolation, attention paths, official names."""

import math

import pytest
import torch

from fastdino.models.attention import Attention, attention_math, check_attention_impl
from fastdino.models.heads import DINOHead
from fastdino.models.vit import VisionTransformer, build_backbone, vit_small, vit_tiny


@pytest.mark.parametrize("patch", [16, 8])
@pytest.mark.parametrize("size", [224, 96])
def test_output_shapes(patch, size):
    model = vit_tiny(patch_size=patch, depth=2).eval()
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 192)
    tokens = model.prepare_tokens(torch.randn(1, 3, size, size))
    assert tokens.shape == (1, (size // patch) ** 2 + 1, 192)


def _bicubic_axis(grid: torch.Tensor, axis: int, n_out: int, scale: float) -> torch.Tensor:
    """Float64 bicubic resize of one axis from its definition: output i samples the input at
    (i + 0.5) / scale - 0.5 with Keys' cubic kernel (A = -0.75), indices clamped to the border."""
    a = -0.75
    n_in = grid.shape[axis]
    rows = []
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        x0 = math.floor(src)
        t = src - x0
        weights = [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
                   ((a + 2) * t - (a + 3)) * t * t + 1,
                   ((a + 2) * (1 - t) - (a + 3)) * (1 - t) ** 2 + 1,
                   ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a]
        rows.append(sum(w * grid.select(axis, min(max(x0 - 1 + k, 0), n_in - 1)) for k, w in enumerate(weights)))
    return torch.stack(rows, dim=axis)


def official_pos_embed_ref(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """The official DINO rule, restated in float64: scale factor (grid + 0.1) / stored side per axis."""
    d = pos_embed.shape[-1]
    side = int(math.isqrt(pos_embed.shape[1] - 1))
    grid = pos_embed[0, 1:].double().reshape(side, side, d)
    grid = _bicubic_axis(grid, 0, grid_h, (grid_h + 0.1) / side)
    grid = _bicubic_axis(grid, 1, grid_w, (grid_w + 0.1) / side)
    return torch.cat((pos_embed[0, :1].double(), grid.reshape(grid_h * grid_w, d)))[None]


@pytest.mark.parametrize("img_size, patch, h, w", [
    (224, 16, 96, 96),  # the paper's local crops
    (32, 8, 16, 16),  # the CPU demo's scale
    (224, 16, 96, 160),  # non-square
    (32, 8, 24, 40),  # non-square, one side larger than the stored grid
])
def test_official_position_embedding_interpolation_matches_float64_definition(img_size, patch, h, w):
    torch.manual_seed(0)
    model = vit_tiny(img_size=img_size, patch_size=patch, depth=1)
    grid_h, grid_w = h // patch, w // patch
    pos = model.interpolate_pos_encoding(grid_h * grid_w, h, w)
    assert pos.shape == (1, grid_h * grid_w + 1, 192)
    assert torch.equal(pos[:, 0], model.pos_embed[:, 0])  # class token position untouched
    ref = official_pos_embed_ref(model.pos_embed.detach(), grid_h, grid_w)
    torch.testing.assert_close(pos.double(), ref, rtol=0, atol=1e-6)
    # the exact-size rule samples other source positions: the two differ by far more than rounding
    exact = vit_tiny(img_size=img_size, patch_size=patch, depth=1, pos_embed_interp="exact")
    exact.load_state_dict(model.state_dict())
    assert (exact.interpolate_pos_encoding(grid_h * grid_w, h, w).double() - ref).abs().max() > 1e-3


def test_exact_position_embedding_interpolation_and_native_size():
    model = vit_tiny(patch_size=16, depth=1, pos_embed_interp="exact")
    assert model.interpolate_pos_encoding(196, 224, 224) is model.pos_embed
    pos = model.interpolate_pos_encoding(36, 96, 96)
    grid = model.pos_embed[:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(pos[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 36, 192))
    # non-square crops get their own grid
    assert model.prepare_tokens(torch.randn(1, 3, 96, 160)).shape == (1, 6 * 10 + 1, 192)
    with pytest.raises(ValueError, match="pos_embed_interp"):
        vit_tiny(depth=1, pos_embed_interp="nearest")


def test_sdpa_equals_math_path():
    torch.manual_seed(0)
    math_model = vit_tiny(patch_size=16, depth=2, attention="math").eval()
    sdpa_model = vit_tiny(patch_size=16, depth=2, attention="sdpa").eval()
    sdpa_model.load_state_dict(math_model.state_dict())
    x = torch.randn(3, 3, 96, 96)
    torch.testing.assert_close(sdpa_model(x), math_model(x), rtol=1e-5, atol=1e-5)


def test_attention_math_against_float64_definition():
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64) for _ in range(3))
    out, attn = attention_math(q, k, v)
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) / 2.0
    torch.testing.assert_close(attn, scores.softmax(-1))
    torch.testing.assert_close(out, scores.softmax(-1) @ v)
    attention = Attention(8, 2, impl="math")
    _, weights = attention(torch.randn(1, 5, 8), return_attention=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 5))


def test_last_self_attention_and_intermediate_tokens():
    model = vit_tiny(patch_size=16, depth=3).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model.get_last_selfattention(x).shape == (2, 3, 17, 17)
    tokens = model.get_intermediate_class_tokens(x, 2)
    assert len(tokens) == 2 and torch.allclose(tokens[-1], model(x), atol=1e-6)


def test_bad_attention_impl_and_missing_xformers():
    with pytest.raises(ValueError, match="model.attention"):
        check_attention_impl("flash")
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="xformers"):
            vit_tiny(attention="xformers")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_xformers_attention_matches_sdpa_on_cuda(dtype):
    """model.attention=xformers (carried to the GPU machines by perf/gpu_wheels.sh): its output and input gradient
    are as close to a float64 reference as sdpa's, with the same weights, at ViT-S's shape (6 heads of 64, 197
    tokens) under autocast."""
    pytest.importorskip("xformers.ops")
    reference = Attention(384, 6, impl="math").cuda().double()
    x = torch.randn(4, 197, 384, device="cuda", dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(4, 197, 384, device="cuda", dtype=torch.float64)
    want = reference(x)
    (want_grad,) = torch.autograd.grad(want, x, grad_out)
    errors = {}
    for impl in ("sdpa", "xformers"):
        layer = Attention(384, 6, impl=impl).cuda()
        layer.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})
        xi = x.detach().float().requires_grad_()
        with torch.autocast("cuda", dtype=dtype):
            out = layer(xi)
        (grad,) = torch.autograd.grad(out, xi, grad_out.float())
        errors[impl] = ((out.double() - want).abs().max().item(), (grad.double() - want_grad).abs().max().item())
    for sdpa_error, xformers_error in zip(errors["sdpa"], errors["xformers"]):
        assert xformers_error <= 2 * sdpa_error + 1e-3, errors


def test_drop_path_only_in_training():
    model = vit_tiny(patch_size=16, depth=2, drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_official_parameter_names_and_sizes():
    names = set(vit_small(patch_size=16).state_dict())
    for name in ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.11.attn.qkv.bias",
                 "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias",
                 "blocks.0.norm1.weight", "blocks.0.norm2.bias", "norm.weight"]:
        assert name in names
    assert sum(p.numel() for p in vit_small(patch_size=16).parameters()) == 21_665_664  # 21.7M as published
    assert build_backbone("vit_base").embed_dim == 768
    with pytest.raises(ValueError, match="model.arch"):
        build_backbone("vit_giant")
    assert isinstance(vit_tiny(), VisionTransformer) and vit_tiny().blocks[0].norm1.eps == 1e-6


def test_dino_head_normalised_last_layer():
    head = DINOHead(192, 100, hidden_dim=64, bottleneck_dim=16)
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.all(gain == 1)
    assert head.last_layer.bias is None
    w = head.last_layer.weight  # the effective weight: rows of unit norm with g = 1
    torch.testing.assert_close(w.norm(dim=1), torch.ones(100))
    out = head(torch.randn(5, 192))
    assert out.shape == (5, 100) and out.abs().max() <= 1.0 + 1e-5  # cosine similarities
    assert DINOHead(8, 4, 16, 8, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


def test_dino_head_batchnorm_keeps_output_image_dependent():
    """Inputs that differ only by a small part on top of a large shared one: without BN the head maps
    every image to nearly the same output, with BN (official `use_bn_in_head`) the outputs stay apart."""
    torch.manual_seed(0)
    plain = DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16)
    bn = DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16, use_bn=True)
    kinds = [type(m).__name__ for m in bn.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]
    assert [type(m).__name__ for m in plain.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    x = 10.0 * torch.randn(1, 32) + 0.01 * torch.randn(16, 32)

    def spread(head):
        out = torch.nn.functional.normalize(head(x), dim=1)
        return 1.0 - (out @ out.T).min().item()  # 0 when every image gets the same output

    assert spread(plain) < 1e-3
    assert spread(bn) > 0.1
    hidden = bn.mlp[1](bn.mlp[0](x))  # batch statistics in training mode: zero mean over the batch
    torch.testing.assert_close(hidden.mean(0), torch.zeros(48), atol=1e-4, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients_and_stores_less():
    """Recomputed blocks replay the RNG: with stochastic depth on, outputs and gradients equal the stored
    path's; the autograd graph keeps only the blocks' inputs (fewer saved tensors)."""
    torch.manual_seed(0)
    plain = vit_tiny(depth=3, patch_size=8, img_size=32, drop_path_rate=0.5)
    recomputed = vit_tiny(depth=3, patch_size=8, img_size=32, drop_path_rate=0.5, grad_checkpointing=True)
    recomputed.load_state_dict(plain.state_dict())
    x = torch.randn(6, 3, 32, 32)
    outs, saved = [], []
    for model in (plain, recomputed):
        torch.manual_seed(1)
        count = [0]

        def pack(t, count=count):
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = model(x)
        y.pow(2).sum().backward()
        outs.append((y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        saved.append(count[0])
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=0)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, rtol=1e-6, atol=1e-7, msg=name)
    assert saved[1] < saved[0] / 2
    recomputed.eval()
    assert torch.equal(recomputed(x), plain.eval()(x))  # evaluation never recomputes
