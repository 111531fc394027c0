import hashlib
import os
import random
import sys

import numpy as np
import pytest

# the tests folder has no __init__.py, so pytest puts only tests/ on sys.path
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from masking_generator import (  # noqa: E402
    MaskingGenerator,
    RandomMaskingGenerator,
    ReleaseMaskingGenerator,
    build_masking_generator,
    count_regions,
)

# (grid, total masked, block budget of the release type)
GRIDS = [(14, 147, 120), (8, 40, 30), ((12, 20), 180, 144)]


def _centre_and_border(masks):
    freq = np.mean(masks, axis=0)
    height, width = freq.shape
    centre = freq[height // 2 - 2:height // 2 + 2, width // 2 - 2:width // 2 + 2].mean()
    ring = np.ones((height, width), dtype=bool)
    ring[1:-1, 1:-1] = False
    return centre, freq[ring].mean()


def _draw(gen, n, seed):
    rng = np.random.default_rng(seed)
    return [gen(rng) for _ in range(n)]


def _regions_centre_and_border(gen, n, seed):
    """Over ``n`` masks of ``gen``: the mean number of masked regions, and the masked frequency at the centre
    and on the border (``_centre_and_border``)."""
    masks = _draw(gen, n, seed)
    return (np.mean([count_regions(m) for m in masks]), *_centre_and_border(masks))


# ---------------------------------------------------------------- exact counts

@pytest.mark.parametrize("mask_type", ["block", "random", "release"])
@pytest.mark.parametrize("grid,total,block_budget", GRIDS)
def test_builder_masks_have_exact_count_and_shape(mask_type, grid, total, block_budget):
    gen = build_masking_generator(mask_type, grid, total, num_block_patches=block_budget)
    shape = (grid, grid) if isinstance(grid, int) else tuple(grid)
    assert gen.get_shape() == shape
    for mask in _draw(gen, 300, seed=1):
        assert mask.shape == shape and mask.dtype == bool
        assert int(mask.sum()) == total


@pytest.mark.parametrize("budget", [120, 147])
def test_block_masks_reach_their_budget_exactly(budget):
    # BEiT's give-up after ten useless draws left 544 of 2,000 such masks short (101..119 of 120)
    gen = build_masking_generator("block", 14, budget, min_num_patches=16, max_num_patches=60)
    counts = {int(m.sum()) for m in _draw(gen, 2000, seed=4)}
    assert counts == {budget}


@pytest.mark.parametrize("total,budget", [(147, 120), (160, 147)])
def test_release_block_stage_reaches_its_budget_exactly(total, budget):
    gen = ReleaseMaskingGenerator(14, total, budget, min_num_patches=16, max_num_patches=60, max_swap=3)
    rng = random.Random(5)
    for _ in range(2000):
        # the block stage draws first, from the Random itself: a copy of its state replays it
        replay = random.Random()
        replay.setstate(rng.getstate())
        block = gen.block(replay)
        mask = gen(rng)
        assert int(block.sum()) == budget
        assert int(mask.sum()) == total
        assert int((block & ~mask).sum()) <= 3


def test_plain_block_generator_hits_budget_with_small_blocks_on_a_small_grid():
    # 8x8 grid, blocks of 40..60 cells: a 7x7 block at most, so the last cells need overlapping blocks
    gen = MaskingGenerator(8, 60, min_num_patches=40, max_num_patches=60)
    assert {int(m.sum()) for m in _draw(gen, 200, seed=3)} == {60}


# What the release's generator gives after random.seed(0) (14x14, blocks of 16..60): its first mask with
# budget 120, the sha256 of its first 200 masks packed with np.packbits, and the next random.random().
RELEASE_FIRST_MASK_120 = """
..............
....xxxxxx....
...xxxxxxx....
xxxxxxxxxxxx..
xxxxxxxxxxxx..
xxxxxxxxxxxx..
xxxxxxxxxxxx..
xxxxxxxxxxxx..
xxxxxxxxxxxx..
xxxxxxxxxx....
xxxxxxxxxx....
xxxxx..x......
xxxxx.........
......xxxx....
"""
RELEASE_200_MASKS = {
    120: ("4a7261d538a18c3bb38cbe8bf087a5d9a591a2f70b680e31ac60252e70563000", 0.5700425667779513),
    147: ("9cb303f542aadb7d3107f33044ab1a85f86e47d77af16d9d34f2b686d3a86d86", 0.21533748329491853),
}


@pytest.mark.parametrize("budget", [120, 147])
def test_block_stage_gives_the_release_masks_for_the_same_random_state(budget):
    gen = MaskingGenerator(14, budget, min_num_patches=16, max_num_patches=60)
    rng = random.Random(0)
    masks = np.stack([gen(rng) for _ in range(200)])
    if budget == 120:
        rows = RELEASE_FIRST_MASK_120.split()
        assert np.array_equal(masks[0], np.array([[c == "x" for c in row] for row in rows]))
    digest, next_draw = RELEASE_200_MASKS[budget]
    assert hashlib.sha256(np.packbits(masks).tobytes()).hexdigest() == digest
    # and the same number of draws: the stream continues where the release's does
    assert rng.random() == next_draw


# ------------------------------------------------------------ rectangle limits

class _RecordingGenerator(MaskingGenerator):
    def __init__(self, *args, **kwargs):
        self.placements = []
        super().__init__(*args, **kwargs)
        self.placements.clear()

    def _place_one(self, mask, max_mask, rng):
        before = mask.copy()
        added = super()._place_one(mask, max_mask, rng)
        self.placements.append((before, mask.copy(), max_mask, added))
        return added


def test_each_placement_is_one_rectangle_within_limits():
    gen = _RecordingGenerator(14, 147, min_num_patches=16, max_num_patches=40)
    for _ in _draw(gen, 100, seed=5):
        pass
    for before, after, max_mask, added in gen.placements:
        new = after & ~before
        assert int(new.sum()) == added
        assert max_mask <= 40
        assert 0 < added <= max_mask
        rows, cols = np.nonzero(new)
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        # the new cells fill their bounding box except where already masked
        assert after[top:bottom, left:right].all()
        assert bottom - top < 14 and right - left < 14
    assert len(gen.placements) > 300


def test_first_placement_area_and_aspect_with_budget_equal_to_max():
    gen = _RecordingGenerator(14, 40, min_num_patches=16, max_num_patches=40, min_aspect=0.3)
    for seed in range(200):
        gen.placements.clear()
        gen(np.random.default_rng(seed))
        before, after, max_mask, added = gen.placements[0]
        assert not before.any() and max_mask == 40
        rows, cols = np.nonzero(after)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert h * w == added <= 40
        # area is drawn from [16, 40]; rounding of the sides may shift it a little
        assert h * w >= 12
        # aspect within [0.3, 1/0.3], loosened for the rounding of short sides
        assert 0.2 <= h / w <= 5.0


# ------------------------------------------------------------------ statistics

def test_release_masks_are_several_regions_biased_to_the_centre():
    gen = build_masking_generator("release", 14, 147, num_block_patches=120)
    mean_regions, centre, border = _regions_centre_and_border(gen, 500, seed=6)
    # measured 5.88 (std 1.95 per mask) over 2000 masks
    assert 5.4 < mean_regions < 6.7
    # measured centre 0.93, border 0.55
    assert centre > border + 0.25


def test_pure_block_masks_are_about_one_region():
    gen = MaskingGenerator(14, 75)
    mean_regions, centre, border = _regions_centre_and_border(gen, 500, seed=7)
    # measured 1.48 (std 0.6) over 2000 masks
    assert 1.2 < mean_regions < 1.8
    # measured centre 0.69, border 0.14
    assert centre > border + 0.4


def test_block_type_stays_mostly_one_region():
    gen = build_masking_generator("block", 14, 147)
    mean_regions = np.mean([count_regions(m) for m in _draw(gen, 300, seed=8)])
    # measured 1.05 over 2000 masks
    assert mean_regions < 1.6


def test_random_masks_are_spatially_uniform():
    gen = build_masking_generator("random", 14, 147)
    masks = _draw(gen, 500, seed=9)
    centre, border = _centre_and_border(masks)
    # both should be 147/196 = 0.75
    assert abs(centre - 0.75) < 0.04 and abs(border - 0.75) < 0.03
    mean_regions = np.mean([count_regions(m) for m in masks])
    # measured 2.73 over 2000 masks; scattered cells, not blocks
    assert 2.3 < mean_regions < 3.2


def test_release_swaps_at_most_max_swap_block_cells():
    gen = ReleaseMaskingGenerator(14, 147, 120, max_swap=3)
    unmasked_counts = []
    for seed in range(200):
        # the block stage consumes the first draws, so the same seed replays it
        block = gen.block(np.random.default_rng(seed))
        mask = gen(np.random.default_rng(seed))
        unmasked_counts.append(int((block & ~mask).sum()))
    assert max(unmasked_counts) <= 3
    assert set(unmasked_counts) == {0, 1, 2, 3}

    no_swap = ReleaseMaskingGenerator(14, 147, 120, max_swap=0)
    for seed in range(50):
        block = no_swap.block(np.random.default_rng(seed))
        mask = no_swap(np.random.default_rng(seed))
        assert not (block & ~mask).any()


# -------------------------------------------------------------- reproducibility

@pytest.mark.parametrize("mask_type", ["block", "random", "release"])
def test_same_seed_gives_same_masks(mask_type):
    def draws(seed):
        gen = build_masking_generator(mask_type, 14, 147, num_block_patches=120,
                                      rng=np.random.default_rng(seed))
        return [gen() for _ in range(5)]

    first, again, other = draws(10), draws(10), draws(11)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_default_rng_follows_torch_seed_in_main_process():
    torch = pytest.importorskip("torch")

    def draws():
        gen = build_masking_generator("release", 14, 147, num_block_patches=120)
        return [gen() for _ in range(3)]

    torch.manual_seed(123)
    first = draws()
    torch.manual_seed(123)
    again = draws()
    torch.manual_seed(124)
    other = draws()
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


class _MaskDataset:
    def __init__(self):
        self.gen = build_masking_generator("release", 14, 147, num_block_patches=120)

    def __len__(self):
        return 8

    def __getitem__(self, index):
        import torch
        info = torch.utils.data.get_worker_info()
        return torch.from_numpy(self.gen()), info.id


def test_dataloader_workers_draw_different_reproducible_masks():
    torch = pytest.importorskip("torch")
    dataset = _MaskDataset()
    # a call in the parent first: the forked workers must not reuse this stream
    dataset.gen()

    def load():
        torch.manual_seed(7)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, timeout=120)
        per_worker = {0: [], 1: []}
        for mask, worker in loader:
            per_worker[int(worker)].append(mask.numpy())
        return per_worker

    first, again = load(), load()
    assert len(first[0]) == len(first[1]) == 4
    assert not any(np.array_equal(a, b) for a, b in zip(first[0], first[1]))
    for worker in (0, 1):
        assert all(np.array_equal(a, b) for a, b in zip(first[worker], again[worker]))



