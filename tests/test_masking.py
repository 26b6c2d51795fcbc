"""GMML group masks and corruption (data/masking.py): cover, grid-aligned connected blocks, sources, statistics."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastdino.data.batch import ResumableShardedSampler
from fastdino.data.masking import (
    BLUR,
    GREY,
    KEEP,
    NOISE,
    OUTSIDE,
    REPLACE,
    ZEROS,
    block_sides,
    corrupt_images,
    group_masks,
    process_rows,
    to_pixels,
)
from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def components(mask):
    """Sizes of the 4-connected components of a 2-D bool mask (plain flood fill: an independent check)."""
    seen, sizes = set(), []
    h, w = mask.shape
    for start in zip(*torch.nonzero(mask, as_tuple=True)):
        start = (int(start[0]), int(start[1]))
        if start in seen:
            continue
        stack, size = [start], 0
        seen.add(start)
        while stack:
            r, c = stack.pop()
            size += 1
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < h and 0 <= nc < w and mask[nr, nc] and (nr, nc) not in seen:
                    seen.add((nr, nc))
                    stack.append((nr, nc))
        sizes.append(size)
    return sizes


@pytest.mark.parametrize("grid,ratio,max_block", [((8, 8), 0.5, 0.3), ((14, 14), 0.4, 0.3), ((14, 14), 0.75, 0.3),
                                                  ((4, 6), 0.5, 0.5), ((28, 28), 0.6, 0.2)])
def test_cover_reaches_the_target_and_overshoots_by_less_than_one_block(grid, ratio, max_block):
    gh, gw = grid
    m = group_masks(64, gh, gw, ratio, max_block, generator=gen())
    cover = m.mask.flatten(1).sum(1)  # (B,) patches
    target = math.ceil(ratio * gh * gw)
    biggest = block_sides(gh, max_block, 1)[1] * block_sides(gw, max_block, 1)[1]
    assert (cover >= target).all(), cover.min()
    assert (cover < target + biggest).all(), cover.max()
    # the last kept block is the one that reached the target: without it the cover is below
    for i in range(8):
        last = int(m.kept[i].sum()) - 1
        t, left, h, w = m.blocks[i, :last].T
        before = torch.zeros(gh, gw, dtype=torch.bool)
        for j in range(last):
            before[t[j] : t[j] + h[j], left[j] : left[j] + w[j]] = True
        assert before.sum() < target


def test_mask_is_the_union_of_grid_aligned_blocks_of_connected_patches():
    gh, gw, p = 12, 10, 4
    lo, hi = block_sides(gh, 0.4, 2)
    m = group_masks(16, gh, gw, 0.5, max_block=0.4, min_block=2, generator=gen(1))
    for i in range(16):
        union = torch.zeros(gh, gw, dtype=torch.bool)
        owner = torch.full((gh, gw), -1)
        for j in torch.nonzero(m.kept[i]).flatten().tolist():
            t, left, h, w = m.blocks[i, j].tolist()
            assert lo <= h <= hi and 2 <= w <= block_sides(gw, 0.4, 2)[1]  # block sides in patches
            assert 0 <= t and t + h <= gh and 0 <= left and left + w <= gw  # inside the grid
            union[t : t + h, left : left + w] = True
            owner[t : t + h, left : left + w] = j
        assert torch.equal(union, m.mask[i])
        assert torch.equal(owner, m.owner[i])
        assert min(components(m.mask[i])) >= 4  # groups of at least 2x2 patches, never a lone patch
    pixels = to_pixels(m.mask, p)  # (B, gh*p, gw*p): constant over each patch (grid-aligned)
    cells = pixels.view(16, gh, p, gw, p)
    assert torch.equal(cells.amin((2, 4)), cells.amax((2, 4)))


def test_masks_differ_across_the_batch_and_are_deterministic_under_a_seed():
    a = group_masks(32, 8, 8, 0.5, generator=gen(3)).mask.flatten(1)
    assert len({tuple(row.tolist()) for row in a}) == 32
    assert torch.equal(a, group_masks(32, 8, 8, 0.5, generator=gen(3)).mask.flatten(1))
    assert not torch.equal(a, group_masks(32, 8, 8, 0.5, generator=gen(4)).mask.flatten(1))
    torch.manual_seed(7)  # the global generator (what training uses) is just as deterministic
    b = group_masks(4, 8, 8, 0.5).mask
    torch.manual_seed(7)
    assert torch.equal(b, group_masks(4, 8, 8, 0.5).mask)


def test_bad_ratio_is_refused():
    for ratio in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="mask ratio"):
            group_masks(2, 4, 4, ratio)


def images(b=8, size=32, seed=0):
    return torch.randn(b, 3, size, size, generator=gen(seed))


def test_every_pixel_comes_from_its_stated_source():
    x, p = images(16), 4
    c = corrupt_images(x, p, 0.6, ("noise", "replace", "zeros"), keep_prob=0.2, group_size=8, generator=gen(5))
    kind = to_pixels(c.kind, p)[:, None].expand_as(x)  # (B, 3, H, W)
    assert torch.equal(c.mask[:, 0], to_pixels(c.kind, p) != OUTSIDE)
    for code in (KEEP, NOISE, REPLACE, ZEROS):
        assert (kind == code).any(), code
    outside = (kind == OUTSIDE) | (kind == KEEP)
    assert torch.equal(c.images[outside], x[outside])  # untouched and unchanged blocks keep the clean pixels
    assert (c.images[kind == ZEROS] == 0).all()
    source = x[c.source]  # (B, 3, H, W): each image's partner
    assert torch.equal(c.images[kind == REPLACE], source[kind == REPLACE])
    own = torch.arange(16)
    assert (c.source != own).all() and torch.equal(c.source // 8, own // 8)  # another image of its own group
    noise = c.images[kind == NOISE]
    assert (noise != x[kind == NOISE]).all() and (noise != source[kind == NOISE]).all()  # fresh values
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1  # N(0, 1)
    kept = c.groups.kept
    assert set(c.block_kind[kept].unique().tolist()) <= {KEEP, NOISE, REPLACE, ZEROS}


def test_kind_statistics_unchanged_probability_and_uniform_kinds():
    c = corrupt_images(images(256, 32), 4, 0.5, ("noise", "replace"), keep_prob=0.1, generator=gen(6))
    kinds = c.block_kind[c.groups.kept]
    n = kinds.numel()
    assert n > 3000
    p_keep = (kinds == KEEP).float().mean().item()
    assert abs(p_keep - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n)  # binomial, 4 sigma
    p_noise = (kinds == NOISE).float().mean().item()
    assert abs(p_noise - 0.45) < 4 * math.sqrt(0.45 * 0.55 / n)
    none = corrupt_images(images(64, 32), 4, 0.5, keep_prob=0.0, generator=gen(6))
    assert not (none.block_kind[none.groups.kept] == KEEP).any()


def test_grey_blocks_are_the_luma_and_blur_blocks_a_gaussian_blur():
    x, p = images(16), 4
    c = corrupt_images(x, p, 0.2, ("zeros",), keep_prob=0.0, grey_prob=1.0, blur_prob=1.0, blur_sigma=(0.5, 1.5),
                       generator=gen(8))
    kind = to_pixels(c.kind, p)[:, None].expand_as(x)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64)[:, None, None]
    rgb = x.double() * std + mean
    luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]  # (B, H, W)
    grey = (luma[:, None] - mean) / std
    assert (kind == GREY).any()
    torch.testing.assert_close(c.images[kind == GREY].double(), grey[kind == GREY], rtol=0, atol=1e-5)
    assert ((c.blur_sigma >= 0.5) & (c.blur_sigma <= 1.5)).all()  # blur_prob=1: every image has its sigma
    # float64 reference: a dense 2-D Gaussian (outer product), reflect padding, per image
    blurred = torch.empty_like(rgb)
    for i in range(16):
        s = float(c.blur_sigma[i])
        r = math.ceil(3 * 1.5)
        t = torch.arange(-r, r + 1, dtype=torch.float64)
        k1 = torch.exp(-(t**2) / (2 * s * s))
        k2 = torch.outer(k1, k1) / k1.sum() ** 2
        padded = F.pad(x[i : i + 1].double(), (r, r, r, r), mode="reflect")
        blurred[i] = F.conv2d(padded, k2.expand(3, 1, -1, -1), groups=3)[0]
    assert (kind == BLUR).any()
    torch.testing.assert_close(c.images[kind == BLUR].double(), blurred[kind == BLUR], rtol=0, atol=1e-5)


def test_bad_corruption_arguments_are_refused():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        corrupt_images(images(2, 30), 4, 0.5)
    with pytest.raises(ValueError, match="kinds"):
        corrupt_images(images(2), 4, 0.5, ("noise", "paint"))
    with pytest.raises(ValueError, match="group_size"):
        corrupt_images(images(6), 4, 0.5, group_size=4)


def test_process_rows_follow_the_samplers_shards_view_major():
    rows = process_rows(per_view=3, n_views=2, rank=1, world_size=2)
    assert rows.total == 12 and rows.process == 1
    assert rows.index.tolist() == [1, 3, 5, 7, 9, 11]  # view 0 rows 0-5, view 1 rows 6-11, the sampler's stride
    assert process_rows(4, 2, 0, 1).index.tolist() == list(range(8))
    one = list(ResumableShardedSampler(24, 6, seed=0, epoch=0))  # one process of batch 6: 4 steps
    for rank in (0, 1):  # two processes of batch 3: each local image is the single run's image at its row
        shard = list(ResumableShardedSampler(24, 3, seed=0, epoch=0, rank=rank, world_size=2))
        rows = process_rows(3, 1, rank, 2).index.tolist()
        for step in range(4):
            assert [one[step * 6 + r] for r in rows] == shard[step * 3 : (step + 1) * 3]


def test_each_process_draws_its_images_global_rows_whatever_the_process_count():
    """One process with the global batch of 2 views x 4 images vs two processes of 2 images per view (simulated:
    each starts from the same generator state, as every rank seeds alike): every image gets the same blocks,
    kinds, grey / blur blocks, blur sigma and unchanged blocks; noise comes from each process's own stream
    (different on the two processes, so image i of each does not share its noise); the shared generator ends
    in the same state either way."""
    x, p = images(8), 4
    kwargs = dict(patch_size=p, ratio=0.5, kinds=("noise", "replace", "zeros"), keep_prob=0.2, grey_prob=0.5,
                  blur_prob=0.5, blur_sigma=(0.5, 1.5))
    g_one = gen(9)
    one = corrupt_images(x, group_size=4, generator=g_one, rows=process_rows(4, 2, 0, 1), **kwargs)
    parts, g_last = [], None
    for rank in (0, 1):
        rows = process_rows(2, 2, rank, 2)
        g_last = gen(9)
        parts.append(corrupt_images(x[rows.index], group_size=2, generator=g_last, rows=rows, **kwargs))
    order = torch.cat([process_rows(2, 2, r, 2).index for r in (0, 1)])  # global row of each local image
    for field in ("mask", "kind", "blur_sigma"):
        merged = torch.empty_like(getattr(one, field))
        merged[order] = torch.cat([getattr(c, field) for c in parts])
        assert torch.equal(merged, getattr(one, field)), field
    assert (one.kind == NOISE).any() and (one.kind == REPLACE).any() and (one.kind == BLUR).any()
    for c, rows in zip(parts, (process_rows(2, 2, r, 2) for r in (0, 1))):
        kind = to_pixels(c.kind, p)[:, None].expand(-1, 3, -1, -1)
        unchanged = (kind == OUTSIDE) | (kind == KEEP)
        assert torch.equal(c.images[unchanged], x[rows.index][unchanged])
        assert torch.equal(c.images[kind == REPLACE], x[rows.index][c.source][kind == REPLACE])  # a local partner
    both = (parts[0].kind == NOISE) & (parts[1].kind == NOISE)  # patches that are noise in image i of each process
    assert both.any()
    where = to_pixels(both, p)[:, None].expand(-1, 3, -1, -1)
    assert (parts[0].images[where] != parts[1].images[where]).all()
    assert torch.equal(torch.rand(4, generator=g_one), torch.rand(4, generator=g_last))