class _BlockDataset:
    def __init__(self):
        self.gen = build_masking_generator("block", 14, 120)

    def __len__(self):
        return 3

    def __getitem__(self, index):
        import torch
        return torch.from_numpy(self.gen()), torch.utils.data.get_worker_info().seed


def test_worker_block_stage_is_the_stream_torch_seeds_python_random_with():
    # torch seeds each worker's `random` with the worker seed, the stream the release's generator drew from
    torch = pytest.importorskip("torch")
    torch.manual_seed(3)
    loaded = list(torch.utils.data.DataLoader(_BlockDataset(), batch_size=None, num_workers=1, timeout=120))
    seed = int(loaded[0][1])
    replay = MaskingGenerator(14, 120, min_num_patches=16, max_num_patches=60)
    python_random = random.Random(seed)
    for mask, _ in loaded:
        assert np.array_equal(mask.numpy(), replay(python_random))


# ---------------------------------------------------------------------- errors

def test_error_unknown_mask_type():
    with pytest.raises(ValueError, match="'blocks'.*block, random, release"):
        build_masking_generator("blocks", 14, 147)


@pytest.mark.parametrize("mask_type", ["block", "random", "release"])
def test_error_mask_num_not_below_patch_count(mask_type):
    with pytest.raises(ValueError, match=r"--mask_num 196 must be below the number of patches 196"):
        build_masking_generator(mask_type, 14, 196, num_block_patches=120)
    with pytest.raises(ValueError, match=r"--mask_num 250 .* patches 240"):
        build_masking_generator(mask_type, (12, 20), 250, num_block_patches=120)


@pytest.mark.parametrize("value", [0, -5])
def test_error_mask_num_not_positive(value):
    with pytest.raises(ValueError, match=rf"--mask_num {value} must be positive"):
        build_masking_generator("random", 14, value)


def test_error_block_budget_above_mask_num():
    with pytest.raises(ValueError,
                       match=r"--num_mask_patches \(block budget\) 150 must not exceed --mask_num 147"):
        build_masking_generator("release", 14, 147, num_block_patches=150)


def test_error_release_without_block_budget():
    with pytest.raises(ValueError, match="--num_mask_patches"):
        build_masking_generator("release", 14, 147)


@pytest.mark.parametrize("mask_type", ["block", "release"])
def test_error_min_patches_above_max(mask_type):
    with pytest.raises(ValueError, match="min_num_patches 70 must not exceed max_num_patches 60"):
        build_masking_generator(mask_type, 14, 147, num_block_patches=120,
                                min_num_patches=70, max_num_patches=60)
    with pytest.raises(ValueError, match="min_num_patches 30 must not exceed max_num_patches 20"):
        MaskingGenerator(14, 75, min_num_patches=30, max_num_patches=20)



@pytest.mark.parametrize("mask_type", ["block", "release"])
def test_error_block_budget_that_cannot_be_placed(mask_type):
    # a 2x2 grid only takes 1x1 blocks, and blocks of at least 16 patches (or of the 3 still missing)
    # never round to 1x1: the release's generator would loop forever
    with pytest.raises(ValueError, match=r"cannot reach its budget of 3 patches on the 2x2 grid with blocks.*; lower "
                                         r"--min_mask_patches_per_block or the block budget \(--num_mask_patches"):
        build_masking_generator(mask_type, 2, 3, num_block_patches=3)


def test_error_rng_of_another_kind():
    with pytest.raises(TypeError, match="numpy.random.Generator or a random.Random, got int"):
        build_masking_generator("release", 14, 147, num_block_patches=120, rng=7)


# ----------------------------------------------------------------- count_regions

def test_count_regions_uses_four_connectivity():
    assert count_regions(np.zeros((4, 4), dtype=bool)) == 0
    assert count_regions(np.ones((3, 5), dtype=bool)) == 1
    diagonal = np.eye(4, dtype=bool)
    assert count_regions(diagonal) == 4
    shape = np.array([[1, 1, 0, 1],
                      [0, 1, 0, 1],
                      [0, 1, 1, 1],
                      [1, 0, 0, 0]], dtype=bool)
    assert count_regions(shape) == 2


def test_repr_shows_settings():
    text = repr(build_masking_generator("release", 14, 147, num_block_patches=120))
    for part in ("14x14", "147", "120", "max_swap=3"):
        assert part in text
    assert "75" in repr(MaskingGenerator(14, 75))
